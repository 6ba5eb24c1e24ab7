"""What happens when Redis fails: `local` (each replica enforces its share in memory), `open`, `closed`.

A call slower than `ratelimit.timeout` counts as a failure. After one, Redis is left alone for a
second (calls go straight to the policy, so a dead Redis costs no latency), then tried again;
recovery is automatic. Authentication never depends on the limiter.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable

from prometheus_client import Gauge

from gateway.clock import Clock
from gateway.errors import GatewayError
from gateway.ratelimit.base import Counters, Limiter, LimiterUnavailable
from gateway.ratelimit.memory import MemoryLimiter
from gateway.ratelimit.policy import Decision, Limit

log = logging.getLogger("gateway.ratelimit")
RETRY_AFTER_FAILURE = 1.0


class FailoverLimiter(Limiter):
    def __init__(
        self, primary: Limiter, policy: str, replicas: int, clock: Clock, degraded: Gauge
    ) -> None:
        self.primary = primary
        self.policy = policy
        self.replicas = replicas
        self.clock = clock
        self.degraded = degraded
        self.local = MemoryLimiter(clock)
        self.down_until = 0.0
        self._shares: dict[Limit, Limit] = {}
        self._last_log = 0.0

    def hit(self, counters: Counters, cost: int = 1) -> Decision | Awaitable[Decision]:
        return self.decide(counters, cost, self.policy)

    def with_policy(self, policy: str) -> Limiter:
        """This limiter, with another failure policy (a route's `ratelimit_on_backend_error`): the
        backend's health and the local counters stay shared."""
        return _Policy(self, policy)

    def decide(self, counters: Counters, cost: int, policy: str) -> Decision | Awaitable[Decision]:
        if self.clock.time() < self.down_until:
            return self._fallback(counters, cost, policy)
        return self._try(counters, cost, policy)

    async def _try(self, counters: Counters, cost: int, policy: str) -> Decision:
        try:
            result = self.primary.hit(counters, cost)
            decision = result if isinstance(result, Decision) else await result
        except LimiterUnavailable as e:
            self._failed(str(e))
            return self._fallback(counters, cost, policy)
        if self.down_until:
            self.down_until = 0.0
            self.degraded.set(0)
            log.warning("rate-limit backend is back; limits are shared again")
        return decision

    def _failed(self, why: str) -> None:
        now = self.clock.time()
        self.down_until = now + RETRY_AFTER_FAILURE
        self.degraded.set(1)
        if now - self._last_log > 60:
            self._last_log = now
            log.error("rate-limit backend failed (%s); the failure policy applies until it answers again", why)

    def _fallback(self, counters: Counters, cost: int, policy: str) -> Decision:
        if policy == "closed":
            raise GatewayError("service_unavailable", "rate limits cannot be checked right now; try again shortly")
        if policy == "open":
            return Decision(True, [])
        shares = self._shares
        local = []
        for limit in counters.limits:
            share = shares.get(limit)
            if share is None:
                share = shares[limit] = limit.scaled(self.replicas)
            local.append(share)
        return self.local.hit(Counters(counters.keys, tuple(local)), cost)

    async def close(self) -> None:
        await self.primary.close()


class _Policy(Limiter):
    """A FailoverLimiter seen with another failure policy."""

    def __init__(self, failover: FailoverLimiter, policy: str) -> None:
        self.failover = failover
        self.policy = policy

    def hit(self, counters: Counters, cost: int = 1) -> Decision | Awaitable[Decision]:
        return self.failover.decide(counters, cost, self.policy)
