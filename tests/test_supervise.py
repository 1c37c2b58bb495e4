"""Supervised loops: an unexpected error restarts the loop, never the node.

The in-process test is the issue's own example: an SQLite "database is locked" during
result expiry used to end the gateway's task group, and with it the whole node.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections import Counter
from pathlib import Path

import pytest

from butterfly.metrics.events import LoopRestarted, MetricsEvent
from butterfly.runtime.generate import generate
from butterfly.runtime.loader import load_stage
from butterfly.runtime.tokenizer import TextCodec
from butterfly.schedule.store import TaskStore
from butterfly.testing.inprocess import InProcessCluster
from butterfly.types.ids import RequestId
from butterfly.types.tasks import InferenceTask
from butterfly.wiring.supervise import MAX_DELAY_S, restart_delay, supervised

pytestmark = pytest.mark.timeout(60)


def test_restart_delay_doubles_from_the_first_and_is_capped() -> None:
    assert [restart_delay(n, 0.1, 1.0) for n in (1, 2, 3, 4, 5, 50)] == [
        0.1,
        0.2,
        0.4,
        0.8,
        1.0,
        1.0,
    ]
    assert restart_delay(10_000) == MAX_DELAY_S


async def test_a_failing_loop_is_restarted_with_backoff_and_counted() -> None:
    runs, slept, events = 0, [], []

    async def loop() -> None:
        nonlocal runs
        runs += 1
        if runs <= 3:
            raise sqlite3.OperationalError("database is locked")

    async def sleep(s: float) -> None:
        slept.append(s)

    await supervised("result_expiry", loop, events.append, sleep=sleep, clock=lambda: 0.0)
    assert runs == 4  # three failures, then it ran to its end
    assert slept == [restart_delay(1), restart_delay(2), restart_delay(3)]
    assert events == [LoopRestarted("result_expiry")] * 3


async def test_a_loop_that_ran_long_before_failing_starts_its_backoff_over() -> None:
    slept: list[float] = []
    runs = 0

    async def loop() -> None:
        nonlocal runs
        runs += 1
        if runs <= 3:
            raise RuntimeError("boom")

    async def sleep(s: float) -> None:
        slept.append(s)

    # (start, failure) clock readings: two quick failures, then one after 998 s of running
    clock = iter([0.0, 0.5, 1.0, 1.5, 2.0, 1000.0, 1000.0]).__next__
    await supervised("x", loop, lambda e: None, sleep=sleep, clock=clock)
    assert slept == [restart_delay(1), restart_delay(2), restart_delay(1)]


async def test_cancellation_passes_through_at_once() -> None:
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    events: list[MetricsEvent] = []
    task = asyncio.create_task(supervised("forever", forever, events.append))
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert events == []


async def test_gateway_keeps_serving_when_result_expiry_hits_a_locked_database(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: Counter[Path] = Counter()  # per store: the standby (node 1) prunes its own too
    prune = TaskStore.prune

    def locked_once(self: TaskStore, finished_before: float) -> list[str]:
        calls[self.path] += 1
        if calls[self.path] == 1:
            raise sqlite3.OperationalError("database is locked")
        return prune(self, finished_before)

    monkeypatch.setattr(TaskStore, "prune", locked_once)
    settings = {"coordination.heartbeat_interval_ms": 10, "scheduling.result_ttl_s": 1}
    async with InProcessCluster(tiny_model, 2, tmp_path, f=0, settings=settings) as c:
        gw = c.gateway
        await c.first_plan()
        assert gw.gateway is not None
        registry = gw.gateway.metrics.registry
        path = gw.gateway.replicas.store.path
        for _ in range(200):  # expiry runs every 0.25 s; bounded in count and time
            if calls[path] >= 2:
                break
            await asyncio.sleep(0.05)
        assert calls[path] >= 2, "result expiry was not restarted after the error"
        restarts = registry.get_sample_value(
            "butterfly_loop_restarts_total", {"loop": "result_expiry"}
        )
        assert restarts == 1.0
        codec = TextCodec.load(tiny_model)
        ids = tuple(codec.encode("Once upon a time"))
        expected = list(generate([load_stage(tiny_model)], list(ids), 8, stop_ids=codec.eos_ids))
        task = InferenceTask(RequestId("after-the-error"), input_ids=ids, max_new_tokens=8)
        result = await asyncio.wait_for(gw.engine.run(task, lambda t: None), 30)
        assert list(result.output_ids) == expected
