"""PartitionService (cache, counters, degradation), the errors, and estimate_quality."""

from __future__ import annotations

import logging

import pytest

from butterfly.partition import (
    Link,
    NodeCapability,
    Plan,
    estimate_per_token_ms,
    estimate_quality,
    load_balanced,
    topology_aware,
)
from butterfly.partition.service import PartitionService
from butterfly.types.errors import (
    InsufficientResources,
    InvalidConfiguration,
    NoNodesAvailable,
    OptimizationFailed,
    UnknownStrategy,
)
from butterfly.types.ids import NodeId
from butterfly.types.model import LayerInfo, Linear

MiB = 1 << 20


def layers(n: int = 8, gflop: float = 1.0, out: int = 1024) -> list[LayerInfo]:
    return [LayerInfo(i, Linear(out, out), gflop * 1e9, MiB, out) for i in range(n)]


def nodes(m: int = 3, links: bool = True, rate: float = 1e12) -> list[NodeCapability]:
    return [
        NodeCapability(
            NodeId(k),
            rate,
            1 << 30,
            {NodeId(j): Link(1.0, 1e9) for j in range(m) if j != k and links},
        )
        for k in range(m)
    ]


def test_cache_hits_for_the_same_facts_in_any_order_and_counts_them() -> None:
    service = PartitionService(cache_size=10)
    first = service.plan(layers(), nodes(), "load_balanced")
    assert (service.hits, service.misses) == (0, 1)
    again = service.plan(layers(), list(reversed(nodes())), "load_balanced")
    assert again is first
    assert (service.hits, service.misses) == (1, 1)
    service.plan(layers(), nodes(), "uniform")  # another strategy: another entry
    service.plan(layers(gflop=2.0), nodes(), "load_balanced")  # other costs: another entry
    assert (service.hits, service.misses) == (1, 3)
    assert service.hit_ratio == pytest.approx(0.25)


def test_cache_is_least_recently_used_and_bounded() -> None:
    service = PartitionService(cache_size=2)
    a, b, c = layers(4), layers(5), layers(6)
    service.plan(a, nodes())
    service.plan(b, nodes())
    service.plan(a, nodes())  # a is now the most recent
    service.plan(c, nodes())  # evicts b
    assert len(service) == 2
    service.plan(a, nodes())
    assert service.hits == 2
    service.plan(b, nodes())
    assert service.misses == 4
    service.invalidate()
    assert len(service) == 0


def test_a_mutated_links_dict_cannot_alias_a_cached_plan() -> None:
    peers = {NodeId(1): Link(1.0, 1e9)}
    node = NodeCapability(NodeId(0), 1e12, 1 << 30, peers)
    peers[NodeId(1)] = Link(50.0, 1e6)
    assert node.links[NodeId(1)] == Link(1.0, 1e9)


def test_degradation_topology_to_load_balanced_is_logged_and_noted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    service = PartitionService()
    with caplog.at_level(logging.WARNING, logger="butterfly.partition.service"):
        plan = service.plan(layers(), nodes(links=False), "topology_aware")
    assert plan.strategy == "load_balanced"
    assert "link measurements" in caplog.text and "load_balanced" in caplog.text
    assert len(plan.notes) == 1 and "topology_aware failed" in plan.notes[0]
    assert service.degradations == 1
    # The degraded plan is cached under the requested strategy: no second failure.
    assert service.plan(layers(), nodes(links=False), "topology_aware") is plan
    assert service.degradations == 1


def test_degradation_runs_the_whole_chain_to_uniform(caplog: pytest.LogCaptureFixture) -> None:
    unmeasured = nodes(rate=0.0)
    with caplog.at_level(logging.WARNING):
        plan = PartitionService().plan(layers(), unmeasured, "topology_aware")
    assert plan.strategy == "uniform"
    assert [n.split(" failed")[0] for n in plan.notes] == ["topology_aware", "load_balanced"]
    assert "flops_per_s = 0" in plan.notes[1]
    assert [len(s.layers) for s in plan.stages] == [3, 3, 2]
    assert plan.to_dict()["bottleneck_ms"] is None  # unknown rate: no estimate, not a guess


