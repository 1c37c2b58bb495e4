"""The one thread of a process that runs torch's parallel work.

Each thread that runs a parallel torch op gets an OpenMP team of its own, which lives as
long as the thread (or until it is freed: `OpenMPPause`). With two teams on a 2-core
machine libgomp counts more threads than cores and stops spinning between parallel
regions, so every op then pays for waking its team: a decode step of the small model on
the main thread went from 10.5 ms to 18-21 ms once a second thread had run a single
parallel op (docs/PERFORMANCE-LOG.md, "One torch thread"). So a node runs every model
computation on one `TorchThread`, and holds the event loop's thread to one OpenMP thread
(`confine_to_one_thread`) for the small tensor work it does itself (sampling,
fingerprints, decoding frames).

The exception is a job of a few milliseconds that measured no slower on the loop's
thread (INLINE_MAX_S): it runs there on a team, saving the hand-off's two wake-ups. The
process then has two teams; since the C kernels meet at barriers of their own, spinning
before they sleep, and nodes run with a short GOMP_SPINCOUNT (cli.launcher), this cost
nothing measurable: a 1-node small-model cluster decoded in 0.98x and 1.03x the time of
the worker alone (bench/hops.py A/B, 8 and 10 rounds, 0.94-1.12 and 0.93-1.04, AMD EPYC).

Not so where the products are MKL's (the Intel Xeon with AMX, whose load-time timing
chose plain `F.linear` for every fp32 shape, runtime.linear): MKL's threads are
libgomp's, and once the loop thread had a team, both teams' products ran 1.6x slower
(eight 3072 x 768 products: 1.49 ms on the worker alone, 2.36 ms on it beside the loop's
team, 2.43 ms inline on that team). The per-kind timing could not see it: the worker,
timed after the loop's team formed, was as slow as inline, so inline won, and a 1-node
small-model cluster decoded at 32 ms a token against 26 with the worker alone, 4 nodes
at 47 against 35 (Intel Xeon, 2026-12-07). So the loop's team is let go
(`OpenMPPause`, libgomp's `omp_pause_resource_all`, which frees the calling thread's
team) before any job goes to the worker: the worker is then always timed, and runs,
alone, and inline on a team is timed with what it costs beside the worker's team;
whichever measures faster wins. Re-forming the team after a worker job costs a thread's
start, which an inline probe after a worker job pays. Measured on the Intel Xeon only:
1 node 27.6 ms a token against 31.2 before (the worker alone 27.0), 4 nodes 42.8
against 52.2 (the worker alone 37.7, a gap not explained yet); on the AMD EPYC, where
the team inline had measured 0.95-0.97x the worker's time, not yet measured.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from butterfly.types.errors import ButterflySystemError

T = TypeVar("T")
log = logging.getLogger(__name__)

FIRST_TRY_MAX_S = 0.05
"""Longest job (as timed on the worker) that is tried once on the event loop's thread,
which waits on it: far below the ~400 ms of silence before a peer is suspected."""
INLINE_MAX_S = 0.002
"""Jobs longer than this (as timed on the worker) run inline with the worker's thread
count, on a team of the loop thread's own: a few milliseconds of products gain from the
second core, and skipping the hand-off saves two thread wake-ups, 0.27 ms a small-model
stage step in a 4-node cluster of this 2-core machine (121 µs there, 145 back; py
timestamps, AMD EPYC). Run inline on one thread, such stages (about 3.3 ms on two
threads, 5.5 ms on one) made a single request decode at 1.44x the one-process time;
with the team, 4 small-model nodes decoded in 0.97x and 0.95x the time of the worker's
(bench/hops.py A/B, 10 and 8 rounds, 0.93-1.01 and 0.88-1.03) and delivered 0.97-1.09x
its tokens/s at 1 to 16 concurrent requests (bench/load.py A/B, medians of 3 rounds,
twice). Shorter jobs, and the loop's own small tensor work, stay on its one thread: a
team's wake-up costs more than they take."""
HANDOFF_MAX_S = 0.001
"""The most one hand-off sample counts: the loop waited longer only when it had other
work to do first (other requests' callbacks, a GC pause, the worker thread's start),
which running the job inline would not remove, only make wait; uncapped, one 20 ms
stall switched a kind to inline for hundreds of jobs (a review)."""
HANDOFF_S = 0.0002
"""What the trip to the worker and back costs beyond the job, two thread wake-ups (22 µs
on an idle event loop; 100-300 µs between a tiny stage's steps on this 2-core machine
under load), until a kind's own is measured (`_Timing.handoff`): between a small-model
stage's steps in a 4-node cluster, on caches the other nodes' weights had flushed, it
was 0.39 ms (0.18 there, 0.21 back; Intel Xeon, thirty-first session), and with this
constant in its place a step's two paths timed within it of each other, so about half
of the steps went to the worker and paid it."""
PROBE_EVERY = 16
"""Every this many jobs of a kind run on the path not chosen, so its time stays known,
or less often when that path is clearly slower (PROBE_SHARE)."""
PROBE_SHARE = 0.02
"""What the probes of the path not chosen may add to a short kind's time, on average. On
the 2-core AMD EPYC of 2026-12-05, a tiny stage's decode step took 0.15-0.2 ms inline
and 1.0-1.7 ms on the worker (its OpenMP team woken on cores the other nodes hold) in a
4-node cluster: one probe in 16 added about 70 µs to every step, a tenth of a hop. The
probe interval grows with the gap, up to RARE_PROBE_EVERY, so a change of conditions is
still seen. Only for kinds whose chosen path is under INLINE_MAX_S: a job of
milliseconds probed on the worker finds its team asleep and times slower than the worker
runs once steps follow one another there (small-model stages: 5.4-6.8 ms probed, against
3.9 ms inline), so frequent probes are what let the worker win such a kind back; spacing
them out made 4 small-model nodes 1.07x slower (bench/hops.py A/B, AMD EPYC). Also for
kinds of milliseconds on the worker, whose inline probes run on a team started again
beside the worker's: with MKL's products 1.6x slower there (Intel Xeon), one in 16 added
about 4% to every step."""
RARE_PROBE_EVERY = 256
"""For a kind too long to run inline: one job in this many is timed inline again, in
case it was measured in a bad moment (a GC pause), at a cost that averages out. Also the
longest interval between probes of a short kind (PROBE_SHARE)."""
EWMA = 0.25
"""Weight of a slower time in a path's moving average; a faster one is taken as it is.
Averaged both ways, one slow first try inline (a cold start) kept a 1-node tiny
cluster's steps on the worker for a whole benchmark run, 1.38 ms a token against 0.54
inline (bench/hops.py, AMD EPYC): the probes, one in 256 jobs for a path that slow,
each took a quarter off the gap, and that took thousands of jobs."""


