"""Header hygiene in both directions: hop-by-hop and Connection-named headers, upgrades, reserved
identity headers and their `_`/`.` spellings, X-Forwarded-*, the request id, and the upstream Host."""

from __future__ import annotations

import pytest

from .wire import (
    UUID7,
    assert_problem,
    get,
    raw_response,
    route,
)

HOP_BY_HOP = ["connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade", "proxy"]


async def test_hop_by_hop_request_headers_are_removed(up, gateway) -> None:
    h = await gateway([route(up)])
    extra = (
        "Connection: keep-alive, X-Foo\r\n"
        "connection: X-BAR\r\n"
        "Keep-Alive: timeout=300\r\n"
        "Proxy-Connection: keep-alive\r\n"
        "TE: trailers\r\n"
        "Trailer: X-T\r\n"
        "Upgrade: h2c\r\n"
        "Proxy: http://evil.test:8080\r\n"
        "Proxy-Authorization: Basic Zm9vOmJhcg==\r\n"
        "X-Foo: named-in-connection\r\n"
        "x-bar: named-in-the-second-connection-line\r\n"
        "X-Kept: yes\r\n"
    )
    r = await h.one(get("/", extra=extra))
    assert r.status == 200
    (req,) = up.requests
    for name in [*HOP_BY_HOP, "proxy-authorization", "x-foo", "x-bar"]:
        assert req.all(name) == [], name
    assert req.all("x-kept") == ["yes"]
    assert b"evil.test" not in up.received


async def test_connection_cannot_remove_gateway_headers(up, gateway) -> None:
    h = await gateway([route(up)])
    extra = "Connection: X-Forwarded-For, x-request-id\r\nConnection: X-Forwarded-Proto, X-FORWARDED-HOST\r\n"
    r = await h.one(get("/", extra=extra))
    (req,) = up.requests
    assert req.all("x-forwarded-for") == ["127.0.0.1"]
    assert req.all("x-forwarded-proto") == ["http"]
    assert req.all("x-forwarded-host") == ["a.test"]
    assert req.all("x-request-id") == [r.header("x-request-id")]


async def test_hop_by_hop_response_headers_are_removed(up, gateway) -> None:
    up.respond = lambda req: raw_response(
        "HTTP/1.1 200 OK",
        "Content-Length: 2",
        "Connection: X-Foo",
        "connection: x-BAR, Keep-Alive",
        "Keep-Alive: timeout=5",
        "Proxy-Connection: keep-alive",
        "TE: trailers",
        "Trailer: X-T",
        "Upgrade: h2c",
        "Proxy: http://evil.test",
        "Proxy-Authenticate: Basic",
        "X-Foo: 1",
        "X-Bar: 2",
        "X-Kept: 3",
        "Set-Cookie: a=1",
        "Set-Cookie: b=2",
        "X-Request-ID: chosen-by-upstream",
        body=b"ok",
    )
    h = await gateway([route(up)])
    c = await h.send(get("/"))
    r = await c.response()
    assert r.status == 200 and r.body == b"ok"
    names = r.names()
    for name in [*HOP_BY_HOP, "proxy-authenticate", "x-foo", "x-bar"]:
        assert name not in names, name
    assert r.all("x-kept") == ["3"]
    assert r.all("set-cookie") == ["a=1", "b=2"]
    assert r.all("x-request-id") == [up.requests[0].header("x-request-id")]
    # the upstream connection is still good for the next request
    await c.send(get("/2"))
    assert (await c.response()).status == 200
    assert up.connections == 1


async def test_h2c_upgrade_is_never_tunnelled(up, gateway) -> None:
    h = await gateway([route(up)])
    extra = "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n"
    c = await h.send(get("/", extra=extra))
    r = await c.response()
    assert r.status == 200 and r.body == b"ok"
    assert "upgrade" not in r.names()
    (req,) = up.requests
    assert req.all("upgrade") == [] and req.all("http2-settings") == [] and req.all("connection") == []
    assert await c.closed()


