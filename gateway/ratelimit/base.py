"""The Limiter interface: every limit of a request decided in one atomic step."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable

from gateway.ratelimit.policy import Decision, Limit

Counters = list[tuple[str, Limit]]  # (storage key, limit); one request's limits share a hash tag


class LimiterUnavailable(Exception):
    """The backend failed or was too slow; the failure policy decides what happens."""


class Limiter(ABC):
    @abstractmethod
    def hit(self, counters: Counters, cost: int = 1) -> Decision | Awaitable[Decision]:
        """Admit only if every limit admits; a refused request consumes from none of them."""

    async def close(self) -> None:
        return None
