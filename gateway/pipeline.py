"""The ordered checks every request passes before it may go upstream.

Request-level checks run first, in the order of ARCHITECTURE.md (framing and Host, the canonical
path and the route, the body cap, the client address); then the route's own stages, compiled once
when the config loads. A stage returns None when it decided synchronously (the common, cheap case)
or an awaitable when it must wait (a store lookup, say); it refuses by raising GatewayError.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

from gateway.errors import GatewayError
from gateway.http.exchange import BODY_CHUNKED, BODY_LENGTH, Exchange
from gateway.http.paths import PathError, canonical_path, without_parameters
from gateway.ids import uuid7
from gateway.routing import Route, Router
from gateway.stages.client_ip import ClientIP

Stage = Callable[[Exchange], Awaitable[None] | None]

_HOST = re.compile(rb"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=-]+)(:[0-9]{1,5})?")
# Valid Host values already seen, as the name routing compares: a service is called by a handful of
# names, and checking one costs a regex and three string operations a request. Bounded: past it,
# a new name is checked every time, so hostile Host values cannot grow it.
_KNOWN_HOSTS_MAX = 256


class Pipeline:
    def __init__(self, router: Router, client_ip: ClientIP) -> None:
        self.router = router
        self.client_ip = client_ip
        self.known_hosts: dict[bytes, str] = {}

    def begin(self, ex: Exchange, peer: str) -> Awaitable[None] | None:
        """Check the request; return None when it may go upstream now, or an awaitable to wait on."""
        ex.request_id = uuid7()
        # The client address first: every refusal below is recorded (and throttled) with it.
        ex.client_ip, ex.xff = self.client_ip.derive(peer, ex.headers)
        if ex.expect_continue == 2:
            raise GatewayError("expectation_failed", "only 'Expect: 100-continue' is supported", close=True)
        route = self._route(ex)
        ex.route = route
        if ex.body_kind == BODY_LENGTH and ex.content_length > route.config.max_body:
            raise GatewayError(
                "payload_too_large",
                f"the body is {ex.content_length} bytes; this route accepts at most {route.config.max_body}",
                close=True,
            )
        stages = route.stages
        for i, stage in enumerate(stages):
            pending = stage(ex)
            if pending is not None:
                return self._finish(ex, pending, stages, i + 1)
        return None

    async def _finish(self, ex: Exchange, pending: Awaitable[None], stages: list[Stage], start: int) -> None:
        await pending
        for stage in stages[start:]:
            more = stage(ex)
            if more is not None:
                await more

    def _route(self, ex: Exchange) -> Route:
        method = ex.method
        if method == "CONNECT":
            raise GatewayError("method_not_allowed", "CONNECT is not supported", [(b"Allow", b"")], close=True)
        if ex.version == b"1.0" and ex.body_kind == BODY_CHUNKED:
            raise GatewayError("bad_request", "Transfer-Encoding is not allowed in HTTP/1.0", close=True)
        host = self._host(ex)
        target = ex.target
        if not target.startswith(b"/"):
            raise GatewayError("bad_request", "the request target must be a path starting with '/'", close=True)
        path, _sep, query = target.partition(b"?")
        if b"#" in query:
            raise GatewayError("invalid_path", "the request target contains a fragment ('#')")
        try:
            ex.path = canonical_path(path)
        except PathError as e:
            raise GatewayError("invalid_path", e.detail) from None
        ex.query = query
        route = self.router.match(ex.path, method, host)
        if (b";" in ex.path or b"%3B" in ex.path) and self.router.match_or_none(
            without_parameters(ex.path.replace(b"%3B", b";")), method, host
        ) is not route:
            # An upstream that drops path parameters (Tomcat, Spring) reads `/admin;x` as `/admin`, and
            # one that decodes first does the same with `/admin%3Bx`: served under another route's
            # auth here, it would be a bypass there.
            raise GatewayError("invalid_path", "the path's ';' parameters would give it another route")
        if ex.upgrade:
            upgrade = (ex.header(b"upgrade") or b"").strip().lower()
            if upgrade == b"websocket":
                if not route.config.websocket:
                    raise GatewayError(
                        "websocket_not_allowed", "this route does not accept WebSocket upgrades", close=True
                    )
            else:
                # Any other protocol switch (h2c, say) is never tunnelled: serve plain HTTP/1.1, then close.
                ex.upgrade = False
                ex.keep_alive = False
        return route

    def _host(self, ex: Exchange) -> str:
        if ex.host_count > 1:
            raise GatewayError("invalid_host", "the request has more than one Host header", close=True)
        raw = ex.host_raw
        known = self.known_hosts.get(raw)
        if known is not None:
            return known
        if not raw:
            if ex.version == b"1.1":
                raise GatewayError("invalid_host", "HTTP/1.1 requests must carry a Host header", close=True)
            return ""
        if not _HOST.fullmatch(raw):
            raise GatewayError("invalid_host", "the Host header is not a valid host[:port]", close=True)
        host = raw.decode("ascii").lower()
        if host.startswith("["):
            host = host[: host.index("]") + 1]
        elif ":" in host:
            host = host.rsplit(":", 1)[0]
        if len(self.known_hosts) < _KNOWN_HOSTS_MAX:
            self.known_hosts[raw] = host
        return host