async def test_websocket_upgrade_on_a_plain_route_is_refused(up, gateway) -> None:
    h = await gateway([route(up)])
    extra = "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    c = await h.send(get("/", extra=extra))
    assert_problem(await c.response(), 400, "websocket_not_allowed")
    assert await c.closed()
    assert up.received == b""


SPOOFED = (
    "X-Consumer-ID: admin\r\n"
    "X-Consumer-Id: admin2\r\n"
    "X.Consumer.ID: dotted\r\n"
    "X-Credential-Identifier: key_1\r\n"
    "X-Consumer-Scopes: *\r\n"
    "X-Consumer-Username: root\r\n"
    "X-Authenticated-User: root\r\n"
    "X.Authenticated.User: root\r\n"
    "X-Gateway-Scopes: *\r\n"
    "X-HTTP-Method-Override: DELETE\r\n"
    "X-Method-Override: DELETE\r\n"
    "X-Real-IP: 10.0.0.1\r\n"
    "Forwarded: for=127.0.0.1\r\n"
    "X-Forwarded-Port: 1\r\n"
    "X-Forwarded-Prefix: /admin\r\n"
)


UNDERSCORED = "X_Consumer_ID: under\r\nx_credential_identifier: under\r\nX_HTTP_Method_Override: DELETE\r\n"


RESERVED = [
    "x-consumer-id",
    "x.consumer.id",
    "x_consumer_id",
    "x-credential-identifier",
    "x_credential_identifier",
    "x-consumer-scopes",
    "x-consumer-username",
    "x-authenticated-user",
    "x.authenticated.user",
    "x-gateway-scopes",
    "x-http-method-override",
    "x_http_method_override",
    "x-method-override",
    "x-real-ip",
    "forwarded",
    "x-forwarded-port",
    "x-forwarded-prefix",
]


@pytest.mark.parametrize("policy", ["drop", "allow"])
async def test_reserved_identity_headers_never_reach_the_upstream(up, gateway, policy) -> None:
    h = await gateway([route(up)], headers_with_underscores=policy)
    r = await h.one(get("/", extra=SPOOFED + UNDERSCORED))
    assert r.status == 200
    (req,) = up.requests
    for name in RESERVED:
        assert req.all(name) == [], name
    lowered = bytes(up.received).lower()
    for value in (b"admin", b"dotted", b"root", b"delete", b"under", b"10.0.0.1", b"key_1"):
        assert value not in lowered, value


async def test_reserved_name_with_trailing_space_is_refused(up, gateway) -> None:
    h = await gateway([route(up)])
    assert_problem(await h.one(get("/", extra="x-consumer-id : admin\r\n")), 400, "bad_request")
    assert up.received == b""


async def test_underscore_headers_are_dropped_by_default(up, gateway) -> None:
    h = await gateway([route(up)])
    assert (await h.one(get("/", extra="X_Custom: 1\r\nX-Custom: 2\r\n"))).status == 200
    (req,) = up.requests
    assert req.all("x_custom") == [] and req.all("x-custom") == ["2"]


async def test_underscore_headers_are_refused_under_reject(up, gateway) -> None:
    h = await gateway([route(up)], headers_with_underscores="reject")
    c = await h.send(get("/", extra="X_Custom: 1\r\n"))
    assert_problem(await c.response(), 400, "bad_request")
    assert await c.closed()
    assert up.received == b""


async def test_underscore_headers_are_forwarded_under_allow(up, gateway) -> None:
    h = await gateway([route(up)], headers_with_underscores="allow")
    assert (await h.one(get("/", extra="X_Custom: 1\r\n"))).status == 200
    (req,) = up.requests
    assert req.all("x_custom") == ["1"]


