"""The in-process engine's stand-in for Juturna's gc.collect() calls (docs/juturna.md,
pitfall 10)."""

from __future__ import annotations

import gc
import time
import weakref

from juturna.components import _pipeline, _pipeline_manager

from juturna_operator.engines.inprocess import CoalescedCollector


class Cycle:
    def __init__(self) -> None:
        self.me = self


def test_a_burst_of_requests_is_one_collection_and_garbage_still_goes() -> None:
    collector = CoalescedCollector(interval=0.2)
    try:
        garbage = Cycle()
        ref = weakref.ref(garbage)
        del garbage
        gc.disable()  # only the collector may collect here
        for _ in range(500):
            assert collector.collect() == 0  # returns at once
        deadline = time.monotonic() + 5
        while (ref() is not None or not collector.collections) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ref() is None, "the cycle was never collected"
        time.sleep(0.5)  # no request since: no more collections
        assert collector.collections == 1
        assert collector.get_threshold() == gc.get_threshold()  # the rest is the real gc
    finally:
        gc.enable()
        collector.uninstall()


def test_install_replaces_gc_in_juturnas_modules_and_uninstall_restores_it() -> None:
    collector = CoalescedCollector()
    collector.install()
    try:
        assert _pipeline.gc is collector
        assert _pipeline_manager.gc is collector
    finally:
        collector.uninstall()
    assert _pipeline.gc is gc
    assert _pipeline_manager.gc is gc
