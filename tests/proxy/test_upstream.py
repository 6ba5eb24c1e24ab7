"""The upstream side: malformed or truncated responses, refused and silent upstreams, and the pool
(a connection with any framing doubt is never reused; a clean one always is), round robin, and the
path sent upstream (strip_prefix, base path)."""

from __future__ import annotations

import asyncio

import pytest

from tests.helpers.net import free_port
from tests.helpers.polling import wait_for
from tests.helpers.upstream import RecordingUpstream, ok

from .wire import (
    ScriptedUpstream,
    assert_problem,
    get,
    raw_response,
    read_head,
    route,
    then_ok,
)


@pytest.mark.parametrize(
    "bad",
    [
        raw_response("HTTP/1.1 200 OK", "Content-Length: 5", "Transfer-Encoding: chunked", body=b"0\r\n\r\n"),
        raw_response("HTTP/1.1 200 OK", "Transfer-Encoding: chunked", "Content-Length: 5", body=b"0\r\n\r\n"),
        b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\nX-A: b\r\n\r\nok",
        raw_response("HTTP/1.1 200 OK", "X-A: a\x00b", "Content-Length: 2", body=b"ok"),
        raw_response("HTTP/1.1 200 OK", "X-A: a\rb", "Content-Length: 2", body=b"ok"),
        raw_response("HTTP/1.1 200 OK", "Content-Length: 2", "Content-Length: 3", body=b"ok"),
        raw_response("HTTP/1.1 200 OK", "Content-Length: -2", body=b"ok"),
        raw_response("HTTP/1.1 200 OK", "X-A: b", " folded", "Content-Length: 2", body=b"ok"),
        raw_response("HTTP/1.1 200 OK", f"X-Big: {'b' * 1_000_000}", "Content-Length: 2", body=b"ok"),
        raw_response("HTTP/1.1 200 OK", *[f"X-{i}: v" for i in range(1000)], "Content-Length: 2", body=b"ok"),
        raw_response("HTTP/1.1 101 Switching Protocols", "Upgrade: websocket", "Connection: Upgrade"),
        b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok",
        b"garbage\r\n\r\n",
    ],
    ids=[
        "cl-te",
        "te-cl",
        "bare-lf",
        "bare-lf-header",
        "nul",
        "cr",
        "dup-cl",
        "neg-cl",
        "obs-fold",
        "1mb-header",
        "1000-headers",
        "unsolicited-101",
        "bad-status",
        "garbage",
    ],
)
async def test_malformed_upstream_response_is_502_and_the_connection_dropped(up, gateway, bad) -> None:
    up.respond = then_ok(bad)
    h = await gateway([route(up)])
    c = await h.send(get("/1"))
    r = await c.response()
    assert_problem(r, 502, "upstream_unavailable")
    assert b"\x00" not in r.body
    r2 = await h.one(get("/2"))
    assert r2.status == 200 and r2.body == b"/2"
    assert up.connections == 2, "an upstream connection that sent a malformed response was reused"


async def test_extra_bytes_after_a_response_poison_nothing(up, gateway) -> None:
    """A response followed by unrequested bytes: the connection must not be pooled."""
    up.respond = then_ok(ok(b"first") + ok(b"smuggled"))
    h = await gateway([route(up)])
    r1 = await h.one(get("/1"))
    assert r1.body == b"first"
    await asyncio.sleep(0.05)
    r2 = await h.one(get("/2"))
    assert r2.body == b"/2", "a queued response was served to the next request"
    assert up.connections == 2


async def test_endless_upstream_header_line_is_502_before_the_read_timeout(gateway) -> None:
    """An upstream header line that never ends is cut at the response-head limit, not buffered."""

    async def script(reader, writer, index):
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX-Endless: ")
        for _ in range(64):
            writer.write(b"e" * 16384)
            await writer.drain()
        await asyncio.sleep(5)

    endless = await ScriptedUpstream(script).start()
    try:
        h = await gateway([route(endless.url, timeouts={"read": "5s"})])
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert_problem(await h.one(get("/"), timeout=2.0), 502, "upstream_unavailable")
        assert loop.time() - t0 < 1.0
    finally:
        await endless.close()


@pytest.mark.parametrize("chunked", [False, True])
async def test_upstream_closing_mid_body_aborts_the_client(gateway, chunked) -> None:
    async def script(reader, writer, index):
        await read_head(reader)
        if chunked:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await writer.drain()
        await asyncio.sleep(0.05)

    bad = await ScriptedUpstream(script).start()
    try:
        h = await gateway([route(bad.url)])
        c = await h.send(get("/"))
        try:
            r = await c.response()
        except EOFError:
            r = None
        if r is not None:
            assert r.status == 200
            assert not r.complete, "a truncated upstream body reached the client as a complete response"
        assert await c.closed()
    finally:
        await bad.close()


async def test_upstream_connection_refused_is_502(gateway) -> None:
    h = await gateway([route(f"http://127.0.0.1:{free_port()}")])
    assert_problem(await h.one(get("/")), 502, "upstream_unavailable")


