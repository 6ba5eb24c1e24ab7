"""Authentication: where a key may come from, how many, the query-string policy, auth modes, and
the answers for missing, unknown, revoked, malformed and expired keys."""

from __future__ import annotations

import json
import re

from gateway.clock import FakeClock
from gateway.keys.format import generate
from tests.helpers.gateway import RunningGateway
from tests.helpers.raw_http import Conn
from tests.helpers.upstream import RecordingUpstream

from .conftest import Start
from .support import bearer, call, count_store_calls, metric, new_key, problem


async def test_bearer_and_x_api_key_are_accepted_and_removed(gw: RunningGateway, up: RecordingUpstream) -> None:
    _, key = await new_key(gw)
    r1 = await call(gw, "GET", "/any/a", bearer(key))
    r2 = await call(gw, "GET", "/any/b", [("X-API-Key", key)])
    r3 = await call(gw, "GET", "/any/c", [("authorization", f"bearer   {key}  ")])
    assert (r1.status, r2.status, r3.status) == (200, 200, 200)
    for req in up.requests:
        assert req.header("authorization") is None
        assert req.header("x-api-key") is None
        assert key.encode() not in bytes(up.received)


async def test_basic_auth_is_not_a_key(gw: RunningGateway, up: RecordingUpstream) -> None:
    r = await call(gw, "GET", "/any/x", [("Authorization", "Basic dXNlcjpwYXNz")])
    problem(r, 401, "missing_api_key")
    assert r.header("www-authenticate") == 'Bearer realm="gateway"'
    _, key = await new_key(gw)
    r = await call(gw, "GET", "/any/x", [("Authorization", "Basic dXNlcjpwYXNz"), ("X-API-Key", key)])
    assert r.status == 200
    assert len(up.requests) == 1


async def test_no_key_is_401_missing(gw: RunningGateway, up: RecordingUpstream) -> None:
    r = await call(gw, "GET", "/any/x")
    problem(r, 401, "missing_api_key")
    assert r.header("www-authenticate") == 'Bearer realm="gateway"'
    assert not up.requests


async def test_two_keys_or_a_repeated_key_header_is_400(gw: RunningGateway, up: RecordingUpstream) -> None:
    _, k1 = await new_key(gw)
    _, k2 = await new_key(gw)
    cases = [
        [("Authorization", f"Bearer {k1}"), ("X-API-Key", k2)],
        [("X-API-Key", k1), ("X-API-Key", k2)],
        [("X-API-Key", k1), ("X-API-Key", k1)],
        [("Authorization", f"Bearer {k1}"), ("Authorization", f"Bearer {k1}")],
        [("Authorization", f"Bearer {k1}"), ("Authorization", f"Bearer {k2}")],
    ]
    for headers in cases:
        problem(await call(gw, "GET", "/any/x", headers), 400, "multiple_api_keys")
    # a header key and a different one in the query (policy warn)
    problem(await call(gw, "GET", f"/warn/x?api_key={k2}", bearer(k1)), 400, "multiple_api_keys")
    problem(await call(gw, "GET", f"/warn/x?api_key={k1}&apikey={k2}"), 400, "multiple_api_keys")
    assert not up.requests


async def test_query_key_rejected_by_default(gw: RunningGateway, up: RecordingUpstream) -> None:
    _, key = await new_key(gw)
    for target in (f"/any/x?api_key={key}", f"/any/x?a=1&apikey={key}", f"/any/x?api%5Fkey={key}",
                   f"/any/x?b=2&%61pi_key={key}"):
        doc = problem(await call(gw, "GET", target, bearer(key)), 400, "api_key_in_query")
        assert "header" in doc["detail"]
        doc = problem(await call(gw, "POST", target, body=b"payload"), 400, "api_key_in_query")
    assert not up.requests
    assert not up.received
    assert metric(gw, "gateway_query_key_total", route="any", action="rejected") == 8
    assert metric(gw, "gateway_query_key_total", route="any", action="warned") == 0


async def test_query_key_warn_accepts_and_strips_the_parameter(gw: RunningGateway, up: RecordingUpstream) -> None:
    rec, key = await new_key(gw)
    r = await call(gw, "GET", f"/warn/x?a=1&api_key={key}&b=2&c=3&b=1")
    assert r.status == 200
    warning = r.header("x-gateway-warning")
    assert warning is not None and warning.startswith("api-key-in-query")
    assert up.requests[-1].target == b"/warn/x?a=1&b=2&c=3&b=1"
    assert up.requests[-1].header("x-credential-identifier") == rec.id
    r = await call(gw, "GET", f"/warn/y?apikey={key}")
    assert r.status == 200 and r.header("x-gateway-warning")
    assert up.requests[-1].target == b"/warn/y"
    # the same key in a header and in the query is one key
    r = await call(gw, "GET", f"/warn/z?z=9&api_key={key}", bearer(key))
    assert r.status == 200
    assert up.requests[-1].target == b"/warn/z?z=9"
    assert metric(gw, "gateway_query_key_total", route="warn", action="warned") == 3
    assert key.encode() not in bytes(up.received)
    # a bad key in the query under warn is still a bad key
    problem(await call(gw, "GET", "/warn/x?api_key=sk_live_nope"), 401, "invalid_api_key")


