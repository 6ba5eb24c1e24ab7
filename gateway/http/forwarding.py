"""Running an exchange: the pipeline's stages, then the upstream request (a pooled connection or a
new one, one fresh retry for an idempotent request on a stale connection), or a tunnel."""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from time import perf_counter
from typing import TYPE_CHECKING

from gateway.errors import DirectResponse, GatewayError
from gateway.http import outliers
from gateway.http.connection import D_LINGER, INF, PAUSE_BUFFER
from gateway.http.exchange import Exchange
from gateway.http.heads import request_head
from gateway.http.responses import Responses

if TYPE_CHECKING:
    from gateway.http.upstream import UpstreamConnection
    from gateway.routing import Upstream

log = logging.getLogger("gateway.http")

IDEMPOTENT = frozenset(["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"])


class Forwarding(Responses):
    # --- running an exchange ----------------------------------------------------------------
    def _start_next(self) -> None:
        if self.closed or self.closing or self.active is not None or not self.queue:
            return
        ex = self.queue.popleft()
        self.active = ex
        try:
            pending = self.server.pipeline.begin(ex, self.peer)
            if ex.body_received > ex.route.config.max_body:  # type: ignore[union-attr]
                raise GatewayError("payload_too_large", "the body exceeds this route's limit", close=True)
        except Exception as e:
            self._stage_failed(ex, e)
            return
        if pending is None:
            self._dispatch(ex, fresh=False)
        else:
            self.server.spawn(self._await_stages(ex, pending))

    async def _await_stages(self, ex: Exchange, pending: Awaitable[None]) -> None:
        try:
            await pending
        except Exception as e:
            self._stage_failed(ex, e)
            return
        if not self.closed and ex is self.active:
            self._dispatch(ex, fresh=False)

    def _stage_failed(self, ex: Exchange, e: Exception) -> None:
        """A stage refused (GatewayError), answered itself (DirectResponse), or broke (a bug: 500)."""
        if isinstance(e, GatewayError):
            self._reject(ex, e)
        elif isinstance(e, DirectResponse):
            self._write_response(ex, e.status, e.headers, e.body, b"")
        else:
            log.error("request pipeline failed", exc_info=e)
            self._reject(ex, GatewayError("internal_error", "the gateway failed to handle this request"))

    def _dispatch(self, ex: Exchange, fresh: bool) -> None:
        route = ex.route
        assert route is not None
        ups = route.upstreams
        up = ups[0] if len(ups) == 1 else outliers.pick(route, self.loop.time())
        if ex.expect_continue == 1 and ex.version == b"1.1" and not ex.body_received and not ex.body_complete:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        ex.expect_continue = 0
        extra = [
            (b"x-forwarded-for", ex.xff),
            (b"x-forwarded-proto", self.server.scheme),
            (b"x-request-id", ex.request_id.encode()),
        ]
        if ex.host_raw:
            extra.append((b"x-forwarded-host", ex.host_raw))
        if ex.upstream_extra:
            extra += ex.upstream_extra
        head = request_head(ex, route, up, extra, ex.upgrade)
        conn = None if fresh else self.server.pool.acquire(up)
        if conn is not None:
            self._send(ex, conn, head)
        else:
            self.server.spawn(self._connect(ex, up, head))

    async def _connect(self, ex: Exchange, up: Upstream, head: bytes) -> None:
        route = ex.route
        assert route is not None
        try:
            conn = await self.server.pool.connect(up, route.config.timeouts.connect)
        except GatewayError as e:
            outliers.failed(route, up, self.loop.time())
            if ex is self.active and not self.closed:
                self._reject(ex, e)
            return
        if self.closed or ex is not self.active or ex.done:
            conn.close()
            return
        if conn.closed:  # the upstream hung up between accepting and our first write
            outliers.failed(route, up, self.loop.time())
            self.upstream_failed(ex, GatewayError("upstream_unavailable", "the upstream closed the connection"), False)
            return
        self._send(ex, conn, head)

    def _send(self, ex: Exchange, conn: UpstreamConnection, head: bytes) -> None:
        now = self.loop.time()
        ex.upstream_started = perf_counter()
        conn.send(ex, self, head, now)
        if self.write_paused and conn.transport is not None:
            conn.transport.pause_reading()
        self._resume(PAUSE_BUFFER)

    def upstream_failed(self, ex: Exchange, err: GatewayError, retry: bool) -> None:
        if ex is not self.active or self.closed:
            return
        conn, ex.upstream = ex.upstream, None
        if retry and not ex.retried and not ex.response_started and ex.method in IDEMPOTENT:
            ex.retried = True  # a pooled connection the upstream had already closed: one fresh try
            self._dispatch(ex, fresh=True)
            return
        # Not while the request body was still coming from a slow client (an upload that outlives the
        # read timeout says nothing of the upstream, and could be used to eject a healthy one), unless
        # it was the upstream that had stopped reading it.
        if (
            conn is not None
            and not ex.response_started
            and (ex.body_complete or conn.write_paused)
            and ex.route is not None
        ):
            outliers.failed(ex.route, conn.upstream, self.loop.time())
        self._reject(ex, err)

    def start_tunnel(self, conn: UpstreamConnection) -> None:
        self.flush_head()
        ex = self.active
        self.tunnel = conn
        self.deadline = INF
        self.deadline_kind = 0
        if ex is not None:
            ex.done = True
            ex.upstream = None
            self.active = None
            self.server.record(ex)
        if self.upgrade_rest:
            conn.tunnel_write(self.upgrade_rest)
            self.upgrade_rest = b""

    def tunnel_write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    def tunnel_ended(self, clean: bool) -> None:
        """The upstream's side of a tunnel closed. After a clean end, what the client has not taken
        yet still goes out before the close (within the idle timeout); after a failure, nothing."""
        self.tunnel = None
        if not clean:
            self.abort()
            return
        self._close()
        self.deadline = self.loop.time() + self.server.idle_timeout
        self.deadline_kind = D_LINGER
