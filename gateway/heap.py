"""Keeping the garbage collector's full collections short while the gateway's state grows.

A serving process accumulates long-lived state per key: cached records, limiter counters, anomaly
windows. With 100,000 keys that is about a million objects the cyclic collector tracks, and a full
collection walks all of them: 100 ms or more with the event loop stopped, every few seconds while
the heap grows (bench/README.md, `keys_100k`). Python's `gc.freeze()` moves every tracked object
out of the collector's sight; later collections walk only what was made since.

The price of a freeze: an object frozen while alive in a reference cycle that dies later is never
collected until unfrozen. The data path is built not to leave such cycles (a closed connection
detaches its parser; a request leaves no cyclic garbage), so what a freeze can strand is little.
To bound it anyway, everything is unfrozen every `reclaim_every` seconds: the full collection after
that walks the whole heap once (one long pause an hour, not one every few seconds), frees what was
stranded, and is itself long enough to bring the next freeze.

When: a full collection that took `threshold` seconds or more says the unfrozen heap has grown
large; what survived it is frozen at once, from the collector's own callback. That is the best
moment: the collection has just freed every piece of cyclic garbage and emptied the younger
generations, so only cycles still alive can be stranded (a freeze at a later tick would also catch
whatever died in between). Freezing only moves the collector's lists; the callback does nothing
else that could block (no logging, no metric library's lock), because it runs on whichever thread
allocated, in the middle of whatever that thread was doing.

Every collection's pause is counted for Prometheus (`gateway_gc_pause_seconds{generation}`), with
the freezes and reclaims (`gateway_gc_freezes_total`, `gateway_gc_reclaims_total`): plain ints,
read at a scrape.

This is for CPython's generational collector (3.11 to 3.13). Where collections are incremental
(3.14) automatic ones do not report generation 2, and on free-threaded builds freezing does nothing:
there the keeper only counts pauses.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.telemetry import Histogram

log = logging.getLogger("gateway.heap")

THRESHOLD = 0.005  # a full collection this long (about 100,000 objects here) brings a freeze
RECLAIM_EVERY = 3600.0
TICK = 1.0
PAUSE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


def settle() -> None:
    """Collect, then freeze what is left: for what start-up made, which lives as long as the process."""
    gc.collect()
    gc.freeze()


class HeapKeeper(Collector):
    """Freezes what long full collections leave, unfreezes everything now and then, counts pauses."""

    def __init__(
        self,
        *,
        threshold: float = THRESHOLD,
        reclaim_every: float = RECLAIM_EVERY,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.threshold = threshold
        self.reclaim_every = reclaim_every
        self.clock = clock
        self.freezes = 0
        self.reclaims = 0
        self.last_reclaim = clock()
        self.pauses = [Histogram(PAUSE_BUCKETS) for _ in range(3)]  # per generation
        self._started: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._registry: CollectorRegistry | None = None

    # --- the collector's callback ----------------------------------------------------------------
    def on_collection(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = self.clock()
            return
        if self._started is None:  # registered in the middle of a collection
            return
        took = self.clock() - self._started
        self._started = None
        generation = info.get("generation", 2)
        self.pauses[generation].observe(took)
        if generation == 2 and took >= self.threshold:
            gc.freeze()
            self.freezes += 1

    def collect(self) -> Iterator[Metric]:
        pauses = HistogramMetricFamily(
            "gateway_gc_pause_seconds", "Garbage collections, by generation (2: full), and how long each stopped the process",
            labels=["generation"],
        )
        for generation, h in enumerate(self.pauses):
            pauses.add_metric([str(generation)], h.cumulative(), h.sum)
        yield pauses
        # Counts, not the number of frozen objects: gc.get_freeze_count() walks the whole frozen list,
        # 14 ms for a million objects, and a worker's metrics are collected every second.
        yield CounterMetricFamily(
            "gateway_gc_freezes", "Times the heap was frozen after a long full collection", self.freezes
        )
        yield CounterMetricFamily(
            "gateway_gc_reclaims", "Times everything frozen was handed back to the collector", self.reclaims
        )

    # --- on the event loop ----------------------------------------------------------------------
    def tick(self) -> None:
        """Unfreeze everything when it is time (what is frozen, and when, the callback decides)."""
        now = self.clock()
        if now - self.last_reclaim < self.reclaim_every:
            return
        self.last_reclaim = now
        gc.unfreeze()  # constant time, frozen or not (unlike counting what is frozen)
        self.reclaims += 1
        log.debug("unfroze the heap; the next full collection walks all of it")

    def start(
        self, loop: asyncio.AbstractEventLoop, registry: CollectorRegistry | None = None, every: float = TICK
    ) -> None:
        if self.on_collection not in gc.callbacks:
            gc.callbacks.append(self.on_collection)
        if registry is not None and self._registry is None:
            registry.register(self)
            self._registry = registry
        if self._timer is not None:
            self._timer.cancel()

        def run() -> None:
            self.tick()
            self._timer = loop.call_later(every, run)

        self._timer = loop.call_later(every, run)

    def stop(self) -> None:
        """Stops freezing and hands everything frozen back to the collector, for a process that goes
        on without a gateway (tests, the demo); the metrics stay registered, for a worker's last
        snapshot."""
        if self.on_collection in gc.callbacks:
            gc.callbacks.remove(self.on_collection)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        gc.unfreeze()
