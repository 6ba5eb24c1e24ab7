"""The typed shape of gateway.yaml: every field defaulted, checked once at load time.

The top level and the shared sections are here; a route's own fields are in `routes.py`, anomaly
detection's in `anomalies.py`."""

from __future__ import annotations

import re
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from gateway.config.anomalies import AnomaliesConfig
from gateway.config.common import Strict, check_rates
from gateway.config.routes import RouteConfig
from gateway.config.units import Duration, HostPort, Network, Size

_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")


class TLSListener(Strict):
    cert: str = Field(description="PEM certificate chain file")
    key: str = Field(description="PEM private key file")


class AdminConfig(Strict):
    listen: HostPort = ("127.0.0.1", 8081)
    token: str = Field(default="", description="bearer token for /admin/*; empty disables token auth")
    cors_origins: list[str] = Field(default_factory=list, description="browser origins allowed on the admin API")


class KeyQueryConfig(Strict):
    names: list[str] = Field(default_factory=lambda: ["api_key", "apikey"])
    policy: Literal["reject", "warn"] = "reject"


class OldPepper(Strict):
    version: int = Field(ge=1)
    secret: str


class IdentityConfig(Strict):
    signing_key: str = Field(default="", description="HS256 key for X-Gateway-Identity; empty: not sent")
    lifetime: Duration = Field(default=60.0, description="exp - iat of the signed identity")

    @field_validator("lifetime")
    @classmethod
    def _lifetime(cls, v: float) -> float:
        if not 0 < v <= 60:
            raise ValueError("must be more than 0s and at most 60s")
        return v


class KeysConfig(Strict):
    prefix: str = "sk"
    default_ttl: Duration | None = 90 * 86400.0
    warn_before: Duration = 7 * 86400.0
    headers: list[str] = Field(default_factory=lambda: ["authorization", "x-api-key"])
    query: KeyQueryConfig = KeyQueryConfig()
    pepper: str = ""
    pepper_version: int = Field(default=1, ge=1, description="version stored beside each digest")
    old_peppers: list[OldPepper] = Field(default_factory=list, description="still accepted for lookups")
    cache_ttl: Duration = Field(default=30.0, description="a verified key is re-read from the store after this")
    negative_ttl: Duration = Field(default=5.0, description="an unknown key is remembered this long")
    negative_cache_size: int = Field(default=100_000, ge=0)
    max_stale: Duration = Field(default=300.0, description="with the store down, cached keys serve this long")
    touch_interval: Duration = Field(default=10.0, description="how often last-used times are written")
    sync_interval: Duration = Field(
        default=0.25, description="how often each process reads key changes made elsewhere (revocations) from the store"
    )

    @field_validator("cache_ttl")
    @classmethod
    def _cache_ttl(cls, v: float) -> float:
        if v > 30:
            raise ValueError("at most 30s: a revocation elsewhere must reach this process within it")
        return v

    @field_validator("sync_interval")
    @classmethod
    def _sync_interval(cls, v: float) -> float:
        if not 0.01 <= v <= 5:
            raise ValueError("from 10ms to 5s: revocations made elsewhere reach each process within it")
        return v

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z][a-z0-9]{0,15}", v):
            raise ValueError("must be 1-16 lowercase letters or digits, starting with a letter")
        return v

    @field_validator("default_ttl", mode="before")
    @classmethod
    def _ttl_none(cls, v: object) -> object:
        return None if v in ("none", None) else v

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: list[str]) -> list[str]:
        for h in v:
            if not _HEADER_NAME.fullmatch(h):
                raise ValueError(f"{h!r} is not a header name")
        return [h.lower() for h in v]


class RateLimitConfig(Strict):
    backend: str = "memory://"
    on_backend_error: Literal["local", "open", "closed"] = "local"
    replicas: int = Field(default=1, ge=1, description="replicas sharing the limits; each enforces 1/N when Redis is down")
    timeout: Duration = Field(default=0.05, description="a Redis call slower than this counts as a failure")
    legacy_headers: bool = Field(default=False, description="also send X-RateLimit-Limit/-Remaining/-Reset")
    owner_limits: list[str] = Field(default_factory=list, description="limits shared by all of an owner's keys")

    @field_validator("owner_limits")
    @classmethod
    def _owner_limits(cls, v: list[str]) -> list[str]:
        check_rates(v)
        return v

    @field_validator("backend")
    @classmethod
    def _backend(cls, v: str) -> str:
        scheme = urlsplit(v).scheme
        if scheme not in ("memory", "redis", "rediss"):
            raise ValueError("must be memory://, redis://HOST:PORT/DB or rediss://…")
        if scheme != "memory":
            from gateway.ratelimit.resp import url_options

            url_options(v)  # its messages quote no value of the URL: it may hold a password
        return v


