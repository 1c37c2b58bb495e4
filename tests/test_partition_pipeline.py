"""Pipeline strategies against brute force on instances small enough to enumerate."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from butterfly.partition import (
    Link,
    NodeCapability,
    Plan,
    hybrid,
    load_balanced,
    topology_aware,
    uniform,
)
from butterfly.partition.capability import Costs, link_between
from butterfly.partition.order import link_ms
from butterfly.types.errors import InsufficientResources, OptimizationFailed
from butterfly.types.ids import NodeId
from butterfly.types.model import LayerInfo, Linear

GFLOP = 1e9


def layer(i: int, gflop: float, mem: int = 1, out: int = 256) -> LayerInfo:
    return LayerInfo(i, Linear(out, out), gflop * GFLOP, mem, out)


@st.composite
def layer_lists(draw: st.DrawFn, max_layers: int = 6) -> list[LayerInfo]:
    n = draw(st.integers(1, max_layers))
    costs = draw(st.lists(st.sampled_from([0, 1, 2, 3, 5, 8, 13]), min_size=n, max_size=n))
    mems = draw(st.lists(st.integers(0, 5), min_size=n, max_size=n))
    return [layer(i, c, m) for i, (c, m) in enumerate(zip(costs, mems, strict=True))]


@st.composite
def node_lists(draw: st.DrawFn, max_nodes: int = 4, links: bool = False) -> list[NodeCapability]:
    m = draw(st.integers(1, max_nodes))
    out = []
    for k in range(m):
        peers: dict[NodeId, Link] = {}
        if links:
            for j in range(m):
                if j != k and draw(st.booleans()):
                    peers[NodeId(j)] = Link(
                        draw(st.sampled_from([0.1, 1.0, 5.0])), draw(st.sampled_from([1e6, 1e9]))
                    )
        rate = draw(st.sampled_from([1e12, 2e12, 3e12]))
        out.append(NodeCapability(NodeId(k), rate, draw(st.integers(1, 14)), peers))
    return out


def compositions(n: int, parts: int, min_part: int) -> Iterator[tuple[int, ...]]:
    if parts == 1:
        if n >= min_part:
            yield (n,)
        return
    for first in range(min_part, n + 1):
        for rest in compositions(n - first, parts - 1, min_part):
            yield (first, *rest)


def stage_ms(costs: Costs, node: NodeCapability, s: int, e: int) -> float:
    return 1000 * math.fsum(x.compute_cost for x in costs.layers[s:e]) / float(node.flops_per_s)


def brute_in_order(layers: list[LayerInfo], nodes: Sequence[NodeCapability]) -> float:
    """Best compute bottleneck over every split in the given order, empty stages allowed."""
    costs = Costs.of(layers, 0)
    best = math.inf
    for sizes in compositions(costs.n, len(nodes), 0):
        worst, start = 0.0, 0
        for node, size in zip(nodes, sizes, strict=True):
            end = start + size
            if size and costs.stage_memory(start, end) > node.memory_bytes:
                worst = math.inf
            elif size:
                worst = max(worst, stage_ms(costs, node, start, end))
            start = end
        best = min(best, worst)
    return best


def brute_any_order(layers: list[LayerInfo], nodes: Sequence[NodeCapability]) -> float:
    """Best bottleneck with transfers over every ordered subset of nodes and every split."""
    costs = Costs.of(layers, 0)
    best = math.inf
    for r in range(1, len(nodes) + 1):
        for seq in itertools.permutations(nodes, r):
            for sizes in compositions(costs.n, r, 1):
                worst, start = 0.0, 0
                for i, (node, size) in enumerate(zip(seq, sizes, strict=True)):
                    end = start + size
                    t = stage_ms(costs, node, start, end)
                    if costs.stage_memory(start, end) > node.memory_bytes:
                        t = math.inf
                    if i + 1 < r:
                        link = link_between(node, seq[i + 1])
                        t += link.transfer_ms(int(costs.boundary[end])) if link else math.inf
                    worst, start = max(worst, t), end
                best = min(best, worst)
    return best


def assert_well_formed(plan: Plan, layers: list[LayerInfo], nodes: list[NodeCapability]) -> None:
    by_id = {node.id: node for node in nodes}
    costs = Costs.of(layers, 0)
    position = 0
    for stage in plan.stages:
        assert stage.layers.start == position
        assert (
            costs.stage_memory(stage.layers.start, stage.layers.end)
            <= by_id[stage.node].memory_bytes
        )
        position = stage.layers.end
    assert position == len(layers)
    assert len({s.node for s in plan.stages}) == len(plan.stages)


def close(a: float, b: float) -> bool:
    return a == b or abs(a - b) <= 1e-9 * max(1.0, abs(b))


@settings(max_examples=300, deadline=None)
@given(layer_lists(), node_lists())
def test_load_balanced_is_optimal_for_id_order(
    layers: list[LayerInfo], nodes: list[NodeCapability]
) -> None:
    expected = brute_in_order(layers, sorted(nodes, key=lambda n: n.id))
    try:
        plan = load_balanced(layers, nodes, context_tokens=0)
    except InsufficientResources:
        assert expected == math.inf
        return
    assert close(plan.bottleneck_ms, expected)
    assert_well_formed(plan, layers, nodes)


@settings(max_examples=150, deadline=None)
@given(layer_lists(), node_lists(links=True))
def test_topology_aware_is_optimal_over_orders_for_small_clusters(
    layers: list[LayerInfo], nodes: list[NodeCapability]
) -> None:
    if len(nodes) > 1 and not any(n.links for n in nodes):
        return  # refused by design: nothing to be topology-aware about
    expected = brute_any_order(layers, nodes)
    try:
        plan = topology_aware(layers, nodes, context_tokens=0)
    except (InsufficientResources, OptimizationFailed):
        assert expected == math.inf
        return
    assert close(plan.bottleneck_ms, expected)
    assert_well_formed(plan, layers, nodes)


@settings(max_examples=100, deadline=None)
@given(layer_lists(), node_lists(links=True), st.randoms(use_true_random=False))
def test_the_same_facts_in_any_order_give_the_same_plan(
    layers: list[LayerInfo], nodes: list[NodeCapability], rnd: random.Random
) -> None:
    shuffled_nodes, shuffled_layers = list(nodes), list(layers)
    rnd.shuffle(shuffled_nodes)
    rnd.shuffle(shuffled_layers)
    for strategy in (uniform, load_balanced, topology_aware, hybrid):
        try:
            first = strategy(layers, nodes, context_tokens=0)
        except (InsufficientResources, OptimizationFailed) as e:
            with pytest.raises(type(e)):
                strategy(shuffled_layers, shuffled_nodes, context_tokens=0)
            continue
        assert strategy(shuffled_layers, shuffled_nodes, context_tokens=0) == first
        assert_well_formed(first, layers, nodes)  # covers every layer, within memory


def test_load_balanced_worked_example_from_the_docstring() -> None:
    layers = [layer(i, c) for i, c in enumerate([1, 1, 1, 1, 4, 4])]
    nodes = [NodeCapability(NodeId(0), 2e12, 100), NodeCapability(NodeId(1), 1e12, 100)]
    spans = [(s.layers.start, s.layers.end) for s in uniform(layers, nodes).stages]
    assert spans == [(0, 3), (3, 6)]
    assert uniform(layers, nodes).bottleneck_ms == pytest.approx(9.0)
    plan = load_balanced(layers, nodes)
    assert [(s.layers.start, s.layers.end) for s in plan.stages] == [(0, 5), (5, 6)]
    assert plan.bottleneck_ms == pytest.approx(4.0)
    small = [NodeCapability(NodeId(0), 2e12, 4), NodeCapability(NodeId(1), 1e12, 100)]
    assert load_balanced(layers, small, context_tokens=0).bottleneck_ms == pytest.approx(8.0)
    slow = [*nodes, NodeCapability(NodeId(2), 1e11, 100)]
    assert load_balanced(layers, slow).quality.unused_nodes == (NodeId(2),)


def test_topology_aware_avoids_the_slow_link_that_id_order_crosses() -> None:
    """Racks {0, 2} and {1, 3}: id order crosses racks three times, a good order once."""
    fast, slow = Link(0.1, 10e9), Link(20.0, 1e8)
    rack = {0: "a", 1: "b", 2: "a", 3: "b"}
    nodes = [
        NodeCapability(
            NodeId(k),
            1e12,
            1 << 30,
            {NodeId(j): fast if rack[j] == rack[k] else slow for j in range(4) if j != k},
        )
        for k in range(4)
    ]
    layers = [layer(i, 10) for i in range(8)]
    blind = load_balanced(layers, nodes)
    aware = topology_aware(layers, nodes)
    assert blind.quality.transfer_ms_per_token > 60  # three slow hops
    assert aware.bottleneck_ms < blind.bottleneck_ms
    crossings = sum(rack[a.node] != rack[b.node] for a, b in itertools.pairwise(aware.stages))
    assert crossings <= 1


def test_large_clusters_use_the_heuristic_and_still_beat_id_order() -> None:
    rack = [k % 4 for k in range(12)]
    nodes = [
        NodeCapability(
            NodeId(k),
            1e12 * (1 + k % 3),
            1 << 30,
            {
                NodeId(j): Link(0.1, 10e9) if rack[j] == rack[k] else Link(5.0, 1e8)
                for j in range(12)
                if j != k
            },
        )
        for k in range(12)
    ]
    layers = [layer(i, 1 + i % 5) for i in range(60)]
    aware = topology_aware(layers, nodes)
    assert aware.bottleneck_ms < load_balanced(layers, nodes).bottleneck_ms
    assert_well_formed(aware, layers, nodes)


def test_hybrid_drops_a_stage_that_buys_less_than_the_tolerance() -> None:
    # 20 x 1 GFLOP and a 0.02 GFLOP tail; node 2 is 20x slower. Three stages give a compute
    # bottleneck of 10 ms, two give 10.02 ms (0.2% worse) and save a hop of 1 ms.
    layers = [layer(i, 1) for i in range(20)] + [layer(20, 0.02)]
    rates = [1e12, 1e12, 5e10]
    nodes = [
        NodeCapability(
            NodeId(k), rates[k], 1 << 30, {NodeId(j): Link(1.0, 1e12) for j in range(3) if j != k}
        )
        for k in range(3)
    ]
    full = load_balanced(layers, nodes)
    assert len(full.stages) == 3
    plan = hybrid(layers, nodes)
    assert len(plan.stages) == 2
    assert plan.bottleneck_ms <= full.bottleneck_ms * 1.05
    assert plan.quality.per_token_latency_ms < full.quality.per_token_latency_ms


def test_hybrid_trims_stages_without_links_too() -> None:
    # Without links the trim works on compute alone: four equal layers on four equal
    # nodes need all four (one layer each); a 10% slower fourth stage is not tolerated.
    layers = [layer(i, 1) for i in range(4)]
    nodes = [NodeCapability(NodeId(k), 1e12, 1 << 30) for k in range(4)]
    assert len(hybrid(layers, nodes).stages) == 4
    tail = [layer(i, 1 if i < 3 else 0.01) for i in range(4)]
    plan = hybrid(tail, nodes)
    assert len(plan.stages) == 3  # the 0.01-GFLOP layer rides along within 5%
    assert plan.bottleneck_ms <= 1.01 + 1e-9


@settings(max_examples=50, deadline=None)
@given(node_lists(max_nodes=6, links=True), st.randoms(use_true_random=False))
def test_link_matrix_matches_link_between_in_any_node_order(
    nodes: list[NodeCapability], rnd: random.Random
) -> None:
    rnd.shuffle(nodes)
    ms = link_ms(nodes, 4096)
    for i, a in enumerate(nodes):
        for j, b in enumerate(nodes):
            link = link_between(a, b)
            expected = 0.0 if i == j else link.transfer_ms(4096) if link else math.inf
            assert ms[i][j] == pytest.approx(expected)


@settings(max_examples=40, deadline=None)
@given(layer_lists(max_layers=12), node_lists(max_nodes=9, links=True))
def test_heuristic_orders_give_well_formed_plans_or_a_clear_error(
    layers: list[LayerInfo], nodes: list[NodeCapability]
) -> None:
    if len(nodes) <= 5 or not any(n.links for n in nodes):
        return
    try:
        plan = topology_aware(layers, nodes, context_tokens=0)
    except InsufficientResources:
        with pytest.raises(InsufficientResources):
            load_balanced(layers, nodes, context_tokens=0)  # it fits in no order tried
        return
    except OptimizationFailed as e:
        assert "measured links" in e.message
        return
    assert_well_formed(plan, layers, nodes)
    for a, b in itertools.pairwise(plan.stages):
        by_id = {n.id: n for n in nodes}
        assert link_between(by_id[a.node], by_id[b.node]) is not None
