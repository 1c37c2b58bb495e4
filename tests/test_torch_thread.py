"""All of a node's torch work runs on one thread, which keeps its thread count."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import threading
import time

import pytest
import torch

from butterfly.runtime.torch_thread import (
    EWMA,
    FIRST_TRY_MAX_S,
    HANDOFF_MAX_S,
    HANDOFF_S,
    INLINE_MAX_S,
    PROBE_EVERY,
    RARE_PROBE_EVERY,
    OpenMPPause,
    TorchThread,
    _Timing,
    confine_to_one_thread,
    single_threaded,
)
from butterfly.types.errors import ButterflySystemError


def in_fresh_thread(fn):  # type: ignore[no-untyped-def]
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("v", fn()))
    t.start()
    t.join(30)
    return out["v"]


def test_torch_thread_keeps_its_count_while_the_event_loop_is_confined() -> None:
    def scenario() -> tuple[int, int, str, str]:
        torch.set_num_threads(2)
        assert confine_to_one_thread() == 2  # what a node does first on its main thread
        worker = TorchThread(2, name="t-test")

        def report() -> tuple[int, str]:
            return torch.get_num_threads(), threading.current_thread().name

        async def main() -> tuple[int, str]:
            return await worker.run(report)

        try:
            n, name = asyncio.run(main())
        finally:
            worker.close()
        return torch.get_num_threads(), n, name, threading.current_thread().name

    mine, workers, name, caller = in_fresh_thread(scenario)
    assert mine == 1
    assert workers == 2
    assert name.startswith("t-test") and name != caller


def test_single_threaded_restores_the_count() -> None:
    def scenario() -> tuple[int, int]:
        torch.set_num_threads(2)
        with single_threaded():
            inside = torch.get_num_threads()
        return inside, torch.get_num_threads()

    assert in_fresh_thread(scenario) == (1, 2)


def test_a_short_kind_runs_inline_once_measured_and_a_long_one_never() -> None:
    """The first job of a kind goes to the worker, which times it; a short kind then
    runs on the caller's thread while nothing is queued, a long kind stays on the worker,
    and a job without a kind always goes there."""
    worker = TorchThread(1, name="t-inline")

    def where() -> str:
        return threading.current_thread().name

    def slow() -> str:
        threading.Event().wait(0.06)  # above FIRST_TRY_MAX_S: the loop never waits on it
        return threading.current_thread().name

    async def main() -> list[str]:
        return [
            await worker.run(where, "short"),
            await worker.run(where, "short"),
            await worker.run(slow, "long"),
            await worker.run(slow, "long"),
            await worker.run(where),
            await worker.run(where),
        ]

    try:
        names = asyncio.run(main())
    finally:
        worker.close()
    caller = threading.current_thread().name
    assert names[0].startswith("t-inline")
    assert names[1] == caller
    assert names[2].startswith("t-inline") and names[3].startswith("t-inline")
    assert names[4].startswith("t-inline") and names[5].startswith("t-inline")


def test_a_short_job_waits_its_turn_behind_a_queued_one() -> None:
    """Order holds: a short kind does not jump ahead of a job already on the worker."""
    worker = TorchThread(1, name="t-order")
    order: list[str] = []

    async def main() -> None:
        await worker.run(lambda: order.append("warm"), "short")  # measured: short
        release = threading.Event()

        def long_job() -> None:
            release.wait(10)
            order.append("long")

        first = asyncio.ensure_future(worker.run(long_job))
        await asyncio.sleep(0)  # the long job is submitted
        second = asyncio.ensure_future(worker.run(lambda: order.append("short"), "short"))
        await asyncio.sleep(0.01)
        release.set()
        await asyncio.gather(first, second)

    try:
        asyncio.run(main())
    finally:
        worker.close()
    assert order == ["warm", "long", "short"]


def test_a_kind_slower_inline_goes_back_to_the_worker() -> None:
    """Chosen by measurement: a job that runs slowly on the caller's thread (as a
    product that needs the worker's second OpenMP thread would) is tried inline once,
    then kept on the worker until a probe."""
    worker = TorchThread(1, name="t-measure")
    caller = threading.current_thread().name

    def job() -> str:
        name = threading.current_thread().name
        if name == caller:
            threading.Event().wait(0.02)  # slow here, fast on the worker
        return name

    async def main() -> list[str]:
        return [await worker.run(job, "k") for _ in range(6)]

    try:
        names = asyncio.run(main())
    finally:
        worker.close()
    assert names[0].startswith("t-measure")  # first: the worker, which times it
    assert names[1] == caller  # then inline once, to time that too
    assert all(n.startswith("t-measure") for n in names[2:])  # the worker won


def inline_share(timing: _Timing, jobs: int) -> int:
    """How many of `jobs` more jobs of a kind so timed run inline."""
    chosen = 0
    for _ in range(jobs):
        timing.count += 1
        chosen += timing.inline_wins()
    return chosen


def test_a_job_of_milliseconds_runs_inline_when_no_slower_there() -> None:
    """A stage of a few milliseconds runs inline on a team as large as the worker's, so
    the paths differ by the hand-off alone: inline when that timed no slower than the
    worker plus the hand-off, apart from the probes that keep the other path's time
    known; on the worker when inline timed slower; a job too long for the loop to wait
    on is timed inline only rarely."""
    alike = _Timing(inline=3 * INLINE_MAX_S, worker=3 * INLINE_MAX_S)
    assert inline_share(alike, 16 * PROBE_EVERY) == 15 * PROBE_EVERY
    slower = _Timing(inline=4 * INLINE_MAX_S, worker=3 * INLINE_MAX_S)
    assert inline_share(slower, 16 * PROBE_EVERY) == 16  # the probes alone
    tiny = _Timing(inline=INLINE_MAX_S / 4, worker=INLINE_MAX_S / 3)  # as fast: inline
    assert inline_share(tiny, 16 * PROBE_EVERY) >= 15 * PROBE_EVERY
    long = _Timing(inline=2 * FIRST_TRY_MAX_S, worker=FIRST_TRY_MAX_S)
    assert inline_share(long, 2 * RARE_PROBE_EVERY) == 2


def test_a_kind_of_milliseconds_runs_inline_on_a_team_and_a_short_one_on_one_thread() -> None:
    """Inline, a job over INLINE_MAX_S gets the worker's thread count and a shorter one
    the loop thread's one; the loop thread keeps its one thread afterwards, and the
    worker its count."""

    def scenario() -> tuple[list[tuple[str, int]], int]:
        torch.set_num_threads(2)
        confine_to_one_thread()
        worker = TorchThread(2, name="t-team")

        def long_job() -> tuple[str, int]:
            threading.Event().wait(2 * INLINE_MAX_S)  # as long on either path
            return threading.current_thread().name, torch.get_num_threads()

        def short_job() -> tuple[str, int]:
            return threading.current_thread().name, torch.get_num_threads()

        async def main() -> list[tuple[str, int]]:
            seen = [await worker.run(job, job.__name__) for job in (long_job, short_job) * 2]
            return [*seen, await worker.run(short_job)]  # no kind: on the worker

        try:
            seen = asyncio.run(main())
        finally:
            worker.close()
        return seen, torch.get_num_threads()

    seen, after = in_fresh_thread(scenario)
    (first_long, first_short, long_inline, short_inline, on_worker) = seen
    assert first_long[0].startswith("t-team") and first_short[0].startswith("t-team")
    assert not long_inline[0].startswith("t-team") and long_inline[1] == 2
    assert not short_inline[0].startswith("t-team") and short_inline[1] == 1
    assert on_worker[0].startswith("t-team") and on_worker[1] == 2  # the worker's kept
    assert after == 1


def test_a_kind_whose_hand_off_measured_slow_runs_inline() -> None:
    """The worker's path costs its job plus the trip there and back, measured per kind:
    a stage step 0.5 ms faster on the worker stays there while the trip is assumed
    (HANDOFF_S), and runs inline once the trip measured 0.9 ms (a small-model stage's
    between steps on flushed caches, Intel Xeon)."""
    timing = _Timing(inline=3.5e-3, worker=3.0e-3)
    assert timing.handoff == HANDOFF_S and not timing.inline_wins()
    for _ in range(8):
        timing.note_handoff(0.9e-3)
    assert 0.8e-3 < timing.handoff < 0.9e-3
    assert timing.inline_wins()
    stalled = _Timing(inline=3.5e-3, worker=3.0e-3)
    stalled.note_handoff(20e-3)  # the loop busy elsewhere: counted as HANDOFF_MAX_S at most
    assert stalled.handoff <= HANDOFF_S + EWMA * (HANDOFF_MAX_S - HANDOFF_S) + 1e-12
    assert not stalled.inline_wins()


def test_the_hand_off_is_what_the_loop_waited_beyond_the_job(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Measured from the loop's side, less the job's own time: a 0.2 s job on an idle
    worker is noted as a hand-off of a fraction of its time, not as the job. (The sample
    itself is checked: HANDOFF_MAX_S caps what it moves the average by.)"""
    samples: list[float] = []
    note = _Timing.note_handoff

    def noted(self: _Timing, seconds: float) -> None:
        samples.append(seconds)
        note(self, seconds)

    monkeypatch.setattr(_Timing, "note_handoff", noted)
    worker = TorchThread(1, name="t-handoff")

    async def main() -> _Timing:
        await worker.run(lambda: time.sleep(0.2), "slow")  # the first run: on the worker
        return worker._kinds["slow"]

    try:
        timing = asyncio.run(main())
    finally:
        worker.close()
    assert timing.worker is not None and timing.worker >= 0.2
    assert len(samples) == 1 and 0 <= samples[0] < 0.1
    assert timing.handoff != HANDOFF_S


