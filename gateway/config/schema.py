"""The typed shape of gateway.yaml: every field defaulted, checked once at load time."""

from __future__ import annotations

import re
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gateway.config.units import Duration, HostPort, Network, Size, parse_rate

_METHOD = re.compile(r"^[A-Z]+$")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
SCOPE = re.compile(r"^(\*|[a-z0-9][a-z0-9_.-]*(:([a-z0-9][a-z0-9_.-]*|\*))*)$")


def check_rates(rates: list[str]) -> None:
    periods: set[int] = set()
    for r in rates:
        _, period = parse_rate(r)
        if period in periods:
            raise ValueError(f"two limits per {r.split('/')[-1].strip()}: give one per period")
        periods.add(period)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


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

    @field_validator("cache_ttl")
    @classmethod
    def _cache_ttl(cls, v: float) -> float:
        if v > 30:
            raise ValueError("at most 30s: a revocation elsewhere must reach this process within it")
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
            if not _HEADER_NAME.match(h):
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
    header_timeout: Duration = Field(default=10.0, description="from the first byte of a request to its last header")
    body_timeout: Duration = Field(default=30.0, description="longest pause between two pieces of a request body: 408")
    idle_timeout: Duration = Field(default=75.0, description="keep-alive: an idle client connection is closed after it")
    max_pipelined: int = Field(default=32, ge=1, description="requests read ahead on one connection")
    max_connections: int = Field(default=10000, ge=1, description="open client connections per worker")


class Timeouts(Strict):
    connect: Duration = 5.0
    read: Duration = Field(default=60.0, description="longest wait for the next byte of the upstream's response")
    total: Duration | None = Field(default=None, description="whole exchange with the upstream; none by default")


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
    query_key_policy: Literal["reject", "warn"] | None = None
    env: Literal["live", "test"] | None = Field(default=None, description="accept only keys of this env")
    max_body: Size = Field(default=10 * 1024 * 1024, description="request body cap: 413 before any byte goes upstream")
    timeouts: Timeouts = Timeouts()
    upstream_ca: str | None = Field(default=None, description="CA bundle to verify https upstreams (default: system)")
    websocket: bool = False
    cors: CorsConfig | None = None

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
            if not _METHOD.match(m):
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
                if not _METHOD.match(m):
                    raise ValueError(f"{m!r} is not an uppercase HTTP method")
        for scopes in lists:
            for s in scopes:
                if not SCOPE.match(s):
                    raise ValueError(f"{s!r} is not a scope (like orders:read, orders:* or *)")
        return v

    @field_validator("ratelimit")
    @classmethod
    def _ratelimit(cls, v: list[str]) -> list[str]:
        check_rates(v)
        return v


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


Action = Literal["alert", "suspend"]


class RateSpikeConfig(Strict):
    factor: float = Field(default=10.0, gt=1, description="a window this many times the key's baseline is a spike")
    min_requests: int = Field(default=100, ge=1, description="smaller windows are never spikes")
    alpha: float = Field(default=0.3, gt=0, le=1, description="EWMA weight of the newest window")
    warmup_windows: int = Field(
        default=5, ge=1, description="windows of history before spikes are judged; a key idle this long warms up again"
    )
    action: Action = "alert"


class NewNetworkConfig(Strict):
    prefix_v4: int = Field(default=24, ge=8, le=32)
    prefix_v6: int = Field(default=48, ge=16, le=128)
    stable_after: Duration = Field(default=86400.0, description="no new network for this long: the set is stable")
    max_networks: int = Field(default=64, ge=1)
    action: Action = "alert"


class SharedKeyConfig(Strict):
    max_addresses: int = Field(default=50, ge=1, description="more client addresses in one window: shared key")
    action: Action = "alert"


class AuthFailuresConfig(Strict):
    per_ip: int = Field(default=50, ge=1, description="failed authentications per window from one address")
    per_prefix: int = Field(default=20, ge=1, description="failures per window with keys sharing a prefix")


class ScopeRefusalsConfig(Strict):
    threshold: int = Field(default=20, ge=1, description="insufficient-scope refusals per window for one key")
    action: Action = "alert"


class AnomaliesConfig(Strict):
    """Detection per key and per client address; each event is audited, counted and logged."""

    enabled: bool = True
    window: Duration = 60.0
    max_tracked: int = Field(default=100_000, ge=100, description="keys and addresses remembered at most")
    rate_spike: RateSpikeConfig = RateSpikeConfig()
    new_network: NewNetworkConfig = NewNetworkConfig()
    shared_key: SharedKeyConfig = SharedKeyConfig()
    auth_failures: AuthFailuresConfig = AuthFailuresConfig()
    scope_refusals: ScopeRefusalsConfig = ScopeRefusalsConfig()


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
