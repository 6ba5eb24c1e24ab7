"""What the key tests share: a config builder, a raw HTTP/1.1 client, the CLI as a subprocess, and
small assertions on problem+json answers.

The client speaks raw bytes over asyncio streams, so a test controls every header line (repeated
headers, odd spellings, lowercase methods) and sees every response header exactly as sent.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gateway.config.schema import GatewayConfig
from gateway.keys.model import KeyRecord
from tests.helpers.gateway import RunningGateway

REPO = Path(__file__).resolve().parent.parent.parent
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


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# --- the CLI ---------------------------------------------------------------------------------------


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["PYTHONPATH"] = str(REPO)
    return env


async def cli(config: Path, *args: str, timeout: float = 30.0) -> Run:
    """`python -m gateway -c CONFIG ARGS…` in a subprocess, without blocking the test's loop."""
    argv = [sys.executable, "-m", "gateway", "-c", str(config), *args]

    def run() -> Run:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=cli_env(),
                           cwd=config.parent, check=False)
        return Run(p.returncode, p.stdout, p.stderr)

    return await asyncio.to_thread(run)


# --- raw HTTP --------------------------------------------------------------------------------------


@dataclass
class Resp:
    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""
    head: bytes = b""

    def header(self, name: str) -> str | None:
        for n, v in self.headers:
            if n.lower() == name.lower():
                return v
        return None

    def all(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def code(self) -> str | None:
        if self.header("content-type") != "application/problem+json":
            return None
        return str(self.json().get("code"))


def request_bytes(method: str, target: str, headers: list[tuple[str, str]] | None = None,
                  body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: gateway.test"]
    lines += [f"{n}: {v}" for n, v in headers or []]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Conn:
    """One keep-alive connection; requests may be pipelined with `many`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1") -> Conn:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def read_response(self, head_only: bool = False, timeout: float = 10.0) -> Resp:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
        lines = head[:-4].decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.append((name, value.strip()))
        resp = Resp(status, headers, head=head)
        length = resp.header("content-length")
        if head_only or status in (204, 304):
            return resp
        if length is not None:
            resp.body = await asyncio.wait_for(self.reader.readexactly(int(length)), timeout)
        elif (resp.header("transfer-encoding") or "").lower() == "chunked":
            body = b""
            while True:
                size = int((await asyncio.wait_for(self.reader.readuntil(b"\r\n"), timeout)).strip(), 16)
                chunk = await asyncio.wait_for(self.reader.readexactly(size + 2), timeout)
                if size == 0:
                    break
                body += chunk[:-2]
            resp.body = body
        return resp

    async def request(self, method: str, target: str, headers: list[tuple[str, str]] | None = None,
                      body: bytes = b"") -> Resp:
        self.writer.write(request_bytes(method, target, headers, body))
        await self.writer.drain()
        return await self.read_response(head_only=method.upper() == "HEAD")

    async def many(self, requests: list[bytes]) -> list[Resp]:
        """Pipeline the raw requests, then read one response for each."""
        self.writer.write(b"".join(requests))
        await self.writer.drain()
        return [await self.read_response() for _ in requests]

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass


async def call(gw: RunningGateway, method: str, target: str, headers: list[tuple[str, str]] | None = None,
               body: bytes = b"") -> Resp:
    """One request on a fresh connection."""
    conn = await Conn.open(gw.port)
    try:
        return await conn.request(method, target, headers, body)
    finally:
        await conn.close()


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


def metric(gw: RunningGateway, name: str, **labels: str) -> float:
    value = gw.services.metrics.registry.get_sample_value(name, labels)
    return float(value or 0.0)
