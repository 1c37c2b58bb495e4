"""One node process: its torch, logging and interpreter settings, and its event loop."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import faulthandler
import gc
import io
import logging
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import NoReturn

import torch
import uvloop

from butterfly.config import ButterflyConfig
from butterfly.runtime.torch_thread import confine_to_one_thread
from butterfly.wiring.logs import configure_logging

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 256 * 1024
"""Blocks this large or larger are mapped on their own and unmapped when freed."""


def return_large_blocks_to_the_os() -> bool:
    """Fix glibc's mmap threshold, so freed tensors leave the process.

    glibc maps a block of 128 KiB or more on its own, and unmaps it when it is freed; but
    each such free raises the threshold to the freed size (up to 32 MiB), after which
    blocks that large come from the heap, where a freed one leaves a hole that only a
    block that fits can reuse. A node allocates tensors of ever new sizes (KV caches
    that grow with each request, activations of each prompt length, snapshots), so its
    heap only grew. A threshold set explicitly stays where it is set.
    Returns whether it was set (False on a C library without mallopt, such as musl).
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


def use_deterministic_algorithms(mode: bool) -> None:
    """`torch.use_deterministic_algorithms(mode)` without its import of torch's compiler.

    torch's own function imports `torch._inductor.config` (and with it dynamo) only to set
    the compiler's flag; that import took 0.93 s of CPU, about a quarter of a node's
    start-up (3.5 s, AMD EPYC), and a node compiles nothing. Should anything have loaded
    the compiler, its flag is set as torch would set it.
    """
    torch._C._set_deterministic_algorithms(mode)
    inductor = sys.modules.get("torch._inductor.config")
    if inductor is not None:
        setattr(inductor, "deterministic", mode)  # noqa: B010 (a module mypy cannot see into)


def prepare_process(cfg: ButterflyConfig) -> int:
    """Set this process up to run a node; returns torch's own thread count (the node's
    torch thread uses it when `resources.threads` is 0)."""
    # torch's parallel work runs on the node's TorchThread; the event loop's own small
    # tensor work stays on this thread alone (runtime.torch_thread)
    torch_threads = confine_to_one_thread()
    # replicas and auditors compare activations: no kernel may pick a racy algorithm
    use_deterministic_algorithms(cfg.advanced.deterministic)
    configure_logging(cfg)
    if not return_large_blocks_to_the_os():
        log.info("the C library has no mallopt: freed tensors may stay in the heap")
    # The event loop hands work to the torch and SQLite threads and takes results back;
    # with Python's default 5 ms GIL switch interval each hand-off could wait that long
    # while the loop thread is busy (measured: 6.7 ms to accept a task, 0.1 ms of work).
    sys.setswitchinterval(0.0005)
    exempt_from_collections()  # the imports'
    return torch_threads


def exempt_from_collections() -> None:
    """Move every object alive now out of the cyclic collector's reach (`gc.freeze`):
    called once the imports are done (torch, transformers, FastAPI: some 160,000
    objects) and again once the node is built. Each full collection scanned them all: a
    gateway under bench/api.py stopped for 153-173 ms every 4 s, every request waiting;
    with the imports frozen, 23-35 ms, and with the node's parts too, 10 ms; p99 latency
    113-150 ms against 196-278 in alternating runs (Intel Xeon, thirty-first session,
    docs/PERFORMANCE-LOG.md). Frozen objects are still freed when
    nothing refers to them; only a reference cycle among them, garbage already, would
    stay: the young generations are collected first, where such cycles are (a full
    collection first added 0.15-0.25 s to a node's start)."""
    gc.collect(1)
    gc.freeze()


STOP_DEADLINE_S = 4.5
"""A node asked to stop has ended by then, whatever still runs: the gateway's grace for
running tasks is 3 s, and the whole cluster is to stop within 5 s (issue 13)."""
BLOCKED_LOOP_SLACK_S = 1.0
"""Beyond the deadline, how long a thread waits for the event loop to end the process
before ending it itself (the loop is then blocked, and cannot)."""


def run_until_signalled(
    main: Callable[[asyncio.Event], Awaitable[None]], deadline_s: float = STOP_DEADLINE_S
) -> None:
    """Run `main(stop)` on uvloop; SIGINT and SIGTERM set `stop`, and the process ends
    `deadline_s` after that at the latest.

    A stop is bounded because what it waits for may not come: under heavy load a gateway
    that had just taken over was still waiting on its own cancelled work 10 s after
    SIGTERM (tests/test_shutdown.py, the node SIGKILLed). Ending it then loses nothing:
    every accepted task was committed to the SQLite store before its 202 (and copied to
    the standby gateways), each running one's checkpoint too, and the next acting
    gateway resumes them. What still ran is logged first, each asyncio task with its
    stack (`overdue_tasks`), so the wait can be found; should the event loop itself be
    blocked, a thread ends the process `BLOCKED_LOOP_SLACK_S` later, with every
    thread's stack (`end_by_deadline`)."""

    async def guarded() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def stopping() -> None:
            if not stop.is_set():
                end_by_deadline(deadline_s + BLOCKED_LOOP_SLACK_S)
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopping)
        work = asyncio.ensure_future(main(stop))
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        done, _ = await asyncio.wait({work}, timeout=deadline_s)
        if not done:
            log.error(
                "still running %.1f s after the stop: ending the process; waiting were:\n%s",
                deadline_s,
                overdue_tasks(),
            )
            end_process(0)
        work.result()  # its error, if it failed

    # uvloop: asyncio's pure-Python loop (selector, handles, the self-pipe wake-up after
    # each torch job) showed in every node's profile under many short requests; uvloop
    # runs the same loop in C (docs/PERFORMANCE-LOG.md, API throughput)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(guarded())


def overdue_tasks() -> str:
    """Every asyncio task of the running loop but the caller, each with its stack."""
    out = io.StringIO()
    me = asyncio.current_task()
    for task in asyncio.all_tasks():
        if task is not me:
            task.print_stack(limit=12, file=out)
    return out.getvalue()


def end_by_deadline(deadline_s: float) -> threading.Timer:
    """End the process `deadline_s` from now unless it ended first, with the stacks of
    every thread logged: a thread, so that a blocked event loop cannot hold it up."""

    def overdue() -> None:
        log.error("still running %.1f s after the stop, its event loop blocked", deadline_s)
        with contextlib.suppress(Exception):
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        end_process(0)

    timer = threading.Timer(deadline_s, overdue)
    timer.daemon = True
    timer.start()
    return timer


def end_process(code: int) -> NoReturn:
    """Exit now, once the node has stopped: its files are closed and its tasks drained.

    The interpreter's own exit, after that, took 1-3 s of a node's shutdown and more on
    a loaded machine: a final garbage collection over the model's objects and torch's
    exit handlers (`torch.library._del_library` for every registered operator), seen in
    stack dumps of nodes still running 1.5 and 3.5 s after SIGTERM. Nothing of a node's
    state depends on them; the log is flushed first.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed, or a full pipe
            stream.flush()
    os._exit(code)


__all__ = [
    "STOP_DEADLINE_S",
    "end_by_deadline",
    "end_process",
    "exempt_from_collections",
    "overdue_tasks",
    "prepare_process",
    "return_large_blocks_to_the_os",
    "run_until_signalled",
]
