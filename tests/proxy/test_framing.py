"""Request framing through real sockets: Content-Length and Transfer-Encoding smuggling shapes,
chunk tricks, malformed heads, trailers, and the framing the gateway sets upstream.

Every refused request is checked the same way: the gateway's own problem+json answer with its code,
the client connection closed after it, and no byte of the refused request at the recording upstream.
Where the danger is a head forwarded before the refusal, the upstream pool is warmed first: an idle
pooled connection is what would let a half-checked request out synchronously.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.helpers.upstream import ok

from .wire import (
    POST,
    assert_problem,
    assert_refused,
    dribble,
    eventually,
    get,
    route,
    warm,
)


@pytest.mark.parametrize("te_first", [False, True])
async def test_cl_and_te_together_are_refused_and_nothing_is_forwarded(up, gateway, te_first) -> None:
    h = await gateway([route(up)])
    framing = ["Content-Length: 6", "Transfer-Encoding: chunked"]
    if te_first:
        framing.reverse()
    smuggled = (POST + "\r\n".join(framing) + "\r\n\r\n0\r\n\r\nG").encode() + get("/next")
    c = await h.send(smuggled)
    assert_problem(await c.response(), 400, "bad_request")
    assert await c.closed()
    await asyncio.sleep(0.05)
    assert up.received == b"" and up.connections == 0  # zero bytes, not even a connection


async def test_cl_and_te_with_a_warm_pool_forward_nothing(up, gateway) -> None:
    h = await gateway([route(up)])
    data = (POST + "Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG").encode()
    await assert_refused(h, up, data + get("/next"), 400, "bad_request")


@pytest.mark.parametrize(
    "lines",
    [
        ["Content-Length: 5", "Content-Length: 6"],
        ["Content-Length: 5", "Content-Length: 5"],
        ["Content-Length: 5, 5"],
        ["Content-Length: 1000 1000"],
        ["Content-Length: +5"],
        ["Content-Length: -0"],
        ["Content-Length: 0x5"],
        ["Content-Length: 5_0"],
        ["Content-Length: "],
        ["Content-Length: \uff15"],  # full-width 5
        ["Content-Length: \u0665"],  # Arabic-Indic 5
        ["Content-Length: 99999999999999999999999999"],
    ],
    ids=lambda lines: "|".join(lines),
)
async def test_bad_content_length_is_refused(up, gateway, lines) -> None:
    h = await gateway([route(up)])
    data = (POST + "\r\n".join(lines) + "\r\n\r\nhello").encode("utf-8")
    await assert_refused(h, up, data, 400, "bad_request")


@pytest.mark.parametrize(
    "lines",
    [
        ["Transfer-Encoding: xchunked"],
        ["Transfer-Encoding: chunked, identity"],
        ["Transfer-Encoding: ,chunked"],
        ["Transfer-Encoding: identity"],
        ["Transfer-Encoding: gzip, chunked"],
        ["Transfer-Encoding: chunked", "Transfer-Encoding: chunked"],
        ["Transfer-Encoding: gzip", "Transfer-Encoding: chunked"],
        ["Transfer-Encoding : chunked"],
        ["Transfer-Encoding:\x0bchunked"],
        ["X-A: b", " Transfer-Encoding: chunked"],
        ["Transfer-Encoding: chunked\x00"],
    ],
    ids=lambda lines: "|".join(lines).replace("\x0b", "VT").replace("\x00", "NUL"),
)
async def test_transfer_encoding_obfuscations_are_refused(up, gateway, lines) -> None:
    h = await gateway([route(up)])
    data = (POST + "\r\n".join(lines) + "\r\n\r\n5\r\nhello\r\n0\r\n\r\n").encode()
    await assert_refused(h, up, data, 400, "bad_request")


async def test_transfer_encoding_on_http10_is_refused(up, gateway) -> None:
    h = await gateway([route(up)])
    data = b"POST /p HTTP/1.0\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    await assert_refused(h, up, data, 400, "bad_request")


async def test_chunked_in_any_case_is_accepted_and_reframed(up, gateway) -> None:
    h = await gateway([route(up)])
    c = await h.send((POST + "Transfer-Encoding: Chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n").encode())
    assert (await c.response()).status == 200
    (req,) = up.requests
    assert req.body == b"hello" and req.all("transfer-encoding") == ["chunked"]


@pytest.mark.parametrize(
    "bad",
    [
        b"0x5\r\nhello\r\n0\r\n\r\n",
        b"+5\r\nhello\r\n0\r\n\r\n",
        b"5 \r\nhello\r\n0\r\n\r\n",
        b"\r\nhello\r\n0\r\n\r\n",
        b"ffffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
        b"5;a\nhello\r\n0\r\n\r\n",
        b"5\r\nhelloXX0\r\n\r\n",
        b"5\r\nhelloworld\r\n0\r\n\r\n",
        b"5\r\nhello\n0\r\n\r\n",
    ],
)
async def test_bad_chunk_mid_stream_aborts_and_discards_the_upstream_connection(up, gateway, bad) -> None:
    up.respond = lambda r: ok(r.target)
    h = await gateway([route(up)])
    await warm(h, up)
    c = await h.send((POST + "Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n").encode())
    await eventually(lambda: b"abc" in up.received)  # the request is streaming on the pooled connection
    await c.send(bad)
    assert_problem(await c.response(), 400, "bad_request")
    assert await c.closed()
    # The upstream connection carried half a request: it must be dropped, not reused.
    n = await h.send(get("/next"))
    r = await n.response()
    assert r.status == 200 and r.body == b"/next"
    assert up.connections == 2
    assert [q.target for q in up.requests] == [b"/warm", b"/next"]
    assert up.parse_errors == 0


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: a.test\r\nX-A: b\r\n c\r\n\r\n",  # obs-fold
        b"GET / HTTP/1.1\r\nHost: a.test\r\nX-A: b\r\n\tc\r\n\r\n",  # obs-fold with a tab
        b"GET / HTTP/1.1\nHost: a.test\r\n\r\n",  # bare LF after the request line
        b"GET / HTTP/1.1\r\nHost: a.test\nX-A: b\r\n\r\n",  # bare LF after a header
        b"GET / HTTP/1.1\r\nHost: a.test\r\n\n",  # bare LF ending the head
        b"GET / HTTP/1.1\r\nHost: a.test\r\nX-A: a\x00b\r\n\r\n",  # NUL in a value
        b"GET / HTTP/1.1\r\nHost: a.test\r\nX-A: \rxTransfer-Encoding: chunked\r\n\r\n",  # CR in a value
        b"GET / HTTP/1.1\r\nHost: a.test\r\nX-A: a\x7fb\r\n\r\n",  # DEL in a value
        b"GET / HTTP/1.1\r\nHost: a.test\r\nX A: b\r\n\r\n",  # space in a name
        b"GET / HTTP/2.0\r\nHost: a.test\r\n\r\n",
        b"GET / HTTP/0.9\r\nHost: a.test\r\n\r\n",
        b"GET / HTTP/1.2\r\nHost: a.test\r\n\r\n",
        b"GET / HTTP/1\xc3\xb61\r\nHost: a.test\r\n\r\n",
        b"get / HTTP/1.1\r\nHost: a.test\r\n\r\n",
        b"GET/: HTTP/1.1\r\nHost: a.test\r\n\r\n",
        b"GETX / HTTP/1.1\r\nHost: a.test\r\n\r\n",
    ],
)
async def test_malformed_heads_are_refused(up, gateway, data) -> None:
    h = await gateway([route(up)])
    await assert_refused(h, up, data + get("/next"), 400, "bad_request")


async def test_error_body_does_not_echo_the_following_request(up, gateway) -> None:
    h = await gateway([route(up)])
    c = await h.send(
        b"GET / HTTP/1.1\nHost: a.test\r\n\r\n" + get("/SECRET-NEXT", extra="X-Key: sk_live_x\r\n")
    )
    r = await c.response()
    assert_problem(r, 400, "bad_request")
    assert b"SECRET" not in r.body and b"sk_live" not in r.body


@pytest.mark.parametrize(
    "framing", ["Content-Length: 5\r\n\r\nhello", "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"]
)
@pytest.mark.parametrize("upgrade", ["h2c", "websocket", "foo"])
async def test_upgrade_request_with_a_body_is_refused(up, gateway, framing, upgrade) -> None:
    """llhttp treats the body of an upgrade request as tunnel bytes; it must not be half-forwarded."""
    h = await gateway([route(up, websocket=True)])
    data = f"POST / HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\nUpgrade: {upgrade}\r\n{framing}"
    c = await h.send(data.encode())
    assert_problem(await c.response(), 400, "bad_request")
    assert await c.closed()
    assert up.received == b""


async def test_trailers_are_discarded(up, gateway) -> None:
    h = await gateway([route(up)])
    body = b"5\r\nhello\r\n0\r\nX-Trailer-Seen: 1\r\nHost: evil.test\r\nX-API-Key: sk_live_trailer\r\n\r\n"
    c = await h.send((POST + "Transfer-Encoding: chunked\r\n\r\n").encode() + body + get("/next"))
    assert (await c.response()).status == 200
    assert (await c.response()).status == 200
    first, second = up.requests
    assert first.body == b"hello"
    assert b"X-Trailer-Seen" not in up.received and b"evil.test" not in up.received
    assert b"sk_live_trailer" not in up.received
    assert first.header("x-forwarded-host") == "a.test"
    assert b"0\r\n\r\nGET /next" in up.received  # the upstream request ended with an empty trailer section
    assert second.target == b"/next"


async def test_content_length_in_trailers_is_refused(up, gateway) -> None:
    """llhttp refuses a Content-Length trailer on a chunked body; it must never re-frame anything."""
    h = await gateway([route(up)])
    await warm(h, up)
    c = await h.send(
        (POST + "Transfer-Encoding: chunked\r\n\r\n").encode()
        + b"5\r\nhello\r\n0\r\nContent-Length: 0\r\n\r\n"
    )
    assert_problem(await c.response(), 400, "bad_request")
    assert await c.closed()
    assert [q.target for q in up.requests] == [b"/warm"]


async def test_ten_thousand_trailer_lines_are_refused(up, gateway) -> None:
    h = await gateway([route(up)])
    await warm(h, up)
    trailers = b"X-T: 1\r\n" * 10_000
    c = await h.send(
        (POST + "Transfer-Encoding: chunked\r\n\r\n").encode() + b"5\r\nhello\r\n0\r\n" + trailers + b"\r\n"
    )
    assert_problem(await c.response(), 431, "headers_too_large")
    assert await c.closed()
    assert [q.target for q in up.requests] == [b"/warm"]  # never completed upstream


async def test_endless_trailer_line_is_refused_when_it_crosses_the_limit(up, gateway) -> None:
    h = await gateway([route(up)], limits={"max_header_bytes": 8192, "body_timeout": "30s"})
    c = await h.send((POST + "Transfer-Encoding: chunked\r\n\r\n").encode() + b"5\r\nhello\r\n0\r\nX-T: ")
    await dribble(c, b"t" * 1024, 64)  # 64 KiB in separate reads, one line that never ends
    assert_problem(await c.response(timeout=1.0), 431, "headers_too_large")
    assert await c.closed(timeout=1.0)
    assert up.requests == []


async def test_slow_chunked_body_is_not_mistaken_for_trailers(up, gateway) -> None:
    """Many reads of chunk framing alone (no body byte) between data: not a header flood."""
    h = await gateway([route(up)], limits={"max_header_bytes": 1024})
    c = await h.send((POST + "Transfer-Encoding: chunked\r\n\r\n").encode())
    for i in range(50):
        await c.send(b"20;ext=%d\r\n" % i)
        await asyncio.sleep(0.001)
        await c.send(b"x" * 32 + b"\r\n")
    await c.send(b"0\r\n\r\n")
    assert (await c.response()).status == 200
    assert up.requests[0].body == b"x" * 32 * 50


async def test_client_framing_headers_are_never_copied_content_length(up, gateway) -> None:
    h = await gateway([route(up)])
    data = (
        POST + "Content-Length: 5\r\nTE: trailers\r\nTrailer: X-T\r\nConnection: TE\r\n\r\nhello"
    ).encode()
    assert (await h.one(data)).status == 200
    (req,) = up.requests
    assert req.body == b"hello"
    assert req.all("content-length") == ["5"]
    for name in ("transfer-encoding", "te", "trailer", "connection", "expect"):
        assert req.all(name) == [], name


async def test_client_framing_headers_are_never_copied_chunked(up, gateway) -> None:
    h = await gateway([route(up)])
    data = (POST + "Transfer-Encoding: chunked\r\nTE: trailers\r\nTrailer: X-T\r\n\r\n").encode()
    data += b"3\r\nabc\r\n4;ext=1\r\ndefg\r\n0\r\nX-T: 1\r\n\r\n"
    assert (await h.one(data)).status == 200
    (req,) = up.requests
    assert req.body == b"abcdefg"
    assert req.all("transfer-encoding") == ["chunked"]
    assert req.all("content-length") == [] and req.all("te") == [] and req.all("trailer") == []
    assert b"ext=1" not in up.received  # re-chunked by the gateway, extensions not copied


async def test_content_length_on_get_is_forwarded_as_sent(up, gateway) -> None:
    h = await gateway([route(up)])
    c = await h.send(get("/g", extra="Content-Length: 5\r\n") + b"hello" + get("/h"))
    assert (await c.response()).status == 200
    assert (await c.response()).status == 200
    g, nxt = up.requests
    assert g.body == b"hello" and g.all("content-length") == ["5"]
    assert nxt.target == b"/h" and nxt.all("content-length") == []


async def test_post_without_body_gets_content_length_zero(up, gateway) -> None:
    h = await gateway([route(up)])
    assert (await h.one(POST.encode() + b"\r\n")).status == 200
    (req,) = up.requests
    assert req.all("content-length") == ["0"] and req.body == b""


async def test_short_body_then_close_discards_the_upstream_connection(up, gateway) -> None:
    up.respond = lambda r: ok(r.target)
    h = await gateway([route(up)])
    await warm(h, up)
    c = await h.send((POST + "Content-Length: 100\r\n\r\n").encode() + b"x" * 50)
    await eventually(lambda: up.received.endswith(b"x" * 50))
    c.close()
    await asyncio.sleep(0.05)
    r = await h.one(get("/next"))
    assert r.status == 200 and r.body == b"/next"
    assert up.connections == 2, "the connection holding a half-sent body was reused"
    assert [q.target for q in up.requests] == [b"/warm", b"/next"]
    assert up.parse_errors == 0
