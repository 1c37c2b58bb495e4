"""Re-planning when a node joins, leaves or is evicted: move few layers unless moving pays.

Moving a layer is not free: the new holder must load its weights (seconds per gigabyte)
and the KV caches of running requests must be transferred or recomputed. A new optimum
that is 1% faster but reshuffles every stage is rarely worth that. So `replan` computes the
optimum for the new membership, then a "sticky" plan: the optimum's stages, each boundary
moved back to where the old plan had it whenever the slowest stage stays within
`tolerance` of the optimum's. The sticky plan is taken when it moves fewer layers.

Example: layers [0, 12) on nodes 0 | 1 | 2 as [0, 4) [4, 8) [8, 12), all equal. Node 1
leaves. The optimum over nodes 0 and 2 is [0, 6) [6, 12): node 0 gains 4, 5 and node 2
gains 6, 7, but 8..11 stay; 4 layers move, exactly node 1's, and nothing else shuffles.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from butterfly.partition.capability import (
    DEFAULT_CONTEXT_TOKENS,
    Costs,
    NodeCapability,
    link_between,
    sorted_nodes,
)
from butterfly.partition.pipeline import STRATEGIES, strategy_named
from butterfly.partition.quality import Plan, Stage, build_plan
from butterfly.types.errors import InvalidConfiguration
from butterfly.types.ids import NodeId
from butterfly.types.model import LayerInfo, ModelPartition, PartitionStrategy

DEFAULT_TOLERANCE = 0.05
"""Slowest-stage time the sticky plan may give up, relative to the new optimum."""

MAX_PASSES = 8


class Placed(Protocol):
    """Anything with stages in pipeline order: a Plan, or a running cluster's plan, whose
    per-stage estimates are not needed to know where layers are."""

    @property
    def stages(self) -> Sequence[ModelPartition]: ...


@dataclass(frozen=True)
class Replan:
    plan: Plan  # the plan to switch to
    moved_layers: int  # layers whose node changes (all of a departed node's included)
    optimum: Plan  # the best plan for the new membership, ignoring where layers are
    optimum_moved_layers: int

    @property
    def kept_in_place(self) -> bool:
        """True when the sticky plan was preferred over the optimum."""
        return self.plan is not self.optimum


def moved_layers(old: Placed, new: Placed) -> int:
    """How many layers run on a different node under `new` than under `old`."""
    before = {i: s.node for s in old.stages for i in s.layers}
    after = {i: s.node for s in new.stages for i in s.layers}
    if before.keys() != after.keys():
        raise InvalidConfiguration(
            f"the old plan covers {len(before)} layers and the new one {len(after)}; "
            "re-planning keeps the model, a new model needs a fresh plan"
        )
    return sum(before[i] != after[i] for i in after)


def replan(
    old: Placed,
    layers: Iterable[LayerInfo],
    nodes: Iterable[NodeCapability],
    strategy: str | PartitionStrategy = PartitionStrategy.LOAD_BALANCED,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    context_tokens: int = DEFAULT_CONTEXT_TOKENS,
) -> Replan:
    """Plan for the new membership `nodes`, keeping `old`'s ranges where that costs little."""
    costs = Costs.of(layers, context_tokens)
    ordered = sorted_nodes(nodes)
    chosen = strategy_named(strategy)
    optimum = STRATEGIES[chosen](costs.layers, ordered, context_tokens=context_tokens)
    optimum_moves = moved_layers(old, optimum)
    held = {s.node: (s.layers.start, s.layers.end) for s in old.stages}
    by_id = {node.id: node for node in ordered}
    stages = [(by_id[s.node], s.layers.start, s.layers.end) for s in optimum.stages]
    limit = optimum.bottleneck_ms * (1 + tolerance)
    sticky = _pull_boundaries(stages, costs, held, limit)
    if sticky == stages:
        return Replan(optimum, optimum_moves, optimum, optimum_moves)
    plan = build_plan(chosen, sticky, costs, ordered)
    moves = moved_layers(old, plan)
    if moves < optimum_moves and plan.bottleneck_ms <= limit:
        return Replan(plan, moves, optimum, optimum_moves)
    return Replan(optimum, optimum_moves, optimum, optimum_moves)


def _pull_boundaries(
    stages: list[Stage], costs: Costs, held: dict[NodeId, tuple[int, int]], limit: float
) -> list[Stage]:
    """Move each stage boundary to an old one while every stage stays within `limit`.

    A boundary between stages i-1 and i may go to the old end of stage i-1's node or the
    old start of stage i's node; only those two stages change, so each try prices two
    stages. Greedy, a few passes, each move strictly keeps more layers in place.
    """
    current = list(stages)
    for _ in range(MAX_PASSES):
        changed = False
        for i in range(1, len(current)):
            (a, a_start, here), (b, _, b_end) = current[i - 1], current[i]
            options = sorted(
                {held[a.id][1] if a.id in held else here, held[b.id][0] if b.id in held else here}
            )
            best, best_kept = here, _kept(current, held)
            for cut in options:
                if not a_start < cut < b_end or cut == here:
                    continue
                trial = list(current)
                trial[i - 1], trial[i] = (a, a_start, cut), (b, cut, b_end)
                nxt = trial[i + 1][0] if i + 1 < len(trial) else None
                if (
                    _stage_ms(costs, a, a_start, cut, b) <= limit
                    and _stage_ms(costs, b, cut, b_end, nxt) <= limit
                    and costs.stage_memory(a_start, cut) <= a.memory_bytes
                    and costs.stage_memory(cut, b_end) <= b.memory_bytes
                    and (kept := _kept(trial, held)) > best_kept
                ):
                    best, best_kept = cut, kept
            if best != here:
                current[i - 1], current[i] = (a, a_start, best), (b, best, b_end)
                changed = True
        if not changed:
            break
    return current


def _kept(stages: list[Stage], held: dict[NodeId, tuple[int, int]]) -> int:
    total = 0
    for node, s, e in stages:
        if node.id in held:
            old_s, old_e = held[node.id]
            total += max(0, min(e, old_e) - max(s, old_s))
    return total


def _stage_ms(
    costs: Costs, node: NodeCapability, s: int, e: int, nxt: NodeCapability | None
) -> float:
    """One stage's time as `quality.build_plan` counts it: compute plus send, if measured."""
    ms = costs.compute_ms(node, s, e)
    link = link_between(node, nxt) if nxt is not None else None
    return ms + (link.transfer_ms(int(costs.boundary[e])) if link else 0.0)
