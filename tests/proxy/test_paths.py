"""Path canonicalisation and routing: one canonical form, used to route and sent upstream as is;
anything an upstream could read differently is refused with 400 invalid_path and never forwarded."""

from __future__ import annotations

import pytest

from gateway.http.paths import PathError, canonical_path
from tests.helpers.upstream import RecordingUpstream, ok

from .wire import assert_problem, get, route

CANONICAL = [
    (b"/", b"/"),
    (b"/a/b", b"/a/b"),
    (b"/a/./b", b"/a/b"),
    (b"/a/b/../c", b"/a/c"),
    (b"/a/b/..", b"/a/"),
    (b"/a/b/.", b"/a/b/"),
    (b"/..", b"/"),
    (b"/../a", b"/a"),
    (b"/../../a/../../b", b"/b"),
    (b"/./", b"/"),
    (b"/public/../admin", b"/admin"),
    (b"/admin/./", b"/admin/"),
    (b"/a//b", b"/a/b"),
    (b"//a", b"/a"),
    (b"///a///b//", b"/a/b/"),
    (b"/a/", b"/a/"),
    (b"/%7Euser", b"/~user"),
    (b"/%41%62c", b"/Abc"),
    (b"/a%2d%5f%2E%7e", b"/a-_.~"),  # an escaped dot inside a name is just a dot
    (b"/a%3a", b"/a%3A"),
    (b"/a%20b", b"/a%20b"),
    (b"/a%3Bb", b"/a%3Bb"),
    (b"/a%3fb", b"/a%3Fb"),
    (b"/a%23b", b"/a%23b"),
    (b"/caf%c3%a9", b"/caf%C3%A9"),
    (b"/a;b=c/d", b"/a;b=c/d"),
    (b"/a...b/...", b"/a...b/..."),
    (b"/a/.../b", b"/a/.../b"),
    (b"/.well-known/x", b"/.well-known/x"),
    (b"/a:b@c!$&'()*+,=", b"/a:b@c!$&'()*+,="),
]

REFUSED = [
    b"/a%2Fb",
    b"/a%2fb",
    b"/a%5Cb",
    b"/a%5cb",
    b"/a\\b",
    b"/a%00b",
    b"/a%0Ab",
    b"/a%0d%0aX-Injected:%201",
    b"/a%7Fb",
    b"/a/%2e%2e/b",
    b"/a/%2E%2E/b",
    b"/a/.%2e/b",
    b"/a/%2e./b",
    b"/a/%2e/b",
    b"/public/%2e%2e%2fadmin",
    b"/a/..;x/b",
    b"/a/..;/b",
    b"/a/.;x/b",
    b"/a%",
    b"/a%2",
    b"/a%zz",
    b"/a%%30",
    b"/a#b",
    b"/#/../admin",
    b"/a|b",
    b"/a{b}",
    b"/a^b",
    b"/a`b",
    b'/a"b',
    b"/a<b>",
]
# raw bytes outside ASCII: llhttp refuses the request line before the canonicaliser sees it
REFUSED_BY_PARSER = [b"/caf\xc3\xa9", b"/a\x80b", b"/a b"]


# --- unit tests of the canonicaliser ------------------------------------------------------------


@pytest.mark.parametrize(("raw", "canon"), CANONICAL)
def test_canonical_path(raw, canon) -> None:
    assert canonical_path(raw) == canon


@pytest.mark.parametrize(("raw", "canon"), CANONICAL)
def test_canonical_path_is_idempotent(raw, canon) -> None:
    assert canonical_path(canonical_path(raw)) == canonical_path(raw)


@pytest.mark.parametrize("raw", [*REFUSED, *REFUSED_BY_PARSER, b"", b"a/b", b"*"])
def test_ambiguous_paths_raise(raw) -> None:
    with pytest.raises(PathError) as e:
        canonical_path(raw)
    assert e.value.detail


def test_canonical_paths_are_returned_unchanged() -> None:
    p = b"/orders/123/items"
    assert canonical_path(p) is p  # the fast path allocates nothing


# --- through the proxy --------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "canon"), CANONICAL)
async def test_upstream_sees_exactly_the_canonical_bytes(up, gateway, raw, canon) -> None:
    h = await gateway([route(up)])
    r = await h.one(b"GET " + raw + b"?q=/../%2F&x HTTP/1.1\r\nHost: a.test\r\n\r\n")
    assert r.status == 200
    assert up.received.startswith(b"GET " + canon + b"?q=/../%2F&x HTTP/1.1\r\n")


@pytest.mark.parametrize("raw", REFUSED)
async def test_ambiguous_paths_are_refused_with_nothing_forwarded(up, gateway, raw) -> None:
    h = await gateway([route(up)])
    c = await h.send(b"GET " + raw + b" HTTP/1.1\r\nHost: a.test\r\n\r\n")
    assert_problem(await c.response(), 400, "invalid_path")
    assert await c.still_open(0.05)  # a refused path is not a framing error: keep-alive continues
    assert up.received == b""