class LimitsConfig(Strict):
    """Per-connection protection: sizes and deadlines on the proxy listener."""

    max_header_bytes: Size = Field(default=32768, description="request line plus all header lines; over it: 431")
    max_headers: int = Field(default=100, ge=1, le=10000, description="header lines in a request; over it: 431")
    max_header_line: Size = Field(
        default=8192, description="the request target, or one header line (name: value); over it: 431"
    )
    header_timeout: Duration = Field(default=10.0, description="from the first byte of a request to its last header")
    body_timeout: Duration = Field(default=30.0, description="longest pause between two pieces of a request body: 408")
    idle_timeout: Duration = Field(default=75.0, description="keep-alive: an idle client connection is closed after it")
    max_pipelined: int = Field(default=32, ge=1, description="requests read ahead on one connection")
    max_connections: int = Field(default=10000, ge=1, description="open client connections per worker")


class AuthThrottleConfig(Strict):
    """Brute-force protection: failed authentications counted per client IP."""

    max_failures: int = Field(default=20, ge=1, description="failures per window before the IP is cooled down")
    window: Duration = 60.0
    cooldown: Duration = Field(default=300.0, description="how long an IP past max_failures gets 429")
    max_tracked: int = Field(default=100_000, ge=100, description="IPs remembered at most (LRU)")


class UsageConfig(Strict):
    """The usage log: one record per request, batched to the store, spooled to disk when it is down."""

    enabled: bool = True
    spool_dir: str = Field(default="", description="default: beside the SQLite store, else ./usage-spool")
    spool_max_bytes: Size = Field(default=1024**3, description="at the cap, on_spool_full applies")
    on_spool_full: Literal["shed", "drop"] = Field(default="shed", description="shed: metered routes answer 503")
    batch_size: int = Field(default=1000, ge=1, le=100_000)
    flush_interval: Duration = Field(default=1.0, description="a batch waits at most this long")
    queue_max: int = Field(default=100_000, ge=1000)
    write_timeout: Duration = Field(default=5.0, description="a slower write counts as a failure: spool")
    retention: Duration = Field(default=30 * 86400.0, description="raw records kept; rollups kept beyond")
    rollup_interval: Duration = Field(default=3600.0)
    access_log: str = Field(default="", description="JSON access log: '-' for stdout, a file path, or empty")


class MetricsConfig(Strict):
    per_key_top: int = Field(default=20, ge=0, le=1000, description="keys with their own series; the rest: other")


class GatewayConfig(Strict):
    listen: HostPort = ("0.0.0.0", 8080)
    tls: TLSListener | None = None
    admin: AdminConfig = AdminConfig()
    store: str = "sqlite:///gateway.db"
    ratelimit: RateLimitConfig = RateLimitConfig()
    keys: KeysConfig = KeysConfig()
    identity: IdentityConfig = IdentityConfig()
    auth: AuthThrottleConfig = AuthThrottleConfig()
    usage: UsageConfig = UsageConfig()
    metrics: MetricsConfig = MetricsConfig()
    anomalies: AnomaliesConfig = AnomaliesConfig()
    trusted_proxies: list[Network] = Field(default_factory=list)
    headers_with_underscores: Literal["drop", "reject", "allow"] = "drop"
    limits: LimitsConfig = LimitsConfig()
    shutdown_timeout: Duration = 30.0
    shutdown_delay: Duration = Field(default=0.0, description="readiness false this long before listeners close")
    upstream_keepalive: int = Field(default=64, ge=0, description="idle upstream connections kept per upstream")
    upstream_idle_timeout: Duration = 60.0
    routes: Annotated[list[RouteConfig], Field(default_factory=list)]

    @field_validator("store")
    @classmethod
    def _store(cls, v: str) -> str:
        if urlsplit(v).scheme not in ("sqlite", "postgresql", "postgres"):
            raise ValueError("must be sqlite:///FILE or postgresql://USER:PASS@HOST:PORT/DB")
        return v

    @field_validator("routes")
    @classmethod
    def _unique(cls, v: list[RouteConfig]) -> list[RouteConfig]:
        seen: set[str] = set()
        for r in v:
            if r.name in seen:
                raise ValueError(f"two routes are named {r.name!r}")
            seen.add(r.name)
        return v