async def test_a_key_under_another_query_name_never_reaches_the_upstream(
    gw: RunningGateway, up: RecordingUpstream
) -> None:
    """`apikey[]` is `apikey` to PHP and Rails, and a key sent as `token=` is still a key: on an
    optional route these went upstream, key and all."""
    rec, key = await new_key(gw)
    for target in (f"/opt/x?apikey[]={key}&a=1", f"/opt/x?apikey%5B%5D={key}", f"/opt/x?token={key}",
                   f"/any/x?api_key[]={key}", f"/any/x?q=1&t={key}"):
        problem(await call(gw, "GET", target), 400, "api_key_in_query")
    assert not up.requests
    # under warn: the key is used, and the parameter stripped whatever its name
    r = await call(gw, "GET", f"/warn/x?a=1&apikey[]={key}&b=2")
    assert r.status == 200
    assert up.requests[-1].target == b"/warn/x?a=1&b=2"
    assert up.requests[-1].header("x-credential-identifier") == rec.id
    r = await call(gw, "GET", f"/warn/y?token={key}")
    assert r.status == 200 and up.requests[-1].target == b"/warn/y"
    assert key.encode() not in bytes(up.received)
    # inside another parameter: refused under either policy, unless it is the key the request
    # authenticates with, written plainly, which is replaced where it stands (tests/keys/test_storage.py)
    _, other = await new_key(gw)
    for target in (f"/opt/x?a=1;api_key={key}", f"/opt/x?q=Bearer%20{key}", f"/opt/x?next=%2Fcb%3Fapi_key%3D{key}",
                   f"/warn/x?q=Bearer+{key}"):
        problem(await call(gw, "GET", target), 400, "api_key_in_query")  # no other key: nothing to match
    for target in (f"/any/x?a=1;token={other}", f"/any/x?q=Bearer%20{other}", f"/warn/x?api_key={key}&n=%2F%3Fk%3D{other}",
                   f"/any/x?a=1;token=%73{key[1:]}"):  # another key, or ours written with an escape
        problem(await call(gw, "GET", target, bearer(key)), 400, "api_key_in_query")
    r = await call(gw, "GET", f"/any/x?a=1;token={key}", bearer(key))
    assert r.status == 200 and up.requests[-1].target == b"/any/x?a=1;token=REDACTED-API-KEY"
    assert key.encode() not in bytes(up.received) and other.encode() not in bytes(up.received)
    # a value that only looks like a key at a glance is left alone
    r = await call(gw, "GET", "/opt/x?q=sk_live_notakey")
    assert r.status == 200 and up.requests[-1].target == b"/opt/x?q=sk_live_notakey"


async def test_route_policy_overrides_the_global_one(start: Start, up: RecordingUpstream) -> None:
    routes = [
        {"name": "strict", "path": "/strict", "upstream": up.url, "query_key_policy": "reject"},
        {"name": "lax", "path": "/lax", "upstream": up.url},
    ]
    gw = await start(routes, keys={"query": {"policy": "warn"}})
    _, key = await new_key(gw)
    problem(await call(gw, "GET", f"/strict/x?api_key={key}"), 400, "api_key_in_query")
    r = await call(gw, "GET", f"/lax/x?q=1&api_key={key}")
    assert r.status == 200 and r.header("x-gateway-warning")
    assert [q.target for q in up.requests] == [b"/lax/x?q=1"]
    assert metric(gw, "gateway_query_key_total", route="strict", action="rejected") == 1
    assert metric(gw, "gateway_query_key_total", route="lax", action="warned") == 1


async def test_auth_optional(gw: RunningGateway, up: RecordingUpstream) -> None:
    r = await call(gw, "GET", "/opt/x", [("X-Consumer-ID", "forged")])
    assert r.status == 200
    assert up.requests[-1].header("x-consumer-id") is None
    assert up.requests[-1].header("x-credential-identifier") is None
    problem(await call(gw, "GET", "/opt/x", [("X-API-Key", "sk_live_bad")]), 401, "invalid_api_key")
    problem(await call(gw, "GET", "/opt/x", [("X-API-Key", generate("sk", "live"))]), 401, "invalid_api_key")
    rec, key = await new_key(gw)
    assert (await call(gw, "GET", "/opt/x", [("X-API-Key", key)])).status == 200
    assert up.requests[-1].header("x-consumer-id") == "alice"
    assert up.requests[-1].header("x-credential-identifier") == rec.id
    assert up.requests[-1].header("x-api-key") is None


