"""Deciding the stage plan of an epoch (`rollout` gathers the facts and hands it out).

One node (the gateway, node 0) decides the plan from facts every node reported about
itself (compute rate, memory, links; see `facts`) and sends the same plan to all; nodes
never derive a plan from their own view. The coordination layer later puts this decision
through agreement.

The decision itself is the partition package's (`PartitionService`, with its cache and
degradation chain); this module turns gathered `StatusReply`s into `NodeCapability`s,
the partitioner's `Plan` into the `StagePlan` the data path runs, and adds what only the
live cluster knows: that the gateway sends the first step and receives the last result,
so those hops count in the per-token estimate too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from butterfly.control.facts import capability_of
from butterfly.metrics.events import Emit, PartitionComputed, discard
from butterfly.partition.capability import (
    DEFAULT_CONTEXT_TOKENS,
    NodeCapability,
    boundary_bytes,
    link_between,
)
from butterfly.partition.quality import Plan, estimate_per_token_ms
from butterfly.partition.replan import replan
from butterfly.partition.service import PartitionService
from butterfly.types.errors import (
    NoNodesAvailable,
)
from butterfly.types.ids import GATEWAY, Epoch, NodeId
from butterfly.types.model import LayerInfo, LayerRange, ModelPartition
from butterfly.types.plan import StagePlan
from butterfly.types.wire.control import StatusReply

log = logging.getLogger(__name__)


def capabilities(
    members: Sequence[NodeId], facts: Mapping[NodeId, StatusReply]
) -> list[NodeCapability]:
    """The members' reported facts as NodeCapabilities; members without a report are left
    out (nothing can be placed on a node whose memory is unknown), with a warning."""
    out = []
    for node in sorted(set(members)):
        reply = facts.get(node)
        if reply is None:
            log.warning("node %s has reported no facts; it is left out of the plan", node)
            continue
        out.append(capability_of(node, reply, members))
    if not out:
        raise NoNodesAvailable(f"none of the nodes {sorted(members)} has reported its facts")
    return out


@dataclass(frozen=True)
class Placement:
    """A decided plan with what it was decided from and what it is expected to cost."""

    stages: StagePlan
    plan: Plan  # the partitioner's plan: per-stage estimates, quality, degradation notes
    nodes: tuple[NodeCapability, ...]
    estimated_per_token_ms: float  # see `per_token_ms`
    seconds: float  # time the partitioner took (a cache hit is microseconds)
    cache_hit: bool

    def to_dict(self) -> dict[str, object]:
        """The plan and its facts as JSON-ready values (for /health and the benchmark)."""
        return {
            "epoch": self.stages.epoch,
            "strategy": str(self.plan.strategy),
            "estimated_per_token_ms": round(self.estimated_per_token_ms, 4),
            "bottleneck_ms": round(self.plan.bottleneck_ms, 4),
            "stages": [
                {"node": n, "start": r.start, "end": r.end, "est_ms": round(s.estimated_ms, 4)}
                for (n, r), s in zip(self.stages.stages, self.plan.stages, strict=True)
            ],
            "notes": list(self.plan.notes),
            "facts": {
                str(c.id): {
                    "flops_per_s": c.flops_per_s,
                    "memory_bytes": c.memory_bytes,
                    "layer_overhead_ms": round(c.layer_overhead_ms, 4),
                    "links": {
                        str(p): {
                            "latency_ms": round(x.latency_ms, 4),
                            "bandwidth_bytes_per_s": x.bandwidth_bytes_per_s,
                        }
                        for p, x in c.links.items()
                    },
                }
                for c in self.nodes
            },
        }

    def describe(self) -> str:
        stages = ", ".join(
            f"node {n} {r} {s.estimated_ms:.2f} ms"
            for (n, r), s in zip(self.stages.stages, self.plan.stages, strict=True)
        )
        return (
            f"epoch {self.stages.epoch} plan ({self.plan.strategy}): {stages}; "
            f"estimated {self.estimated_per_token_ms:.2f} ms per token"
        )


def per_token_ms(
    plan: Plan,
    layers: Sequence[LayerInfo],
    nodes: Sequence[NodeCapability],
    *,
    gateway: NodeId = GATEWAY,
    context_tokens: int = DEFAULT_CONTEXT_TOKENS,
    result_bytes: int = 0,
) -> float:
    """Expected wall time of one decode step as the gateway measures it.

    The partitioner's figure (every stage's compute plus every inter-stage transfer over
    the measured links), plus the two hops only the live cluster has: the gateway sending
    the step to the first stage and the last stage returning its result (`result_bytes`,
    one row of logits; the last layer's output size when not given) to the gateway. A
    hop from or to the gateway itself is a direct call and costs nothing.
    """
    ms = estimate_per_token_ms(plan, layers, nodes, context_tokens=context_tokens)
    by_id = {n.id: n for n in nodes}
    first, last = by_id.get(plan.stages[0].node), by_id.get(plan.stages[-1].node)
    gw = by_id.get(gateway)
    if gw is not None and first is not None and first.id != gateway:
        link = link_between(gw, first)
        ms += link.transfer_ms(8) if link else 0.0  # a token id or so
    if gw is not None and last is not None and last.id != gateway:
        link = link_between(last, gw)
        size = result_bytes or boundary_bytes(max(layers, key=lambda x: x.id))
        ms += link.transfer_ms(size) if link else 0.0
    return ms


def _to_stage_plan(epoch: Epoch, plan: Plan) -> StagePlan:
    return StagePlan(epoch, tuple((s.node, s.layers) for s in plan.stages))


def place(
    epoch: Epoch,
    members: list[NodeId],
    facts: Mapping[NodeId, StatusReply],
    *,
    layers: list[LayerInfo],
    strategy: str,
    service: PartitionService | None = None,
    emit: Emit = discard,
    gateway: NodeId = GATEWAY,
    result_bytes: int = 0,
) -> Placement:
    """Plan `layers` over `members` from their reported facts with `strategy`.

    `service` (the node's own, so its cache outlives one call) computes or recalls the
    plan and degrades the strategy when facts it needs are missing; one
    PartitionComputed event reports the time taken and whether the cache answered.
    """
    if service is None:  # not `or`: an empty service has len() 0 and is falsy
        service = PartitionService()
    nodes = capabilities(members, facts)
    hits = service.hits
    started = time.perf_counter()
    plan = service.plan(layers, nodes, strategy)
    seconds = time.perf_counter() - started
    hit = service.hits > hits
    emit(PartitionComputed(seconds=seconds, cache_hit=hit))
    estimate = per_token_ms(
        plan,
        layers,
        nodes,
        gateway=gateway,
        context_tokens=service.context_tokens,
        result_bytes=result_bytes,
    )
    placement = Placement(_to_stage_plan(epoch, plan), plan, tuple(nodes), estimate, seconds, hit)
    log.info("%s", placement.describe())
    for note in plan.notes:
        log.warning("epoch %s plan: %s", epoch, note)
    return placement


def decide_plan(
    epoch: Epoch,
    members: list[NodeId],
    facts: Mapping[NodeId, StatusReply],
    *,
    layers: list[LayerInfo],
    strategy: str,
    service: PartitionService | None = None,
    emit: Emit = discard,
) -> StagePlan:
    """The stage plan of `epoch` over `members` (the nodes allowed in it), one stage per
    used node in pipeline order; see `place` for the details kept beside it."""
    return place(
        epoch, members, facts, layers=layers, strategy=strategy, service=service, emit=emit
    ).stages


@dataclass(frozen=True)
class _Placed:
    """An old StagePlan in the shape `partition.replan` reads (its stages only)."""

    stages: tuple[ModelPartition, ...]


def replan_after(
    old: StagePlan,
    members: list[NodeId],
    facts: Mapping[NodeId, StatusReply],
    *,
    layers: list[LayerInfo],
    strategy: str,
    emit: Emit = discard,
) -> tuple[StagePlan, int]:
    """The plan of epoch `old.epoch + 1` over `members`, and how many layers change node.

    For a node joining, leaving or evicted: `partition.replan` computes the optimum for
    the new membership and keeps the old ranges instead wherever that costs at most 5%
    of the slowest stage, since every moved layer must be loaded again and its KV caches
    rebuilt. A departed node's layers always move.
    """
    nodes = capabilities(members, facts)
    placed = _Placed(tuple(ModelPartition(n, LayerRange(r.start, r.end)) for n, r in old.stages))
    started = time.perf_counter()
    result = replan(placed, layers, nodes, strategy)
    emit(PartitionComputed(seconds=time.perf_counter() - started, cache_hit=False))
    new = _to_stage_plan(Epoch(old.epoch + 1), result.plan)
    log.info(
        "re-planned epoch %s -> %s (%s): %s; %d layer(s) move%s",
        old.epoch,
        new.epoch,
        result.plan.strategy,
        ", ".join(f"node {n} {r}" for n, r in new.stages),
        result.moved_layers,
        " (kept old ranges)" if result.kept_in_place else "",
    )
    return new, result.moved_layers
