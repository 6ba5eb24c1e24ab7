"""The optional JSON access log: one line per request, with the usage record's fields, to a file or
to stdout."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from gateway.keys.format import generate
from gateway.usage.record import FIELDS
from tests.helpers.upstream import RecordingUpstream
from tests.usage.conftest import Start
from tests.usage.support import (
    ADMIN_TOKEN,
    GatewayProcess,
    Resp,
    bearer,
    call,
    config_data,
    usage_rows,
    wait_for,
    wait_rows,
)


def lines_of(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


async def traffic(port: int, key: str) -> list[Resp]:
    answers = [
        await call(port, "GET", "/orders/1", bearer(key)),
        await call(port, "POST", "/orders", [("X-API-Key", key)], b'{"n": 1}'),
        await call(port, "GET", "/orders/2"),
        await call(port, "GET", "/orders/3", bearer(generate("sk", "live"))),
        await call(port, "GET", "/nowhere"),
        await call(port, "GET", "/down/1"),
        await call(port, "GET", "/open/1?x=y"),
    ]
    assert [r.status for r in answers] == [200, 200, 401, 401, 404, 502, 200]
    return answers


async def test_access_log_to_a_file_has_one_line_per_request(start: Start, store_url: str, tmp_path: Path) -> None:
    log = tmp_path / "logs" / "access.log"
    log.parent.mkdir()
    gw = await start(usage={"access_log": str(log)})
    record, key = await gw.services.keys.create("alice", scopes=["orders:read", "orders:write"])
    answers = await traffic(gw.port, key)
    # buffered, flushed by the proxy's ticker (a fraction of a second)
    await wait_for(lambda: len(lines_of(log)) >= len(answers), 5, what="the access log lines")
    lines = lines_of(log)
    assert len(lines) == len(answers)
    assert all(list(line) == list(FIELDS) for line in lines)
    assert [line["request_id"] for line in lines] == [r.request_id for r in answers]
    assert [line["status"] for line in lines] == [r.status for r in answers]
    assert [line["key_id"] for line in lines] == [record.id, record.id, None, None, None, None, None]
    assert [line["error_code"] for line in lines] == [None, None, "missing_api_key", "invalid_api_key",
                                                      "no_route", "upstream_unavailable", None]
    assert lines[1]["bytes_in"] == 8 and lines[1]["method"] == "POST" and lines[1]["owner"] == "alice"
    assert all(line["client_ip"] == "127.0.0.1" for line in lines)
    # the same fields and values as the usage records in the store
    rows = {r["request_id"]: r for r in await wait_rows(store_url, len(answers))}
    for line in lines:
        row = rows[line["request_id"]]
        assert row["at"] == pytest.approx(line["at"], abs=1e-3)
        assert {k: v for k, v in line.items() if k != "at"} == {k: v for k, v in row.items() if k != "at"}
    text = log.read_text()
    assert key not in text and ADMIN_TOKEN not in text


async def test_no_access_log_by_default(start: Start, tmp_path: Path, store_url: str) -> None:
    gw = await start()
    assert gw.services.access_log is None
    _, key = await gw.services.keys.create("alice", scopes=["orders:read", "orders:write"])
    await traffic(gw.port, key)
    assert len(await wait_rows(store_url, 7)) == 7  # the usage records do not depend on it


async def test_access_log_to_stdout_of_gateway_run(tmp_path: Path, up: RecordingUpstream) -> None:
    store = f"sqlite:///{tmp_path / 'gateway.db'}"
    data = config_data(store, up.url, usage={"access_log": "-", "spool_dir": str(tmp_path / "spool")})
    gw = GatewayProcess(tmp_path, data, log_level="INFO")
    try:
        await asyncio.to_thread(gw.wait_ready)
        created = await call(gw.admin_port, "POST", "/admin/keys",
                             [("Authorization", f"Bearer {ADMIN_TOKEN}"), ("Content-Type", "application/json")],
                             json.dumps({"owner": "alice", "scopes": ["orders:read", "orders:write"]}).encode())
        assert created.status == 201, created.body
        key, key_id = created.json()["key"], created.json()["id"]
        answers = await traffic(gw.port, key)
    finally:
        code = await asyncio.to_thread(gw.stop_checked)
    assert code == 0, gw.stderr()[-2000:]
    out = gw.stdout().splitlines()
    lines = [json.loads(line) for line in out]  # stdout holds the access log and nothing else
    assert [line["request_id"] for line in lines] == [r.request_id for r in answers]
    assert all(list(line) == list(FIELDS) for line in lines)
    assert [line["key_id"] for line in lines[:2]] == [key_id, key_id]
    assert [line["status"] for line in lines] == [r.status for r in answers]
    assert key not in gw.stdout() and key not in gw.stderr()
    # the program's own log lines go to stderr, never mixed into the JSON lines
    assert "proxy listening" in gw.stderr()
    rows = await usage_rows(store)
    assert {r["request_id"] for r in rows} == {line["request_id"] for line in lines}
