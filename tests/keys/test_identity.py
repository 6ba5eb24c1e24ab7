"""What the upstream learns about the caller: the credential removed, client-sent identity headers
removed on every route, the gateway's own added, and an optional signed identity."""

from __future__ import annotations

import base64
import json
from dataclasses import replace

import pytest

from gateway.clock import FakeClock
from gateway.identity import InvalidIdentity, verify
from tests.helpers.gateway import RunningGateway
from tests.helpers.upstream import RecordingUpstream

from .conftest import Start
from .support import SIGNING_KEY, bearer, call, new_key

FORGED = [
    ("X-Consumer-ID", "forged"),
    ("X_Consumer_ID", "forged"),
    ("X.Consumer.ID", "forged"),
    ("x-consumer-id", "forged"),
    ("X-Credential-Identifier", "forged"),
    ("X_Credential.Identifier", "forged"),
    ("X-Consumer-Scopes", "*"),
    ("X-Consumer-Env", "live"),
    ("X-Gateway-Identity", "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0."),
    ("X.Gateway_Identity", "forged"),
]
RESERVED = {b"x-consumer-id", b"x-credential-identifier", b"x-consumer-scopes", b"x-consumer-env",
            b"x-gateway-identity"}


def canonical(name: bytes) -> bytes:
    return name.lower().replace(b"_", b"-").replace(b".", b"-")


def identity_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(canonical(n), v) for n, v in headers if canonical(n) in RESERVED]


async def test_forged_identity_headers_are_removed_on_every_route(gw: RunningGateway, up: RecordingUpstream) -> None:
    rec, key = await new_key(gw, "carol", scopes=["orders:read", "reports:read"])
    for target, headers in (("/open/x", []), ("/opt/x", []), ("/any/x", bearer(key)),
                            ("/orders/1", [("X-API-Key", key)])):
        r = await call(gw, "GET", target, FORGED + headers)
        assert r.status == 200, (target, r.body)
    open_req, opt_req, any_req, orders_req = up.requests
    assert identity_headers(open_req.headers) == []
    assert identity_headers(opt_req.headers) == []
    for req in (any_req, orders_req):
        assert identity_headers(req.headers) == [
            (b"x-consumer-id", b"carol"),
            (b"x-credential-identifier", rec.id.encode()),
            (b"x-consumer-scopes", b"orders:read reports:read"),
            (b"x-consumer-env", b"live"),
        ]
        assert req.header("authorization") is None and req.header("x-api-key") is None
        assert b"forged" not in b"".join(v for _, v in req.headers)
    assert key.encode() not in bytes(up.received)


async def test_a_stored_owner_or_scope_with_a_line_break_never_breaks_the_upstream_head(
    gw: RunningGateway, up: RecordingUpstream
) -> None:
    """Input checks refuse them now; a row written before (or by hand) must still not inject a header."""
    rec, key = await new_key(gw, "eve", scopes=["orders:read"])
    bad = replace(rec, owner="eve\r\nx-injected: 1", scopes=("orders:read\n", "*\x01"))
    await gw.services.store.update_key(bad, None)
    gw.services.cache.invalidate(rec.id)
    r = await call(gw, "GET", "/any/x", bearer(key))
    assert r.status == 200, r.body
    req = up.requests[-1]
    assert req.header("x-injected") is None
    assert identity_headers(req.headers)[:1] == [(b"x-consumer-id", b"eve%0D%0Ax-injected: 1")]
    assert req.header("x-consumer-scopes") == "orders:read%0A *%01"


async def test_identity_headers_cannot_be_smuggled_with_underscores_allowed(
    start: Start, up: RecordingUpstream
) -> None:
    gw = await start(headers_with_underscores="allow")
    await new_key(gw)
    r = await call(gw, "GET", "/open/x", FORGED)
    assert r.status == 200
    assert identity_headers(up.requests[-1].headers) == []


async def test_signed_identity(start: Start, up: RecordingUpstream, clock: FakeClock) -> None:
    gw = await start(identity={"signing_key": SIGNING_KEY})
    rec, key = await new_key(gw, "dave", env="test", scopes=["orders:read"])
    r = await call(gw, "GET", "/orders/7", [*bearer(key), ("X-Gateway-Identity", "forged")])
    assert r.status == 200
    req = up.requests[-1]
    tokens = req.all("x-gateway-identity")
    assert len(tokens) == 1
    token = tokens[0]
    claims = verify(token, SIGNING_KEY, now=clock.time())
    assert claims["kid"] == rec.id
    assert claims["sub"] == "dave"
    assert claims["scopes"] == ["orders:read"]
    assert claims["env"] == "test"
    assert claims["rid"] == req.header("x-request-id") == r.header("x-request-id")
    assert claims["iat"] == int(clock.time())
    assert 0 < claims["exp"] - claims["iat"] <= 60
    assert verify(token, SIGNING_KEY.encode(), now=clock.time()) == claims
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header["alg"] == "HS256"

    # tampered payload, wrong key, expired, alg none, garbage
    head, payload, sig = token.split(".")
    forged = dict(claims, scopes=["*"])
    forged_payload = base64.urlsafe_b64encode(json.dumps(forged).encode()).rstrip(b"=").decode()
    with pytest.raises(InvalidIdentity):
        verify(f"{head}.{forged_payload}.{sig}", SIGNING_KEY, now=clock.time())
    with pytest.raises(InvalidIdentity):
        verify(token[:-2] + ("AA" if token[-2:] != "AA" else "BB"), SIGNING_KEY, now=clock.time())
    with pytest.raises(InvalidIdentity):
        verify(token, "another-key", now=clock.time())
    with pytest.raises(InvalidIdentity, match="expired"):
        verify(token, SIGNING_KEY, now=claims["exp"] + 60)
    none_head = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
    with pytest.raises(InvalidIdentity):
        verify(f"{none_head}.{payload}.", SIGNING_KEY, now=clock.time())
    for garbage in ("", "a.b", "a.b.c.d", "!!.??.##"):
        with pytest.raises(InvalidIdentity):
            verify(garbage, SIGNING_KEY, now=clock.time())

    # no key on an optional route, no identity at all
    assert (await call(gw, "GET", "/opt/x")).status == 200
    assert up.requests[-1].header("x-gateway-identity") is None


async def test_no_signed_identity_without_a_signing_key(gw: RunningGateway, up: RecordingUpstream) -> None:
    _, key = await new_key(gw)
    assert (await call(gw, "GET", "/any/x", [*bearer(key), ("X-Gateway-Identity", "forged")])).status == 200
    assert up.requests[-1].header("x-gateway-identity") is None


def test_identity_lifetime_is_at_most_60s() -> None:
    from pydantic import ValidationError

    from gateway.config.schema import IdentityConfig

    with pytest.raises(ValidationError):
        IdentityConfig.model_validate({"signing_key": "k", "lifetime": "61s"})
