"""A node's fixed cost per layer (`layer_overhead_ms`) in every part of the cost model."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from butterfly.cli import app
from butterfly.partition import NodeCapability, estimate_quality, load_balanced
from butterfly.partition.replan import replan
from butterfly.partition.service import PartitionService
from butterfly.types.errors import InvalidConfiguration
from butterfly.types.ids import NodeId
from butterfly.types.model import LayerInfo, Linear


def layers(costs: list[float]) -> list[LayerInfo]:
    return [LayerInfo(i, Linear(8, 8), c * 1e9, 1, 8) for i, c in enumerate(costs)]


def node(k: int, rate: float = 1e12, overhead: float = 0.0) -> NodeCapability:
    return NodeCapability(NodeId(k), rate, 1 << 30, {}, overhead)


def brute_force(costs: list[float], nodes: list[NodeCapability]) -> float:
    """Smallest bottleneck over every contiguous split in id order (empty stages allowed)."""
    n, best = len(costs), float("inf")
    for cuts in itertools.combinations_with_replacement(range(n + 1), len(nodes) - 1):
        bounds = [0, *cuts, n]
        worst = 0.0
        for k, (s, e) in enumerate(itertools.pairwise(bounds)):
            if e > s:
                ms = sum(costs[s:e]) * 1e9 / nodes[k].flops_per_s * 1000
                worst = max(worst, ms + (e - s) * nodes[k].layer_overhead_ms)
        best = min(best, worst)
    return best


def test_overhead_is_charged_per_layer() -> None:
    """Equal rates, but node 1 pays 1 ms per layer more: it gets fewer layers."""
    plan = load_balanced(layers([1.0] * 9), [node(0), node(1, overhead=1.0)])
    assert [(s.node, s.layers.start, s.layers.end) for s in plan.stages] == [(0, 0, 6), (1, 6, 9)]
    assert plan.bottleneck_ms == pytest.approx(6.0)  # node 1: 3 ms compute + 3 ms overhead
    quality = estimate_quality(plan, layers([1.0] * 9), [node(0), node(1, overhead=1.0)])
    assert quality.per_token_latency_ms == pytest.approx(6.0 + 6.0)


@settings(max_examples=60, deadline=None)
@given(
    costs=st.lists(st.floats(0.1, 5.0), min_size=1, max_size=7),
    spec=st.lists(st.tuples(st.floats(0.5e12, 2e12), st.floats(0.0, 3.0)), min_size=1, max_size=3),
)
def test_the_optimum_with_overheads_matches_brute_force(
    costs: list[float], spec: list[tuple[float, float]]
) -> None:
    nodes = [node(k, rate, overhead) for k, (rate, overhead) in enumerate(spec)]
    plan = load_balanced(layers(costs), nodes)
    assert plan.bottleneck_ms == pytest.approx(brute_force(costs, nodes), rel=1e-9)


def test_overhead_is_part_of_the_cache_key_and_validated() -> None:
    service = PartitionService()
    model = layers([1.0] * 4)
    service.plan(model, [node(0), node(1)])
    service.plan(model, [node(0), node(1, overhead=0.5)])
    assert (service.hits, service.misses) == (0, 2)
    assert node(1, overhead=0.5) == node(1, overhead=0.5) != node(1)
    with pytest.raises(InvalidConfiguration, match="layer_overhead_ms"):
        node(0, overhead=-1.0)


def test_replan_prices_stages_with_the_overhead() -> None:
    model = layers([1.0] * 9)
    old = load_balanced(model, [node(0), node(1)])
    result = replan(old, model, [node(0), node(1, overhead=1.0)], tolerance=0.0)
    assert result.plan.bottleneck_ms == pytest.approx(6.0)


def test_plan_cli_reads_a_nodes_layer_overhead(tmp_path: Path) -> None:
    model = [{"id": i, "compute_cost": 1e9, "memory_bytes": 1, "output_size": 8} for i in range(9)]
    nodes = [
        {"id": 0, "flops_per_s": 1e12, "memory_bytes": 1 << 30},
        {"id": 1, "flops_per_s": 1e12, "memory_bytes": 1 << 30, "layer_overhead_ms": 1.0},
    ]
    (tmp_path / "l.json").write_text(json.dumps(model))
    (tmp_path / "n.json").write_text(json.dumps(nodes))
    args = ["plan", "--layers", str(tmp_path / "l.json"), "--nodes", str(tmp_path / "n.json")]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert [(s["node"], s["start"], s["end"]) for s in out["stages"]] == [(0, 0, 6), (1, 6, 9)]
    nodes[1]["layer_overhead_ms"] = -1
    (tmp_path / "n.json").write_text(json.dumps(nodes))
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code != 0 and "layer_overhead_ms" in result.output
