"""The one thread of a process that runs torch's parallel work.

Each thread that runs a parallel torch op gets an OpenMP team of its own, which lives as
long as the thread. With two teams on a 2-core machine libgomp counts more threads than
cores and stops spinning between parallel regions, so every op then pays for waking its
team: a decode step of the small model on the main thread went from 10.5 ms to 18-21 ms
once a second thread had run a single parallel op (docs/PERFORMANCE.md, "One torch
thread"). So a node runs every model computation on one `TorchThread`, and holds the
event loop's thread to one OpenMP thread (`confine_to_one_thread`) for the small tensor
work it does itself (sampling, fingerprints, decoding frames).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")


def confine_to_one_thread() -> int:
    """Parallel torch ops on the calling thread run on it alone, so it never starts a team.
    Returns the count torch had chosen (its default: one per physical core), for the
    process's `TorchThread`."""
    import torch  # here, so that importing this module stays cheap for the CLI

    chosen = torch.get_num_threads()  # also settles it, or a later op would reset it
    torch.set_num_threads(1)
    return chosen


@contextmanager
def single_threaded() -> Iterator[None]:
    """Torch's ops on the calling thread run on it alone inside the block. An audit's
    prefill cost an auditor node 0.13 s of CPU on one thread against 0.18 s on two (where
    the second thread's spinning counts too), for about twice the wall time: the trade for
    work nobody waits on token by token. Loading a stage too: after a failure every
    survivor loads at once, and a 4-layer load took 290 ms on one thread each against
    410 ms on two."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _claim(threads: int) -> None:
    import torch

    torch.get_num_threads()
    torch.set_num_threads(threads)


class TorchThread:
    def __init__(self, threads: int = 0, name: str = "torch") -> None:
        """`threads` for torch's parallel ops; 0 means one per CPU this process may use."""
        count = threads or len(os.sched_getaffinity(0))
        self._executor = ThreadPoolExecutor(
            1, thread_name_prefix=name, initializer=_claim, initargs=(count,)
        )

    async def run(self, fn: Callable[[], T]) -> T:
        """`fn` on this thread, after every job submitted before it."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def close(self, *, wait: bool = False) -> None:
        self._executor.shutdown(wait=wait, cancel_futures=True)