async def test_client_forwarding_headers_from_an_untrusted_peer_are_replaced(up, gateway) -> None:
    h = await gateway([route(up)])
    seen = []
    h.proxy.observers.append(lambda ex: seen.append(ex.client_ip))
    extra = "X-Forwarded-For: 1.2.3.4\r\nX-Forwarded-For: 5.6.7.8\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.test\r\n"
    r = await h.one(get("/", host="public.test:8080", extra=extra))
    assert r.status == 200
    (req,) = up.requests
    assert req.all("x-forwarded-for") == ["127.0.0.1"]
    assert req.all("x-forwarded-proto") == ["http"]
    assert req.all("x-forwarded-host") == ["public.test:8080"]
    assert seen == ["127.0.0.1"]


@pytest.mark.parametrize(
    ("trusted", "lines", "client", "chain"),
    [
        (["127.0.0.1/32"], ["1.2.3.4, 10.0.0.1"], "10.0.0.1", "1.2.3.4, 10.0.0.1, 127.0.0.1"),
        (["127.0.0.1/32", "10.0.0.0/8"], ["1.2.3.4, 10.0.0.1"], "1.2.3.4", "1.2.3.4, 10.0.0.1, 127.0.0.1"),
        (["127.0.0.1/32"], ["1.1.1.1", "2.2.2.2"], "2.2.2.2", "1.1.1.1, 2.2.2.2, 127.0.0.1"),
        (["127.0.0.1/32"], ["9.9.9.9,::ffff:10.0.0.7"], "10.0.0.7", "9.9.9.9, ::ffff:10.0.0.7, 127.0.0.1"),
        (["127.0.0.1/32"], ["1.2.3.4, not-an-ip"], "127.0.0.1", None),
        (["10.0.0.0/8"], ["1.2.3.4"], "127.0.0.1", "127.0.0.1"),  # the peer itself is not trusted
    ],
)
async def test_trusted_proxy_chain_is_walked_from_the_right(
    up, gateway, trusted, lines, client, chain
) -> None:
    h = await gateway([route(up)], trusted_proxies=trusted)
    seen = []
    h.proxy.observers.append(lambda ex: seen.append(ex.client_ip))
    extra = "".join(f"X-Forwarded-For: {v}\r\n" for v in lines)
    assert (await h.one(get("/", extra=extra))).status == 200
    assert seen == [client]
    (req,) = up.requests
    xff = req.all("x-forwarded-for")
    assert len(xff) == 1
    if chain is not None:
        assert xff == [chain]


async def test_request_id_is_a_uuid7_shared_with_the_client(up, gateway) -> None:
    h = await gateway([route(up)])
    c = await h.send(get("/", extra="X-Request-ID: client-chosen\r\nX_Request_ID: under\r\n"))
    r1 = await c.response()
    await c.send(get("/"))
    r2 = await c.response()
    ids = [r.header("x-request-id") for r in (r1, r2)]
    assert all(i and UUID7.match(i) for i in ids), ids
    assert ids[0] != ids[1]
    assert [q.all("x-request-id") for q in up.requests] == [[ids[0]], [ids[1]]]
    assert b"client-chosen" not in up.received and b"under" not in up.received


async def test_gateway_errors_carry_the_request_id(up, gateway) -> None:
    h = await gateway([route(up, path="/api")])
    r = await h.one(get("/nope"))
    doc = assert_problem(r, 404, "no_route")
    assert UUID7.match(r.header("x-request-id") or "")
    assert doc["request_id"] == r.header("x-request-id")


async def test_upstream_host_comes_from_the_upstream_url(up, gateway) -> None:
    h = await gateway([route(up)])
    assert (await h.one(get("/", host="public.test"))).status == 200
    (req,) = up.requests
    assert req.all("host") == [f"127.0.0.1:{up.port}"]


async def test_preserve_host(up, gateway) -> None:
    h = await gateway([route(up, preserve_host=True)])
    assert (await h.one(get("/", host="Public.Test:8443"))).status == 200
    (req,) = up.requests
    assert req.all("host") == ["Public.Test:8443"]
