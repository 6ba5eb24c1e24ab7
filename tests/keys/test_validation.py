"""Every management input is validated by the service layer the CLI and the admin API share, before
anything is written: a refused call leaves the keys and the audit trail as they were."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.clock import FakeClock
from gateway.keys.digest import Pepper, Peppers
from gateway.keys.inputs import Conflict, InvalidInput, KeyNotFound
from gateway.keys.service import KeyService
from tests.helpers.gateway import RunningGateway

from .support import new_key

BAD_CREATE: list[tuple[dict[str, Any], str]] = [
    ({"allow_ips": ["10.0.0.0/33"]}, "allow_ips"),
    ({"allow_ips": ["300.1.1.1"]}, "allow_ips"),
    ({"allow_ips": ["office"]}, "allow_ips"),
    ({"allow_ips": ["10.0.0.0/8", "::1/129"]}, "allow_ips"),
    ({"allow_ips": [""]}, "allow_ips"),
    ({"allow_ips": "10.0.0.0/8"}, "allow_ips"),
    ({"scopes": ["Orders:Read"]}, "scopes"),
    ({"scopes": ["orders read"]}, "scopes"),
    ({"scopes": ["orders::read"]}, "scopes"),
    ({"scopes": ["orders:"]}, "scopes"),
    ({"scopes": [":read"]}, "scopes"),
    ({"scopes": ["or*ders"]}, "scopes"),
    ({"scopes": [""]}, "scopes"),
    ({"scopes": "orders:read"}, "scopes"),
    # `$` matches before a final newline: these passed a `^...$` match and reached a header upstream
    ({"scopes": ["orders:read\n"]}, "scopes"),
    ({"scopes": ["orders:read\r\n"]}, "scopes"),
    ({"scopes": ["*\n"]}, "scopes"),
    ({"ttl": "10x"}, "ttl"),
    ({"ttl": "0s"}, "ttl"),
    ({"ttl": "-1d"}, "ttl"),
    ({"ttl": "90"}, "ttl"),
    ({"ttl": ""}, "ttl"),
    ({"limits": ["100/fortnight"]}, "limits"),
    ({"limits": ["0/minute"]}, "limits"),
    ({"limits": ["lots"]}, "limits"),
    ({"limits": "10/second"}, "limits"),
    ({"limits": ["3/minute", "5/minute"]}, "limits"),
    ({"limits": [10]}, "limits"),
    ({"env": "prod"}, "env"),
    ({"name": "x" * 129}, "name"),
    ({"name": "line\nbreak"}, "name"),
]
BAD_OWNERS = ["", "bad owner!", "-leading", "x" * 129, "tab\there", "eve\n", "eve\r\n", "eve\nx-admin: 1"]


@pytest.mark.parametrize(("fields", "field"), BAD_CREATE)
async def test_create_refuses(fields: dict[str, Any], field: str) -> None:
    # validation comes before any store call: a service without a store shows it
    svc = KeyService(None, Peppers(Pepper(b"p", 1)), "sk", FakeClock(), 90 * 86400.0)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput) as e:
        await svc.create("acme", **fields)
    assert e.value.field == field and e.value.message


@pytest.mark.parametrize("owner", BAD_OWNERS)
async def test_create_refuses_owner(owner: str) -> None:
    svc = KeyService(None, Peppers(Pepper(b"p", 1)), "sk", FakeClock(), 90 * 86400.0)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput) as e:
        await svc.create(owner)
    assert e.value.field == "owner"


async def test_nothing_is_written_on_bad_input(gw: RunningGateway) -> None:
    svc = gw.services.keys
    rec, _ = await new_key(gw, scopes=["orders:read"], allow_ips=["10.0.0.0/8"])
    gone, _ = await new_key(gw)
    await svc.revoke(gone.id)
    store = gw.services.store

    async def snapshot() -> tuple[list[object], int]:
        return [k.public() for k in await store.list_keys()], len(await store.list_audit())

    before = await snapshot()
    for owner in BAD_OWNERS:
        with pytest.raises(InvalidInput):
            await svc.create(owner)
    for fields, _ in BAD_CREATE:
        with pytest.raises(InvalidInput):
            await svc.create("acme", **fields)
        if "env" in fields:
            continue  # a key's env never changes
        with pytest.raises(InvalidInput):
            await svc.update(rec.id, **({"name": "n", "scopes": ["orders:write"]} | fields))
    unknown = "key_" + "B" * 20
    for call in (svc.get(unknown), svc.update(unknown, scopes=["a"]), svc.revoke(unknown), svc.rotate(unknown),
                 svc.get("../etc/passwd"), svc.get("")):
        with pytest.raises(KeyNotFound):
            await call
    for bad_grace in ("forever", "-1h", "1"):
        with pytest.raises(InvalidInput):
            await svc.rotate(rec.id, grace=bad_grace)
    with pytest.raises(InvalidInput):
        await svc.revoke(rec.id, reason="x" * 501)
    with pytest.raises(Conflict):
        await svc.rotate(gone.id)
    with pytest.raises(Conflict):
        await svc.update(gone.id, scopes=["a"])
    with pytest.raises(InvalidInput):
        await svc.audit(since="yesterday")
    assert await snapshot() == before
    # a rotated key cannot be rotated again (rotate the successor)
    await svc.rotate(rec.id)
    with pytest.raises(Conflict):
        await svc.rotate(rec.id)
