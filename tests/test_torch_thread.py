"""All of a node's torch work runs on one thread, which keeps its thread count."""

from __future__ import annotations

import asyncio
import threading

import torch

from butterfly.runtime.torch_thread import TorchThread, confine_to_one_thread, single_threaded


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
