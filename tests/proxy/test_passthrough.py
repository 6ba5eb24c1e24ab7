"""What the upstream answers reaches the client untouched where it should: redirects (never
followed), encoded bodies (never decoded), HEAD, 204/304, 1xx, and bodies re-framed for the client."""

from __future__ import annotations

import gzip

import pytest

from tests.helpers.upstream import ok

from .wire import (
    ScriptedUpstream,
    get,
    raw_response,
    read_head,
    route,
    then_ok,
)


async def test_redirects_are_passed_through_not_followed(up, gateway) -> None:
    up.respond = lambda req: raw_response(
        "HTTP/1.1 302 Found", "Location: http://169.254.169.254/latest/meta-data/", "Content-Length: 0"
    )
    h = await gateway([route(up)])
    r = await h.one(get("/go"))
    assert r.status == 302
    assert r.header("location") == "http://169.254.169.254/latest/meta-data/"
    assert [q.target for q in up.requests] == [b"/go"]


async def test_gzip_is_passed_through_byte_for_byte(up, gateway) -> None:
    payload = gzip.compress(b"hello " * 1000)
    up.respond = lambda req: raw_response(
        "HTTP/1.1 200 OK", "Content-Encoding: gzip", f"Content-Length: {len(payload)}", body=payload
    )
    h = await gateway([route(up)])
    body = gzip.compress(b"request " * 500)
    data = f"POST /z HTTP/1.1\r\nHost: a.test\r\nContent-Encoding: gzip\r\nContent-Length: {len(body)}\r\nAccept-Encoding: gzip\r\n\r\n".encode()
    r = await h.one(data + body)
    assert r.status == 200 and r.header("content-encoding") == "gzip"
    assert r.body == payload
    (req,) = up.requests
    assert req.body == body and req.all("content-encoding") == ["gzip"]
    assert req.all("accept-encoding") == ["gzip"]


async def test_gzip_chunked_response_is_passed_through(up, gateway) -> None:
    payload = gzip.compress(b"chunk " * 1000)
    half = len(payload) // 2
    up.respond = lambda req: (
        raw_response("HTTP/1.1 200 OK", "Content-Encoding: gzip", "Transfer-Encoding: chunked")
        + (b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (half, payload[:half], len(payload) - half, payload[half:]))
    )
    h = await gateway([route(up)])
    r = await h.one(get("/"))
    assert r.body == payload and r.header("transfer-encoding") == "chunked"


async def test_head_then_get_reuse_the_upstream_connection(up, gateway) -> None:
    up.respond = lambda req: raw_response(
        "HTTP/1.1 200 OK", "Content-Length: 5", body=b"" if req.method == "HEAD" else b"hello"
    )
    h = await gateway([route(up)])
    c = await h.send(b"HEAD /h HTTP/1.1\r\nHost: a.test\r\n\r\n")
    r = await c.response(head_only=True)
    assert r.status == 200 and r.header("content-length") == "5"
    await c.send(get("/g"))
    r = await c.response()
    assert r.status == 200 and r.body == b"hello"
    assert [q.method for q in up.requests] == ["HEAD", "GET"]
    assert up.connections == 1
    assert await c.still_open()


@pytest.mark.parametrize(
    "status_lines",
    [
        ["HTTP/1.1 204 No Content"],
        ["HTTP/1.1 304 Not Modified", 'ETag: "x"', "Content-Length: 10"],
    ],
)
async def test_204_and_304_have_no_body(up, gateway, status_lines) -> None:
    up.respond = then_ok(raw_response(*status_lines))
    h = await gateway([route(up)])
    c = await h.send(get("/1") + get("/2"))
    first = await c.response()
    assert first.status == int(status_lines[0].split()[1]) and first.body == b""
    assert "transfer-encoding" not in first.names()
    if first.status == 204:
        assert "content-length" not in first.names()
    second = await c.response()
    assert second.status == 200 and second.body == b"/2"
    assert up.connections == 1


async def test_early_hints_reach_an_http11_client_first(up, gateway) -> None:
    up.respond = lambda req: (
        raw_response("HTTP/1.1 103 Early Hints", "Link: </s.css>; rel=preload") + ok(b"final")
    )
    h = await gateway([route(up)])
    c = await h.send(get("/"))
    hint = await c.response()
    assert hint.status == 103 and hint.header("link") == "</s.css>; rel=preload"
    final = await c.response()
    assert final.status == 200 and final.body == b"final"
    await c.send(get("/"))
    assert (await c.response()).status == 103
    assert (await c.response()).status == 200
    assert up.connections == 1


async def test_early_hints_are_not_sent_to_an_http10_client(up, gateway) -> None:
    up.respond = lambda req: (
        raw_response("HTTP/1.1 103 Early Hints", "Link: </s.css>; rel=preload") + ok(b"final")
    )
    h = await gateway([route(up)])
    r = await h.one(b"GET / HTTP/1.0\r\nHost: a.test\r\n\r\n")
    assert r.status == 200 and r.body == b"final"


async def test_upstream_100_continue_is_not_relayed(up, gateway) -> None:
    up.respond = lambda req: raw_response("HTTP/1.1 100 Continue") + ok(b"final")
    h = await gateway([route(up)])
    r = await h.one(b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 2\r\n\r\nhi")
    assert r.status == 200 and r.body == b"final"


async def test_close_delimited_upstream_response_is_reframed(gateway) -> None:
    async def script(reader, writer, index):
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\nhello until close")
        await writer.drain()

    eof = await ScriptedUpstream(script).start()
    try:
        h = await gateway([route(eof.url)])
        c = await h.send(get("/"))
        r = await c.response()
        assert r.status == 200 and r.body == b"hello until close" and r.complete
        assert r.header("transfer-encoding") == "chunked"
        await c.send(get("/"))
        assert (await c.response()).body == b"hello until close"
        assert eof.connections == 2
    finally:
        await eof.close()


async def test_http10_client_gets_a_close_delimited_body_from_a_chunked_upstream(up, gateway) -> None:
    up.respond = lambda req: (
        raw_response("HTTP/1.1 200 OK", "Transfer-Encoding: chunked") + b"5\r\nhello\r\n0\r\n\r\n"
    )
    h = await gateway([route(up)])
    c = await h.send(b"GET / HTTP/1.0\r\nHost: a.test\r\nConnection: keep-alive\r\n\r\n")
    r = await c.response()
    assert r.status == 200 and r.body == b"hello"
    assert "transfer-encoding" not in r.names() and "content-length" not in r.names()
    assert c.eof


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"HTTP/1.1 200 OK", "OK"),
        (b"HTTP/1.1 404 Not Found Here", "Not Found Here"),
        (b"HTTP/1.1 200 O\tK", "O\tK"),
        (b"HTTP/1.1 200 O\x01K", ""),  # control bytes: the phrase is dropped, never passed on
        (b"HTTP/1.1 200 O\x7fK", ""),
        (b"HTTP/1.1 200 O\x1bK", ""),
    ],
)
async def test_the_reason_phrase_never_carries_a_control_byte(up, gateway, line, reason) -> None:
    up.respond = lambda req: line + b"\r\nContent-Length: 2\r\n\r\nok"
    h = await gateway([route(up)])
    c = await h.send(get("/"))
    r = await c.response()
    assert r.body == b"ok" and r.reason == reason  # the status line's rest, as read off the wire