@dataclass
class _Timing:
    """Seconds a kind of job takes on each path (moving averages), and how many ran."""

    inline: float | None = None
    worker: float | None = None
    handoff: float = HANDOFF_S  # the trip to the worker and back, beyond the job
    count: int = 0
    since_probe: int = 0  # jobs decided since the path not chosen was last tried

    def note(self, on_worker: bool, seconds: float) -> None:
        old = self.worker if on_worker else self.inline
        new = seconds if old is None or seconds < old else old + EWMA * (seconds - old)
        if on_worker:
            self.worker = new
        else:
            self.inline = new

    def note_handoff(self, seconds: float) -> None:
        """What the event loop waited beyond the job itself, for a job sent to an idle
        worker (a queued one would count its wait as well). Averaged both ways: a
        wake-up's cost varies from one step to the next, and the lucky ones are not the
        rule."""
        sample = min(max(0.0, seconds), HANDOFF_MAX_S)
        self.handoff += EWMA * (sample - self.handoff)

    def inline_wins(self) -> bool:
        """Inline when it measured no slower than the worker plus the hand-off; each path
        is tried now and then (`_probe_every`), the worker first. Inline only for jobs
        short enough for the loop to wait on (FIRST_TRY_MAX_S); those over INLINE_MAX_S
        run there on a team (`team`). Called once per job that could run inline."""
        if self.worker is None:
            return False
        if self.inline is None:
            return self.worker <= FIRST_TRY_MAX_S  # never tried: try it once
        if self.inline > FIRST_TRY_MAX_S:
            return self.count % RARE_PROBE_EVERY == 0
        on_worker = self.worker + self.handoff
        better = self.inline <= on_worker
        # counted here, not by `count`: the interval moves with the timings, and a
        # modulo of a moving interval could leave any number of jobs between probes
        self.since_probe += 1
        chosen, other = (self.inline, on_worker) if better else (on_worker, self.inline)
        probe = self.since_probe >= _probe_every(chosen, other, on_worker=not better)
        if probe:
            self.since_probe = 0
        return better != probe

    def team(self) -> bool:
        """Whether this kind runs inline on as many threads as the worker (INLINE_MAX_S)."""
        return self.worker is not None and self.worker > INLINE_MAX_S