def test_a_path_far_slower_is_probed_rarely_and_a_close_one_often() -> None:
    """The probes of the path not chosen cost about PROBE_SHARE of a short kind's time:
    a tiny stage's step, 0.17 ms inline against 1.3 ms on the worker (as measured in a
    4-node cluster), is sent to the worker once in RARE_PROBE_EVERY jobs, not once in
    PROBE_EVERY (which added 70 µs to every step). Paths whose probe costs little, and
    kinds of milliseconds, are both timed every PROBE_EVERY jobs."""
    jobs = 4 * RARE_PROBE_EVERY
    far = _Timing(inline=0.17e-3, worker=1.3e-3)
    assert jobs - inline_share(far, jobs) == 4
    close = _Timing(inline=1.0e-3, worker=0.85e-3)  # inline: the hand-off makes up the rest
    assert jobs - inline_share(close, jobs) == jobs // PROBE_EVERY
    worker_wins = _Timing(inline=1.3e-3, worker=0.17e-3)
    probes = inline_share(worker_wins, jobs)
    assert jobs // RARE_PROBE_EVERY <= probes < jobs // PROBE_EVERY // 4
    # a kind of milliseconds: the worker's team, asleep when probed, times slower than
    # it runs step after step, so both paths stay probed every PROBE_EVERY jobs
    stage = _Timing(inline=2 * INLINE_MAX_S, worker=3.4 * INLINE_MAX_S)
    assert inline_share(stage, jobs) == jobs - jobs // PROBE_EVERY


