"""What the key tests share: a config builder, a raw HTTP/1.1 client, the CLI as a subprocess, and
small assertions on problem+json answers.

The client speaks raw bytes over asyncio streams, so a test controls every header line (repeated
headers, odd spellings, lowercase methods) and sees every response header exactly as sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.config.schema import GatewayConfig
from gateway.keys.model import KeyRecord
from tests.helpers.gateway import RunningGateway, metric  # noqa: F401 - the suite imports metric from here
from tests.helpers.processes import cli  # noqa: F401 - the suite imports it from here
from tests.helpers.raw_http import Conn, Resp, request_bytes  # noqa: F401 - the suite imports them from here
from tests.helpers.raw_http import call as raw_call

PEPPER = "pepper-for-the-key-tests-0123456789"
ADMIN_TOKEN = "admin-token-for-the-key-tests-0123456789"
SIGNING_KEY = "identity-signing-key-for-tests-0123456789"

# Routes every key test can use; `up` is the recording upstream's URL.
def default_routes(up: str) -> list[dict[str, Any]]:
    return [
        {"name": "orders", "path": "/orders", "upstream": up,
         "scopes": {"GET": ["orders:read"], "POST": ["orders:write"]}},
        {"name": "reports", "path": "/reports", "upstream": up, "scopes": ["reports:read"]},
        {"name": "any", "path": "/any", "upstream": up},
        {"name": "warn", "path": "/warn", "upstream": up, "query_key_policy": "warn"},
        {"name": "opt", "path": "/opt", "upstream": up, "auth": "optional"},
        {"name": "open", "path": "/open", "upstream": up, "auth": "none"},
        {"name": "live", "path": "/live", "upstream": up, "env": "live"},
    ]


def config_data(store_url: str, up: str, routes: list[dict[str, Any]] | None = None,
                keys: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    """The config as plain data (written to YAML for the CLI, validated for in-process gateways)."""
    data: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0", "token": ADMIN_TOKEN},
        "store": store_url,
        "keys": {"pepper": PEPPER, **(keys or {})},
        # the brute-force throttle (tested with rate limits) would answer 429 to the many bad keys here
        "auth": {"max_failures": 1_000_000},
        "routes": routes if routes is not None else default_routes(up),
    }
    data.update(top)
    return data


def validate(data: dict[str, Any]) -> GatewayConfig:
    return GatewayConfig.model_validate(data)


# --- the CLI ---------------------------------------------------------------------------------------


# --- raw HTTP --------------------------------------------------------------------------------------


async def call(gw: RunningGateway, method: str, target: str, headers: list[tuple[str, str]] | None = None,
               body: bytes = b"") -> Resp:
    """One request on a fresh connection."""
    return await raw_call(gw.port, method, target, headers, body)


def bearer(key: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {key}")]


def problem(resp: Resp, status: int, code: str) -> dict[str, Any]:
    """Assert a problem+json answer with this status and code; return its document."""
    assert resp.status == status, (resp.status, resp.body)
    assert resp.header("content-type") == "application/problem+json", resp.headers
    doc: dict[str, Any] = resp.json()
    assert doc["code"] == code, doc
    assert doc["status"] == status
    return doc


# --- counting store traffic ------------------------------------------------------------------------


@dataclass
class StoreCalls:
    """Counts calls to the store's methods by name, wrapping them on the instance."""

    counts: dict[str, int] = field(default_factory=dict)

    def __getitem__(self, name: str) -> int:
        return self.counts.get(name, 0)

    @property
    def writes(self) -> int:
        return sum(self[n] for n in ("insert_key", "update_key", "rotate", "set_digest", "touch", "add_audit"))


def count_store_calls(store: Any) -> StoreCalls:
    calls = StoreCalls()
    for name in ("find_by_digests", "get_key", "list_keys", "insert_key", "update_key", "rotate", "set_digest",
                 "touch", "add_audit", "list_audit"):
        original = getattr(store, name)

        def wrapper(*a: Any, _name: str = name, _original: Any = original, **kw: Any) -> Any:
            calls.counts[_name] = calls.counts.get(_name, 0) + 1
            return _original(*a, **kw)

        setattr(store, name, wrapper)
    return calls


async def new_key(gw: RunningGateway, owner: str = "alice", **kw: Any) -> tuple[KeyRecord, str]:
    """Create a key through the service layer; returns the record and the raw key."""
    return await gw.services.keys.create(owner, **kw)
