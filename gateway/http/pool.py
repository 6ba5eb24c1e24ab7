"""The keep-alive pool of upstream connections: idle ones per origin, and the busy ones.

A connection is taken most recently used first (the one likeliest to still be open), returned only
after a cleanly framed exchange, and closed past `upstream_idle_timeout`; the proxy's ticker sweeps
idle connections and times out stalled exchanges.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from gateway.errors import GatewayError
from gateway.http.upstream import UpstreamConnection

if TYPE_CHECKING:
    from gateway.routing import Upstream


class UpstreamPool:
    """Idle keep-alive connections per upstream origin, most recently used first."""

    def __init__(self, loop: asyncio.AbstractEventLoop, keepalive: int, idle_timeout: float) -> None:
        self.loop = loop
        self.keepalive = keepalive
        self.idle_timeout = idle_timeout
        self.idle: dict[tuple[str, str, int, int], list[UpstreamConnection]] = {}
        self.busy: set[UpstreamConnection] = set()

    def acquire(self, upstream: Upstream) -> UpstreamConnection | None:
        conns = self.idle.get(upstream.key)
        while conns:
            conn = conns.pop()
            if not conn.closed:
                conn.reused = True
                return conn
        return None

    async def connect(self, upstream: Upstream, timeout: float) -> UpstreamConnection:
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(
                    lambda: UpstreamConnection(self, upstream),
                    upstream.host,
                    upstream.port,
                    ssl=upstream.ssl,
                    server_hostname=upstream.host if upstream.ssl else None,
                ),
                timeout,
            )
        except TimeoutError:
            raise GatewayError("upstream_timeout", "connecting to the upstream timed out") from None
        except OSError as e:
            reason = "TLS verification failed" if "SSL" in type(e).__name__ else "connection refused or failed"
            raise GatewayError("upstream_unavailable", f"cannot connect to the upstream: {reason}") from None
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        self.busy.discard(conn)
        if conn.closed or not conn.reusable or self.keepalive == 0:
            conn.close()
            return
        conns = self.idle.setdefault(conn.key, [])
        if len(conns) >= self.keepalive:
            conn.close()
            return
        conn.deadline = self.loop.time() + self.idle_timeout
        if conn.transport is not None:
            # A slow client may have paused it as the last bytes went out; an idle connection reads
            # (to see the upstream close it), and the next exchange must hear its answer.
            conn.transport.resume_reading()
        conns.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        self.busy.discard(conn)
        conns = self.idle.get(conn.key)
        if conns and conn in conns:
            conns.remove(conn)

    def sweep(self, now: float) -> None:
        """Close idle connections past their time; time out stalled exchanges."""
        for conns in self.idle.values():
            for conn in [c for c in conns if c.deadline < now]:
                conn.close()
        for conn in [c for c in self.busy if c.deadline < now or c.total_deadline < now]:
            conn.on_timeout()

    def close_all(self) -> None:
        for conns in list(self.idle.values()):
            for conn in list(conns):
                conn.close()
        for conn in list(self.busy):
            with contextlib.suppress(Exception):
                conn.abort()