@pytest.mark.parametrize("raw", REFUSED_BY_PARSER)
async def test_bytes_outside_the_target_grammar_are_refused_by_the_parser(up, gateway, raw) -> None:
    h = await gateway([route(up)])
    c = await h.send(b"GET " + raw + b" HTTP/1.1\r\nHost: a.test\r\n\r\n")
    assert_problem(await c.response(), 400, "bad_request")
    assert await c.closed()
    assert up.received == b""


async def test_fragment_in_the_query_is_refused(up, gateway) -> None:
    h = await gateway([route(up)])
    assert_problem(await h.one(get("/a?x=1#frag")), 400, "invalid_path")
    assert up.received == b""


async def test_invalid_path_keeps_the_connection_usable(up, gateway) -> None:
    h = await gateway([route(up)])
    c = await h.send(get("/a%2Fb") + get("/ok"))
    assert_problem(await c.response(), 400, "invalid_path")
    assert (await c.response()).status == 200
    assert [q.target for q in up.requests] == [b"/ok"]


# --- routing on the canonical path --------------------------------------------------------------


def _named(tag: bytes) -> RecordingUpstream:
    return RecordingUpstream(respond=lambda r: ok(tag + b" " + r.target))


@pytest.fixture
async def three():
    ups = [await _named(t).start() for t in (b"A", b"B", b"C")]
    try:
        yield ups
    finally:
        for u in ups:
            await u.close()


@pytest.mark.parametrize(
    ("path", "tag"),
    [
        ("/api", b"A"),
        ("/api/", b"A"),
        ("/api/x", b"A"),
        ("/api/v2", b"B"),
        ("/api/v2/", b"B"),
        ("/api/v2/x", b"B"),
        ("/api/v2x", b"A"),
        ("/api/v2/../v3", b"A"),
        ("/api/x/../v2/y", b"B"),
        ("//api//v2", b"B"),
        ("/api/%76%32/y", b"B"),
        ("/apix", b"C"),
        ("/API/v2", b"C"),
        ("/", b"C"),
        ("/public/../api/v2", b"B"),
    ],
)
async def test_longest_prefix_on_a_segment_boundary_wins(three, gateway, path, tag) -> None:
    a, b, c = three
    h = await gateway(
        [
            route(c, name="root", path="/"),
            route(a, name="api", path="/api"),
            route(b, name="v2", path="/api/v2"),
        ]
    )
    r = await h.one(get(path))
    assert r.status == 200
    assert r.body.split(b" ")[0] == tag, r.body


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/ordersx", 404, "no_route"),
        ("/order", 404, "no_route"),
        ("/", 404, "no_route"),
        ("/x/orders", 404, "no_route"),
        ("/Orders", 404, "no_route"),
        ("/x/../ordersx", 404, "no_route"),
        ("/orders%2Fx", 400, "invalid_path"),
        ("/orders/%2e%2e/admin", 400, "invalid_path"),
    ],
)
async def test_segment_boundary_and_no_route(up, gateway, path, status, code) -> None:
    h = await gateway([route(up, path="/orders")])
    assert_problem(await h.one(get(path)), status, code)
    assert up.received == b""


async def test_route_prefix_matches_its_subtree(up, gateway) -> None:
    h = await gateway([route(up, path="/orders")])
    for p in ("/orders", "/orders/", "/orders/1", "/orders/1/items"):
        assert (await h.one(get(p))).status == 200
    assert len(up.requests) == 4


async def test_methods_405_with_allow(three, gateway) -> None:
    a, b, _ = three
    h = await gateway(
        [
            route(a, name="read", path="/orders", methods=["GET", "HEAD"]),
            route(b, name="write", path="/orders", methods=["POST"]),
        ]
    )
    assert (await h.one(get("/orders/1"))).body.startswith(b"A")
    r = await h.one(b"POST /orders HTTP/1.1\r\nHost: a.test\r\nContent-Length: 0\r\n\r\n")
    assert r.body.startswith(b"B")
    r = await h.one(b"DELETE /orders/1 HTTP/1.1\r\nHost: a.test\r\n\r\n")
    assert_problem(r, 405, "method_not_allowed")
    assert r.header("allow") == "GET, HEAD, POST"
    r = await h.one(b"PATCH /elsewhere HTTP/1.1\r\nHost: a.test\r\n\r\n")
    assert_problem(r, 404, "no_route")


async def test_methods_are_case_sensitive_tokens(up, gateway) -> None:
    h = await gateway([route(up, methods=["GET"])])
    assert_problem(await h.one(b"get / HTTP/1.1\r\nHost: a.test\r\n\r\n"), 400, "bad_request")
    assert_problem(await h.one(b"POST / HTTP/1.1\r\nHost: a.test\r\n\r\n"), 405, "method_not_allowed")
    assert up.received == b""


