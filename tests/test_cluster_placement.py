"""Real node processes: the gateway's plan follows what the nodes report about themselves."""

from __future__ import annotations

import tomllib
from pathlib import Path

import httpx
import pytest

from butterfly.cli.launcher import LocalCluster, free_port_block, node_configs
from butterfly.config import dump_toml

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

LIMIT = 450_000
"""Node 1's memory: the tiny model's last layer with its KV cache for 512 tokens is
382,464 bytes, the last two 698,368, so node 1 can hold exactly one layer. (Not lower:
`butterfly validate` refuses a limit below an equal share of the weights, 436,096 bytes.)"""
LIMIT_0 = 1_200_000
"""Node 0's: three layers and the embeddings (about 1.01 MB), not all four (1.40 MB). With
room for the whole model, the load-balanced plan may keep it on node 0 alone, when the
link it measured costs more than the split saves (a busy machine did, and failed CI)."""


def test_a_nodes_memory_limit_shapes_the_plan(tiny_model: Path, tmp_path: Path) -> None:
    """Two equal nodes would split the tiny model 2 + 2; node 1 reports 450 kB (its
    `resources.memory_limit_bytes`), so the gateway gives it only the last layer, and
    node 0, which cannot hold the whole model, the other three."""
    port = free_port_block(4)
    configs = node_configs(nodes=2, f=0, model=tiny_model, api_port=port, data_dir=tmp_path)
    for config, limit in ((configs[0], LIMIT_0), (configs[1], LIMIT)):
        doc = tomllib.loads(config.read_text())
        doc.setdefault("resources", {})["memory_limit_bytes"] = limit
        config.write_text(dump_toml(doc))
    cluster = LocalCluster(configs, f"http://127.0.0.1:{port}", tmp_path)
    try:
        cluster.start()
        cluster.wait_ready(120)
        health = httpx.get(f"{cluster.api_url}/health", timeout=10).json()
        plan = health["plan"]
        stages = [(s["node"], s["start"], s["end"]) for s in plan["stages"]]
        assert stages == [(0, 0, 3), (1, 3, 4)], plan
        assert plan["strategy"] == "load_balanced" and plan["epoch"] == health["epoch"]
        facts = plan["facts"]
        assert facts["1"]["memory_bytes"] == LIMIT
        assert facts["0"]["memory_bytes"] == LIMIT_0
        for node, peer in (("0", "1"), ("1", "0")):
            link = facts[node]["links"][peer]
            assert link["latency_ms"] > 0 and link["bandwidth_bytes_per_s"] > 0
        assert all(f["flops_per_s"] > 0 and f["layer_overhead_ms"] >= 0 for f in facts.values())
        assert plan["estimated_per_token_ms"] > 0
        assert [n["layers"] for n in health["nodes"]] == [[0, 3], [3, 4]]
        body = {"prompt": "Hello", "max_new_tokens": 4, "wait": True}
        result = httpx.post(f"{cluster.api_url}/inference", json=body, timeout=60).json()
        assert [s["node"] for s in result["stages"]] == [0, 1]
        metrics = httpx.get(f"{cluster.api_url}/metrics", timeout=10).text
        assert "butterfly_partition_computation_duration_seconds_count 1.0" in metrics
    finally:
        cluster.stop(grace_s=10.0)
        for p in cluster.procs:
            assert p.poll() is not None, f"node process {p.pid} is still running"
