"""What a request line and Host may be: origin-form targets only, no CONNECT, one valid Host on
HTTP/1.1 (none needed on HTTP/1.0), and `Expect` answered only once the checks have passed."""

from __future__ import annotations

import asyncio

import pytest

from .wire import (
    POST,
    assert_problem,
    assert_refused,
    route,
    warm,
)


@pytest.mark.parametrize(
    "target", [b"http://internal/admin", b"https://a.test/", b"HTTP://internal/", b"*", b"a.test:80"]
)
async def test_non_origin_form_targets_are_refused(up, gateway, target) -> None:
    h = await gateway([route(up)])
    data = b"GET " + target + b" HTTP/1.1\r\nHost: a.test\r\n\r\n"
    before = await warm(h, up)
    c = await h.send(data)
    assert_problem(await c.response(), 400, "bad_request")
    assert await c.closed()
    await asyncio.sleep(0.05)
    assert len(up.received) == before


async def test_connect_is_405(up, gateway) -> None:
    h = await gateway([route(up)])
    await assert_refused(
        h, up, b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n", 405, "method_not_allowed"
    )


@pytest.mark.parametrize(
    "headers",
    [
        "",
        "Host: a.test\r\nHost: b.test\r\n",
        "Host: a.test\r\nhost: a.test\r\n",
        "Host: \r\n",
        "Host: a.test:80:80\r\n",
        "Host: a.test/x\r\n",
        "Host: a.test:'<a href=\r\n",
        "Host: a test\r\n",
        "Host: a.test:999999\r\n",
    ],
)
async def test_missing_duplicate_or_invalid_host(up, gateway, headers) -> None:
    h = await gateway([route(up)])
    await assert_refused(h, up, f"GET / HTTP/1.1\r\n{headers}\r\n".encode(), 400, "invalid_host")


async def test_http10_without_host_is_served(up, gateway) -> None:
    h = await gateway([route(up)])
    c = await h.send(b"GET /old HTTP/1.0\r\n\r\n")
    r = await c.response()
    assert r.status == 200 and r.body == b"ok"
    assert await c.closed()  # HTTP/1.0 without keep-alive
    (req,) = up.requests
    assert req.header("host") == f"127.0.0.1:{up.port}"
    assert req.all("x-forwarded-host") == []


async def test_http10_keep_alive_is_honoured(up, gateway) -> None:
    h = await gateway([route(up)])
    c = await h.send(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    r = await c.response()
    assert r.status == 200 and r.header("connection") == "keep-alive"
    await c.send(b"GET /b HTTP/1.0\r\n\r\n")
    assert (await c.response()).status == 200
    assert await c.closed()


async def test_expect_100_continue_after_the_checks(up, gateway) -> None:
    h = await gateway([route(up)])
    c = await h.send((POST + "Content-Length: 5\r\nExpect: 100-continue\r\n\r\n").encode())
    cont = await c.response()
    assert cont.status == 100 and cont.body == b""
    assert up.requests == []
    await c.send(b"hello")
    r = await c.response()
    assert r.status == 200
    (req,) = up.requests
    assert req.body == b"hello" and req.all("expect") == []


async def test_expect_on_a_missing_route_gets_404_without_100(up, gateway) -> None:
    h = await gateway([route(up, path="/api")])
    c = await h.send(
        (POST.replace("/p", "/nope") + "Content-Length: 5\r\nExpect: 100-continue\r\n\r\n").encode()
    )
    assert_problem(await c.response(), 404, "no_route")
    assert await c.closed()
    assert up.received == b""


async def test_expect_with_a_body_over_the_cap_gets_413_without_100(up, gateway) -> None:
    h = await gateway([route(up, max_body=1024)])
    data = (POST + "Content-Length: 1073741824\r\nExpect: 100-continue\r\n\r\n").encode()
    before = await warm(h, up)
    c = await h.send(data)
    r = await c.response()
    assert_problem(r, 413, "payload_too_large")
    assert await c.closed()
    assert len(up.received) == before


async def test_unknown_expectation_is_417(up, gateway) -> None:
    h = await gateway([route(up)])
    await assert_refused(
        h, up, (POST + "Content-Length: 5\r\nExpect: tea-please\r\n\r\n").encode(), 417, "expectation_failed"
    )