def test_probes_of_a_short_kind_are_never_further_apart_than_rare_probe_every() -> None:
    """The interval moves with the timings on every job; probes still come at most
    RARE_PROBE_EVERY jobs apart (a modulo of the moving interval left up to 727)."""
    timing = _Timing(inline=0.17e-3, worker=0.5e-3)
    probes = []
    for job in range(20 * RARE_PROBE_EVERY):
        timing.inline = 0.17e-3 * (0.8 + 0.4 * ((job * 7919) % 101) / 100)  # +-20%
        timing.count += 1  # as TorchThread.run counts each job
        if not timing.inline_wins():
            probes.append(job)
    gaps = [b - a for a, b in itertools.pairwise(probes)]
    assert len(probes) > 20 and max(gaps) <= RARE_PROBE_EVERY


def test_one_slow_first_try_inline_is_undone_by_the_first_fast_probe() -> None:
    """A cold first try inline (50 ms for a 0.1 ms job) leaves the kind on the worker
    only until the next probe times it fast: a faster time is taken as it is, not
    averaged in (each probe would take a quarter off the gap, one in RARE_PROBE_EVERY
    jobs apart)."""
    timing = _Timing(inline=50e-3, worker=1.2e-3)
    jobs = 0
    while not timing.inline_wins():
        jobs += 1
        timing.count += 1
        assert jobs <= RARE_PROBE_EVERY + 1, "never probed inline again"
    timing.note(False, 0.1e-3)  # the probe, timed
    assert inline_share(timing, 64) >= 60  # inline from then on, but for probes


