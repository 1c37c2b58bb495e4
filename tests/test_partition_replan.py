"""Re-planning on membership changes: how many layers move, and that few do when cheap."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from butterfly.partition import NodeCapability, Plan, load_balanced, topology_aware
from butterfly.partition.capability import Link
from butterfly.partition.replan import moved_layers, replan
from butterfly.types.errors import InvalidConfiguration
from butterfly.types.ids import NodeId
from butterfly.types.model import LayerInfo, Linear


def layers(costs: list[float]) -> list[LayerInfo]:
    return [LayerInfo(i, Linear(8, 8), c * 1e9, 1, 8) for i, c in enumerate(costs)]


def node(k: int, rate: float = 1e12, memory: int = 1000) -> NodeCapability:
    return NodeCapability(NodeId(k), rate, memory)


def spans(plan: Plan) -> list[tuple[int, int, int]]:
    return [(s.node, s.layers.start, s.layers.end) for s in plan.stages]


def test_a_node_leaving_moves_exactly_its_layers() -> None:
    model = layers([1.0] * 12)
    old = load_balanced(model, [node(0), node(1), node(2)])
    assert spans(old) == [(0, 0, 4), (1, 4, 8), (2, 8, 12)]
    r = replan(old, model, [node(0), node(2)])
    assert spans(r.plan) == [(0, 0, 6), (2, 6, 12)]
    assert r.moved_layers == 4 == moved_layers(old, r.plan)


def test_a_node_that_would_not_help_is_left_idle_and_nothing_moves() -> None:
    model = layers([1.0] * 12)
    old = load_balanced(model, [node(0), node(1), node(2)])
    r = replan(old, model, [node(0), node(1), node(2), node(3, rate=0.3e12)])
    assert r.moved_layers == 0
    assert spans(r.plan) == spans(old)


def test_within_the_tolerance_the_old_boundaries_are_kept() -> None:
    # 13 layers on three nodes: 5, 4, 4. A fourth node with room for one layer makes the
    # optimum 4, 4, 4, 1 (moving layers 4, 8 and 12). With 30% tolerance the old
    # boundaries stay and only layer 12 moves to the newcomer.
    model = layers([1.0] * 13)
    old = load_balanced(model, [node(0), node(1), node(2)])
    assert [len(s.layers) for s in old.stages] == [5, 4, 4]
    joined = [node(0), node(1), node(2), node(3, memory=1)]
    r = replan(old, model, joined, tolerance=0.3)
    assert r.optimum.bottleneck_ms == pytest.approx(4.0)
    assert r.optimum_moved_layers == 3
    assert r.kept_in_place and r.moved_layers == 1
    assert spans(r.plan) == [(0, 0, 5), (1, 5, 9), (2, 9, 12), (3, 12, 13)]
    assert replan(old, model, joined).moved_layers == 3  # 5% tolerance: 5 ms is too slow


def test_a_fast_node_joining_is_worth_a_reshuffle() -> None:
    model = layers([1.0] * 12)
    old = load_balanced(model, [node(0), node(1), node(2)])
    r = replan(old, model, [node(k) for k in range(4)])
    assert r.plan.bottleneck_ms == pytest.approx(3.0)  # 4 ms -> 3 ms is not within 5%
    assert not r.kept_in_place
    assert r.moved_layers == moved_layers(old, r.plan) == 6


def test_tolerance_zero_always_takes_an_optimal_plan() -> None:
    model = layers([1.0] * 12)
    old = load_balanced(model, [node(0), node(1), node(2)])
    r = replan(old, model, [*(node(k) for k in range(3)), node(3, 0.3e12)], tolerance=0.0)
    assert r.plan.bottleneck_ms == pytest.approx(r.optimum.bottleneck_ms)


def test_replanning_for_a_different_model_is_refused() -> None:
    old = load_balanced(layers([1.0] * 6), [node(0), node(1)])
    with pytest.raises(InvalidConfiguration, match="fresh plan"):
        replan(old, layers([1.0] * 7), [node(0), node(1)])


def test_replan_works_with_topology_aware_plans() -> None:
    peers = {k: {NodeId(j): Link(0.5, 1e9) for j in range(4) if j != k} for k in range(4)}
    members = [NodeCapability(NodeId(k), 1e12, 1000, peers[k]) for k in range(4)]
    model = layers([1.0] * 16)
    old = topology_aware(model, members)
    leaving = old.stages[1].node
    r = replan(old, model, [m for m in members if m.id != leaving], "topology_aware")
    assert r.moved_layers >= len(old.stages[1].layers)
    assert r.moved_layers == moved_layers(old, r.plan)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.sampled_from([1.0, 2.0, 3.0]), min_size=2, max_size=10),
    st.lists(st.sampled_from([1e12, 2e12]), min_size=2, max_size=4),
    st.data(),
)
def test_replan_never_exceeds_the_tolerance_nor_moves_more_than_the_optimum(
    costs: list[float], rates: list[float], data: st.DataObject
) -> None:
    model = layers(costs)
    before = [node(k, r) for k, r in enumerate(rates)]
    old = load_balanced(model, before)
    leaving = data.draw(st.sampled_from([n.id for n in before]))
    after = [n for n in before if n.id != leaving]
    r = replan(old, model, after)
    assert r.plan.bottleneck_ms <= r.optimum.bottleneck_ms * 1.05 + 1e-9
    assert r.moved_layers <= r.optimum_moved_layers
    assert r.moved_layers == moved_layers(old, r.plan)
    gone = sum(len(s.layers) for s in old.stages if s.node == leaving)
    assert r.moved_layers >= gone  # a departed node's layers always move
