"""The rate-limit stage: every limit of the key (its own, else the route's), plus its owner's."""

from __future__ import annotations

from collections.abc import Awaitable

from gateway.errors import GatewayError
from gateway.http.exchange import Exchange
from gateway.keys.model import KeyRecord
from gateway.metrics import Metrics
from gateway.ratelimit.base import Counters, Limiter
from gateway.ratelimit.policy import (
    Decision,
    Limit,
    legacy_headers,
    parse_limits,
    policy_header,
    state_header,
)

_MAX_CACHED = 100_000


def _one_per_period(limits: list[Limit]) -> list[Limit]:
    """The tightest limit of each period. A key's stored limits may name a period twice (`3/minute`
    and `5/minute`); both would share one counter, named after the period, and count every request
    twice. The looser one can never refuse first, so it is dropped."""
    tightest: dict[int, Limit] = {}
    for lim in limits:
        seen = tightest.get(lim.period)
        if seen is None or lim.count < seen.count:
            tightest[lim.period] = lim
    return [lim for lim in limits if tightest[lim.period] is lim]


class _Plan(Counters):
    """A key's counters on a route, with the record they were built from and its policy header."""

    __slots__ = ("header", "record")

    def __init__(self, keys: tuple[str, ...], limits: tuple[Limit, ...], record: KeyRecord, header: bytes) -> None:
        super().__init__(keys, limits)
        self.record = record
        self.header = header


class RateLimitStage:
    def __init__(
        self,
        limiter: Limiter,
        route: str,
        route_limits: list[str],
        owner_limits: list[str],
        metrics: Metrics,
        legacy: bool,
    ) -> None:
        self.limiter = limiter
        self.route = route
        self.route_limits = parse_limits(route_limits)
        self.owner_limits = parse_limits(owner_limits, prefix="owner-")
        self.legacy = legacy
        self.refused = metrics.ratelimited.labels(route)
        # One tuple for every key without limits of its own: shared, not one per key.
        self._shared_limits = tuple(self.route_limits) + tuple(self.owner_limits)
        self._plans: dict[str, _Plan] = {}

    def _plan(self, record: KeyRecord) -> _Plan:
        """Storage keys and the policy header for a key on this route, computed once per key version.

        All of a request's counters carry the owner as Redis hash tag, so one script may touch them
        all on Redis Cluster.
        """
        plan = self._plans.get(record.id)
        if plan is not None and plan.record is record:
            return plan
        tag = "{" + record.owner + "}"
        if record.limits:
            own: list[Limit] = _one_per_period(parse_limits(record.limits))
            base = f"rl:{tag}:k:{record.id}:"
            limits = (*own, *self.owner_limits)
        else:
            own = self.route_limits
            base = f"rl:{tag}:k:{record.id}:r:{self.route}:"
            limits = self._shared_limits
        keys = (*[base + lim.name for lim in own], *[f"rl:{tag}:o:{lim.name}" for lim in self.owner_limits])
        plan = _Plan(keys, limits, record, policy_header(limits))
        if len(self._plans) >= _MAX_CACHED:
            self._plans.clear()
        self._plans[record.id] = plan
        return plan

    def __call__(self, ex: Exchange) -> Awaitable[None] | None:
        p = ex.principal
        if p is None:
            return None
        plan = self._plan(p.record)
        if not plan.keys:
            return None
        decision = self.limiter.hit(plan)
        if isinstance(decision, Decision):
            self._apply(ex, decision, plan.header, plan.limits[0])
            return None
        return self._finish(ex, decision, plan.header, plan.limits[0])

    async def _finish(self, ex: Exchange, pending: Awaitable[Decision], header: bytes, first: Limit) -> None:
        self._apply(ex, await pending, header, first)

    def _apply(self, ex: Exchange, d: Decision, header: bytes, first: Limit) -> None:
        if d.outcomes:
            if d.outcomes[0].limit is not first:
                # Decided on other limits than planned: the failure policy's local share (limit ÷
                # replicas). The policy field describes the quota actually enforced, like `r` and `t`.
                header = policy_header([o.limit for o in d.outcomes])
            extra = ex.response_extra
            extra.append((b"RateLimit-Policy", header))
            extra.append((b"RateLimit", state_header(d.outcomes)))
            if self.legacy:
                extra += legacy_headers(d.outcomes)
        if d.allowed:
            return
        self.refused.inc()
        names = ", ".join(f'"{o.limit.name}" ({o.limit.count} per {o.limit.period}s)' for o in d.violated())
        raise GatewayError(
            "rate_limited",
            f"over the limit of {names}",
            [(b"Retry-After", str(d.retry_after).encode())],
        )