async def test_fresh_upstream_connection_closed_before_the_first_write_is_502_at_once(up, gateway) -> None:
    """The upstream accepts and hangs up before the request is written (a race on a real network:
    here its hang-up is made to arrive first). The client must not wait out the read timeout."""
    h = await gateway([route(up, timeouts={"read": "30s"})])
    pool = h.proxy.pool
    real_connect = pool.connect

    async def connect_then_hang_up(upstream, timeout):
        conn = await real_connect(upstream, timeout)
        conn.transport.close()
        await wait_for(lambda: conn.closed, 2, 0.001, "its connection_lost, with no exchange on it yet")
        return conn

    pool.connect = connect_then_hang_up
    assert_problem(await h.one(get("/"), timeout=10.0), 502, "upstream_unavailable")  # not the 30 s read timeout
    pool.connect = real_connect
    r = await h.one(get("/"))
    assert r.status == 200


async def test_upstream_that_never_answers_is_504_within_the_read_timeout(up, gateway) -> None:
    up.respond = lambda req: None
    h = await gateway([route(up, timeouts={"read": "0.3s"})])
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    r = await h.one(get("/"), timeout=3.0)
    elapsed = loop.time() - t0
    assert_problem(r, 504, "upstream_timeout")
    assert 0.25 <= elapsed < 1.0, elapsed


async def test_upstream_that_stalls_mid_body_is_cut_at_the_read_timeout(gateway) -> None:
    async def script(reader, writer, index):
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await writer.drain()
        await asyncio.sleep(5)

    stall = await ScriptedUpstream(script).start()
    try:
        h = await gateway([route(stall.url, timeouts={"read": "0.3s"})])
        c = await h.send(get("/"))
        try:
            r = await c.response(timeout=2.0)
            assert not r.complete
        except EOFError:
            pass
        assert await c.closed(timeout=1.0)
    finally:
        await stall.close()


async def test_upstream_connection_close_is_honoured(up, gateway) -> None:
    """`Connection: close` from the upstream: that connection is not pooled even if left open."""
    up.respond = lambda req: ok(req.target, headers=[("Connection", "close")])
    h = await gateway([route(up)])
    c = await h.send(get("/1"))
    r = await c.response()
    assert r.body == b"/1" and "connection" not in r.names()
    await c.send(get("/2"))
    assert (await c.response()).body == b"/2"
    assert up.connections == 2


async def test_early_upstream_answer_before_the_body_ends_drops_both_connections(gateway) -> None:
    async def script(reader, writer, index):
        while True:
            head = await read_head(reader)
            if head.startswith(b"POST"):
                writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n")
            else:
                writer.write(ok(b"c%d" % index))
            await writer.drain()

    early = await ScriptedUpstream(script).start()
    try:
        h = await gateway([route(early.url)])
        c = await h.send(b"POST /big HTTP/1.1\r\nHost: a.test\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        r = await c.response()
        assert r.status == 413
        assert await c.closed()  # the rest of the client's body can no longer be framed
        r2 = await h.one(get("/next"))
        assert r2.body == b"c1", "the upstream connection with a half-sent body was reused"
        assert early.connections == 2
    finally:
        await early.close()


async def test_pooled_connection_closed_by_the_upstream_is_retried_once_for_get(gateway) -> None:
    async def script(reader, writer, index):
        await read_head(reader)
        writer.write(ok(b"c%d" % index))
        await writer.drain()
        # then close the idle keep-alive connection, as servers do

    closing = await ScriptedUpstream(script).start()
    try:
        h = await gateway([route(closing.url)])
        assert (await h.one(get("/"))).body == b"c0"
        await asyncio.sleep(0.05)
        assert (await h.one(get("/"))).body == b"c1"
    finally:
        await closing.close()


async def test_round_robin_across_two_upstreams(gateway) -> None:
    a = await RecordingUpstream(respond=lambda r: ok(b"a")).start()
    b = await RecordingUpstream(respond=lambda r: ok(b"b")).start()
    try:
        h = await gateway([route(a.url, upstream=[a.url, b.url])])
        c = await h.send(get("/") * 4)
        bodies = [(await c.response()).body for _ in range(4)]
        assert sorted(bodies) == [b"a", b"a", b"b", b"b"]
        assert bodies[0] != bodies[1] and bodies[1] != bodies[2]
        assert a.connections == 1 and b.connections == 1
        assert b.requests[0].header("host") == f"127.0.0.1:{b.port}"
    finally:
        await a.close()
        await b.close()


@pytest.mark.parametrize(
    ("base", "strip", "sent", "expected"),
    [
        ("", True, "/api/x?q=1", "/x?q=1"),
        ("", True, "/api", "/"),
        ("", True, "/api/", "/"),
        ("", False, "/api/x", "/api/x"),
        ("/base", False, "/api/x", "/base/api/x"),
        ("/base/", False, "/api/x?y", "/base/api/x?y"),
        ("/base", True, "/api/x", "/base/x"),
        ("/base", True, "/api", "/base/"),
    ],
)
async def test_strip_prefix_and_base_path(up, gateway, base, strip, sent, expected) -> None:
    h = await gateway([route(up.url + base, path="/api", strip_prefix=strip)])
    assert (await h.one(get(sent))).status == 200
    assert [q.target for q in up.requests] == [expected.encode()]


async def test_keep_alive_reuses_one_upstream_connection(up, gateway) -> None:
    h = await gateway([route(up)])
    c = await h.send(get("/"))
    for _ in range(5):
        assert (await c.response()).status == 200
        await c.send(get("/"))
    assert (await c.response()).status == 200
    for _ in range(5):
        assert (await h.one(get("/"))).status == 200
    assert len(up.requests) == 11
    assert up.connections == 1
