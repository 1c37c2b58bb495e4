"""Placement speed and quality: 1000 layers on 64 heterogeneous nodes, uncached and cached.

Prints one JSON object. Times are milliseconds per `PartitionService.plan` call (median,
p10, p90 over repeats): "uncached" on a fresh service (a miss: fingerprint the input,
compute, cache), "cached" on a warm one with the same objects, and "cached_equal_copies"
with equal but newly built objects (the key is recomputed and compared field by field).
The reference measured in the same run is `uniform`, which validates the same input and
builds the same kind of plan without optimising anything; `ratio_to_uniform` divides by
its median. Plan quality is reported beside the times: a fast planner is only worth it if
its plans are better (`bottleneck_vs_uniform` < 1).

The cluster is seeded: 8 racks, fast links inside a rack, slow between, compute rates
spread over 1.5 orders of magnitude, 4-32 GiB per node.

    .venv/bin/python bench/partition.py [--repeats 21]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from butterfly.partition.capability import Link, NodeCapability
from butterfly.partition.service import PartitionService
from butterfly.types.ids import NodeId
from butterfly.types.model import DecoderBlock, LayerInfo

SEED = 20240604
LAYERS, NODES, RACKS = 1000, 64, 8
TARGETS_MS = {"uncached": 50.0, "cached": 1.0}
STRATEGIES = ("load_balanced", "topology_aware")


def workload(seed: int = SEED) -> tuple[list[LayerInfo], list[NodeCapability]]:
    rng = random.Random(seed)
    block = DecoderBlock(4096, 32, 8, 14336)
    layers = [
        LayerInfo(
            id=i,
            layer_type=block,
            compute_cost=4e8 * rng.uniform(0.8, 1.2) * (3 if i == LAYERS - 1 else 1),
            memory_bytes=int(200e6 * rng.uniform(0.9, 1.1)),
            output_size=4096,
            kv_bytes_per_token=16384,
            activation_bytes_per_token=8192,
        )
        for i in range(LAYERS)
    ]
    rack = [rng.randrange(RACKS) for _ in range(NODES)]
    nodes = []
    for k in range(NODES):
        links = {}
        for j in range(NODES):
            if j != k:
                near = rack[j] == rack[k]
                links[NodeId(j)] = Link(
                    rng.uniform(0.05, 0.2) if near else rng.uniform(1.0, 5.0),
                    rng.uniform(5e9, 1e10) if near else rng.uniform(1e8, 1e9),
                )
        nodes.append(
            NodeCapability(
                NodeId(k), 10 ** rng.uniform(11, 12.5), int(rng.uniform(4, 32) * 2**30), links
            )
        )
    return layers, nodes


def summary(samples_s: list[float]) -> dict[str, float]:
    ms = sorted(x * 1000 for x in samples_s)

    def pct(p: float) -> float:
        return round(ms[min(len(ms) - 1, round(p * (len(ms) - 1)))], 4)

    return {"median": round(statistics.median(ms), 4), "p10": pct(0.1), "p90": pct(0.9)}


def timed(call: Callable[[], object], repeats: int) -> list[float]:
    out = []
    gc.collect()
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        out.append(time.perf_counter() - started)
    return out


def measure(strategy: str, repeats: int) -> dict[str, Any]:
    layers, nodes = workload()
    uncached = timed(lambda: PartitionService().plan(layers, nodes, strategy), repeats)
    warm = PartitionService()
    plan = warm.plan(layers, nodes, strategy)
    cached = timed(lambda: warm.plan(layers, nodes, strategy), repeats * 10)
    copies = [workload() for _ in range(repeats)]
    it = iter(copies)
    equal = timed(lambda: warm.plan(*next(it), strategy), repeats)
    return {
        "uncached_ms": summary(uncached),
        "cached_ms": summary(cached),
        "cached_equal_copies_ms": summary(equal),
        "cache": {"hits": warm.hits, "misses": warm.misses},
        "plan": {
            "strategy": str(plan.strategy),
            "stages": len(plan.stages),
            "bottleneck_ms": round(plan.bottleneck_ms, 4),
            "per_token_latency_ms": round(plan.quality.per_token_latency_ms, 3),
            "imbalance_pct": round(plan.quality.imbalance_pct, 2),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    repeats = parser.parse_args().repeats
    reference = measure("uniform", repeats)
    ref_ms = reference["uncached_ms"]["median"]
    results: dict[str, Any] = {}
    for strategy in STRATEGIES:
        r = measure(strategy, repeats)
        r["ratio_to_uniform"] = round(r["uncached_ms"]["median"] / ref_ms, 2)
        r["bottleneck_vs_uniform"] = round(
            r["plan"]["bottleneck_ms"] / reference["plan"]["bottleneck_ms"], 4
        )
        r["meets_targets"] = {
            "uncached": r["uncached_ms"]["median"] <= TARGETS_MS["uncached"],
            "cached": r["cached_ms"]["median"] <= TARGETS_MS["cached"],
        }
        results[strategy] = r
    print(
        json.dumps(
            {
                "benchmark": "partition",
                "workload": {"layers": LAYERS, "nodes": NODES, "racks": RACKS, "seed": SEED},
                "repeats": repeats,
                "targets_ms": TARGETS_MS,
                "reference_uniform": reference,
                "strategies": results,
                "machine": {
                    "cpus": os.cpu_count(),
                    "load_average_1m": round(os.getloadavg()[0], 2),
                    "python": platform.python_version(),
                    "numpy": np.__version__,
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
