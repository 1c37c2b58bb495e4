"""Helpers shared by the benchmark scripts: summary statistics and the demo model."""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from butterfly.runtime.demo import create_demo

T = TypeVar("T")


def summary(samples: list[float]) -> dict[str, Any]:
    """Median with spread (p10, p90, min, max), in the unit of the samples."""
    s = sorted(samples)

    def pct(p: float) -> float:
        return s[min(len(s) - 1, max(0, round(p * (len(s) - 1))))]

    return {
        "median": round(statistics.median(s), 4),
        "p10": round(pct(0.1), 4),
        "p90": round(pct(0.9), 4),
        "min": round(s[0], 4),
        "max": round(s[-1], 4),
        "n": len(s),
    }


def bench_model(size: str) -> Path:
    """The demo model of `size`, created once under bench/out/ (never downloaded)."""
    path = Path(__file__).resolve().parent / "out" / "models" / f"demo-{size}"
    if not (path / "config.json").is_file():
        create_demo(path, size)
    return path


VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def cpu() -> dict[str, Any]:
    """The CPU model and its vector extensions: figures differ between an AMD EPYC and an
    Intel Xeon with AVX-512 and AMX (the machine's CPU changes between sessions)."""
    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"cpu_model": model, "vector_extensions": [f for f in VECTOR_FLAGS if f in flags]}


def read_bandwidth_samples(megabytes: int = 512, rounds: int = 9) -> list[float]:
    """Memory read bandwidth on torch's threads, GB/s, one sample per pass: summing a
    buffer far larger than the caches reads every byte once."""
    x = torch.ones(megabytes * 2**20 // 4)
    x.sum()  # fault the pages in
    rates = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        x.sum()
        rates.append(x.numel() * 4 / (time.perf_counter() - t0) / 1e9)
    return rates


def floor_ms(weight_bytes: int, samples: list[float]) -> float:
    """The memory-bandwidth floor of a decode step: the bytes of weights it reads over the
    *highest* read bandwidth in `samples`. A floor is a time no kernel can beat."""
    return round(weight_bytes / (max(samples) * 1e9) * 1000, 3)


def beside_bandwidth(run: Callable[[], T]) -> tuple[T, list[float]]:
    """`run()`, and read-bandwidth samples taken just before and just after it. This
    machine's bandwidth moves between about 30 and 56 GB/s within one run, so a decode
    is held to the floor of what the memory did while it ran: against the run's median,
    fp32 decode came out at 0.76x its "floor", and against the run's highest sample at
    1.45x when most of its tokens ran in the slow state (AMD EPYC, 2026-12-05)."""
    before = read_bandwidth_samples(rounds=2)
    out = run()
    return out, before + read_bandwidth_samples(rounds=2)


def decode_bytes(stage: Any) -> int:
    """Bytes one decode step of a Llama stage reads: every weight it holds but the
    embedding table, of which a step reads one row (unless it is also the head)."""
    from butterfly.runtime.llama import stage_bytes

    held = stage_bytes(stage)
    if stage.embed is not None and stage.head is not stage.embed:
        held -= stage.embed.numel() * stage.embed.element_size()
    return held


def machine() -> dict[str, Any]:
    """The CPU and software a figure was measured on, and the load when it was written
    (1, 5 and 15 minutes): a figure's "quiet" or "loaded" must be checkable in its JSON."""
    return {
        **cpu(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "load_average_1_5_15m": [round(x, 2) for x in os.getloadavg()],
    }
