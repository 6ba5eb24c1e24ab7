"""Size limits and deadlines on the client side: header block, header count, target, body cap,
the header deadline (slowloris), the body deadline, and idle keep-alive. Timeouts are set small in
each test's config instead of sleeping long."""

from __future__ import annotations

import asyncio

from tests.helpers.upstream import ok

from .wire import (
    POST,
    ScriptedUpstream,
    assert_problem,
    assert_refused,
    dribble,
    get,
    read_head,
    route,
    warm,
)


async def test_header_block_over_max_header_bytes(up, gateway) -> None:
    h = await gateway([route(up)], limits={"max_header_bytes": 8192})
    extra = "".join(f"X-H{i}: {'v' * 1000}\r\n" for i in range(12))
    await assert_refused(h, up, get("/", extra=extra), 431, "headers_too_large")


async def test_header_block_just_under_the_limit_passes(up, gateway) -> None:
    h = await gateway([route(up)], limits={"max_header_bytes": 8192})
    extra = "".join(f"X-H{i}: {'v' * 1000}\r\n" for i in range(6))
    assert (await h.one(get("/", extra=extra))).status == 200


async def test_more_than_max_headers(up, gateway) -> None:
    h = await gateway([route(up)], limits={"max_headers": 20})
    extra = "".join(f"X-H{i}: v\r\n" for i in range(30))
    await assert_refused(h, up, get("/", extra=extra), 431, "headers_too_large")


async def test_default_limit_refuses_a_100_kib_cookie(up, gateway) -> None:
    h = await gateway([route(up)])
    await assert_refused(h, up, get("/", extra=f"Cookie: {'c' * 100_000}\r\n"), 431, "headers_too_large")


async def test_64_kib_request_target(up, gateway) -> None:
    h = await gateway([route(up)])
    await assert_refused(h, up, get("/" + "a" * 65536), 431, "headers_too_large")


async def test_one_header_line_over_max_header_line(up, gateway) -> None:
    """8 KiB a line by default (as nginx's buffers), though the whole block may hold 32 KiB."""
    h = await gateway([route(up)])
    name = "X-Long"
    at_limit = "v" * (8192 - len(name) - 2)  # "X-Long: vvv…" is 8192 bytes without its CRLF
    await assert_refused(h, up, get("/", extra=f"{name}: {at_limit}v\r\n"), 431, "headers_too_large")
    assert (await h.one(get("/", extra=f"{name}: {at_limit}\r\n"))).status == 200


async def test_max_header_line_is_configurable(up, gateway) -> None:
    h = await gateway([route(up)], limits={"max_header_line": 1024})
    await assert_refused(h, up, get("/", extra=f"Cookie: {'c' * 1020}\r\n"), 431, "headers_too_large")


async def test_request_target_over_max_header_line(up, gateway) -> None:
    h = await gateway([route(up)])
    await assert_refused(h, up, get("/" + "a" * 8192), 431, "headers_too_large")
    assert (await h.one(get("/" + "a" * 8191))).status == 200


