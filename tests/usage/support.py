"""What the usage and observability tests share.

- a config builder (in-process gateways and `gateway run` subprocesses use the same data);
- a raw HTTP/1.1 client, so a test controls every byte and sees every response header;
- reading the usage records straight from SQLite or PostgreSQL (not through the gateway's code);
- stopping and starting the throwaway PostgreSQL of scripts/test-services.sh;
- `gateway run` as a subprocess, and parsing /metrics text.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.config.schema import GatewayConfig
from gateway.keys.peppers import sqlite_path
from tests.helpers.configs import write_config
from tests.helpers.net import free_port
from tests.helpers.polling import wait_for
from tests.helpers.processes import cli, cli_env, http_get, stop_process, wait_ready  # noqa: F401 - the suite imports them from here
from tests.helpers.raw_http import Conn, Resp, call, request_bytes  # noqa: F401 - the suite imports them from here

PEPPER = "pepper-for-the-usage-tests-0123456789"
ADMIN_TOKEN = "admin-token-for-the-usage-tests-0123456789"
START_TIMEOUT = 30.0


# --- config ----------------------------------------------------------------------------------------


def default_routes(up: str) -> list[dict[str, Any]]:
    return [
        {"name": "orders", "path": "/orders", "upstream": up,
         "scopes": {"GET": ["orders:read"], "POST": ["orders:write"]}},
        {"name": "reports", "path": "/reports", "upstream": up, "scopes": ["reports:read"]},
        {"name": "small", "path": "/small", "upstream": up, "max_body": 16},
        {"name": "warn", "path": "/warn", "upstream": up, "query_key_policy": "warn"},
        {"name": "open", "path": "/open", "upstream": up, "auth": "none"},
        # nothing listens on port 9 of loopback: 502 upstream_unavailable
        {"name": "down", "path": "/down", "upstream": "http://127.0.0.1:9", "auth": "none"},
    ]


def config_data(store_url: str, up: str, routes: list[dict[str, Any]] | None = None,
                usage: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0", "token": ADMIN_TOKEN},
        "store": store_url,
        "keys": {"pepper": PEPPER},
        # many refusals per test: neither the brute-force throttle nor the detector may get in the way
        "auth": {"max_failures": 1_000_000},
        "anomalies": {"enabled": False},
        "usage": {"flush_interval": "200ms", **(usage or {})},
        "routes": routes if routes is not None else default_routes(up),
    }
    data.update(top)
    return data


def validate(data: dict[str, Any]) -> GatewayConfig:
    return GatewayConfig.model_validate(data)


def bearer(key: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {key}")]


def admin(token: str = ADMIN_TOKEN) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {token}")]


# --- reading the usage records from the store itself ------------------------------------------------

COLUMNS = ("request_id", "at", "key_id", "owner", "env", "route", "method", "status", "upstream_status",
           "latency_ms", "upstream_ms", "bytes_in", "bytes_out", "client_ip", "error_code")


def _pg_connect_args(store_url: str) -> tuple[str, dict[str, str]]:
    """asyncpg takes `?search_path=` as a server setting; pass it explicitly to be sure."""
    parts = urlsplit(store_url)
    settings = {k: v[0] for k, v in parse_qs(parts.query).items()}
    return parts._replace(query="").geturl(), settings


async def pg_connect(store_url: str) -> Any:
    dsn, settings = _pg_connect_args(store_url)
    return await asyncpg.connect(dsn, timeout=10, server_settings=settings)


def _sqlite_rows(path: str) -> list[dict[str, Any]]:
    conn = sqlite3.connect(path, timeout=10)
    try:
        cur = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM usage_records")
        out = []
        for row in cur.fetchall():
            d = dict(zip(COLUMNS, row, strict=True))
            d["at"] = datetime.fromisoformat(d["at"].replace("Z", "+00:00")).timestamp()
            out.append(d)
        return out
    finally:
        conn.close()


async def usage_rows(store_url: str) -> list[dict[str, Any]]:
    """Every raw usage record, read with plain SQL; `at` as epoch seconds."""
    path = sqlite_path(store_url)
    if path is not None:
        return await asyncio.to_thread(_sqlite_rows, str(path))
    conn = await pg_connect(store_url)
    try:
        rows = await conn.fetch(f"SELECT {', '.join(COLUMNS)} FROM usage_records")
    finally:
        await conn.close()
    out = []
    for r in rows:
        d = dict(r)
        d["at"] = d["at"].timestamp()
        out.append(d)
    return out


async def wait_rows(store_url: str, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Wait until exactly n records are stored (fail on more), return them."""
    seen: list[dict[str, Any]] = []

    async def enough() -> bool:
        nonlocal seen
        seen = await usage_rows(store_url)
        assert len(seen) <= n, f"{len(seen)} usage records, expected {n}"
        return len(seen) == n

    await wait_for(enough, timeout, 0.05, f"{n} usage records")
    return seen


