"""Authorization of an authenticated key: environment, client IP allowlist, scopes for the method."""

from __future__ import annotations

import ipaddress

from gateway.errors import GatewayError
from gateway.http.exchange import Exchange
from gateway.metrics import Metrics
from gateway.stages.client_ip import normalise

# Methods that read like GET need GET's scopes when a route lists scopes per method.
_AS_GET = {"HEAD": "GET", "OPTIONS": "GET"}


def grants(granted: frozenset[str], required: str) -> bool:
    """`*` grants all; `orders:*` grants `orders:read` and `orders:items:read`."""
    if required in granted or "*" in granted:
        return True
    parts = required.split(":")
    return any(":".join(parts[:i]) + ":*" in granted for i in range(1, len(parts)))


class EnvStage:
    def __init__(self, env: str, metrics: Metrics) -> None:
        self.env = env
        self.metrics = metrics

    def __call__(self, ex: Exchange) -> None:
        p = ex.principal
        if p is not None and p.record.env != self.env:
            self.metrics.auth_rejected("wrong_environment")
            raise GatewayError("wrong_environment", f"this route accepts only {self.env} keys")


class IPAllowStage:
    """A key with an allowlist works only from those networks; an address we cannot parse is denied."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._parsed: dict[str, ipaddress.IPv4Address | ipaddress.IPv6Address | None] = {}

    def __call__(self, ex: Exchange) -> None:
        p = ex.principal
        if p is None or p.networks is None:
            return
        ip = self._parsed.get(ex.client_ip)
        if ip is None:
            ip = normalise(ex.client_ip)
            if len(self._parsed) > 65536:
                self._parsed.clear()
            self._parsed[ex.client_ip] = ip
        if ip is None or not any(ip.version == n.version and ip in n for n in p.networks):
            self.metrics.auth_rejected("ip_not_allowed")
            raise GatewayError("ip_not_allowed", "this key may not be used from your address")


class ScopeStage:
    """Route scopes: a list for every method, or per method (unlisted methods are refused)."""

    def __init__(self, scopes: dict[str, list[str]] | list[str], metrics: Metrics) -> None:
        self.per_method = isinstance(scopes, dict)
        self.all = tuple(scopes) if isinstance(scopes, list) else ()
        self.by_method = {m: tuple(v) for m, v in scopes.items()} if isinstance(scopes, dict) else {}
        self.metrics = metrics

    def __call__(self, ex: Exchange) -> None:
        p = ex.principal
        if p is None:
            return  # `auth: optional` without a key: the upstream sees no identity
        if self.per_method:
            method = ex.method
            required = self.by_method.get(method)
            if required is None:
                required = self.by_method.get(_AS_GET.get(method, ""))
            if required is None:
                self.metrics.auth_rejected("insufficient_scope")
                raise GatewayError("insufficient_scope", f"no scope grants {method} on this route")
        else:
            required = self.all
        granted = p.granted
        for scope in required:
            if not grants(granted, scope):
                self.metrics.auth_rejected("insufficient_scope")
                raise GatewayError("insufficient_scope", f"this request needs the scope {scope!r}")
