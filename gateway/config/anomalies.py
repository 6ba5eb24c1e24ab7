"""Anomaly detection in gateway.yaml: per key and per client address, each rule with its action."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gateway.config.common import Strict
from gateway.config.units import Duration

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
