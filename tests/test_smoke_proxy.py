"""The first proof: a GET and a POST pass through, keep-alive on both sides."""

from __future__ import annotations

import aiohttp

from tests.helpers.gateway import make_config, start_proxy
from tests.helpers.upstream import RecordingUpstream, ok


async def test_get_and_post_pass_through_on_one_upstream_connection() -> None:
    up = await RecordingUpstream(respond=lambda r: ok(b"hello " + r.body)).start()
    gw = await start_proxy(make_config([{"name": "api", "path": "/api", "upstream": up.url, "auth": "none"}]))
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(gw.url + "/api/x?b=2&a=1") as r:
                assert r.status == 200
                assert await r.read() == b"hello "
            async with s.post(gw.url + "/api/y", data=b"world") as r:
                assert await r.read() == b"hello world"
        assert [q.target for q in up.requests] == [b"/api/x?b=2&a=1", b"/api/y"]
        assert up.connections == 1
    finally:
        await gw.close()
        await up.close()
