"""Storage: only HMAC-SHA256(pepper, key) and its pepper version are kept. The canary: keys used every
way a client might (header, query string under `warn`, Referer, cookie, body) appear nowhere but in
the create/rotate answers and in the bodies the clients themselves sent."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from gateway.clock import Clock
from gateway.keys.format import generate
from tests.helpers.gateway import RunningGateway
from tests.helpers.upstream import RecordingUpstream

from .conftest import Start
from .support import ADMIN_TOKEN, PEPPER, bearer, call, cli, new_key, problem


async def test_only_the_peppered_digest_is_stored(gw: RunningGateway) -> None:
    rec, key = await new_key(gw, scopes=["orders:read"])
    stored = await gw.services.store.get_key(rec.id)
    assert stored is not None
    assert stored.digest == hmac.digest(PEPPER.encode(), key.encode(), hashlib.sha256)
    assert stored.pepper_version == 1
    assert stored.hint == f"sk_live_…{key[-4:]}"
    found = await gw.services.store.find_by_digests([stored.digest])
    assert found is not None and found.id == rec.id
    assert await gw.services.store.find_by_digests([hashlib.sha256(key.encode()).digest()]) is None
    assert key not in json.dumps(rec.public())


async def _table_text(store_url: str, schema: str) -> str:
    conn = await asyncpg.connect(store_url.split("?")[0], timeout=10)
    try:
        tables = [r["table_name"] for r in await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", schema)]
        assert {"api_keys", "audit_log"} <= set(tables)
        rows = []
        for t in tables:
            rows += [r[0] for r in await conn.fetch(f'SELECT t::text FROM "{schema}"."{t}" AS t')]
        assert rows
        return "\n".join(rows)
    finally:
        await conn.close()


async def test_canary(start: Start, up: RecordingUpstream, store_url: str, pg_schema: str | None,
                      config_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    gw = await start(clock=Clock())  # keys are also made by the CLI, on the real clock
    raw: list[str] = []
    shown: list[str] = []  # what the CLI and admin API printed, except the create/rotate answers

    rec, key = await new_key(gw, scopes=["orders:*"])
    raw.append(key)
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession(gw.admin_url, headers=admin) as s:
        async with s.post("/admin/keys", json={"owner": "erin", "scopes": ["orders:read"]}) as r:
            assert r.status == 201
            created = await r.json()
            raw.append(created["key"])
        async with s.post(f"/admin/keys/{rec.id}/rotate", json={"grace": "1h"}) as r:
            assert r.status == 201
            raw.append((await r.json())["key"])
    made = await cli(config_file, "keys", "create", "--owner", "frank", "--scope", "orders:read", "--json")
    assert made.code == 0, made.err
    raw.append(made.json()["key"])
    assert all(len(k) == len(raw[0]) for k in raw) and len(set(raw)) == 4

    answers = []
    for key in raw:
        body = json.dumps({"note": "the client's own copy", "token": key}).encode()
        carriers = [("Referer", f"https://app.example/settings?api_key={key}&tab=2"),
                    ("Cookie", f"theme=dark; api_key={key}")]
        answers += [
            await call(gw, "POST", f"/warn/submit?a=1&api_key={key}&b=2", bearer(key) + carriers, body),
            await call(gw, "GET", f"/warn/page?api_key={key}&next=/cb%3Ftoken%3D{key}", carriers),
            await call(gw, "GET", "/orders/1", [("X-API-Key", key), carriers[0]]),
        ]
        problem(await call(gw, "GET", f"/any/x?api_key={key}", carriers), 400, "api_key_in_query")
        assert (await call(gw, "GET", "/open/x", bearer(generate("sk", "live")))).status == 200
    assert [a.status for a in answers] == [200] * len(answers)
    await gw.services.flush_last_used()
    problem(await call(gw, "GET", "/any/x", bearer(raw[0][:-1] + ("0" if raw[0][-1] != "0" else "1"))), 401, "invalid_api_key")

    # what the client got back
    for a in answers:
        assert not any(k in a.head.decode("latin-1") or k.encode() in a.body for k in raw)

    # the upstream: in the bodies the clients sent, nowhere else
    received = bytes(up.received)
    assert up.requests
    in_bodies = 0
    for req in up.requests:
        text = req.target + b"\n" + b"\n".join(n + b": " + v for n, v in req.headers)
        for k in raw:
            assert k.encode() not in text, (k, text)
            in_bodies += req.body.count(k.encode())
    assert sum(received.count(k.encode()) for k in raw) == in_bodies == len(raw)
    referers = [req.header("referer") for req in up.requests if req.header("referer")]
    assert referers and all("REDACTED" in r and "tab=2" in r for r in referers)
    assert b"/warn/page?next=/cb%3Ftoken%3DREDACTED-API-KEY" in received

    # management output: CLI and admin API
    commands = (("keys", "list", "--json"), ("keys", "show", rec.id), ("audit", "--json"))
    for args, run in zip(commands, await asyncio.gather(*(cli(config_file, *c) for c in commands)), strict=True):
        assert run.code == 0, (args, run.err)
        shown.append(run.out + run.err)
    assert {k["hint"][:9] for k in json.loads(shown[0])} == {"sk_live_…"}
    assert rec.id in shown[1] and created["id"] in shown[2]
    async with aiohttp.ClientSession(gw.admin_url, headers=admin) as s:
        for path in ("/admin/keys", f"/admin/keys/{rec.id}", "/admin/audit", "/metrics"):
            async with s.get(path) as r:
                assert r.status == 200
                shown.append(await r.text())
    assert "gateway_query_key_total" in shown[-1]
    for text in shown:
        assert not any(k in text for k in raw)

    # logs
    logged = caplog.text + "\n".join(r.getMessage() for r in caplog.records)
    assert not any(k in logged for k in raw)

    # the store itself
    if pg_schema is None:
        db = Path(store_url.removeprefix("sqlite:///"))
        files = [p for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")) if p.exists()]
        data = b"".join(p.read_bytes() for p in files)
        assert len(data) > 0
        assert not any(k.encode() in data for k in raw)
        await gw.close()
        data = b"".join(p.read_bytes() for p in (db, Path(f"{db}-wal")) if p.exists())
        assert not any(k.encode() in data for k in raw)
    else:
        text = await _table_text(store_url, pg_schema)
        assert "erin" in text and "frank" in text
        assert not any(k in text for k in raw)
    for key in raw:
        # nor any long piece of it (the hint's last four characters are all that is kept)
        assert key[8:40] not in logged and not any(key[8:40] in t for t in shown)
