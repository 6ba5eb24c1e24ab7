"""What the anomaly tests through the proxy share: the config, HTTP calls, the CLI, metrics."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.gateway import RunningGateway
from tests.helpers.polling import wait_for
from tests.helpers.processes import cli  # noqa: F401 - the suite imports it from here

PEPPER = "pepper-for-the-anomaly-tests-0123456789"
ADMIN_TOKEN = "admin-token-for-the-anomaly-tests-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
T = TypeVar("T")


def config_data(db: Path, up: str, anomalies: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0", "token": ADMIN_TOKEN},
        "store": f"sqlite:///{db}",
        "keys": {"pepper": PEPPER},
        "auth": {"max_failures": 1_000_000},  # the brute-force throttle would answer 429 to bad keys
        "anomalies": {"window": "60s", **(anomalies or {})},
        "routes": [
            {"name": "api", "path": "/api", "upstream": up},
            {"name": "orders", "path": "/orders", "upstream": up, "scopes": ["orders:read"]},
        ],
    }


@dataclass
class Resp:
    status: int
    content_type: str
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def call(gw: RunningGateway, key: str | None, target: str = "/api/x") -> Resp:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    async with aiohttp.ClientSession() as s, s.get(gw.url + target, headers=headers) as r:
        return Resp(r.status, r.headers.get("Content-Type", ""), await r.read())


async def calls(gw: RunningGateway, key: str, n: int, target: str = "/api/x") -> list[int]:
    """`n` requests one after the other on one connection; their statuses."""
    out = []
    async with aiohttp.ClientSession() as s:
        for _ in range(n):
            async with s.get(gw.url + target, headers={"Authorization": f"Bearer {key}"}) as r:
                await r.read()
                out.append(r.status)
    return out


def assert_problem(resp: Resp, status: int, code: str) -> None:
    assert resp.status == status, (resp.status, resp.body)
    assert resp.content_type == "application/problem+json", resp.content_type
    doc = resp.json()
    assert doc["code"] == code and doc["status"] == status, doc


async def eventually(check: Callable[[], Awaitable[T | None]], timeout: float = 5.0) -> T:
    """Poll `check` until it returns something truthy (events are recorded by a background task)."""
    result: T = await wait_for(check, timeout, 0.01, "the check")
    return result


def anomalies_total(gw: RunningGateway) -> dict[str, float]:
    """gateway_anomalies_total by kind, as a scrape would read it."""
    text = generate_latest(gw.services.metrics.registry).decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "gateway_anomalies_total":
                out[sample.labels["kind"]] = sample.value
    return out