async def test_auth_none_leaves_credentials_alone(gw: RunningGateway, up: RecordingUpstream) -> None:
    calls = count_store_calls(gw.services.store)
    r = await call(gw, "GET", "/open/x?api_key=whatever",
                   [("Authorization", "Bearer not-a-key"), ("X-API-Key", "also-not-a-key")])
    assert r.status == 200
    req = up.requests[-1]
    assert req.header("authorization") == "Bearer not-a-key"
    assert req.header("x-api-key") == "also-not-a-key"
    assert req.target == b"/open/x?api_key=whatever"
    assert req.header("x-consumer-id") is None
    assert calls.counts == {}


def _normalised(resp_body: bytes) -> bytes:
    doc = json.loads(resp_body)
    assert re.fullmatch(r"[0-9a-f-]{36}", doc["request_id"])
    return re.sub(rb'"request_id":"[0-9a-f-]{36}"', b'"request_id":"X"', resp_body)


async def test_unknown_revoked_and_malformed_keys_get_identical_answers(gw: RunningGateway) -> None:
    rec, revoked = await new_key(gw)
    assert (await call(gw, "GET", "/any/x", bearer(revoked))).status == 200  # cached now
    await gw.services.keys.revoke(rec.id)
    unknown = generate("sk", "live")
    answers = [
        await call(gw, "GET", "/any/x", bearer(unknown)),
        await call(gw, "GET", "/any/x", bearer(revoked)),
        await call(gw, "GET", "/any/x", bearer(revoked[:-1] + ("A" if revoked[-1] != "A" else "B"))),
        await call(gw, "GET", "/any/x", bearer(unknown)),  # now from the negative cache
    ]
    for r in answers:
        problem(r, 401, "invalid_api_key")
        assert r.header("www-authenticate") == 'Bearer realm="gateway"'
    first = answers[0]
    skip = {"date", "x-request-id"}
    expected_headers = [(n, v) for n, v in first.headers if n.lower() not in skip]
    for r in answers[1:]:
        assert _normalised(r.body) == _normalised(first.body)
        assert [(n, v) for n, v in r.headers if n.lower() not in skip] == expected_headers
        assert [n for n, _ in r.headers] == [n for n, _ in first.headers]


async def test_expired_key_is_401_expired(gw: RunningGateway, clock: FakeClock) -> None:
    _, key = await new_key(gw, ttl="1h")
    assert (await call(gw, "GET", "/any/x", bearer(key))).status == 200
    clock.advance(3600 - 1)
    assert (await call(gw, "GET", "/any/x", bearer(key))).status == 200
    clock.advance(1)
    r = await call(gw, "GET", "/any/x", bearer(key))
    problem(r, 401, "expired_api_key")
    assert r.header("www-authenticate") == 'Bearer realm="gateway"'
    assert metric(gw, "gateway_auth_rejections_total", reason="expired") == 1


async def test_expect_100_continue_only_once_the_key_is_checked(gw: RunningGateway, up: RecordingUpstream) -> None:
    """A client waiting on 100-continue must not be told to send its body before its key passed:
    without a key, or with a bad one, the answer is the refusal, and the connection closes."""
    _, key = await new_key(gw)
    head = "POST /any/x HTTP/1.1\r\nHost: gateway.test\r\nContent-Length: 5000000\r\nExpect: 100-continue\r\n"
    for extra in ("", "X-API-Key: sk_live_notakey\r\n", f"X-API-Key: {key[:-1]}{'A' if key[-1] != 'A' else 'B'}\r\n"):
        conn = await Conn.open(gw.port)
        try:
            conn.writer.write((head + extra + "\r\n").encode())
            r = await conn.read_response()
            assert r.status == 401 and r.code in ("missing_api_key", "invalid_api_key"), r.head
            assert r.header("connection") == "close"
            assert await conn.reader.read() == b""  # closed, and no 100 Continue came before the 401
        finally:
            await conn.close()
    conn = await Conn.open(gw.port)
    try:
        conn.writer.write(
            f"POST /any/x HTTP/1.1\r\nHost: gateway.test\r\nContent-Length: 5\r\nExpect: 100-continue\r\n"
            f"X-API-Key: {key}\r\n\r\n".encode()
        )
        assert (await conn.read_response()).status == 100
        conn.writer.write(b"hello")
        assert (await conn.read_response()).status == 200
    finally:
        await conn.close()
    assert [r.body for r in up.requests] == [b"hello"]
