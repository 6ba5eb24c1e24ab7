"""A refusal answered before its body arrived: a small rest is read and dropped so the connection
stays usable (as nginx does); a large one, or a client waiting on 100-continue, closes it."""

from __future__ import annotations

import asyncio

from tests.helpers.gateway import make_config, read_response, start_proxy
from tests.helpers.upstream import RecordingUpstream


async def _gateway() -> tuple[RecordingUpstream, object]:
    up = await RecordingUpstream().start()
    gw = await start_proxy(make_config([{"name": "api", "path": "/api", "upstream": up.url}]))
    return up, gw


async def test_small_body_behind_a_refusal_is_drained_and_the_connection_reused() -> None:
    up, gw = await _gateway()
    try:
        reader, writer = await gw.open()  # type: ignore[attr-defined]
        writer.write(b"POST /nowhere HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n")
        status, headers, _ = await read_response(reader)
        assert status == 404
        assert headers.get("connection") != "close"
        writer.write(b"0123456789GET /api/next HTTP/1.1\r\nHost: a\r\n\r\n")
        status, _, body = await read_response(reader)
        assert status == 200 and body == b"ok"
        assert [r.target for r in up.requests] == [b"/api/next"]  # the dropped body never went upstream
        assert b"0123456789" not in up.received
        writer.close()
    finally:
        await gw.close()  # type: ignore[attr-defined]
        await up.close()


async def test_large_body_behind_a_refusal_closes_the_connection() -> None:
    up, gw = await _gateway()
    try:
        reader, writer = await gw.open()  # type: ignore[attr-defined]
        writer.write(b"POST /nowhere HTTP/1.1\r\nHost: a\r\nContent-Length: 10000000\r\n\r\n")
        status, headers, _ = await read_response(reader)
        assert status == 404
        assert headers.get("connection") == "close"
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert up.received == b""
    finally:
        await gw.close()  # type: ignore[attr-defined]
        await up.close()


async def test_client_waiting_for_100_continue_is_not_kept() -> None:
    up, gw = await _gateway()
    try:
        reader, writer = await gw.open()  # type: ignore[attr-defined]
        writer.write(b"POST /nowhere HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n")
        status, headers, _ = await read_response(reader)
        assert status == 404
        assert headers.get("connection") == "close"
        assert up.received == b""
    finally:
        await gw.close()  # type: ignore[attr-defined]
        await up.close()
