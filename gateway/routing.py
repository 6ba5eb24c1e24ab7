"""Routes compiled once from config, and the router that picks one for a canonical path."""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from gateway.config.routes import RouteConfig
from gateway.errors import GatewayError

if TYPE_CHECKING:
    from gateway.pipeline import Stage


@dataclass(slots=True)
class Upstream:
    """One upstream origin; `base` is its path prefix ("" for none)."""

    scheme: str
    host: str
    port: int
    base: bytes
    host_header: bytes
    ssl: ssl.SSLContext | None
    key: tuple[str, str, int, int] = field(init=False)
    # Passive health (http/outliers.py): failures in a row, out of rotation until, times ejected.
    failures: int = 0
    ejected_until: float = 0.0
    ejections: int = 0

    def __post_init__(self) -> None:
        self.key = (self.scheme, self.host, self.port, id(self.ssl))


@dataclass(slots=True)
class Route:
    config: RouteConfig
    name: str
    prefix: bytes
    methods: frozenset[str] | None
    host: str | None
    upstreams: list[Upstream]
    stages: list[Stage] = field(default_factory=list)
    next_upstream: int = 0  # round robin (http/outliers.py picks)
    ejections: int = 0

    def matches_host(self, host: str) -> bool:
        want = self.host
        if want is None:
            return True
        if want.startswith("*."):
            return host.endswith(want[1:]) and len(host) > len(want) - 1
        return host == want

    def upstream_path(self, path: bytes, upstream: Upstream) -> bytes:
        """The path sent upstream: prefix stripped if asked, under the upstream's base path."""
        if self.config.strip_prefix and self.prefix != b"/":
            path = path[len(self.prefix) :] or b"/"
        return upstream.base + path if upstream.base else path


SSLCache = dict[tuple[str | None, int], ssl.SSLContext]


def _ssl_context(ca: str | None, cache: SSLCache) -> ssl.SSLContext:
    """One context per CA bundle as it is now: a bundle replaced on disk gets a new one at a reload."""
    key = (ca, os.stat(ca).st_mtime_ns if ca else 0)
    ctx = cache.get(key)
    if ctx is None:
        ctx = ssl.create_default_context(cafile=ca)
        ctx.set_alpn_protocols(["http/1.1"])
        cache[key] = ctx
    return ctx


def compile_route(cfg: RouteConfig, ssl_cache: SSLCache) -> Route:
    urls = [cfg.upstream] if isinstance(cfg.upstream, str) else list(cfg.upstream)
    ups = []
    for url in urls:
        u = urlsplit(url)
        assert u.hostname is not None  # checked by the schema
        tls = u.scheme == "https"
        port = u.port or (443 if tls else 80)
        default_port = port == (443 if tls else 80)
        host = u.hostname
        shown = f"[{host}]" if ":" in host else host
        host_header = (shown if default_port else f"{shown}:{port}").encode()
        ups.append(
            Upstream(
                scheme=u.scheme,
                host=host,
                port=port,
                base=u.path.rstrip("/").encode(),
                host_header=host_header,
                ssl=_ssl_context(cfg.upstream_ca, ssl_cache) if tls else None,
            )
        )
    return Route(
        config=cfg,
        name=cfg.name,
        prefix=cfg.path.encode(),
        methods=frozenset(cfg.methods) if cfg.methods else None,
        host=cfg.host,
        upstreams=ups,
    )


class Router:
    """Longest prefix on a segment boundary wins; host-bound routes before host-free ones."""

    def __init__(self, routes: list[Route]) -> None:
        self.routes = sorted(routes, key=lambda r: (r.host is not None, len(r.prefix)), reverse=True)
        self._has_hosts = any(r.host for r in routes)

    def match(self, path: bytes, method: str, host: str) -> Route:
        allowed: set[str] = set()
        path_matched = False
        for r in self.routes:
            p = r.prefix
            if p != b"/" and not (
                path.startswith(p) and (len(path) == len(p) or path[len(p)] == 0x2F)
            ):
                continue
            if self._has_hosts and not r.matches_host(host):
                continue
            if r.methods is None or method in r.methods:
                return r
            path_matched = True
            allowed |= r.methods
        if path_matched:
            allow = ", ".join(sorted(allowed)).encode()
            raise GatewayError(
                "method_not_allowed",
                f"{method} is not allowed here; allowed: {allow.decode()}",
                [(b"Allow", allow)],
            )
        raise GatewayError("no_route", "no route matches this path")

    def match_or_none(self, path: bytes, method: str, host: str) -> Route | None:
        try:
            return self.match(path, method, host)
        except GatewayError:
            return None
