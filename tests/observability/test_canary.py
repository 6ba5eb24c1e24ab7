"""A canary key sent every way a client might send it appears nowhere it should not.

Two canaries: a real key (created, so it is found and used) and a made-up one that is well formed
(its checksum is right, so it reaches the cache and the store lookup). Each is sent in the
credential headers (Authorization, X-API-Key, a custom header from `keys.headers`), in the query
string (policy warn and reject), in the body, in a malformed header line (a parser error), in the
Referer and a Cookie, in an oversized header section, and after revocation. Then the raw key must
be in no log line (DEBUG, with exception text), no metric, no usage record, no audit row, no access
log line, no spool file, no response, and nowhere in what the upstream received, except inside a
body the client itself sent.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from gateway.keys.format import generate
from tests.helpers.upstream import RecordingUpstream
from tests.usage.conftest import Start
from tests.usage.support import (
    ADMIN_TOKEN,
    Conn,
    GatewayProcess,
    Resp,
    call,
    config_data,
    default_routes,
    http_get,
    request_bytes,
)

CUSTOM = "X-Custom-Key"


def settings(up: str, tmp_path: Path) -> dict[str, Any]:
    """Keys in a custom header too; the detector on with low thresholds, so it logs and audits."""
    return {
        "routes": default_routes(up),
        "usage": {"access_log": str(tmp_path / "access.log"), "spool_dir": str(tmp_path / "spool")},
        "keys": {"headers": ["authorization", "x-api-key", CUSTOM.lower()]},
        "anomalies": {"enabled": True, "auth_failures": {"per_ip": 3, "per_prefix": 2},
                      "scope_refusals": {"threshold": 2}},
    }


def attempts(key: str) -> list[tuple[str, bytes]]:
    """(name, raw request) for every way the key is sent; names starting with `body` carry it in the body."""
    referer = f"https://app.example/page?api_key={key}&x=1"
    return [
        ("x-api-key", request_bytes("GET", "/orders/1", [("X-API-Key", key)])),
        ("authorization", request_bytes("GET", "/orders/2", [("Authorization", f"Bearer {key}")])),
        ("custom", request_bytes("GET", "/orders/3", [(CUSTOM, key)])),
        ("lowercase-scheme", request_bytes("GET", "/orders/4", [("Authorization", f"bearer {key}")])),
        ("query-warn", request_bytes("GET", f"/warn/5?api_key={key}&page=2")),
        ("query-warn-encoded", request_bytes("GET", f"/warn/6?api%5Fkey={key}")),
        ("query-reject", request_bytes("GET", f"/orders/7?api_key={key}")),
        ("query-and-header", request_bytes("GET", f"/orders/8?apikey={key}", [("X-API-Key", key)])),
        ("referer", request_bytes("GET", "/orders/9", [("X-API-Key", key), ("Referer", referer)])),
        ("cookie", request_bytes("GET", "/orders/10", [("Authorization", f"Bearer {key}"),
                                                        ("Cookie", f"session=abc; api_key={key}")])),
        ("referer-only", request_bytes("GET", "/orders/11", [("Referer", referer)])),
        ("two-keys", request_bytes("GET", "/orders/12", [("X-API-Key", key), ("Authorization", f"Bearer {key}")])),
        ("scope", request_bytes("GET", "/reports/13", [("X-API-Key", key)])),
        ("scope-again", request_bytes("GET", "/reports/14", [("X-API-Key", key)])),
        ("body-open", request_bytes("POST", "/open/15", [("Content-Type", "application/json")],
                                    f'{{"api_key": "{key}"}}'.encode())),
        ("body-keyed", request_bytes("POST", "/orders", [("X-API-Key", key)], f"token={key}".encode())),
        ("body-too-large", request_bytes("POST", "/small", [("X-API-Key", key)], key.encode() * 2)),
        ("malformed-line", f"GET /orders/16 HTTP/1.1\r\nHost: gateway.test\r\nX-API-Key: {key}\r\n"
                           f"this line has no colon {key}\r\n\r\n".encode()),
        ("control-char", f"GET /orders/17 HTTP/1.1\r\nHost: gateway.test\r\nX-API-Key: {key}\x01\r\n\r\n".encode()),
        ("bad-path", request_bytes("GET", f"/orders/%2e%2e/{key}", [("X-API-Key", key)])),
        ("too-large-head", request_bytes("GET", "/orders/18", [("X-API-Key", key), ("X-Filler", "f" * 40000)])),
        ("no-route", request_bytes("GET", "/nowhere", [("X-API-Key", key), ("Referer", referer)])),
    ]


async def send_all(port: int, key: str) -> list[tuple[str, Resp | None]]:
    out: list[tuple[str, Resp | None]] = []
    for name, raw in attempts(key):
        conn = await Conn.open(port)
        try:
            out.append((name, await conn.send(raw)))
        except (asyncio.IncompleteReadError, ConnectionError):
            out.append((name, None))  # closed without an answer: nothing to check in it
        finally:
            await conn.close()
    return out


def dump_sqlite(path: str) -> str:
    conn = sqlite3.connect(path)
    try:
        return "\n".join(conn.iterdump())
    finally:
        conn.close()


def files_text(folder: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in folder.rglob("*") if p.is_file()
                   and not p.name.endswith((".db", ".db-wal", ".db-shm")))


def check_upstream(up: RecordingUpstream, keys: list[str]) -> None:
    """The key reaches the upstream only inside a body its client sent."""
    assert up.requests, "nothing reached the upstream"
    for req in up.requests:
        for key in keys:
            k = key.encode()
            assert k not in req.target, req.target
            for name, value in req.headers:
                assert k not in value, (name, value)
            if k in req.body:
                assert req.method == "POST" and req.target in (b"/open/15", b"/orders"), req.target
    assert any(keys[0].encode() in req.body for req in up.requests)  # the body the client sent is intact


def check_responses(sent: list[tuple[str, Resp | None]], keys: list[str]) -> None:
    for name, resp in sent:
        if resp is None:
            continue
        blob = resp.body + repr(resp.headers).encode()
        for key in keys:
            assert key.encode() not in blob, (name, resp.status, resp.body)


def formatted(records: list[logging.LogRecord]) -> str:
    fmt = logging.Formatter("%(name)s %(levelname)s %(message)s")
    out = []
    for r in records:
        out.append(fmt.format(r))  # message, args and exception text with its traceback
        out.append(repr(r.args))
        if r.exc_info and r.exc_info[1] is not None:
            out.append(repr(r.exc_info[1].args))
    return "\n".join(out)


async def test_canary_key_in_process(start: Start, up: RecordingUpstream, tmp_path: Path,
                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    extra = settings(up.url, tmp_path)
    gw = await start(extra.pop("routes"), usage=extra.pop("usage"), **extra)
    real_record, real = await gw.services.keys.create("alice", scopes=["orders:read", "orders:write"])
    fake = generate("sk", "live")
    assert fake != real
    sent = await send_all(gw.port, real) + await send_all(gw.port, fake)
    statuses = dict((name, r.status if r else None) for name, r in sent[: len(sent) // 2])
    assert statuses["x-api-key"] == statuses["authorization"] == statuses["custom"] == 200
    assert statuses["query-warn"] == 200 and statuses["referer"] == 200 and statuses["cookie"] == 200
    assert statuses["query-reject"] == 400 and statuses["referer-only"] == 401
    assert statuses["malformed-line"] == 400 and statuses["control-char"] == 400
    assert statuses["too-large-head"] == 431

    # revoked: the same key once more, through the admin API
    revoked = await call(gw.admin_port, "POST", f"/admin/keys/{real_record.id}/revoke",
                         [("Authorization", f"Bearer {ADMIN_TOKEN}"), ("Content-Type", "application/json")],
                         b'{"reason": "canary"}')
    assert revoked.status == 200, revoked.body
    sent += await send_all(gw.port, real)
    await gw.services.flush_last_used()
    metrics = (await call(gw.admin_port, "GET", "/metrics")).body.decode()
    audit = (await call(gw.admin_port, "GET", "/admin/audit?since=1d",
                        [("Authorization", f"Bearer {ADMIN_TOKEN}")])).body.decode()
    anomalies = [r for r in caplog.records if r.name.startswith("gateway") and "anomaly" in r.getMessage()]
    assert anomalies, "the detector was expected to log"
    await gw.close()  # the usage queue is flushed to the store

    keys = [real, fake]
    logs = formatted(caplog.records) + caplog.text
    db = dump_sqlite(str(tmp_path / "gateway.db"))
    assert real_record.id in db and "insufficient_scope" in db  # it does hold the usage and audit rows
    spooled = files_text(tmp_path / "spool") if (tmp_path / "spool").exists() else ""
    access_log = (tmp_path / "access.log").read_text()
    assert access_log.count("\n") >= 40
    for key in keys:
        assert key not in logs
        assert key not in metrics
        assert key not in audit
        assert key not in db
        assert key not in access_log
        assert key not in spooled
    check_responses(sent, keys)
    check_upstream(up, keys)


async def test_canary_key_with_gateway_run(tmp_path: Path, up: RecordingUpstream) -> None:
    extra = settings(up.url, tmp_path)
    extra["usage"]["access_log"] = "-"
    data = config_data(f"sqlite:///{tmp_path / 'gateway.db'}", up.url, **extra)
    gw = GatewayProcess(tmp_path, data, log_level="DEBUG")
    try:
        await asyncio.to_thread(gw.wait_ready)
        created = await call(gw.admin_port, "POST", "/admin/keys",
                             [("Authorization", f"Bearer {ADMIN_TOKEN}"), ("Content-Type", "application/json")],
                             b'{"owner": "alice", "scopes": ["orders:read", "orders:write"]}')
        assert created.status == 201, created.body
        real = created.json()["key"]
        fake = generate("sk", "live")
        sent = await send_all(gw.port, real)
        assert {name: r.status if r else None for name, r in sent}["x-api-key"] == 200
        sent += await send_all(gw.port, fake)
        status, metrics = await asyncio.to_thread(http_get, gw.admin_url + "/metrics")
        assert status == 200
    finally:
        code = await asyncio.to_thread(gw.stop_checked)
    assert code == 0, gw.stderr()[-3000:]
    out, err = gw.stdout(), gw.stderr()
    assert out.count("\n") >= 30  # the access log is on stdout
    assert "DEBUG" in err or "INFO" in err
    db = dump_sqlite(str(tmp_path / "gateway.db"))
    for key in (real, fake):
        assert key not in out
        assert key not in err
        assert key.encode() not in metrics
        assert key not in db
    check_responses(sent, [real, fake])
    check_upstream(up, [real, fake])


@pytest.mark.parametrize("real", [True, False])
async def test_a_key_only_in_the_referer_of_an_optional_route_is_not_forwarded(
    start: Start, up: RecordingUpstream, real: bool
) -> None:
    """`auth: optional` runs the key stage, which sees the Referer: a well-formed key there (a page
    URL with ?api_key=…) must not reach the upstream even when no credential header came with it."""
    gw = await start([*default_routes(up.url), {"name": "opt", "path": "/opt", "upstream": up.url,
                                                 "auth": "optional"}])
    key = (await gw.services.keys.create("alice"))[1] if real else generate("sk", "live")
    resp = await call(gw.port, "GET", "/opt/page", [("Referer", f"https://app.example/?api_key={key}")])
    assert resp.status == 200
    check_upstream_headers(up, key)


def check_upstream_headers(up: RecordingUpstream, key: str) -> None:
    for req in up.requests:
        assert key.encode() not in req.target
        for name, value in req.headers:
            assert key.encode() not in value, (name, value)
