"""The Limiter interface: every limit of a request decided in one atomic step."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Iterable

from gateway.ratelimit.policy import Decision, Limit


class Counters:
    """One request's counters, in order: storage keys (all with one hash tag) and their limits.

    The keys are a tuple of strings and the limits a tuple shared by every key on a route that has
    no limits of its own, so a key's counters add one object to what each full garbage collection
    walks instead of a list and a tuple per limit (bench `keys_100k`).
    """

    __slots__ = ("encoded", "keys", "limits")

    def __init__(self, keys: tuple[str, ...], limits: tuple[Limit, ...]) -> None:
        self.keys = keys
        self.limits = limits
        # A backend's wire form of one hit on these counters, kept by the backend that built it
        # (the Redis limiter's EVALSHA command): built once per key, not per request.
        self.encoded: bytes | None = None

    @classmethod
    def of(cls, pairs: Iterable[tuple[str, Limit]]) -> Counters:
        """From (storage key, limit) pairs."""
        listed = list(pairs)
        return cls(tuple(key for key, _ in listed), tuple(limit for _, limit in listed))

    def __len__(self) -> int:
        return len(self.keys)


# Seconds past a backend call's deadline that show this event loop itself was held up (busy elsewhere,
# or starved of CPU) while the answer may have come in time: that call gets one more timeout.
LATE = 0.005


class LimiterUnavailable(Exception):
    """The backend failed or was too slow; the failure policy decides what happens."""


class Limiter(ABC):
    @abstractmethod
    def hit(self, counters: Counters, cost: int = 1) -> Decision | Awaitable[Decision]:
        """Admit only if every limit admits; a refused request consumes from none of them."""

    async def close(self) -> None:
        return None
