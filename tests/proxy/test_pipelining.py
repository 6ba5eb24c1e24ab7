"""Pipelining: answers in order, nothing of a refused request forwarded, a bounded read-ahead, and
exactly one answer however much follows a refusal in the same read."""

from __future__ import annotations

import asyncio

import pytest

from tests.helpers.upstream import ok

from .wire import (
    POST,
    assert_problem,
    get,
    route,
)


async def test_pipelined_requests_are_answered_in_order(up, gateway) -> None:
    up.respond = lambda r: ok(r.target)
    h = await gateway([route(up)])
    c = await h.send(get("/1") + (POST + "Content-Length: 3\r\n\r\n").encode() + b"abc" + get("/3"))
    bodies = [(await c.response()).body for _ in range(3)]
    assert bodies == [b"/1", b"/p", b"/3"]
    assert [q.target for q in up.requests] == [b"/1", b"/p", b"/3"]
    assert up.requests[1].body == b"abc"
    assert up.connections == 1
    assert await c.still_open()


async def test_invalid_request_pipelined_after_a_valid_one(up, gateway) -> None:
    up.respond = lambda r: ok(r.target)
    h = await gateway([route(up)])
    bad = b"POST /bad HTTP/1.1\r\nHost: a.test\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"
    c = await h.send(get("/ok") + bad + get("/after"))
    first = await c.response()
    assert first.status == 200 and first.body == b"/ok"
    assert_problem(await c.response(), 400, "bad_request")
    assert await c.closed()
    await asyncio.sleep(0.05)
    assert [q.target for q in up.requests] == [b"/ok"]
    assert b"/bad" not in up.received and b"/after" not in up.received


async def test_pipelining_is_bounded(up, gateway) -> None:
    limit = 4
    h = await gateway([route(up)], limits={"max_pipelined": limit})
    c = await h.send(get("/x") * 10_000)
    got = await c.responses()
    assert 1 <= len(got) <= limit, len(got)
    assert all(r.status == 200 for r in got)
    assert got[-1].header("connection") == "close"
    assert len(up.requests) == len(got)


async def test_data_after_connection_close_is_never_forwarded(up, gateway) -> None:
    h = await gateway([route(up)])
    c = await h.send(get("/1", extra="Connection: close\r\n") + get("/2"))
    got = await c.responses()
    assert [r.status for r in got] == [200]
    assert got[0].header("connection") == "close"
    assert [q.target for q in up.requests] == [b"/1"]
    assert b"/2" not in up.received


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        # refused at the head (no Host) while its chunked body is unread, then a bad chunk size
        (b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400, "invalid_host"),
        # refused (417) with its body unread, then a framing error in the same read
        (
            b"POST /p HTTP/1.1\r\nHost: a.test\r\nExpect: nope\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX",
            417,
            "expectation_failed",
        ),
        # refused (no Host) and closed, then bytes after `Connection: close`
        (b"GET / HTTP/1.1\r\nConnection: close\r\n\r\nGET / HTTP/1.1\r\n\r\n", 400, "invalid_host"),
        (b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n\x00\x01garbage", 400, "invalid_host"),
    ],
)
async def test_one_answer_when_a_refused_request_is_followed_by_garbage(
    up, gateway, data, status, code
) -> None:
    h = await gateway([route(up)])
    c = await h.send(data)
    got = await c.responses()
    assert len(got) == 1, [r.status for r in got]
    assert_problem(got[0], status, code)
    assert up.received == b""