def test_a_model_that_does_not_fit_is_not_degraded_and_says_what_is_missing() -> None:
    small = [NodeCapability(NodeId(k), 1e12, 3 * MiB) for k in range(2)]
    with pytest.raises(InsufficientResources) as e:
        PartitionService(context_tokens=0).plan(layers(8), small, "topology_aware")
    # Two nodes of 3 MiB hold 6 of the 8 one-MiB layers: the last stage lacks 2 MiB.
    assert "stage 1 on node 1" in e.value.message
    assert "2.00 MiB missing" in e.value.message
    with pytest.raises(InsufficientResources, match="layer 0 alone needs"):
        load_balanced(layers(2), [NodeCapability(NodeId(0), 1e12, MiB // 2)], context_tokens=0)


def test_the_kv_budget_counts_against_memory() -> None:
    kv = [LayerInfo(i, Linear(8, 8), 1e9, MiB, 8, kv_bytes_per_token=1024) for i in range(4)]
    one = [NodeCapability(NodeId(0), 1e12, 4 * MiB + 4 * 1024 * 1000)]
    assert load_balanced(kv, one, context_tokens=1000).quality.min_headroom_bytes == 0
    with pytest.raises(InsufficientResources, match="KV cache for 1001 tokens"):
        load_balanced(kv, one, context_tokens=1001)


def test_bad_requests_raise_the_documented_errors() -> None:
    service = PartitionService()
    with pytest.raises(NoNodesAvailable):
        service.plan(layers(), [], "load_balanced")
    with pytest.raises(UnknownStrategy, match="topology_aware"):
        service.plan(layers(), nodes(), "fastest")
    with pytest.raises(InvalidConfiguration, match="listed twice"):
        service.plan(layers(), nodes() + nodes()[:1])
    with pytest.raises(InvalidConfiguration, match="without gaps"):
        service.plan(layers()[1:], nodes())
    with pytest.raises(InvalidConfiguration, match="flops_per_s"):
        NodeCapability(NodeId(0), -1.0, 1)
    with pytest.raises(InvalidConfiguration, match="bandwidth"):
        Link(1.0, 0.0)
    assert not NoNodesAvailable.fatal and NoNodesAvailable.retriable
    with pytest.raises(OptimizationFailed):
        topology_aware(layers(), nodes(links=False))


def test_quality_numbers_are_computed_from_the_plan() -> None:
    # 8 x 1 GFLOP on three 1 TFLOP/s nodes, 1 ms + 1 KiB * 4 B / 1 GB/s per link.
    plan = load_balanced(layers(8), nodes(3))
    q = plan.quality
    counts = [len(s.layers) for s in plan.stages]
    assert sorted(counts) == [2, 3, 3]
    send = 1.0 + 1000 * 4096 / 1e9
    est = [c + send for c in counts[:-1]] + [float(counts[-1])]
    assert [s.estimated_ms for s in plan.stages] == pytest.approx(est)
    assert plan.bottleneck_ms == pytest.approx(max(est))
    assert q.communication_bytes_per_token == 2 * 4096
    assert q.transfer_ms_per_token == pytest.approx(2 * send)
    assert q.per_token_latency_ms == pytest.approx(8 + 2 * send)
    assert q.throughput_tokens_per_s == pytest.approx(1000 / max(est))
    mean = sum(est) / 3
    assert q.imbalance_pct == pytest.approx((max(est) - mean) / mean * 100)
    assert q.load_balance == pytest.approx(mean / max(est))
    assert dict(q.memory_by_node) == {k: c * MiB for k, c in enumerate(counts)}
    assert q.peak_memory_bytes == 3 * MiB
    # Same plan, slower links measured later: the estimate follows the facts.
    slower = [
        NodeCapability(n.id, n.flops_per_s, n.memory_bytes, {p: Link(5.0, 1e9) for p in n.links})
        for n in nodes(3)
    ]
    later = estimate_quality(plan, layers(8), slower)
    assert later.per_token_latency_ms == pytest.approx(q.per_token_latency_ms + 8)
    assert estimate_per_token_ms(plan, layers(8), nodes(3), per_hop_ms=0.3) == pytest.approx(
        q.per_token_latency_ms + 0.6
    )


def test_estimate_quality_refuses_a_plan_that_does_not_match_the_layers() -> None:
    plan: Plan = load_balanced(layers(8), nodes(3))
    with pytest.raises(InvalidConfiguration, match="covers layers"):
        estimate_quality(plan, layers(9), nodes(3))
    with pytest.raises(InvalidConfiguration, match="not listed"):
        estimate_quality(plan, layers(8), nodes(2))
