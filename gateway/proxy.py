"""The proxy listener: routes and pipeline compiled from config, the upstream pool, timers, draining."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import socket
import ssl
from collections.abc import Callable, Coroutine
from typing import Any

from gateway.config.schema import GatewayConfig
from gateway.errors import GatewayError
from gateway.http.connection import ConnectionBase
from gateway.http.exchange import Exchange
from gateway.http.outliers import EjectionMetrics, carry_over
from gateway.http.pool import UpstreamPool
from gateway.http.server import ClientConnection
from gateway.pipeline import Pipeline, Stage
from gateway.ratelimit.failover import FailoverLimiter
from gateway.routing import Route, Router, SSLCache, compile_route
from gateway.services import Services
from gateway.stages.auth import AuthStage
from gateway.stages.authorize import EnvStage, IPAllowStage, ScopeStage
from gateway.stages.client_ip import ClientIP, normalise
from gateway.stages.cors import Cors
from gateway.stages.identity import IdentityStage
from gateway.stages.ratelimit import RateLimitStage
from gateway.tasks import Tasks
from gateway.telemetry import Telemetry
from gateway.usage.writer import UsageWriter

log = logging.getLogger("gateway.proxy")

Observer = Callable[[Exchange], None]


class UsageGuard:
    """Under `usage.on_spool_full: shed`: a request that could not be metered is not served."""

    def __init__(self, writer: UsageWriter) -> None:
        self.writer = writer

    def __call__(self, ex: Exchange) -> None:
        if self.writer.full:
            raise GatewayError("service_unavailable", "usage cannot be recorded right now; try again shortly")


def build_routes(
    config: GatewayConfig, services: Services | None, ssl_cache: SSLCache | None = None
) -> list[Route]:
    """Compile every route with its ordered stages: CORS preflight (no key needed), authentication,
    environment, IP allowlist, scopes, then identity headers for the upstream. `ssl_cache` keeps one TLS
    context per CA bundle across reloads, and with it the pooled connections keyed by it."""
    if ssl_cache is None:
        ssl_cache = {}
    routes = []
    signing = config.identity.signing_key.encode() or None
    for rc in config.routes:
        route = compile_route(rc, ssl_cache)
        stages: list[Stage] = []
        if services is not None and services.usage is not None and config.usage.on_spool_full == "shed":
            stages.append(UsageGuard(services.usage))
        if rc.cors is not None:
            stages.append(Cors(rc.cors))
        if rc.auth != "none":
            if services is None:
                raise ValueError(f"route {rc.name!r} needs keys, but no key store is open")
            m = services.metrics
            policy = rc.query_key_policy or config.keys.query.policy
            stages.append(AuthStage(services.key_auth, rc.auth, policy, rc.name, services.throttle))
            if rc.env is not None:
                stages.append(EnvStage(rc.env, m))
            stages.append(IPAllowStage(m))
            stages.append(ScopeStage(rc.scopes, m))
            rl = config.ratelimit
            # Always present: a key's own limits apply even on routes without defaults.
            limiter = services.limiter
            if rc.ratelimit_on_backend_error is not None and isinstance(limiter, FailoverLimiter):
                limiter = limiter.with_policy(rc.ratelimit_on_backend_error)
            stages.append(RateLimitStage(limiter, rc.name, rc.ratelimit, rl.owner_limits, m, rl.legacy_headers))
            stages.append(IdentityStage(signing, config.identity.lifetime, services.clock))
        route.stages = stages
        routes.append(route)
    return routes


class ProxyServer:
    def __init__(
        self, config: GatewayConfig, loop: asyncio.AbstractEventLoop, services: Services | None = None
    ) -> None:
        self.services = services
        self.observers: list[Observer] = []
        self.loop = loop
        self.scheme = b"https" if config.tls else b"http"
        self._ssl_cache: SSLCache = {}
        self.reload(config)
        if services is not None:
            services.metrics.registry.register(EjectionMetrics(lambda: self.router.routes, loop.time))
            self.observers.append(
                Telemetry(
                    services.clock,
                    services.request_metrics,
                    services.usage,
                    services.access_log,
                    services.anomalies,
                )
            )
        self.pool = UpstreamPool(loop, config.upstream_keepalive, config.upstream_idle_timeout)
        self.connections: set[ConnectionBase] = set()
        self.tasks = Tasks()
        self.draining = False
        self.date = b""
        self._server: asyncio.Server | None = None
        self._ticker: asyncio.TimerHandle | None = None
        self._peer_cache: dict[str, str] = {}

    def reload(self, config: GatewayConfig) -> None:
        """Routes, request limits and the rest of what gateway/reload.py lists as live, from `config`:
        a request already routed keeps its route; the next ones see these."""
        # Everything that can fail first: a route that does not compile leaves the running ones in place.
        router = Router(build_routes(config, self.services, self._ssl_cache))
        pipeline = Pipeline(router, ClientIP(list(config.trusted_proxies)))
        previous: Router | None = getattr(self, "router", None)
        if previous is not None:
            carry_over(previous.routes, router.routes)
        self.config = config
        lim = config.limits
        self.header_timeout = lim.header_timeout
        self.body_timeout = lim.body_timeout
        self.idle_timeout = lim.idle_timeout
        self.max_header_bytes = lim.max_header_bytes
        self.max_headers = lim.max_headers
        self.max_header_line = lim.max_header_line
        self.max_pipelined = lim.max_pipelined
        self.max_connections = lim.max_connections
        self.underscores = config.headers_with_underscores
        self.router = router
        self.pipeline = pipeline
        self._tick_every = self._tick_interval(config)

    @staticmethod
    def _tick_interval(config: GatewayConfig) -> float:
        shortest = min(
            [config.limits.header_timeout, config.limits.body_timeout, config.limits.idle_timeout]
            + [t for r in config.routes for t in (r.timeouts.read, r.timeouts.total or 1e9)]
        )
        return max(0.02, min(0.25, shortest / 5))

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        self.tasks.spawn(coro)

    def record(self, ex: Exchange) -> None:
        for observe in self.observers:
            observe(ex)

    def normalise_peer(self, peer: str) -> str:
        cached = self._peer_cache.get(peer)
        if cached is None:
            ip = normalise(peer)
            cached = str(ip) if ip is not None else peer
            if len(self._peer_cache) > 65536:
                self._peer_cache.clear()
            self._peer_cache[peer] = cached
        return cached

    def ssl_context(self) -> ssl.SSLContext | None:
        tls = self.config.tls
        if tls is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ctx.load_cert_chain(tls.cert, tls.key)
        except OSError as e:  # ssl.SSLError too; neither names the file
            raise OSError(f"cannot load tls.cert {tls.cert!r} with tls.key {tls.key!r}: {e.strerror or e}") from None
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx

    async def start(self, sock: socket.socket | None = None) -> None:
        self._tick()
        host, port = self.config.listen
        kwargs: dict[str, Any] = {"ssl": self.ssl_context(), "backlog": 4096}
        if sock is not None:
            self._server = await self.loop.create_server(lambda: ClientConnection(self), sock=sock, **kwargs)
        else:
            self._server = await self.loop.create_server(
                lambda: ClientConnection(self), host, port, reuse_port=True, **kwargs
            )

    @property
    def sockets(self) -> list[socket.socket]:
        return list(self._server.sockets) if self._server else []

    def _tick(self) -> None:
        now = self.loop.time()
        self.date = email.utils.formatdate(usegmt=True).encode()
        for conn in [c for c in self.connections if c.deadline < now]:
            try:
                conn.on_deadline(now)
            except Exception:
                log.exception("deadline handling failed")
                conn.abort()
        self.pool.sweep(now)
        if self.services is not None and self.services.access_log is not None:
            self.services.access_log.flush()
        self._ticker = self.loop.call_later(self._tick_every, self._tick)

    async def drain(self, timeout: float) -> bool:
        """Stop accepting, let in-flight exchanges finish; True if all did within the timeout."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            if conn.active is None and not conn.queue and conn.current is None:
                conn._close()
        deadline = self.loop.time() + timeout
        while self.connections and self.loop.time() < deadline:  # noqa: ASYNC110 - connections end on their own
            await asyncio.sleep(0.05)
        clean = not self.connections
        for conn in list(self.connections):
            conn.abort()
        return clean

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        if self._server is not None:
            self._server.close()
        self.pool.close_all()
        await self.tasks.cancel_all()
