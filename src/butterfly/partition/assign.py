"""The specification's WorkAssigner: layers to nodes, not necessarily contiguous.

Seed 000's `WorkAssigner` hands each node a set of layer ids and reports each node's
estimated compute time; its example prints a per-node table and "Load imbalance" =
(slowest - mean) / mean. These functions reproduce that interface. They suit work whose
layers can run anywhere in any grouping (offline batch scoring, a verification re-run
spread over spare nodes); a serving pipeline wants the contiguous stages of `pipeline`,
and `topology_aware` here simply is that pipeline placement written as an assignment.

Per-layer time on a node = compute_cost / flops_per_s + `layer_overhead_ms` (the caller's,
plus the node's measured `NodeCapability.layer_overhead_ms`). The overhead is a fixed cost
per layer (dispatch, reading the layer's weights) that no FLOP count shows;
the seed's RoundRobin rows (55, 60, 65, 70 ms for 5 layers each of 1..20 GFLOP at
1 TFLOP/s) are exactly compute + 2 ms per layer.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from butterfly.partition.capability import (
    DEFAULT_CONTEXT_TOKENS,
    Costs,
    NodeCapability,
    layer_memory,
    sorted_nodes,
)
from butterfly.partition.pipeline import topology_aware as topology_plan
from butterfly.partition.split import Tables, shortfall, split
from butterfly.types.errors import InsufficientResources, OptimizationFailed, UnknownStrategy
from butterfly.types.ids import NodeId
from butterfly.types.model import LayerInfo

MAX_IMPROVEMENT_ROUNDS = 10_000

PAIR_EXCHANGE_MAX_LAYERS = 32
"""Above this many layers on a node, exchanges move single layers only (pairs are O(k^2))."""


class AssignmentStrategy(enum.StrEnum):
    ROUND_ROBIN = "round_robin"
    LOAD_BALANCED = "load_balanced"
    TOPOLOGY_AWARE = "topology_aware"
    HYBRID = "hybrid"


@dataclass(frozen=True)
class NodeAssignment:
    node: NodeId
    layer_ids: tuple[int, ...]
    estimated_ms: float


@dataclass(frozen=True)
class Assignment:
    strategy: AssignmentStrategy
    nodes: tuple[NodeAssignment, ...]  # by node id, every node listed even if idle

    @property
    def slowest_ms(self) -> float:
        return max(a.estimated_ms for a in self.nodes)

    @property
    def imbalance_pct(self) -> float:
        """(slowest - mean) / mean * 100 over the nodes that run something (as the seed)."""
        busy = [a.estimated_ms for a in self.nodes if a.layer_ids]
        mean = sum(busy) / len(busy)
        return (max(busy) - mean) / mean * 100 if mean > 0 else 0.0

    @property
    def node_switches(self) -> int:
        """How often consecutive layers run on different nodes: activations sent per token."""
        owner = {i: a.node for a in self.nodes for i in a.layer_ids}
        return sum(owner[i] != owner[i + 1] for i in range(len(owner) - 1))


class Assigner(Protocol):
    def __call__(
        self,
        layers: Iterable[LayerInfo],
        nodes: Iterable[NodeCapability],
        *,
        layer_overhead_ms: float = 0.0,
        context_tokens: int = DEFAULT_CONTEXT_TOKENS,
    ) -> Assignment: ...


class _Loads:
    """Layer times per node and the running load/memory of each node."""

    def __init__(
        self,
        layers: Sequence[LayerInfo],
        nodes: Sequence[NodeCapability],
        overhead_ms: float,
        context_tokens: int,
    ) -> None:
        self.nodes = nodes
        self.time = [
            [
                1000 * x.compute_cost / node.flops_per_s + overhead_ms + node.layer_overhead_ms
                for x in layers
            ]
            for node in nodes
        ]
        self.mem = [layer_memory(x, context_tokens) for x in layers]
        self.owned: list[list[int]] = [[] for _ in nodes]
        self.load = [0.0] * len(nodes)
        self.used = [0] * len(nodes)

    def fits(self, k: int, i: int) -> bool:
        return self.used[k] + self.mem[i] <= self.nodes[k].memory_bytes

    def put(self, k: int, i: int) -> None:
        self.owned[k].append(i)
        self.load[k] += self.time[k][i]
        self.used[k] += self.mem[i]

    def take(self, k: int, i: int) -> None:
        self.owned[k].remove(i)
        self.load[k] -= self.time[k][i]
        self.used[k] -= self.mem[i]

    def result(self, strategy: AssignmentStrategy) -> Assignment:
        return Assignment(
            strategy,
            tuple(
                NodeAssignment(
                    node.id,
                    tuple(sorted(owned)),
                    sum(self.time[k][i] for i in owned),  # summed afresh: no drift from moves
                )
                for k, (node, owned) in enumerate(zip(self.nodes, self.owned, strict=True))
            ),
        )


def _prepare(
    layers: Iterable[LayerInfo],
    nodes: Iterable[NodeCapability],
    strategy: AssignmentStrategy,
    context_tokens: int,
) -> tuple[Costs, tuple[NodeCapability, ...]]:
    costs = Costs.of(layers, context_tokens)
    ordered = sorted_nodes(nodes)
    missing = [str(node.id) for node in ordered if node.flops_per_s <= 0]
    if missing:
        raise OptimizationFailed(
            f"{strategy} needs measured compute rates; node(s) {', '.join(missing)} have none"
        )
    return costs, ordered


def round_robin(
    layers: Iterable[LayerInfo],
    nodes: Iterable[NodeCapability],
    *,
    layer_overhead_ms: float = 0.0,
    context_tokens: int = DEFAULT_CONTEXT_TOKENS,
) -> Assignment:
    """Layer i to node i mod m, in id order: the baseline that ignores every cost."""
    costs, ordered = _prepare(layers, nodes, AssignmentStrategy.ROUND_ROBIN, context_tokens)
    loads = _Loads(costs.layers, ordered, layer_overhead_ms, context_tokens)
    for i in range(costs.n):
        k = i % len(ordered)
        if not loads.fits(k, i):
            raise InsufficientResources(
                f"round robin puts layer {i} on node {ordered[k].id}, which is out of memory "
                f"({ordered[k].memory_bytes} bytes); use load_balanced"
            )
        loads.put(k, i)
    return loads.result(AssignmentStrategy.ROUND_ROBIN)


def load_balanced(
    layers: Iterable[LayerInfo],
    nodes: Iterable[NodeCapability],
    *,
    layer_overhead_ms: float = 0.0,
    context_tokens: int = DEFAULT_CONTEXT_TOKENS,
) -> Assignment:
    """Minimise the busiest node's time, any layer anywhere, within memory.

    This is makespan scheduling on unrelated machines (NP-hard), so it is a heuristic:
    longest layer first onto the node that would finish it soonest (LPT), then the best
    exchange of up to two layers each way between two nodes, repeatedly, while one evens
    them out (`_improve`). Each round prices every such exchange: meant for the tens to
    hundreds of layers of one model. On the seed's example it reaches the optimum (loads
    63, 63, 62, 62 ms around a mean of 62.5: 0.8%).
    """
    costs, ordered = _prepare(layers, nodes, AssignmentStrategy.LOAD_BALANCED, context_tokens)
    loads = _Loads(costs.layers, ordered, layer_overhead_ms, context_tokens)
    m = len(ordered)
    for i in sorted(range(costs.n), key=lambda i: (-costs.layers[i].compute_cost, i)):
        options = [k for k in range(m) if loads.fits(k, i)]
        if not options:
            raise InsufficientResources(shortfall(costs, ordered))
        loads.put(i=i, k=min(options, key=lambda k: (loads.load[k] + loads.time[k][i], k)))
    for _ in range(MAX_IMPROVEMENT_ROUNDS):
        if not _improve(loads):
            break
    return loads.result(AssignmentStrategy.LOAD_BALANCED)


def _groups(owned: Sequence[int]) -> list[tuple[int, ...]]:
    """What one side of an exchange may give: nothing, one layer, or (if few) two."""
    out: list[tuple[int, ...]] = [(), *((i,) for i in owned)]
    if len(owned) <= PAIR_EXCHANGE_MAX_LAYERS:
        out += itertools.combinations(owned, 2)
    return out


def _improve(loads: _Loads) -> bool:
    """Apply the best exchange between two nodes that evens them out; False if none.

    An exchange moves up to two layers each way. "Evens out" = lowers the sum of squared
    loads without raising the pair's larger load, so the busiest node never gets busier.
    Squares make exchanges between two non-busiest nodes count too, and two-layer groups
    matter on regular inputs: on the seed's example LPT ends at 64, 63, 62, 61 ms where no
    one-for-one swap helps, but giving 6 + 7 for 11 takes the busiest node to 62.
    """
    t, load = loads.time, loads.load
    best: tuple[float, int, int, tuple[int, ...], tuple[int, ...]] | None = None
    for p, q in itertools.combinations(range(len(loads.nodes)), 2):
        ceiling = max(load[p], load[q]) * (1 + 1e-12)
        before = load[p] ** 2 + load[q] ** 2
        give_q = _groups(loads.owned[q])
        for gp in _groups(loads.owned[p]):
            out_p, in_q = sum(t[p][i] for i in gp), sum(t[q][i] for i in gp)
            for gq in give_q:
                if not gp and not gq:
                    continue
                a = load[p] - out_p + sum(t[p][j] for j in gq)
                b = load[q] - sum(t[q][j] for j in gq) + in_q
                gain = before - a * a - b * b
                if max(a, b) > ceiling or gain <= before * 1e-12:
                    continue
                if (best is None or gain > best[0]) and _exchange_fits(loads, p, gp, q, gq):
                    best = (gain, p, q, gp, gq)
    if best is None:
        return False
    _, p, q, gp, gq = best
    for i in gp:
        loads.take(p, i)
        loads.put(q, i)
    for j in gq:
        loads.take(q, j)
        loads.put(p, j)
    return True


def _exchange_fits(loads: _Loads, p: int, gp: tuple[int, ...], q: int, gq: tuple[int, ...]) -> bool:
    moved_p = sum(loads.mem[i] for i in gp)
    moved_q = sum(loads.mem[j] for j in gq)
    return (
        loads.used[p] - moved_p + moved_q <= loads.nodes[p].memory_bytes
        and loads.used[q] - moved_q + moved_p <= loads.nodes[q].memory_bytes
    )


def topology_aware(
    layers: Iterable[LayerInfo],
    nodes: Iterable[NodeCapability],
    *,
    layer_overhead_ms: float = 0.0,
    context_tokens: int = DEFAULT_CONTEXT_TOKENS,
) -> Assignment:
    """Contiguous runs along measured links: `pipeline.topology_aware`'s node order.

    Keeping consecutive layers together sends activations only at run boundaries, over
    the links the pipeline placement chose; the split is then redone with the per-layer
    overhead, so the runs are optimal for this cost model and that order.
    """
    costs, ordered = _prepare(layers, nodes, AssignmentStrategy.TOPOLOGY_AWARE, context_tokens)
    plan = topology_plan(costs.layers, ordered, context_tokens=context_tokens)
    by_id = {node.id: node for node in ordered}
    order = [by_id[s.node] for s in plan.stages]
    order += [node for node in ordered if node not in order]
    tables = Tables(costs, layer_overhead_ms)
    found = split(costs, order, [0.0] * len(order), tables=tables)
    if found is None:
        raise InsufficientResources(shortfall(costs, order))
    loads = _Loads(costs.layers, ordered, layer_overhead_ms, context_tokens)
    index = {node.id: k for k, node in enumerate(ordered)}
    for k, s, e in found.stages:
        for i in range(s, e):
            loads.put(index[order[k].id], i)
    return loads.result(AssignmentStrategy.TOPOLOGY_AWARE)


def hybrid(
    layers: Iterable[LayerInfo],
    nodes: Iterable[NodeCapability],
    *,
    layer_overhead_ms: float = 0.0,
    context_tokens: int = DEFAULT_CONTEXT_TOKENS,
) -> Assignment:
    """The busiest node as idle as possible first, then the fewest activation transfers.

    Tries load_balanced and (when links were measured) topology_aware; the lower slowest
    node wins, a tie goes to the one that switches nodes less often along the layers.
    """
    ordered = sorted_nodes(nodes)
    layers = tuple(layers)
    found = [
        load_balanced(
            layers, ordered, layer_overhead_ms=layer_overhead_ms, context_tokens=context_tokens
        )
    ]
    if len(ordered) > 1 and any(node.links for node in ordered):
        # Too few links to chain: the balanced assignment stands alone.
        with contextlib.suppress(OptimizationFailed):
            found.append(
                topology_aware(
                    layers,
                    ordered,
                    layer_overhead_ms=layer_overhead_ms,
                    context_tokens=context_tokens,
                )
            )
    best = min(found, key=lambda a: (round(a.slowest_ms, 9), a.node_switches))
    return Assignment(AssignmentStrategy.HYBRID, best.nodes)


ASSIGNERS: dict[AssignmentStrategy, Assigner] = {
    AssignmentStrategy.ROUND_ROBIN: round_robin,
    AssignmentStrategy.LOAD_BALANCED: load_balanced,
    AssignmentStrategy.TOPOLOGY_AWARE: topology_aware,
    AssignmentStrategy.HYBRID: hybrid,
}


def assign(
    strategy: str,
    layers: Iterable[LayerInfo],
    nodes: Iterable[NodeCapability],
    *,
    layer_overhead_ms: float = 0.0,
    context_tokens: int = DEFAULT_CONTEXT_TOKENS,
) -> Assignment:
    try:
        assigner = ASSIGNERS[AssignmentStrategy(strategy)]
    except ValueError:
        known = ", ".join(s.value for s in AssignmentStrategy)
        raise UnknownStrategy(
            f"unknown assignment strategy {strategy!r}; one of: {known}"
        ) from None
    return assigner(
        layers, nodes, layer_overhead_ms=layer_overhead_ms, context_tokens=context_tokens
    )