def _probe_every(chosen: float, other: float, on_worker: bool = False) -> int:
    """PROBE_EVERY jobs, or more where a probe of the other path costs more than
    PROBE_SHARE of that many jobs' time and either the chosen path (seconds, the
    worker's with its hand-off) is under INLINE_MAX_S or the worker is chosen (`on_worker`:
    a team inline, probed, starts its thread again and runs beside the worker's team)."""
    if other <= chosen or (chosen > INLINE_MAX_S and not on_worker):
        return PROBE_EVERY
    spaced = (other - chosen) / (PROBE_SHARE * chosen)
    return max(PROBE_EVERY, min(RARE_PROBE_EVERY, int(spaced)))


class OpenMPPause:
    """libgomp's `omp_pause_resource_all(omp_pause_soft)`, in every libgomp mapped into
    the process (torch's own copy; the compiled kernels' if another): it frees the
    calling thread's OpenMP team (the next parallel op on that thread starts one again).
    Callable only where the process has a libgomp with it (`available`); elsewhere a
    team inline stays, as before, for the process's life."""

    SOFT = 1  # omp_pause_soft

    def __init__(self) -> None:
        self._fns = _find_pauses()

    @property
    def available(self) -> bool:
        return bool(self._fns)

    def __call__(self) -> bool:
        """Free the calling thread's teams; False where that is not possible."""
        return bool(self._fns) and all([fn(self.SOFT) == 0 for fn in self._fns])


def _find_pauses() -> list[Any]:
    """`omp_pause_resource_all` of each libgomp already mapped, not one found by name
    through the loader, which could be another OpenMP runtime than the one torch's (or
    the compiled kernels') threads run on."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line}
    except OSError:
        return []
    fns = []
    for path in sorted(paths):
        try:
            fn = ctypes.CDLL(path).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
        fns.append(fn)
    return fns


def confine_to_one_thread() -> int:
    """Parallel torch ops on the calling thread run on it alone, so it never starts a team.
    Returns the count torch had chosen (its default: one per physical core), for the
    process's `TorchThread`."""
    import torch  # here, so that importing this module stays cheap for the CLI

    chosen = torch.get_num_threads()  # also settles it, or a later op would reset it
    torch.set_num_threads(1)
    return chosen


class _Threads:
    """`threads`' block. A class, not a generator: a small-model node enters one per
    decode step, and on caches other processes had flushed the block took 31 µs as a
    generator against 14 as this class, most of that the two calls into torch (AMD EPYC,
    docs/PERFORMANCE-LOG.md, fourteenth session)."""

    def __init__(self, count: int) -> None:
        self._count, self._before = count, count

    def __enter__(self) -> None:
        import torch

        self._before = torch.get_num_threads()
        if self._before != self._count:
            torch.set_num_threads(self._count)

    def __exit__(self, *_: object) -> None:
        import torch

        if self._before != self._count:
            torch.set_num_threads(self._before)


def threads(count: int) -> AbstractContextManager[None]:
    """Torch's ops on the calling thread run on `count` threads inside the block: the
    OpenMP and MKL counts are the thread's own (the worker keeps its count), though torch
    also keeps the last count set as the default for threads that start later."""
    return _Threads(count)


@contextmanager
def single_threaded() -> Iterator[None]:
    """Torch's ops on the calling thread run on it alone inside the block. An audit's
    prefill cost an auditor node 0.13 s of CPU on one thread against 0.18 s on two (where
    the second thread's spinning counts too), for about twice the wall time: the trade for
    work nobody waits on token by token. Loading a stage too: after a failure every
    survivor loads at once, and a 4-layer load took 290 ms on one thread each against
    410 ms on two."""
    with threads(1):
        yield