# --- the throwaway PostgreSQL of scripts/test-services.sh ------------------------------------------


class Postgres:
    """Stop and start the test PostgreSQL with the variables scripts/test-services.sh exports."""

    def __init__(self) -> None:
        env = os.environ
        names = ("GATEWAY_TEST_PG_BIN", "GATEWAY_TEST_PG_DATA", "GATEWAY_TEST_PG_LOG", "GATEWAY_TEST_PG_OS_USER")
        missing = [n for n in names if not env.get(n)]
        if missing:
            msg = f"{', '.join(missing)} not set: run through `make test` to stop and start PostgreSQL"
            if env.get("GATEWAY_TEST_SERVICES") == "1":
                pytest.fail(msg, pytrace=False)
            pytest.skip(msg)
        self.bin = env["GATEWAY_TEST_PG_BIN"]
        self.data = env["GATEWAY_TEST_PG_DATA"]
        self.log = env["GATEWAY_TEST_PG_LOG"]
        self.user = env["GATEWAY_TEST_PG_OS_USER"]

    def _ctl(self, *args: str) -> None:
        argv = [f"{self.bin}/pg_ctl", "-D", self.data, *args]
        if os.geteuid() == 0 and self.user != "root":
            argv = ["runuser", "-u", self.user, "--", *argv]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd="/", check=False)
        assert p.returncode == 0, f"pg_ctl {' '.join(args)} failed: {p.stdout}{p.stderr}"

    def running(self) -> bool:
        return Path(self.data, "postmaster.pid").exists()

    def stop(self) -> None:
        self._ctl("-m", "fast", "-w", "-t", "30", "stop")

    def start(self) -> None:
        if not self.running():
            self._ctl("-l", self.log, "-w", "-t", "60", "start")

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)

    async def astart(self) -> None:
        await asyncio.to_thread(self.start)


# --- /metrics --------------------------------------------------------------------------------------

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_metrics(text: str) -> Samples:
    """{(sample name, sorted labels): value} of a Prometheus text exposition."""
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


def label_values(samples: Samples, name: str, label: str) -> set[str]:
    return {dict(lab)[label] for (n, lab), _ in samples.items() if n == name and label in dict(lab)}


# --- `gateway run` as a subprocess -----------------------------------------------------------------


class GatewayProcess:
    """`python -m gateway run -c FILE [--workers N]` on free loopback ports; stdout and stderr to files."""

    def __init__(self, workdir: Path, data: dict[str, Any], *, workers: int | None = None,
                 log_level: str = "INFO", name: str = "gateway") -> None:
        self.port = free_port()
        self.admin_port = free_port()
        data = {**data, "listen": f"127.0.0.1:{self.port}",
                "admin": {**data.get("admin", {}), "listen": f"127.0.0.1:{self.admin_port}"}}
        self.config_path = write_config(workdir / f"{name}-{self.port}.yaml", data)
        self.stdout_path = workdir / f"{name}-{self.port}.stdout"
        self.stderr_path = workdir / f"{name}-{self.port}.stderr"
        argv = [sys.executable, "-m", "gateway", "run", "-c", str(self.config_path), "--log-level", log_level]
        if workers is not None:
            argv += ["--workers", str(workers)]
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(argv, cwd=workdir, env=cli_env(), stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=err)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = START_TIMEOUT) -> GatewayProcess:
        wait_ready(self.proc, self.admin_url, self.stderr, timeout)
        return self

    def metrics(self) -> str:
        status, body = http_get(self.admin_url + "/metrics")
        assert status == 200, status
        return body.decode()

    def dropped(self) -> float:
        return total(parse_metrics(self.metrics()), "gateway_usage_dropped_total")

    def stop_checked(self) -> int:
        """SIGTERM, after checking that the gateway dropped no usage record; the exit code."""
        if self.proc.poll() is None:
            assert self.dropped() == 0
        return self.stop()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        return stop_process(self.proc, sig, timeout)
