"""A route in gateway.yaml: where it matches, where it forwards, what it asks of a key."""

from __future__ import annotations

import os
import re
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from gateway.config.common import SCOPE, Strict, check_rates
from gateway.config.units import Duration, Size

_METHOD = re.compile(r"[A-Z]+")


class Timeouts(Strict):
    connect: Duration = 5.0
    read: Duration = Field(default=60.0, description="longest wait for the next byte of the upstream's response")
    total: Duration | None = Field(default=None, description="whole exchange with the upstream; none by default")


class OutlierConfig(Strict):
    """Passive health checks over a route's upstreams (as Envoy's outlier detection): an upstream that
    failed this many times in a row (refused, reset, timed out: no response) is left out of the
    rotation for `ejection`, longer each time it fails again on return, up to `max_ejection`."""

    consecutive_failures: int = Field(default=5, ge=1)
    ejection: Duration = 30.0
    max_ejection: Duration = 300.0
    max_ejected_percent: int = Field(default=50, ge=0, le=100, description="of the route's upstreams, at once")


class CorsConfig(Strict):
    origins: list[str] = Field(description="allowed origins, or [\"*\"]")
    methods: list[str] = Field(default_factory=lambda: ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"])
    headers: list[str] = Field(default_factory=lambda: ["authorization", "content-type", "x-api-key"])
    expose_headers: list[str] = Field(default_factory=list)
    credentials: bool = False
    max_age: Duration = 600.0

    @model_validator(mode="after")
    def _wildcard(self) -> CorsConfig:
        if self.credentials and "*" in self.origins:
            raise ValueError("credentials: true cannot be combined with origin \"*\" (browsers refuse it)")
        return self


class RouteConfig(Strict):
    name: str
    path: str
    methods: list[str] | None = None
    host: str | None = None
    upstream: str | list[str]
    strip_prefix: bool = False
    preserve_host: bool = False
    auth: Literal["required", "optional", "none"] = "required"
    scopes: dict[str, list[str]] | list[str] = Field(default_factory=list)
    ratelimit: list[str] = Field(default_factory=list)
    ratelimit_on_backend_error: Literal["local", "open", "closed"] | None = Field(
        default=None, description="this route's ratelimit.on_backend_error"
    )
    query_key_policy: Literal["reject", "warn"] | None = None
    env: Literal["live", "test"] | None = Field(default=None, description="accept only keys of this env")
    max_body: Size = Field(default=10 * 1024 * 1024, description="request body cap: 413 before any byte goes upstream")
    timeouts: Timeouts = Timeouts()
    outlier: OutlierConfig = OutlierConfig()
    upstream_ca: str | None = Field(default=None, description="CA bundle to verify https upstreams (default: system)")
    websocket: bool = False
    cors: CorsConfig | None = None

    @field_validator("upstream_ca")
    @classmethod
    def _upstream_ca(cls, v: str | None) -> str | None:
        if v is not None and not os.path.isfile(v):
            raise ValueError(f"no such file: {v}")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", v):
            raise ValueError("must be 1-64 letters, digits, '_', '.' or '-'")
        return v

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        from gateway.http.paths import PathError, canonical_path

        if not v.startswith("/"):
            raise ValueError("must start with '/'")
        try:
            canon = canonical_path(v.encode())
        except PathError as e:
            raise ValueError(f"is not a canonical path ({e.detail})") from None
        if canon.decode() != v:
            raise ValueError(f"is not in canonical form (write {canon.decode()!r})")
        return v.rstrip("/") or "/"

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return None
        if not v:
            raise ValueError("must name at least one method (or be left out for all)")
        for m in v:
            if not _METHOD.fullmatch(m):
                raise ValueError(f"{m!r} is not an uppercase HTTP method")
        return v

    @field_validator("host")
    @classmethod
    def _host(cls, v: str | None) -> str | None:
        if v is None:
            return None
        if not re.fullmatch(r"(\*\.)?[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*", v):
            raise ValueError("must be a host name, optionally starting with '*.'")
        return v.lower()

    @field_validator("upstream")
    @classmethod
    def _upstream(cls, v: str | list[str]) -> str | list[str]:
        urls = [v] if isinstance(v, str) else v
        if not urls:
            raise ValueError("needs at least one URL")
        for u in urls:
            parts = urlsplit(u)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"{u!r} is not an http:// or https:// URL")
            if parts.query or parts.fragment:
                raise ValueError(f"{u!r}: an upstream URL takes no query or fragment")
            try:
                parts.port  # noqa: B018 - raises on a bad port
            except ValueError:
                raise ValueError(f"{u!r} has a bad port") from None
        return v

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, v: dict[str, list[str]] | list[str]) -> dict[str, list[str]] | list[str]:
        lists = v.values() if isinstance(v, dict) else [v]
        if isinstance(v, dict):
            for m in v:
                if not _METHOD.fullmatch(m):
                    raise ValueError(f"{m!r} is not an uppercase HTTP method")
        for scopes in lists:
            for s in scopes:
                if not SCOPE.fullmatch(s):
                    raise ValueError(f"{s!r} is not a scope (like orders:read, orders:* or *)")
        return v

    @field_validator("ratelimit")
    @classmethod
    def _ratelimit(cls, v: list[str]) -> list[str]:
        check_rates(v)
        return v
