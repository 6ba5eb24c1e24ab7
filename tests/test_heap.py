"""The heap keeper: a long full collection brings a freeze as it ends, a short one or a young one
does not, and everything is unfrozen every `reclaim_every` seconds so that what a freeze stranded
is collected. The collector is Python's own; only the clock timing it is scripted."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from gateway.clock import FakeClock
from gateway.heap import HeapKeeper


@pytest.fixture
def clean_heap() -> Iterator[None]:
    gc.unfreeze()
    try:
        yield
    finally:
        gc.unfreeze()


def collection(keeper: HeapKeeper, clock: FakeClock, generation: int, seconds: float) -> None:
    """What the collector reports around one collection that took `seconds`."""
    keeper.on_collection("start", {"generation": generation})
    clock.advance(seconds)
    keeper.on_collection("stop", {"generation": generation, "collected": 0, "uncollectable": 0})


def test_only_a_long_full_collection_brings_a_freeze(clean_heap) -> None:
    clock = FakeClock(1000.0)
    keeper = HeapKeeper(threshold=0.005, clock=clock.time)
    collection(keeper, clock, 2, 0.004)
    collection(keeper, clock, 1, 0.050)  # a young collection, however long, says nothing of the heap
    keeper.tick()
    assert gc.get_freeze_count() == 0 and keeper.freezes == 0

    collection(keeper, clock, 2, 0.006)
    assert gc.get_freeze_count() > 0 and keeper.freezes == 1
    keeper.tick()
    assert keeper.freezes == 1, "one long collection, one freeze"


def test_pauses_are_counted_per_generation_for_prometheus(clean_heap) -> None:
    clock = FakeClock(1000.0)
    keeper = HeapKeeper(threshold=0.005, clock=clock.time)
    registry = CollectorRegistry()
    registry.register(keeper)
    collection(keeper, clock, 0, 0.0002)
    collection(keeper, clock, 0, 0.0002)
    collection(keeper, clock, 2, 0.030)
    keeper.tick()
    get = registry.get_sample_value
    assert get("gateway_gc_pause_seconds_count", {"generation": "0"}) == 2
    assert get("gateway_gc_pause_seconds_bucket", {"generation": "0", "le": "0.00025"}) == 2
    assert get("gateway_gc_pause_seconds_bucket", {"generation": "0", "le": "0.0001"}) == 0
    assert get("gateway_gc_pause_seconds_count", {"generation": "1"}) == 0
    assert get("gateway_gc_pause_seconds_bucket", {"generation": "2", "le": "0.025"}) == 0
    assert get("gateway_gc_pause_seconds_bucket", {"generation": "2", "le": "0.05"}) == 1
    assert get("gateway_gc_pause_seconds_sum", {"generation": "2"}) == pytest.approx(0.030)
    assert get("gateway_gc_freezes_total") == 1 and gc.get_freeze_count() > 0
    assert get("gateway_gc_reclaims_total") == 0


def test_everything_is_unfrozen_every_reclaim_interval(clean_heap) -> None:
    clock = FakeClock(1000.0)
    keeper = HeapKeeper(threshold=0.005, reclaim_every=3600, clock=clock.time)
    collection(keeper, clock, 2, 0.010)
    assert gc.get_freeze_count() > 0

    clock.advance(3599)
    keeper.tick()
    assert gc.get_freeze_count() > 0 and keeper.reclaims == 0
    clock.advance(1)
    keeper.tick()
    assert gc.get_freeze_count() == 0 and keeper.reclaims == 1
    keeper.tick()
    assert gc.get_freeze_count() == 0

    # The long full collection that follows freezes again, and the interval starts over.
    collection(keeper, clock, 2, 0.010)
    assert gc.get_freeze_count() > 0 and keeper.freezes == 2
    clock.advance(3599)
    keeper.tick()
    assert keeper.reclaims == 1


def test_stranded_cycle_is_collected_after_the_reclaim(clean_heap) -> None:
    """Why the reclaim exists: a cycle frozen while alive outlives its last reference until then."""

    class Node:
        pass

    def nodes() -> int:
        return sum(1 for o in gc.get_objects() if isinstance(o, Node))

    a, b = Node(), Node()
    a.other, b.other = b, a  # type: ignore[attr-defined]
    clock = FakeClock(1000.0)
    keeper = HeapKeeper(reclaim_every=3600, clock=clock.time)
    collection(keeper, clock, 2, 0.010)
    del a, b
    gc.collect()
    assert gc.get_freeze_count() > 0
    gc.unfreeze()  # only to count them: frozen objects are not listed
    assert nodes() == 2, "a frozen cycle was collected"
    gc.freeze()
    clock.advance(3600)
    keeper.tick()
    gc.collect()
    assert nodes() == 0


async def test_started_keeper_freezes_as_a_real_long_collection_ends(clean_heap) -> None:
    keeper = HeapKeeper(threshold=0.0)  # any full collection counts as long
    keeper.start(asyncio.get_running_loop(), every=0.01)
    try:
        assert keeper.on_collection in gc.callbacks
        gc.collect(1)
        assert keeper.freezes == 0 and gc.get_freeze_count() == 0
        gc.collect()
        assert keeper.freezes == 1 and gc.get_freeze_count() > 0
        assert sum(keeper.pauses[1].counts) >= 1 and sum(keeper.pauses[2].counts) >= 1
    finally:
        keeper.stop()
    assert keeper.on_collection not in gc.callbacks
    assert gc.get_freeze_count() == 0, "a stopped keeper leaves nothing frozen"


async def test_ticks_run_until_stopped_even_when_started_twice(clean_heap) -> None:
    clock = FakeClock(1000.0)
    keeper = HeapKeeper(reclaim_every=1.0, clock=clock.time)
    loop = asyncio.get_running_loop()
    keeper.start(loop, every=0.001)
    keeper.start(loop, every=0.001)  # one chain of ticks, not two
    try:
        for _ in range(3):
            clock.advance(1.0)
            before = keeper.reclaims
            for _ in range(500):
                await asyncio.sleep(0.002)
                if keeper.reclaims > before:
                    break
            assert keeper.reclaims == before + 1, "each second of the clock, one reclaim from the ticks"
    finally:
        keeper.stop()
    clock.advance(10.0)
    await asyncio.sleep(0.05)
    assert keeper.reclaims == 3, "ticks went on after stop()"
