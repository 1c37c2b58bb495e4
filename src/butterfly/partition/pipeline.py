"""Pipeline placement: contiguous `[start, end)` stages over nodes, one registered name each.

    uniform         equal layer counts; needs only memory figures
    load_balanced   optimal split over the nodes in id order; needs compute rates
    topology_aware  also picks the order, counting activation transfers; needs links
    hybrid          within 5% of the best bottleneck, the fewest stages / lowest latency

Each is a pure function of (layers, nodes, context budget): the same facts in any order
give the same plan (inputs are sorted by id first, see `capability`). The degradation
chain topology_aware -> load_balanced -> uniform follows what each needs measured; it
lives in `service`, not here.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from typing import Protocol

from butterfly.partition.capability import (
    DEFAULT_CONTEXT_TOKENS,
    Costs,
    NodeCapability,
    fmt_bytes,
    sorted_nodes,
)
from butterfly.partition.order import EXACT_MAX_NODES, heuristic_orders, link_ms
from butterfly.partition.quality import Plan, Stage, build_plan
from butterfly.partition.split import Split, Tables, fits, shortfall, split, split_prefix
from butterfly.partition.strategies import uniform_ranges
from butterfly.types.errors import InsufficientResources, OptimizationFailed, UnknownStrategy
from butterfly.types.ids import NodeId
from butterfly.types.model import LayerInfo, PartitionStrategy

_SAME = 1e-9
"""Relative difference below which two bottlenecks are a tie (broken by latency)."""

HYBRID_TOLERANCE = 0.05
"""How much bottleneck (throughput) hybrid gives up to save stages and latency."""


class Strategy(Protocol):
    def __call__(
        self,
        layers: Iterable[LayerInfo],
        nodes: Iterable[NodeCapability],
        *,
        context_tokens: int = DEFAULT_CONTEXT_TOKENS,
    ) -> Plan: ...


def uniform(
    layers: Iterable[LayerInfo],
    nodes: Iterable[NodeCapability],
    *,
    context_tokens: int = DEFAULT_CONTEXT_TOKENS,
) -> Plan:
    """Equal layer counts over the nodes in id order: the fallback that needs no rates.

    Earlier stages get the extra layers (10 layers on 4 nodes: 3, 3, 2, 2); with more nodes
    than layers the highest ids are left unused.
    """
    costs = Costs.of(layers, context_tokens)
    ordered = sorted_nodes(nodes)
    ranges = uniform_ranges(costs.n, min(costs.n, len(ordered)))
    stages = [(node, r.start, r.end) for node, r in zip(ordered, ranges, strict=False)]
    over = [
        f"stage {i} on node {node.id} (layers [{s}, {e})) needs "
        f"{fmt_bytes(costs.stage_memory(s, e))} but has {fmt_bytes(node.memory_bytes)}: "
        f"{fmt_bytes(costs.stage_memory(s, e) - node.memory_bytes)} missing"
        for i, (node, s, e) in enumerate(stages)
        if costs.stage_memory(s, e) > node.memory_bytes
    ]
    if over:
        raise InsufficientResources(
            "equal layer counts do not fit: " + "; ".join(over) + ". Add memory, lower the "
            f"context budget ({context_tokens} tokens), or use load_balanced."
        )
    return build_plan(PartitionStrategy.UNIFORM, stages, costs, ordered)


def load_balanced(
    layers: Iterable[LayerInfo],
    nodes: Iterable[NodeCapability],
    *,
    context_tokens: int = DEFAULT_CONTEXT_TOKENS,
) -> Plan:
    """The split over the nodes in id order whose slowest stage is as fast as possible.

    A pipeline runs at the pace of its slowest stage, so this minimises
    max over stages of sum(layer.compute_cost) / node.flops_per_s (+ the node's fixed
    `layer_overhead_ms` per layer), never giving a node
    more bytes (weights + KV cache for `context_tokens`) than it has. The optimum is exact
    (a dynamic program, `split.split`); a node that would only slow the pipeline is left
    unused. Link times are not modelled (that is topology_aware).

    Worked example: six layers of 1, 1, 1, 1, 4, 4 GFLOP per token; node 0 does
    2 TFLOP/s, node 1 does 1 TFLOP/s.

        uniform        node 0: [0, 3)  3 GFLOP  1.5 ms    node 1: [3, 6)  9 GFLOP  9.0 ms
        load_balanced  node 0: [0, 5)  8 GFLOP  4.0 ms    node 1: [5, 6)  4 GFLOP  4.0 ms

    The bottleneck drops from 9 ms to 4 ms: 2.25x the tokens per second. If node 0 can
    hold only four layers, the best is [0, 4) 2 ms and [4, 6) 8 ms. A third node at
    0.1 TFLOP/s would need 10 ms for even a 1-GFLOP layer, so it gets nothing.
    """
    costs = Costs.of(layers, context_tokens)
    ordered = sorted_nodes(nodes)
    _require_rates(ordered, PartitionStrategy.LOAD_BALANCED)
    found = split(costs, ordered, [0.0] * len(ordered))
    if found is None:
        raise InsufficientResources(shortfall(costs, ordered))
    return build_plan(PartitionStrategy.LOAD_BALANCED, _stages(found, ordered), costs, ordered)


def topology_aware(
    layers: Iterable[LayerInfo],
    nodes: Iterable[NodeCapability],
    *,
    context_tokens: int = DEFAULT_CONTEXT_TOKENS,
) -> Plan:
    """Choose the node order too, charging each stage the time to send its activations on.

    A stage's time is its compute plus the transfer of its output to the next stage over
    the measured link (latency + bytes / bandwidth, with the model's largest boundary
    size). For up to `order.EXACT_MAX_NODES` nodes every order is tried and the result is
    optimal (over orders and splits: every ordered subset of nodes is some order's prefix).
    For more, `order.heuristic_orders` proposes a few (nearest-neighbour chains improved by
    2-opt, and id order when its links are competitive) and each is split optimally for
    its order. Nodes never measured against each other are never placed next to each
    other.
    """
    costs = Costs.of(layers, context_tokens)
    ordered = sorted_nodes(nodes)
    _require_rates(ordered, PartitionStrategy.TOPOLOGY_AWARE)
    if len(ordered) > 1 and not any(node.links for node in ordered):
        raise OptimizationFailed(
            f"topology_aware needs link measurements and none of the {len(ordered)} nodes "
            "has any; measure links (latency, bandwidth) or use load_balanced"
        )
    ms = link_ms(ordered, costs.max_boundary_bytes())
    exact = len(ordered) <= EXACT_MAX_NODES
    orders: Iterable[tuple[int, ...]] = (
        itertools.permutations(range(len(ordered))) if exact else heuristic_orders(ordered, ms)
    )
    tables = Tables(costs)
    best = math.inf
    ties: list[tuple[Split, list[NodeCapability]]] = []  # splits within rounding of the best
    fits_somewhere = False
    for indices in orders:
        order = [ordered[i] for i in indices]
        sends = _sends(indices, ms)
        found = split(costs, order, sends, tables=tables)
        fits_somewhere = fits_somewhere or found is not None or fits(costs, order)
        if found is None:
            continue
        if not found.contiguous:
            if exact:
                # The DP's value bounds the no-skip optimum from below; solve only if it
                # could still beat the best plan so far.
                if found.bottleneck_ms > best * (1 + _SAME):
                    continue
                found = split_prefix(costs, order, sends)
            else:
                found, order = _drop_skipped(costs, found, order, ordered, ms, tables)
            if found is None:
                continue
        if found.bottleneck_ms < best * (1 - _SAME):
            best, ties = found.bottleneck_ms, []
        if found.bottleneck_ms <= best * (1 + _SAME):
            ties.append((found, order))
    if ties:
        plans = [
            build_plan(PartitionStrategy.TOPOLOGY_AWARE, _stages(f, o), costs, ordered)
            for f, o in ties
        ]
        return min(plans, key=_rank)
    by_memory = sorted(ordered, key=lambda node: (-node.memory_bytes, node.id))
    if not (fits_somewhere or fits(costs, ordered) or fits(costs, by_memory)):
        raise InsufficientResources(shortfall(costs, by_memory))
    raise OptimizationFailed(
        "the model fits in memory, but no chain of nodes along measured links that was "
        "tried can hold it; measure the missing links or use load_balanced"
    )


def hybrid(
    layers: Iterable[LayerInfo],
    nodes: Iterable[NodeCapability],
    *,
    context_tokens: int = DEFAULT_CONTEXT_TOKENS,
) -> Plan:
    """Throughput first, then latency: the fewest leading nodes within 5% of the best.

    Takes the better of load_balanced and (when links are measured) topology_aware, then
    binary-searches the shortest prefix of its node order whose optimal split is within
    `HYBRID_TOLERANCE` of that bottleneck. Fewer stages mean fewer hops per token and
    fewer nodes to fail; among the plans within the tolerance the lowest per-token latency
    wins, and on equal latency (links unmeasured) the one with fewer stages.
    """
    costs = Costs.of(layers, context_tokens)
    ordered = sorted_nodes(nodes)
    tried: list[Strategy] = [load_balanced]
    if len(ordered) > 1 and any(node.links for node in ordered):
        tried.append(topology_aware)
    candidates, failures = [], []
    for strategy in tried:
        try:
            candidates.append(strategy(costs.layers, ordered, context_tokens=context_tokens))
        except (InsufficientResources, OptimizationFailed) as e:
            failures.append(e)  # e.g. links too sparse to chain: the other one stands
    if not candidates:
        raise failures[0]
    base = min(candidates, key=_rank)
    limit = base.bottleneck_ms * (1 + HYBRID_TOLERANCE)
    by_id = {node.id: node for node in ordered}
    order = [by_id[s.node] for s in base.stages]
    ms = link_ms(order, costs.max_boundary_bytes())
    # Unmeasured links count as free, as `quality` counts them (and flags them).
    sends = [x if math.isfinite(x) else 0.0 for x in _sends(tuple(range(len(order))), ms)]
    lo, hi = 1, len(order)  # invariant: a prefix of hi nodes is within the limit
    while lo < hi:
        mid = (lo + hi) // 2
        found = split(costs, order[:mid], sends[:mid])
        if found is not None and found.bottleneck_ms <= limit:
            hi = mid
        else:
            lo = mid + 1
    found = split(costs, order[:hi], sends[:hi])
    if found is not None:
        trimmed = build_plan(PartitionStrategy.HYBRID, _stages(found, order), costs, ordered)
        candidates.append(trimmed)
    within = [p for p in candidates if p.bottleneck_ms <= limit]
    # Lowest latency; on a tie (e.g. no measured links) the fewest stages, then the fastest.
    pick = min(
        within,
        key=lambda p: (round(p.quality.per_token_latency_ms, 9), p.quality.stages, p.bottleneck_ms),
    )
    return build_plan(PartitionStrategy.HYBRID, _plan_stages(pick, by_id), costs, ordered)


STRATEGIES: dict[PartitionStrategy, Strategy] = {
    PartitionStrategy.UNIFORM: uniform,
    PartitionStrategy.LOAD_BALANCED: load_balanced,
    PartitionStrategy.TOPOLOGY_AWARE: topology_aware,
    PartitionStrategy.HYBRID: hybrid,
}


def strategy_named(name: str) -> PartitionStrategy:
    try:
        return PartitionStrategy(name)
    except ValueError:
        known = ", ".join(s.value for s in PartitionStrategy)
        raise UnknownStrategy(f"unknown strategy {name!r}; choose one of: {known}") from None


def _require_rates(nodes: Sequence[NodeCapability], strategy: PartitionStrategy) -> None:
    missing = [str(node.id) for node in nodes if node.flops_per_s <= 0]
    if missing:
        raise OptimizationFailed(
            f"{strategy} needs every node's measured compute rate; node(s) "
            f"{', '.join(missing)} report flops_per_s = 0 (not measured yet)"
        )


def _sends(indices: Sequence[int], ms: Sequence[Sequence[float]]) -> list[float]:
    return [ms[a][b] for a, b in itertools.pairwise(indices)] + [0.0]


def _stages(found: Split, order: Sequence[NodeCapability]) -> list[Stage]:
    return [(order[k], s, e) for k, s, e in found.stages]


def _plan_stages(plan: Plan, by_id: dict[NodeId, NodeCapability]) -> list[Stage]:
    return [(by_id[s.node], s.layers.start, s.layers.end) for s in plan.stages]


def _rank(plan: Plan) -> tuple[float, float]:
    return (plan.bottleneck_ms, plan.quality.per_token_latency_ms)


def _drop_skipped(
    costs: Costs,
    found: Split,
    order: list[NodeCapability],
    ordered: Sequence[NodeCapability],
    ms: Sequence[Sequence[float]],
    tables: Tables,
) -> tuple[Split | None, list[NodeCapability]]:
    """Re-split over the used nodes only, until no unused node sits between used ones.

    A node skipped between two used ones was charged as the receiver of its predecessor's
    activations, which it is not. Splitting again over just the nodes that were used makes
    those sends real; if that split skips one of them in turn, drop it too. The node set
    shrinks every round, so this ends with a split whose charges are all true (or None).
    """
    index = {node.id: i for i, node in enumerate(ordered)}
    current: Split | None = found
    while current is not None and not current.contiguous:
        order = [order[k] for k, _, _ in current.stages]
        current = split(costs, order, _sends([index[node.id] for node in order], ms), tables=tables)
    return current, order
