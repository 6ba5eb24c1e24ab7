"""The admin API over the admin listener: authentication (token or an `admin` key) and its audit,
the key endpoints, the audit trail, problem+json for bad input, and the OpenAPI document."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.helpers.gateway import RunningGateway

from .support import ADMIN_TOKEN, bearer, call, new_key

KEY = re.compile(r"sk_(live|test)_[0-9A-Za-z]{49}")
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
async def admin(gw: RunningGateway) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(gw.admin_url, headers=AUTH) as s:
        yield s


async def _problem(resp: aiohttp.ClientResponse, status: int, code: str) -> dict[str, Any]:
    assert resp.status == status, (resp.status, await resp.text())
    assert resp.content_type == "application/problem+json"
    doc: dict[str, Any] = await resp.json(content_type=None)
    assert doc["code"] == code and doc["status"] == status and doc["detail"]
    return doc


async def test_admin_authentication(gw: RunningGateway) -> None:
    _, admin_key = await new_key(gw, "ops", scopes=["admin"])
    _, star_key = await new_key(gw, "root", scopes=["*"])
    _, plain_key = await new_key(gw, "app", scopes=["orders:read"])
    revoked_rec, revoked_admin = await new_key(gw, "old-ops", scopes=["admin"])
    await gw.services.keys.revoke(revoked_rec.id)
    async with aiohttp.ClientSession(gw.admin_url) as s:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {ADMIN_TOKEN}"},
                        {"Authorization": f"Bearer {ADMIN_TOKEN}x"}, {"Authorization": f"Bearer {plain_key}"},
                        {"Authorization": f"Bearer {revoked_admin}"}, {"X-API-Key": admin_key},
                        {"Authorization": f"Bearer {star_key}"}):  # `*` is for the APIs, not key management
            async with s.get("/admin/keys", headers=headers) as r:
                await _problem(r, 401, "admin_unauthorized")
                assert r.headers["WWW-Authenticate"].startswith("Bearer")
        for key in (ADMIN_TOKEN, admin_key):
            async with s.get("/admin/keys", headers={"Authorization": f"Bearer {key}"}) as r:
                assert r.status == 200
        async with s.post("/admin/keys", json={"owner": "made-by-key"},
                          headers={"Authorization": f"Bearer {admin_key}"}) as r:
            assert r.status == 201
            made = await r.json()
        # health and metrics need no token; the OpenAPI document neither
        for path in ("/healthz", "/metrics", "/admin/openapi.json"):
            async with s.get(path) as r:
                assert r.status == 200, path
    entries = await gw.services.keys.audit()
    failures = [e for e in entries if e.action == "admin_auth_failed"]
    assert len(failures) == 8
    for e in failures:
        assert e.source_ip == "127.0.0.1" and e.actor == "anonymous" and e.key_id is None
        assert e.change["path"] == "/admin/keys"
    assert failures[-1].change["credentials"] is False  # the first, without any Authorization
    created = [e for e in entries if e.action == "create" and e.key_id == made["id"]]
    assert created[0].actor.startswith("key:") and created[0].source_ip == "127.0.0.1"
    text = " ".join(str(e.public()) for e in entries)
    for secret in (admin_key, star_key, plain_key, revoked_admin, ADMIN_TOKEN, "wrong"):
        assert secret not in text


async def test_admin_token_unset_means_keys_only(start: Any) -> None:
    gw = await start(admin={"listen": "127.0.0.1:0", "token": ""})
    _, admin_key = await new_key(gw, "ops", scopes=["admin"])
    async with aiohttp.ClientSession(gw.admin_url) as s:
        async with s.get("/admin/keys", headers={"Authorization": "Bearer "}) as r:
            assert r.status == 401
        async with s.get("/admin/keys", headers={"Authorization": f"Bearer {admin_key}"}) as r:
            assert r.status == 200


async def test_key_endpoints(gw: RunningGateway, admin: aiohttp.ClientSession) -> None:
    async with admin.post("/admin/keys", json={
        "owner": "acme", "name": "web", "env": "test", "scopes": ["orders:read"], "allow_ips": ["127.0.0.1"],
        "limits": ["100/minute"], "ttl": "30d"}) as r:
        assert r.status == 201
        doc = await r.json()
    key, key_id = doc["key"], doc["id"]
    assert KEY.fullmatch(key) and key.startswith("sk_test_")
    assert {"id", "key", "owner", "env", "scopes", "expires_at"} <= set(doc)
    assert doc["allow_ips"] == ["127.0.0.1/32"] and doc["hint"] == f"sk_test_…{key[-4:]}"
    assert (await call(gw, "GET", "/orders/1", bearer(key))).status == 200

    async with admin.get("/admin/keys") as r:
        listed = (await r.json())["keys"]
    async with admin.get("/admin/keys", params={"owner": "nobody"}) as r:
        assert (await r.json())["keys"] == []
    async with admin.get(f"/admin/keys/{key_id}") as r:
        assert r.status == 200
        shown = await r.json()
    for d in (*listed, shown):
        assert "key" not in d and "digest" not in d
    assert key not in str(listed) + str(shown)
    assert shown["id"] == key_id and shown["status"] == "active"

    async with admin.patch(f"/admin/keys/{key_id}", json={"scopes": ["orders:write"], "allow_ips": []}) as r:
        assert r.status == 200
        patched = await r.json()
    assert patched["scopes"] == ["orders:write"] and patched["allow_ips"] == []
    assert patched["limits"] == ["100/minute"]  # not given: kept
    r2 = await call(gw, "GET", "/orders/1", bearer(key))
    assert r2.status == 403  # the change applies at once in this process

    async with admin.post(f"/admin/keys/{key_id}/rotate", json={"grace": "2h"}) as r:
        assert r.status == 201
        rotated = await r.json()
    assert KEY.fullmatch(rotated["key"]) and rotated["id"] != key_id
    assert rotated["scopes"] == ["orders:write"] and rotated["env"] == "test" and rotated["owner"] == "acme"
    assert rotated["previous"]["rotated_to"] == rotated["id"]
    async with admin.post(f"/admin/keys/{key_id}/rotate") as r:
        await _problem(r, 409, "conflict")

    async with admin.post(f"/admin/keys/{rotated['id']}/revoke", json={"reason": "leaked"}) as r:
        assert r.status == 200
        assert (await r.json())["status"] == "revoked"
    assert (await call(gw, "POST", "/orders", bearer(rotated["key"]), b"{}")).status == 401
    async with admin.post(f"/admin/keys/{rotated['id']}/rotate", json={}) as r:
        await _problem(r, 409, "conflict")
    async with admin.post(f"/admin/keys/{key_id}/revoke") as r:  # no body
        assert r.status == 200

    async with admin.get("/admin/audit") as r:
        entries = (await r.json())["entries"]
    async with admin.get("/admin/audit", params={"key_id": key_id, "since": "1h"}) as r:
        mine = (await r.json())["entries"]
    actions = [e["action"] for e in entries]
    assert {"create", "update", "rotate", "revoke"} <= set(actions)
    assert {e["action"] for e in mine} == {"create", "update", "rotate", "revoke"}
    for e in entries:
        assert {"at", "action", "actor", "source_ip", "key_id", "change"} <= set(e)
        if e["action"] != "admin_auth_failed":
            assert e["actor"] == "admin-token" and e["source_ip"] == "127.0.0.1"
    update = next(e for e in mine if e["action"] == "update")
    assert update["change"]["scopes"] == {"from": ["orders:read"], "to": ["orders:write"]}
    assert key not in str(entries) and rotated["key"] not in str(entries)


BAD_BODIES: list[Any] = [
    {"owner": "eve\n"},
    {"owner": "o", "scopes": ["orders:read\n"]},
    {"owner": "o", "allow_ips": ["10.0.0.0/33"]},
    {"owner": "o", "allow_ips": ["not-an-ip"]},
    {"owner": "o", "allow_ips": [7]},
    {"owner": "o", "scopes": ["Orders:Read"]},
    {"owner": "o", "scopes": "orders:read"},
    {"owner": "o", "scopes": [None]},
    {"owner": "o", "ttl": "10x"},
    {"owner": "o", "ttl": 30},
    {"owner": "o", "limits": ["100/fortnight"]},
    {"owner": "o", "limits": [{"n": 1}]},
    {"owner": "o", "env": "prod"},
    {"owner": "o", "no_expiry": "yes"},
    {"owner": "o", "unknown_field": 1},
    {"owner": ""},
    {"owner": 12},
    {"name": "no owner"},
    [],
    "just a string",
]


async def test_bad_input(gw: RunningGateway, admin: aiohttp.ClientSession) -> None:
    rec, _ = await new_key(gw, scopes=["orders:read"])
    store = gw.services.store

    async def snapshot() -> tuple[list[object], int]:
        return [k.public() for k in await store.list_keys()], len(await store.list_audit())

    before = await snapshot()
    for body in BAD_BODIES:
        async with admin.post("/admin/keys", json=body) as r:
            await _problem(r, 400, "invalid_input")
    for raw in (b"{", b"\xff\xfe", b"null"):
        async with admin.post("/admin/keys", data=raw, headers={"Content-Type": "application/json"}) as r:
            await _problem(r, 400, "invalid_input")
    for body in ({"scopes": ["ok:read"], "allow_ips": ["999.0.0.0/8"]}, {"ttl": "soon"}, {"owner": "x"},
                 {"limits": ["1/decade"]}, {"name": 5}):
        async with admin.patch(f"/admin/keys/{rec.id}", json=body) as r:
            await _problem(r, 400, "invalid_input")
    async with admin.post(f"/admin/keys/{rec.id}/rotate", json={"grace": "a while"}) as r:
        await _problem(r, 400, "invalid_input")
    async with admin.post(f"/admin/keys/{rec.id}/rotate", json={"grace": 3600}) as r:
        await _problem(r, 400, "invalid_input")
    async with admin.post(f"/admin/keys/{rec.id}/revoke", json={"reason": 5}) as r:
        await _problem(r, 400, "invalid_input")
    async with admin.get("/admin/audit", params={"since": "yesterday"}) as r:
        await _problem(r, 400, "invalid_input")
    unknown = "key_" + "C" * 20
    for method, path in (("GET", f"/admin/keys/{unknown}"), ("PATCH", f"/admin/keys/{unknown}"),
                         ("POST", f"/admin/keys/{unknown}/revoke"), ("POST", f"/admin/keys/{unknown}/rotate"),
                         ("GET", "/admin/keys/nonsense")):
        async with admin.request(method, path, json={"scopes": ["a:b"]} if method == "PATCH" else None) as r:
            doc = await _problem(r, 404, "key_not_found")
            assert path.rsplit("/", 2)[1 if path.endswith(("revoke", "rotate")) else 2] in doc["detail"]
    assert await snapshot() == before


async def test_openapi(admin: aiohttp.ClientSession) -> None:
    async with admin.get("/admin/openapi.json") as r:
        assert r.status == 200
        assert r.content_type == "application/json"
        doc = await r.json()
    assert doc["openapi"].startswith("3.")
    paths = doc["paths"]
    expected = {
        "/admin/keys": {"get", "post"},
        "/admin/keys/{id}": {"get", "patch"},
        "/admin/keys/{id}/revoke": {"post"},
        "/admin/keys/{id}/rotate": {"post"},
        "/admin/audit": {"get"},
        "/admin/usage": {"get"},
    }
    for path, methods in expected.items():
        assert methods <= set(paths[path]), path
        for op in paths[path].values():
            assert "responses" in op and "summary" in op
    assert doc["paths"]["/admin/keys"]["post"]["responses"]["201"]
    assert "bearer" in str(doc["components"]["securitySchemes"])
