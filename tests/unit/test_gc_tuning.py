"""GC tuning (hub/gc_tuning.py) and the buffered delivery counter (hub/metrics.py)."""

from __future__ import annotations

import asyncio
import gc
from dataclasses import dataclass

import pytest

from hub import gc_tuning
from hub.metrics import FLUSH_INTERVAL, Metrics
from hub.settings import load_settings


@dataclass(frozen=True)
class FakeConn:
    id: int
    leaves_cycles: bool = True


@pytest.fixture
def restore_gc():
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def test_settings_parse_thresholds() -> None:
    assert load_settings(gc_thresholds="50000, 20,100").gc_thresholds == (50000, 20, 100)
    assert load_settings(gc_thresholds="").gc_thresholds is None
    assert load_settings().gc == "tuned"
    for bad in ("1,2", "a,b,c", "0,10,10"):
        with pytest.raises(ValueError, match="HERALD_GC_THRESHOLDS"):
            load_settings(gc_thresholds=bad)


def test_policy_refreezes_after_enough_new_connections(restore_gc: None) -> None:
    conns = [FakeConn(i) for i in range(1, 11)]
    policy = gc_tuning.FreezePolicy(lambda: conns, freeze_after=5, thaw_after=100, check_interval=0)
    policy.freeze()
    assert gc.get_freeze_count() > 0
    conns += [FakeConn(i) for i in range(11, 15)]  # 4 new: not yet
    assert policy.check() is None
    conns.append(FakeConn(15))
    assert policy.check() == "freeze"
    assert policy.stats.freezes == 2
    assert policy.check() is None  # all frozen now


def test_policy_thaws_after_enough_frozen_connections_closed(restore_gc: None) -> None:
    conns = [FakeConn(i) for i in range(1, 21)]
    policy = gc_tuning.FreezePolicy(lambda: conns, freeze_after=50, thaw_after=8, check_interval=0)
    policy.freeze()
    del conns[:7]  # 7 frozen ones closed: fewer than thaw_after
    assert policy.check() is None
    del conns[:1]  # 8 closed, 12 alive
    assert policy.check() == "thaw"
    assert policy.stats.thaws == 1
    assert policy.check() is None  # the survivors count as frozen again


def test_closed_connections_that_left_no_cycles_never_cause_a_thaw(restore_gc: None) -> None:
    # herald's raw write paths break their cycles: a full turnover needs no thaw
    conns = [FakeConn(i, leaves_cycles=i > 16) for i in range(1, 21)]
    policy = gc_tuning.FreezePolicy(lambda: conns, freeze_after=50, thaw_after=3, check_interval=0)
    policy.freeze()
    del conns[:16]  # 16 clean ones closed, 4 leaky ones alive
    assert policy.check() is None
    del conns[:2]  # 2 leaky ones closed: fewer than thaw_after
    assert policy.check() is None
    del conns[:1]  # the third leaky one closed
    assert policy.check() == "thaw"


def test_policy_thaws_only_after_half_the_live_count_closed(restore_gc: None) -> None:
    conns = [FakeConn(i) for i in range(1, 21)]
    policy = gc_tuning.FreezePolicy(lambda: conns, freeze_after=50, thaw_after=2, check_interval=0)
    policy.freeze()
    del conns[:6]  # 6 closed, 14 alive
    assert policy.check() is None
    del conns[:1]  # 7 closed, 13 alive
    assert policy.check() == "thaw"


def test_frozen_cycles_are_collected_after_a_thaw(restore_gc: None) -> None:
    class Node:
        pass

    policy = gc_tuning.FreezePolicy(list, freeze_after=1, thaw_after=1, check_interval=0)
    a, b = Node(), Node()
    a.other, b.other = b, a  # type: ignore[attr-defined]
    import weakref

    ref = weakref.ref(a)
    policy.freeze()
    del a, b
    gc.collect()
    assert ref() is not None  # frozen: a full collection never looks at it
    policy.thaw()
    assert ref() is None


async def test_tune_applies_and_restores(restore_gc: None) -> None:
    before = gc.get_threshold()
    settings = load_settings(gc_thresholds="40000,15,90", gc_check_interval=0)
    with gc_tuning.tune(settings, list) as policy:
        assert policy is not None
        assert gc.get_threshold() == (40000, 15, 90)
        assert gc.get_freeze_count() > 0
        with gc_tuning.tune(settings, list):  # a second app in the same process
            pass
        assert gc.get_threshold() == (40000, 15, 90)
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


async def test_tune_default_leaves_the_collector_alone() -> None:
    before = gc.get_threshold()
    with gc_tuning.tune(load_settings(gc="default"), list) as policy:
        assert policy is None
        assert gc.get_threshold() == before
        assert gc.get_freeze_count() == 0


async def test_tune_checks_periodically(restore_gc: None) -> None:
    conns: list[FakeConn] = []
    settings = load_settings(gc_freeze_after=2, gc_check_interval=0.01)
    with gc_tuning.tune(settings, lambda: conns) as policy:
        assert policy is not None
        conns += [FakeConn(1), FakeConn(2)]
        for _ in range(100):
            await asyncio.sleep(0.01)
            if policy.stats.freezes == 2:
                break
        assert policy.stats.freezes == 2


async def test_delivered_counter_is_buffered_and_flushed() -> None:
    metrics = Metrics()
    child = metrics.delivered.labels("websocket")
    child.inc(3)
    child.inc()
    assert metrics.delivered.counter.labels("websocket")._value.get() == 0
    # Rendering (this worker's /metrics) flushes first.
    assert b'herald_messages_delivered_total{transport="websocket"} 4.0' in metrics.render()
    child.inc(2)
    await asyncio.sleep(FLUSH_INTERVAL + 0.2)  # and a timer, for the other workers' view
    assert metrics.delivered.counter.labels("websocket")._value.get() == 6
    assert metrics.totals()["herald_messages_delivered_total"]["transport=websocket"] == 6


def test_delivered_counter_without_a_loop_counts_at_once() -> None:
    metrics = Metrics()
    metrics.delivered.labels("sse").inc(5)
    assert metrics.delivered.counter.labels("sse")._value.get() == 5
