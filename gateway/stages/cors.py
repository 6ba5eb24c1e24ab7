"""CORS per route: preflights answered by the gateway (no key needed), allowed origins echoed."""

from __future__ import annotations

from gateway.config.routes import CorsConfig
from gateway.errors import DirectResponse, GatewayError
from gateway.http.exchange import Exchange


class Cors:
    def __init__(self, cfg: CorsConfig) -> None:
        self.any_origin = "*" in cfg.origins
        self.origins = frozenset(o.encode() for o in cfg.origins)
        self.methods = frozenset(m.upper() for m in cfg.methods)
        self.allow_methods = ", ".join(cfg.methods).encode()
        self.allow_headers = ", ".join(cfg.headers).encode()
        self.header_set = frozenset(h.lower() for h in cfg.headers)
        self.expose = ", ".join(cfg.expose_headers).encode()
        self.credentials = cfg.credentials
        self.max_age = str(int(cfg.max_age)).encode()

    def _origin_headers(self, origin: bytes) -> list[tuple[bytes, bytes]]:
        headers = [(b"Access-Control-Allow-Origin", b"*" if self.any_origin and not self.credentials else origin)]
        if not self.any_origin or self.credentials:
            headers.append((b"Vary", b"Origin"))
        if self.credentials:
            headers.append((b"Access-Control-Allow-Credentials", b"true"))
        return headers

    def __call__(self, ex: Exchange) -> None:
        origin = ex.header(b"origin")
        if origin is None:
            return
        allowed = self.any_origin or origin in self.origins
        requested = ex.header(b"access-control-request-method")
        if ex.method == "OPTIONS" and requested is not None:
            if not allowed:
                raise GatewayError("cors_rejected", "this origin may not call this route")
            if requested.decode("latin-1").upper() not in self.methods:
                raise GatewayError("cors_rejected", "this method is not allowed cross-origin")
            wanted = ex.header(b"access-control-request-headers") or b""
            for h in wanted.split(b","):
                h = h.strip().lower()
                if h and h.decode("latin-1") not in self.header_set:
                    raise GatewayError("cors_rejected", f"header {h.decode('latin-1')!r} is not allowed")
            headers = self._origin_headers(origin)
            headers += [
                (b"Access-Control-Allow-Methods", self.allow_methods),
                (b"Access-Control-Allow-Headers", self.allow_headers),
                (b"Access-Control-Max-Age", self.max_age),
            ]
            raise DirectResponse(204, headers)
        if allowed:
            ex.response_extra += self._origin_headers(origin)
            if self.expose:
                ex.response_extra.append((b"Access-Control-Expose-Headers", self.expose))
