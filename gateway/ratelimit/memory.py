"""The in-memory limiter (`memory://`): the embedded default and the Redis fallback's engine.

Each counter keeps its running total and a short deque of (sub-window index, count), so a
decision costs O(limits) whatever the traffic. The number of counters is bounded (least recently
used dropped first), and a dropped counter is one that has been idle longest.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from gateway.clock import Clock
from gateway.ratelimit.base import Counters, Limiter
from gateway.ratelimit.policy import BUCKETS, Decision, Limit, Outcome


class _Window:
    __slots__ = ("buckets", "total")

    def __init__(self) -> None:
        self.total = 0
        self.buckets: deque[list[int]] = deque()

    def prune(self, oldest: int) -> None:
        b = self.buckets
        while b and b[0][0] < oldest:
            self.total -= b.popleft()[1]


class MemoryLimiter(Limiter):
    def __init__(self, clock: Clock, max_counters: int = 1_000_000) -> None:
        self.clock = clock
        self.max_counters = max_counters
        self.windows: OrderedDict[str, _Window] = OrderedDict()

    def hit(self, counters: Counters, cost: int = 1) -> Decision:
        now_ms = int(self.clock.time() * 1000)
        windows = self.windows
        states = []
        allowed = True
        for key, limit in counters:
            w = windows.get(key)
            if w is None:
                w = windows[key] = _Window()
                if len(windows) > self.max_counters:
                    windows.popitem(last=False)
            else:
                windows.move_to_end(key)
            index = now_ms // limit.width_ms
            b = w.buckets
            if b and b[0][0] < index - BUCKETS:
                w.prune(index - BUCKETS)
            if w.total + cost > limit.count:
                allowed = False
            states.append((w, limit, index))
        if not allowed:
            return Decision(False, [_outcome(w, limit, now_ms, cost, False) for w, limit, _ in states])
        outcomes = []
        for w, limit, index in states:
            b = w.buckets
            if b and b[-1][0] == index:
                b[-1][1] += cost
            else:
                b.append([index, cost])
            w.total += cost
            # The common case inline: admitted, so no limit needs a retry time.
            width = limit.width_ms
            outcomes.append(
                Outcome(limit, limit.count - w.total, ((b[0][0] + BUCKETS + 1) * width - now_ms) / 1000, 0.0)
            )
        return Decision(True, outcomes)


def _outcome(w: _Window, limit: Limit, now_ms: int, cost: int, allowed: bool) -> Outcome:
    width = limit.width_ms
    remaining = max(0, limit.count - w.total)
    reset = (w.buckets[0][0] + BUCKETS + 1) * width - now_ms if w.buckets else 0
    retry = 0
    if not allowed and w.total + cost > limit.count:
        # The first moment enough old sub-windows have left the window for this request to fit.
        need = w.total + cost - limit.count
        freed = 0
        for index, count in w.buckets:
            freed += count
            if freed >= need:
                retry = (index + BUCKETS + 1) * width - now_ms
                break
        else:
            retry = limit.period * 1000
    return Outcome(limit, remaining, reset / 1000, retry / 1000)
