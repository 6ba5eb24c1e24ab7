"""The in-memory limiter (`memory://`): the embedded default and the Redis fallback's engine.

Each counter is one list of small ints: its running total, then (sub-window index, count) pairs,
oldest first. A decision costs O(limits) whatever the traffic. One flat list per counter keeps the
state a key leaves behind to one object per limit for the garbage collector to walk: with 100,000
keys, a full collection walks all of it (bench/README.md, `keys_100k`). The number of counters is
bounded (least recently used dropped first), and a dropped counter is one that has been idle longest.
"""

from __future__ import annotations

from collections import OrderedDict

from gateway.clock import Clock
from gateway.ratelimit.base import Counters, Limiter
from gateway.ratelimit.policy import BUCKETS, Decision, Limit, Outcome

# A counter: [total, index, count, index, count, ...], the oldest sub-window first.
Window = list[int]


def _prune(w: Window, oldest: int) -> None:
    """Drop the sub-windows before `oldest` and their counts from the total."""
    i, n, freed = 1, len(w), 0
    while i < n and w[i] < oldest:
        freed += w[i + 1]
        i += 2
    del w[1:i]
    w[0] -= freed


class MemoryLimiter(Limiter):
    def __init__(self, clock: Clock, max_counters: int = 1_000_000) -> None:
        self.clock = clock
        self.max_counters = max_counters
        self.windows: OrderedDict[str, Window] = OrderedDict()

    def hit(self, counters: Counters, cost: int = 1) -> Decision:
        now_ms = int(self.clock.time() * 1000)
        windows = self.windows
        states = []
        allowed = True
        for key, limit in zip(counters.keys, counters.limits):  # noqa: B905 - equal lengths by construction
            w = windows.get(key)
            if w is None:
                w = windows[key] = [0]
                if len(windows) > self.max_counters:
                    windows.popitem(last=False)
            else:
                windows.move_to_end(key)
            index = now_ms // limit.width_ms
            if len(w) > 1 and w[1] < index - BUCKETS:
                _prune(w, index - BUCKETS)
            if w[0] + cost > limit.count:
                allowed = False
            states.append((w, limit, index))
        if not allowed:
            return Decision(False, [_outcome(w, limit, now_ms, cost) for w, limit, _ in states])
        outcomes = []
        for w, limit, index in states:
            # The newest sub-window takes the hit when it is this one, or later: if the clock stepped
            # back, counting the hit late keeps the list in order and frees its slot late, never early.
            if len(w) > 1 and w[-2] >= index:
                w[-1] += cost
            else:
                w += (index, cost)
            w[0] += cost
            # The common case inline: admitted, so no limit needs a retry time.
            outcomes.append(
                Outcome(limit, limit.count - w[0], ((w[1] + BUCKETS + 1) * limit.width_ms - now_ms) / 1000, 0.0)
            )
        return Decision(True, outcomes)


def _outcome(w: Window, limit: Limit, now_ms: int, cost: int) -> Outcome:
    """A limit's state when the request was refused (by this limit or another): nothing counted."""
    width = limit.width_ms
    total = w[0]
    remaining = max(0, limit.count - total)
    reset = (w[1] + BUCKETS + 1) * width - now_ms if len(w) > 1 else 0
    retry = 0
    if total + cost > limit.count:
        # The first moment enough old sub-windows have left the window for this request to fit.
        need = total + cost - limit.count
        freed = 0
        for i in range(1, len(w), 2):
            freed += w[i + 1]
            if freed >= need:
                retry = (w[i] + BUCKETS + 1) * width - now_ms
                break
        else:
            retry = limit.period * 1000
    return Outcome(limit, remaining, reset / 1000, retry / 1000)