def test_a_cancelled_waiter_leaves_its_job_counted_until_it_ends() -> None:
    """A step whose handler is cancelled (its connection closed) still runs on the
    worker; a job of an inline kind that comes meanwhile waits behind it there instead
    of running beside it on the loop's thread."""
    worker = TorchThread(1, name="t-cancel")
    worker._kinds["k"] = _Timing(inline=1e-4, worker=1e-4)  # a kind that runs inline
    started, ended = threading.Event(), threading.Event()

    def long_job() -> None:
        started.set()
        threading.Event().wait(0.2)
        ended.set()

    async def main() -> tuple[str, bool]:
        waiter = asyncio.ensure_future(worker.run(long_job))
        for _ in range(1000):  # bounded: the job starts within a second
            if started.is_set():
                break
            await asyncio.sleep(0.001)
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiter
        return await worker.run(lambda: (threading.current_thread().name, ended.is_set()), "k")

    try:
        name, after_the_first = asyncio.run(main())
    finally:
        worker.close(wait=True)
    assert name.startswith("t-cancel") and after_the_first


def test_a_closed_torch_thread_says_the_node_is_stopping() -> None:
    """A step that reaches a stopping node fails saying so, of every kind: the executor's
    own RuntimeError read as the step's fault ("step failed: cannot schedule new futures
    after shutdown", an InvalidInput to the client)."""
    worker = TorchThread(1, name="closed")
    worker.close(wait=True)

    async def main() -> list[str]:
        said = []
        for kind in (None, "short"):
            try:
                await worker.run(lambda: 1, kind)
            except ButterflySystemError as e:
                said.append(str(e))
        return said

    assert ["stopping" in why for why in asyncio.run(main())] == [True, True]


def os_threads() -> set[str]:
    return set(os.listdir("/proc/self/task"))


def test_a_job_for_the_worker_lets_the_loop_threads_team_go() -> None:
    """Once a job has run inline on a team, the loop thread has an OpenMP team of its
    own, beside the worker's, and with MKL's products both then ran 1.6x slower (Intel
    Xeon): the next job sent to the worker first frees the loop's team (its OpenMP
    thread ends), so the worker runs, and is timed, as the only team."""
    assert OpenMPPause().available, "torch's libgomp has omp_pause_resource_all"

    def scenario() -> tuple[set[str], set[str]]:
        torch.set_num_threads(2)
        confine_to_one_thread()
        worker = TorchThread(2, name="t-pause")
        big = torch.ones(1 << 22)

        def inline_on_a_team() -> str:
            float(big.sum())  # long enough for torch to run it on a team
            return threading.current_thread().name

        async def main() -> tuple[set[str], set[str]]:
            await worker.run(lambda: None)  # the worker's thread exists before counting
            before = os_threads()
            # a kind of milliseconds that measured as fast inline: it runs there, on a team
            worker._kinds["stage"] = _Timing(inline=3 * INLINE_MAX_S, worker=3 * INLINE_MAX_S)
            assert not (await worker.run(inline_on_a_team, "stage")).startswith("t-pause")
            team = os_threads() - before  # the loop's team's own thread
            await worker.run(lambda: None)  # to the worker: the loop's team goes first
            for _ in range(200):  # bounded: the team's thread ends within a second
                if not team & os_threads():
                    break
                await asyncio.sleep(0.005)
            return team, team & os_threads()

        try:
            return asyncio.run(main())
        finally:
            worker.close()

    team, left = in_fresh_thread(scenario)
    assert team  # the loop's own team started a thread
    assert not left  # and it ended when the worker's job was sent


def test_a_team_inline_far_slower_than_the_worker_is_probed_less_often() -> None:
    """A stage's step of milliseconds that ran 1.6x slower inline on a team (beside the
    worker's, with MKL's products) stays on the worker, and its inline probes, each also
    starting the loop's team again, cost about PROBE_SHARE of its time, not one job in
    PROBE_EVERY; one slower by less than that share is still probed every PROBE_EVERY."""
    jobs = 4 * RARE_PROBE_EVERY
    far = _Timing(inline=1.6 * 6e-3, worker=6e-3)
    assert 0 < inline_share(far, jobs) < jobs // PROBE_EVERY // 1.5
    near = _Timing(inline=1.05 * 6e-3, worker=6e-3)
    assert inline_share(near, jobs) == jobs // PROBE_EVERY