def _claim(threads: int) -> None:
    import torch

    torch.get_num_threads()
    torch.set_num_threads(threads)


class TorchThread:
    def __init__(self, threads: int = 0, name: str = "torch") -> None:
        """`threads` for torch's parallel ops; 0 means one per CPU this process may use."""
        count = threads or len(os.sched_getaffinity(0))
        self._threads = count
        self._executor = ThreadPoolExecutor(
            1, thread_name_prefix=name, initializer=_claim, initargs=(count,)
        )
        self._queued = 0  # jobs submitted to the worker that have not ended there
        self._lock = threading.Lock()
        self._kinds: dict[Hashable, _Timing] = {}
        self._closed = False
        # whether a job ran inline on a team since the last `_pause`: the calling thread
        # then has a team of its own, which slows the worker's (module docstring)
        self._team_inline = False
        self._pause: OpenMPPause | None = None

    async def run(self, fn: Callable[[], T], kind: Hashable = None) -> T:
        """`fn` after every job submitted before it.

        A job with a `kind` may run inline, on the calling event loop's thread, when no
        job is queued (so order holds): the hand-off to the worker and back costs two
        thread wake-ups, more than a small job itself. On a loaded 2-core machine a tiny
        model's whole decode step took 0.5 ms inline and 13-17 ms on the worker, whose
        two OpenMP threads wait for each other's turn on the cores. Which path is faster
        is measured per kind (`_Timing`), not assumed. Inline, a kind of milliseconds
        runs on the worker's thread count (INLINE_MAX_S), a shorter one on the loop
        thread's one (`confine_to_one_thread`). Raises ButterflySystemError once closed
        (the node stops): a step that reached the node then fails saying so, where the
        executor's own "cannot schedule new futures after shutdown" read as the step's
        fault (InvalidInput "step failed: ...")."""
        if self._closed:
            raise ButterflySystemError("this node is stopping: its torch thread is closed")
        timing = None if kind is None else self._kinds.get(kind)
        if timing is None and kind is not None:
            timing = self._kinds[kind] = _Timing()
        if timing is not None:
            timing.count += 1
            if not self._queued and timing.inline_wins():
                started = time.perf_counter()
                if timing.team():
                    self._team_inline = True
                    with threads(self._threads):
                        out = fn()
                else:
                    out = fn()
                timing.note(False, time.perf_counter() - started)
                return out

        took = 0.0

        def timed() -> T:
            nonlocal took
            started = time.perf_counter()
            out = fn()
            took = time.perf_counter() - started
            if timing is not None:
                timing.note(True, took)
            return out

        if self._team_inline:
            self._let_team_go()
        with self._lock:
            idle = not self._queued
            self._queued += 1
        sent = time.perf_counter()
        try:
            job = self._executor.submit(timed)
        except BaseException:
            self._ended(None)
            raise
        job.add_done_callback(self._ended)
        out = await asyncio.wrap_future(job)
        if timing is not None and idle:
            timing.note_handoff(time.perf_counter() - sent - took)
        return out

    def _let_team_go(self) -> None:
        """Free the calling (event loop's) thread's team before a job goes to the
        worker, which then runs, and is timed, as the only team (module docstring)."""
        if self._pause is None:
            self._pause = OpenMPPause()
            if not self._pause.available:
                log.info("no omp_pause_resource_all: a team inline stays beside the worker's")
        self._team_inline = not self._pause()

    def _ended(self, _job: Future[Any] | None) -> None:
        """A job ended on the worker, or will never run there: it is counted off only
        then, not when its waiter went away. A step whose handler was cancelled (its
        connection closed) still runs on the worker, and a job of a kind that runs
        inline, started meanwhile, would have run beside it: two teams on the cores, and
        two writers to a request's KV cache when the step is retried."""
        with self._lock:
            self._queued -= 1

    def close(self, *, wait: bool = False) -> None:
        self._closed = True
        self._executor.shutdown(wait=wait, cancel_futures=True)
