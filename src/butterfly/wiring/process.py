"""One node process: its torch, logging and interpreter settings, and its event loop."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable

import torch
import uvloop

from butterfly.config import ButterflyConfig
from butterfly.runtime.torch_thread import confine_to_one_thread
from butterfly.wiring.logs import configure_logging


def prepare_process(cfg: ButterflyConfig) -> int:
    """Set this process up to run a node; returns torch's own thread count (the node's
    torch thread uses it when `resources.threads` is 0)."""
    # torch's parallel work runs on the node's TorchThread; the event loop's own small
    # tensor work stays on this thread alone (runtime.torch_thread)
    torch_threads = confine_to_one_thread()
    # replicas and auditors compare activations: no kernel may pick a racy algorithm
    torch.use_deterministic_algorithms(cfg.advanced.deterministic)
    configure_logging(cfg)
    # The event loop hands work to the torch and SQLite threads and takes results back;
    # with Python's default 5 ms GIL switch interval each hand-off could wait that long
    # while the loop thread is busy (measured: 6.7 ms to accept a task, 0.1 ms of work).
    sys.setswitchinterval(0.0005)
    return torch_threads


def run_until_signalled(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run `main(stop)` on uvloop; SIGINT and SIGTERM set `stop`."""

    async def guarded() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    # uvloop: asyncio's pure-Python loop (selector, handles, the self-pipe wake-up after
    # each torch job) showed in every node's profile under many short requests; uvloop
    # runs the same loop in C (docs/PERFORMANCE.md, API throughput)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(guarded())


__all__ = ["prepare_process", "run_until_signalled"]
