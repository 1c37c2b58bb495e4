"""Helpers shared by the benchmark scripts: summary statistics and the demo model."""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from butterfly.runtime.demo import create_demo


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


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