async def test_method_override_header_does_not_change_routing(three, gateway) -> None:
    a, _, _ = three
    h = await gateway([route(a, path="/orders", methods=["GET"])])
    r = await h.one(get("/orders", extra="X-HTTP-Method-Override: DELETE\r\n"))
    assert r.status == 200
    assert a.requests[0].method == "GET" and a.requests[0].all("x-http-method-override") == []


@pytest.mark.parametrize(
    ("host", "tag"),
    [
        ("api.example.com", b"A"),
        ("API.Example.COM", b"A"),
        ("api.example.com:8443", b"A"),
        ("x.example.com", b"B"),
        ("a.b.example.com", b"B"),
        ("example.com", b"C"),
        ("evilexample.com", b"C"),
        ("example.com.evil.test", b"C"),
        ("127.0.0.1", b"C"),
        ("[::1]:80", b"C"),
    ],
)
async def test_host_routing(three, gateway, host, tag) -> None:
    a, b, c = three
    h = await gateway(
        [
            route(a, name="exact", path="/", host="api.example.com"),
            route(b, name="wild", path="/", host="*.example.com"),
            route(c, name="any", path="/"),
        ]
    )
    for _ in range(2):  # the second time from the gateway's names already seen
        r = await h.one(get("/x", host=host))
        assert r.status == 200
        assert r.body == tag + b" /x"
        assert host.encode() in h.proxy.pipeline.known_hosts


async def test_host_names_remembered_are_bounded_and_only_valid_ones(three, gateway) -> None:
    _, b, c = three
    h = await gateway([route(b, name="wild", path="/", host="*.example.com"), route(c, name="any", path="/")])
    c1 = await h.client()
    for i in range(300):
        await c1.send(get("/x", host=f"h{i}.example.com"))
        assert (await c1.response()).body == b"B /x"
    known = h.proxy.pipeline.known_hosts
    assert len(known) == 256 and b"h299.example.com" not in known
    assert (await h.one(get("/x", host="h299.example.com"))).body == b"B /x"  # still checked and routed
    assert_problem(await h.one(get("/x", host="a test")), 400, "invalid_host")
    assert b"a test" not in known


async def test_host_bound_routes_only(up, gateway) -> None:
    h = await gateway([route(up, host="api.example.com")])
    assert_problem(await h.one(get("/", host="other.example.com")), 404, "no_route")
    assert up.received == b""
    assert (await h.one(get("/", host="api.example.com"))).status == 200


async def test_gateway_error_to_head_has_no_body(up, gateway) -> None:
    h = await gateway([route(up, path="/api")])
    c = await h.send(b"HEAD /nope HTTP/1.1\r\nHost: a.test\r\n\r\n" + get("/api/x"))
    r = await c.response(head_only=True)
    assert r.status == 404 and r.header("content-type") == "application/problem+json"
    assert int(r.header("content-length") or 0) > 0  # the length a GET would have had, and no bytes
    nxt = await c.response()
    assert nxt.status == 200 and nxt.body == b"ok"


@pytest.mark.parametrize(
    ("path", "tag"),
    [
        ("/api/x;v=1", b"A"),  # parameters that keep the path on its route are forwarded as sent
        ("/api/v2/y;jsessionid=9", b"B"),
        ("/api/v2/y%3Bjsessionid=9", b"B"),
        ("/apix;y", b"C"),
        ("/;x", b"C"),
    ],
)
async def test_path_parameters_that_keep_the_route_are_forwarded(three, gateway, path, tag) -> None:
    a, b, c = three
    h = await gateway(
        [route(c, name="root", path="/"), route(a, name="api", path="/api"), route(b, name="v2", path="/api/v2")]
    )
    r = await h.one(get(path))
    assert r.status == 200
    assert r.body == tag + b" " + path.encode()


@pytest.mark.parametrize(
    "path",
    [
        "/api;x", "/api;a=1/x", "/api;x/v2", "/api/v2;x", "/api/v2;jsessionid=9/y", "/api;/v2/y",
        "/api%3Bx", "/api%3bx/v2", "/api/v2%3Bx",  # the same for an upstream that decodes first
    ],
)
async def test_path_parameters_that_would_change_the_route_are_refused(three, gateway, path) -> None:
    """An upstream that drops `;` parameters (Tomcat, Spring) would read `/api;x` as `/api`: routed
    to the catch-all here, it would escape /api's auth and limits there."""
    a, b, c = three
    h = await gateway(
        [route(c, name="root", path="/"), route(a, name="api", path="/api"), route(b, name="v2", path="/api/v2")]
    )
    r = await h.one(get(path))
    assert_problem(r, 400, "invalid_path")
    assert a.requests == b.requests == c.requests == []
