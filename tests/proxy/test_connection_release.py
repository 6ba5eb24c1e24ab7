"""A closed connection is freed by reference counting alone, on both sides of the gateway.

Serving processes freeze their long-lived heap (gateway/heap.py): a frozen object the collector
would have to find in a reference cycle is never freed. So nothing of a connection may wait for the
collector: these tests run with it switched off and expect every closed connection gone at once.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from gateway.http.server import ClientConnection
from gateway.http.upstream import UpstreamConnection
from tests.helpers.net import free_port
from tests.helpers.polling import wait_for

from .wire import get, route


def alive(cls: type) -> int:
    """Instances of cls that exist (the collector tracks each until it is freed)."""
    return sum(1 for o in gc.get_objects() if isinstance(o, cls))


def connections() -> tuple[int, int]:
    """Client and upstream connections that exist."""
    return alive(ClientConnection), alive(UpstreamConnection)


@pytest.fixture
def no_collector() -> Iterator[tuple[int, int]]:
    """The collector switched off; yields the connections that exist before the test's own."""
    gc.collect()
    gc.disable()
    try:
        yield connections()
    finally:
        gc.enable()


async def freed(before: tuple[int, int], what: str) -> None:
    await wait_for(lambda: connections() == before, 3, 0.01, what)


async def test_closed_client_and_upstream_connections_are_freed_without_the_collector(
    up, gateway, no_collector
) -> None:
    before = no_collector
    h = await gateway([route(up)])
    clients = []
    for i in range(4):
        c = await h.client()
        await c.send(get(f"/{i}"))
        assert (await c.response()).status == 200
        clients.append(c)
    assert len(h.proxy.connections) == 4
    assert alive(ClientConnection) == before[0] + 4
    assert alive(UpstreamConnection) > before[1]

    for c in clients:
        c.close()
    await wait_for(lambda: not h.proxy.connections, 3, 0.01, "the gateway seeing its clients go")
    await wait_for(lambda: alive(ClientConnection) == before[0], 3, 0.01, "the closed client connections freed")

    h.proxy.pool.close_all()
    await wait_for(
        lambda: alive(UpstreamConnection) == before[1], 3, 0.01, "the closed upstream connections freed"
    )
    assert not gc.isenabled()  # nothing above turned the collector back on


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (get("/x", extra="Connection: close\r\n"), 200),  # the gateway closes after answering
        (b"HEAD /x HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n", 200),  # a fresh parser upstream
        (b"GET /x HTTP/1.1\r\nHost: a.test\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (get("/x", host="a.test\r\nHost: b.test"), 400),  # refused by the pipeline, not the parser
    ],
)
async def test_connections_ended_by_the_gateway_are_freed_without_the_collector(
    up, gateway, no_collector, request_bytes: bytes, status: int
) -> None:
    h = await gateway([route(up)])
    c = await h.client()
    await c.send(request_bytes)
    assert (await c.response(head_only=request_bytes.startswith(b"HEAD"))).status == status
    assert await c.closed()
    await wait_for(lambda: not h.proxy.connections, 3, 0.01, "the gateway's side closed")
    h.proxy.pool.close_all()
    await freed(no_collector, "both sides freed")


async def test_connection_to_a_refused_upstream_is_freed_without_the_collector(gateway, no_collector) -> None:
    h = await gateway([route(f"http://127.0.0.1:{free_port()}")])
    c = await h.client()
    await c.send(get("/x"))
    assert (await c.response()).status == 502
    c.close()
    await freed(no_collector, "the connection freed")
