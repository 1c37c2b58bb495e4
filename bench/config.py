"""Configuration costs: load + validate of the full template, hashing, manager memory,
and the commit latency of a cluster-wide update on 4 local node processes.

Prints one JSON object. References measured in the same run: parsing the same TOML with
plain `tomllib` (the floor for any TOML-based loader) and sha256 of the already
serialized config (the floor for any hash). Targets from issue 6: load + validate
<= 5 ms, hash <= 0.5 ms, cluster-wide update p50 <= 50 ms.

`cluster_update_commit_ms`: a 4-node cluster (f = 1, tiny demo model) on 127.0.0.1;
`POST /api/v1/config` changing a dynamic-consensus option, one at a time, timed at the
client until the answer (PROPOSE, PREPARE on every node, PBFT commit, apply everywhere,
FINALIZE confirmation from every node). `gateway_phases_ms` splits the same updates as
the gateway logged them. On a 2-core machine the 4 processes share the cores, so the
load average is reported beside the figures.

    .venv/bin/python bench/config.py [--repeats N] [--updates N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import statistics
import sys
import tempfile
import time
import tomllib
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from butterfly.cli.launcher import LocalCluster, free_ports, node_configs
from butterfly.config import (
    ButterflyConfig,
    ConfigHistory,
    ConfigManager,
    cluster_hash,
    config_hash,
    load_config,
    template,
)
from butterfly.config.versions import canonical_json
from common import bench_model, machine

TARGETS_MS = {"load_validate": 5.0, "hash": 0.5, "cluster_update_p50": 50.0}


def summary(samples: list[float]) -> dict[str, Any]:
    s = sorted(samples)

    def pct(p: float) -> float:
        return s[min(len(s) - 1, max(0, round(p * (len(s) - 1))))]

    return {
        "median": round(statistics.median(s), 4),
        "p10": round(pct(0.1), 4),
        "p90": round(pct(0.9), 4),
        "n": len(s),
    }


def timed_ms(fn: Callable[[], object], repeats: int, warmup: int = 5) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def manager_memory(cfg: ButterflyConfig, history_file: Path) -> dict[str, Any]:
    """Python heap held by a manager with 5 subscribers after 10 updates (tracemalloc).

    SQLite allocates outside the Python heap, so the history's own cache is not in this
    figure; its file size is reported beside it.
    """
    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    history = ConfigHistory(history_file)
    manager = ConfigManager(cfg, history)
    seen: list[int] = []
    for i in range(5):
        manager.subscribe(f"s{i}", lambda old, new: seen.append(new.scheduling.max_queue))
    for i in range(10):
        manager.update({"scheduling.max_queue": 100 + i})
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    history.close()
    return {
        "heap_bytes": current - base,
        "peak_bytes": peak - base,
        "history_versions": 11,
        "history_file_bytes": os.path.getsize(history_file),
    }


PHASES = re.compile(
    r"config seq \d+ in ([\d.]+) ms \(prepare ([\d.]+), commit ([\d.]+), finalize ([\d.]+)\)"
)


def cluster_update(updates: int) -> dict[str, Any]:
    """Time `updates` cluster-wide changes through the gateway of a 4-node cluster."""
    with tempfile.TemporaryDirectory() as d:
        data, port = Path(d), free_ports(1)[0]
        configs = node_configs(
            nodes=4, f=1, model=bench_model("tiny"), api_port=port, data_dir=data
        )
        cluster = LocalCluster(configs, f"http://127.0.0.1:{port}", data)
        samples: list[float] = []
        try:
            cluster.start()
            cluster.wait_ready(300)
            url = f"{cluster.api_url}/api/v1/config"
            with httpx.Client(timeout=60.0) as client:
                for i in range(updates + 5):  # the first 5 warm connections and caches up
                    body = {"byzantine.audit_fraction": 0.5 + (i % 2) / 4}
                    t0 = time.perf_counter()
                    r = client.post(url, json=body)
                    elapsed = (time.perf_counter() - t0) * 1000
                    if r.status_code != 200 or set(r.json()["nodes"].values()) != {"applied"}:
                        raise SystemExit(f"update {i} failed: {r.status_code} {r.text}")
                    if i >= 5:
                        samples.append(elapsed)
        finally:
            cluster.stop()
        logged = [PHASES.search(line) for line in (data / "node-0.log").read_text().splitlines()]
        phases = [[float(x) for x in m.groups()] for m in logged if m][5:]
    names = ("total", "prepare", "commit", "finalize")
    return {
        **summary(samples),
        "nodes": 4,
        "f": 1,
        "gateway_phases_ms": {
            name: round(statistics.median(p[k] for p in phases), 3) for k, name in enumerate(names)
        },
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--updates", type=int, default=40)
    args = parser.parse_args()
    n = args.repeats
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "template.toml"
        text = template()
        path.write_text(text)
        load_ms = timed_ms(lambda: load_config([path]), n)
        parse_ms = timed_ms(lambda: tomllib.loads(path.read_text()), n)
        cfg = load_config([path])
        hash_ms = timed_ms(lambda: config_hash(cfg), n * 3)
        cluster_ms = timed_ms(lambda: cluster_hash(cfg), n * 3)
        blob = canonical_json(cfg.model_dump(mode="json"))
        sha_ms = timed_ms(lambda: hashlib.sha256(blob).hexdigest(), n * 3)
        with ConfigHistory(Path(d) / "update.sqlite3") as history:
            manager = ConfigManager(cfg, history)
            levels = iter(["debug", "info"] * (n // 2 + 10))
            update_ms = timed_ms(
                lambda: manager.update({"observability.log_level": next(levels)}), n // 3
            )
        memory = manager_memory(cfg, Path(d) / "memory.sqlite3")
    load_med, hash_med = statistics.median(load_ms), statistics.median(hash_ms)
    cluster = cluster_update(args.updates)
    result = {
        "bench": "config",
        "template": {"bytes": len(text.encode()), "lines": text.count("\n")},
        "load_validate_ms": summary(load_ms),
        "reference_tomllib_parse_ms": summary(parse_ms),
        "ratio_load_to_parse": round(load_med / statistics.median(parse_ms), 2),
        "config_hash_ms": summary(hash_ms),
        "cluster_hash_ms": summary(cluster_ms),
        "reference_sha256_of_json_ms": summary(sha_ms),
        "ratio_hash_to_sha256": round(hash_med / statistics.median(sha_ms), 2),
        "local_update_ms": summary(update_ms),
        "manager_memory": memory,
        "targets_ms": TARGETS_MS,
        "meets_targets": load_med <= TARGETS_MS["load_validate"]
        and hash_med <= TARGETS_MS["hash"]
        and cluster["median"] <= TARGETS_MS["cluster_update_p50"],
        "cluster_update_commit_ms": cluster,
        "machine": machine(),
    }
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