async def test_unterminated_header_line_is_refused_when_it_crosses_the_limit(up, gateway) -> None:
    """One endless header line: refused as soon as it is over the limit, not at the header deadline."""
    h = await gateway([route(up)], limits={"max_header_bytes": 8192, "header_timeout": "30s"})
    c = await h.send(b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Long: ")
    await dribble(c, b"v" * 1024, 64)  # 64 KiB in separate reads, one line that never ends
    assert_problem(await c.response(timeout=1.0), 431, "headers_too_large")
    assert await c.closed(timeout=1.0)
    assert up.received == b""


async def test_large_bodies_do_not_count_against_the_header_limit(up, gateway) -> None:
    """The header-size guard must not mistake pipelined body bytes for head bytes."""
    h = await gateway([route(up)], limits={"max_header_bytes": 4096})
    body = b"b" * 200_000
    c = await h.send(
        (POST + f"Content-Length: {len(body)}\r\n\r\n").encode() + body + b"GET /next HTTP/1.1\r\n"
    )
    assert (await c.response()).status == 200
    await c.send(b"Host: a.test\r\n\r\n")
    assert (await c.response()).status == 200
    assert up.requests[0].body == body and up.requests[1].target == b"/next"


async def test_body_over_the_cap_without_expect_is_413_before_any_byte_goes_upstream(up, gateway) -> None:
    h = await gateway([route(up, max_body=1024)])
    await assert_refused(
        h, up, (POST + "Content-Length: 4096\r\n\r\n").encode() + b"x" * 4096, 413, "payload_too_large"
    )


async def test_chunked_body_over_the_cap_is_cut_off(up, gateway) -> None:
    h = await gateway([route(up, max_body=1024)])
    await warm(h, up)
    c = await h.send((POST + "Transfer-Encoding: chunked\r\n\r\n").encode())
    for _ in range(4):
        await c.send(b"200\r\n" + b"x" * 512 + b"\r\n")
    assert_problem(await c.response(), 413, "payload_too_large")
    assert await c.closed()
    assert [q.target for q in up.requests] == [b"/warm"]
    assert up.body_bytes <= 1024 + 512


async def test_slowloris_head_hits_the_header_deadline(up, gateway) -> None:
    h = await gateway([route(up)], limits={"header_timeout": "0.3s"})
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    c = await h.send(b"GET / HTTP/1.1\r\nHost: a.test\r\n")
    got = None
    for i in range(30):  # one header byte every 50 ms, for longer than the deadline
        await c.send(b"X-%d: 1\r\n" % i)
        try:
            got = await c.response(timeout=0.05)
            break
        except (TimeoutError, EOFError):
            if c.eof:
                break
    assert got is not None, "no answer to a head that never ends"
    assert_problem(got, 408, "request_timeout")
    assert loop.time() - t0 < 1.0
    assert await c.closed()
    assert up.received == b""


async def test_silent_connection_is_closed_at_the_header_deadline(up, gateway) -> None:
    h = await gateway([route(up)], limits={"header_timeout": "0.3s"})
    c = await h.client()
    assert await c.closed(timeout=1.5)


async def test_partial_pipelined_head_after_a_served_request_hits_the_deadline(up, gateway) -> None:
    h = await gateway([route(up)], limits={"header_timeout": "0.3s"})
    c = await h.send(get("/1") + b"GET /2 HTTP/1.1\r\nHost: a.test\r\n")
    assert (await c.response()).status == 200
    assert_problem(await c.response(timeout=1.5), 408, "request_timeout")
    assert await c.closed(timeout=1.0)
    assert [q.target for q in up.requests] == [b"/1"]


async def test_partial_pipelined_head_behind_a_slow_request_still_hits_the_deadline(gateway) -> None:
    """The head deadline must survive an exchange that outlasts it (a slow upstream)."""

    async def slow(reader, writer, index):
        while True:
            await read_head(reader)
            await asyncio.sleep(0.5)
            writer.write(ok(b"slow"))
            await writer.drain()

    slow_up = await ScriptedUpstream(slow).start()
    try:
        h = await gateway([route(slow_up.url)], limits={"header_timeout": "0.3s"})
        c = await h.send(get("/1") + b"GET /2 HTTP/1.1\r\nHost: a.test\r\n")
        assert (await c.response()).body == b"slow"
        assert_problem(await c.response(timeout=1.5), 408, "request_timeout")
        assert await c.closed(timeout=1.0)
    finally:
        await slow_up.close()


async def test_idle_keep_alive_connection_is_closed(up, gateway) -> None:
    h = await gateway([route(up)], limits={"idle_timeout": "0.4s"})
    c = await h.send(get("/"))
    assert (await c.response()).status == 200
    assert await c.still_open(0.15)
    assert await c.closed(timeout=1.5)


async def test_keep_alive_after_a_gateway_error_uses_the_idle_timeout(up, gateway) -> None:
    """A refusal answered while its own head is parsed leaves a normal idle keep-alive connection."""
    h = await gateway([route(up)], limits={"idle_timeout": "0.3s", "header_timeout": "10s"})
    c = await h.send(get("/a%2Fb"))
    assert_problem(await c.response(), 400, "invalid_path")
    assert await c.still_open(0.1)
    assert await c.closed(timeout=1.0)


async def test_stalled_body_gets_408(up, gateway) -> None:
    h = await gateway([route(up)], limits={"body_timeout": "0.3s"})
    await warm(h, up)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    c = await h.send((POST + "Content-Length: 10\r\n\r\nabc").encode())
    assert_problem(await c.response(timeout=1.5), 408, "request_timeout")
    assert loop.time() - t0 < 1.2
    assert await c.closed()
    assert [q.target for q in up.requests] == [b"/warm"]
    r = await h.one(get("/next"))
    assert r.status == 200
    assert up.connections == 2  # the upstream connection holding the partial body was dropped


async def test_stalled_body_queued_behind_a_slow_request_still_gets_408(gateway) -> None:
    async def slow(reader, writer, index):
        await read_head(reader)
        await asyncio.sleep(0.5)
        writer.write(ok(b"slow"))
        await writer.drain()
        await reader.read()

    slow_up = await ScriptedUpstream(slow).start()
    try:
        h = await gateway([route(slow_up.url)], limits={"body_timeout": "0.3s"})
        c = await h.send(get("/1") + (POST + "Content-Length: 10\r\n\r\nabc").encode())
        assert (await c.response()).body == b"slow"
        assert_problem(await c.response(timeout=1.5), 408, "request_timeout")
        assert await c.closed(timeout=1.0)
    finally:
        await slow_up.close()


async def test_a_new_connections_header_deadline_runs_from_its_accept(up, gateway) -> None:
    """A first byte sent late buys no time: the head must be complete header_timeout after the accept."""
    h = await gateway([route(up)], limits={"header_timeout": "1s"})
    loop = asyncio.get_running_loop()
    c = await h.client()
    t0 = loop.time()
    await asyncio.sleep(0.7)
    await c.send(b"GET / HTTP/1.1\r\n")  # and then nothing more
    got = await c.response(timeout=3.0)
    assert_problem(got, 408, "request_timeout")
    assert loop.time() - t0 < 1.5  # 1 s from the accept (and a tick), not 1 s from the first byte
    assert up.received == b""
