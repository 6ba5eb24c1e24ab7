"""Limits, decisions, and the IETF RateLimit header fields (draft-ietf-httpapi-ratelimit-headers-10).

The algorithm is a sliding window of BUCKETS + 1 sub-windows. A request is admitted only if the
sub-windows overlapping the last `period` seconds hold fewer than `count` requests, so no window of
`period` seconds ever admits more than `count` — no 2x burst at a fixed window's edge, as fixed
windows allow — and the state is a bounded handful of counters per limit, unlike a log of every
request. It errs on the safe side by at most one sub-window (period / BUCKETS): a slot frees up to
that much later than an exact log would free it, never earlier. GCRA was the other candidate; it
refills continuously, so a burst of `count` followed by steady traffic admits nearly 2x`count` in
the first window, which is exactly what a per-key quota's users do not expect.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from gateway.config.units import RATE_PERIODS, parse_rate

BUCKETS = 20
_UNIT = {seconds: name for name, seconds in RATE_PERIODS.items()}


@dataclass(frozen=True, slots=True)
class Limit:
    name: str
    count: int
    period: int
    # Derived once, here: the hot path reads them per request.
    width_ms: int = field(init=False, compare=False, repr=False)
    state_prefix: bytes = field(init=False, compare=False, repr=False)  # b'"name";r='

    def __post_init__(self) -> None:
        object.__setattr__(self, "width_ms", max(1, self.period * 1000 // BUCKETS))
        object.__setattr__(self, "state_prefix", f'"{self.name}";r='.encode())

    def scaled(self, divisor: int) -> Limit:
        """This replica's share when replicas cannot coordinate (never less than 1)."""
        return Limit(self.name, max(1, math.ceil(self.count / divisor)), self.period)


def parse_limits(rates: Sequence[str], prefix: str = "") -> list[Limit]:
    out = []
    for rate in rates:
        count, period = parse_rate(rate)
        out.append(Limit(prefix + _UNIT[period], count, period))
    return out


@dataclass(slots=True)
class Outcome:
    """One limit's state after a decision: requests left, seconds until a slot frees."""

    limit: Limit
    remaining: int
    reset: float
    retry_after: float  # > 0 only when this limit refused the request


@dataclass(slots=True)
class Decision:
    allowed: bool
    outcomes: list[Outcome]

    @property
    def retry_after(self) -> int:
        return max((math.ceil(o.retry_after) for o in self.outcomes if o.retry_after > 0), default=1)

    def violated(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.retry_after > 0]


def policy_header(limits: Sequence[Limit]) -> bytes:
    return ", ".join(f'"{lim.name}";q={lim.count};w={lim.period}' for lim in limits).encode()


def state_header(outcomes: list[Outcome]) -> bytes:
    return b", ".join([b"%s%d;t=%d" % (o.limit.state_prefix, o.remaining, math.ceil(o.reset)) for o in outcomes])


def legacy_headers(outcomes: list[Outcome]) -> list[tuple[bytes, bytes]]:
    """X-RateLimit-* of the most constrained limit, for clients that predate the IETF fields."""
    tight = min(outcomes, key=lambda o: (o.remaining, -o.reset))
    return [
        (b"X-RateLimit-Limit", str(tight.limit.count).encode()),
        (b"X-RateLimit-Remaining", str(tight.remaining).encode()),
        (b"X-RateLimit-Reset", str(math.ceil(tight.reset)).encode()),
    ]
