"""A plan, and what it is expected to cost: every number computed from the layers and nodes.

The specification's `estimate_quality` returned constants (load balance 0.9, latency 0); a
plan's explanation is only worth reading if it is computed from the same facts the plan
was, so every field here is derived from the stages, the layers' costs and the nodes'
measured rates and links. One evaluator serves all strategies, so plans made by different
strategies are compared on the same terms.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from butterfly.partition.capability import (
    DEFAULT_CONTEXT_TOKENS,
    Costs,
    NodeCapability,
    link_between,
    sorted_nodes,
)
from butterfly.types.errors import InvalidConfiguration
from butterfly.types.ids import NodeId
from butterfly.types.model import LayerInfo, LayerRange, ModelPartition, PartitionStrategy


@dataclass(frozen=True)
class Quality:
    """What a plan is expected to cost per token; see `estimate_quality`."""

    stages: int
    unused_nodes: tuple[NodeId, ...]  # nodes the plan leaves idle (slower or unneeded)
    load_balance: float  # mean stage time / slowest stage time; 1.0 is perfectly even
    imbalance_pct: float  # (slowest - mean) / mean * 100, the specification's "Load imbalance"
    communication_bytes_per_token: int  # activations crossing stage boundaries
    transfer_ms_per_token: float  # time those crossings take over the measured links
    memory_by_node: tuple[tuple[NodeId, int], ...]  # weights + KV budget held, per stage
    peak_memory_bytes: int  # the largest of those
    min_headroom_bytes: int  # the smallest (node memory - bytes held); < 0: does not fit
    per_token_latency_ms: float  # one token through every stage and link, unpipelined
    throughput_tokens_per_s: float  # 1 / bottleneck: a full pipeline's steady rate
    unmeasured_links: int  # boundaries whose link nobody measured (counted as free)

    def to_dict(self) -> dict[str, object]:
        return {
            "stages": self.stages,
            "unused_nodes": list(self.unused_nodes),
            "load_balance": finite_or_none(self.load_balance),
            "imbalance_pct": finite_or_none(self.imbalance_pct),
            "communication_bytes_per_token": self.communication_bytes_per_token,
            "transfer_ms_per_token": self.transfer_ms_per_token,
            "memory_bytes_by_node": {str(node): b for node, b in self.memory_by_node},
            "peak_memory_bytes": self.peak_memory_bytes,
            "min_headroom_bytes": self.min_headroom_bytes,
            "per_token_latency_ms": finite_or_none(self.per_token_latency_ms),
            "throughput_tokens_per_s": self.throughput_tokens_per_s,
            "unmeasured_links": self.unmeasured_links,
        }


@dataclass(frozen=True)
class Plan:
    """Stages in pipeline order, each with its estimated time per token (compute + send)."""

    stages: tuple[ModelPartition, ...]
    strategy: PartitionStrategy
    bottleneck_ms: float
    quality: Quality
    notes: tuple[str, ...] = field(default=(), compare=False)  # e.g. why a strategy degraded

    def node_of(self, layer: int) -> NodeId:
        for stage in self.stages:
            if layer in stage.layers:
                return stage.node
        raise InvalidConfiguration(f"layer {layer} is not in the plan")

    def to_dict(self) -> dict[str, object]:
        return {
            "strategy": str(self.strategy),
            "stages": [
                {
                    "node": s.node,
                    "start": s.layers.start,
                    "end": s.layers.end,
                    "est_ms": finite_or_none(s.estimated_ms),
                }
                for s in self.stages
            ],
            "bottleneck_ms": finite_or_none(self.bottleneck_ms),
            "quality": self.quality.to_dict(),
            "notes": list(self.notes),
        }


def finite_or_none(x: float) -> float | None:
    """JSON has no infinity; an unmeasured node's time is unknown, printed as null."""
    return x if math.isfinite(x) else None


Stage = tuple[NodeCapability, int, int]


def build_plan(
    strategy: PartitionStrategy,
    stages: Sequence[Stage],
    costs: Costs,
    nodes: Sequence[NodeCapability],
    *,
    per_hop_ms: float = 0.0,
) -> Plan:
    """Evaluate `stages` (node, start, end) and wrap them as a Plan."""
    compute, send, unmeasured = _stage_times(stages, costs)
    est = [c + s for c, s in zip(compute, send, strict=True)]
    slowest = max(est)
    mean = sum(est) / len(est)
    bytes_held = [costs.stage_memory(s, e) for _, s, e in stages]
    held = [(node.id, b) for (node, _, _), b in zip(stages, bytes_held, strict=True)]
    used = {node.id for node, _, _ in stages}
    quality = Quality(
        stages=len(stages),
        unused_nodes=tuple(node.id for node in nodes if node.id not in used),
        load_balance=mean / slowest if slowest > 0 else 1.0,
        imbalance_pct=(slowest - mean) / mean * 100 if mean > 0 else 0.0,
        communication_bytes_per_token=sum(int(costs.boundary[e]) for _, _, e in stages[:-1]),
        transfer_ms_per_token=sum(send),
        memory_by_node=tuple(held),
        peak_memory_bytes=max(bytes_held),
        min_headroom_bytes=min(
            node.memory_bytes - b for (node, _, _), b in zip(stages, bytes_held, strict=True)
        ),
        per_token_latency_ms=sum(compute) + sum(send) + per_hop_ms * (len(stages) - 1),
        throughput_tokens_per_s=1000.0 / slowest if slowest > 0 else math.inf,
        unmeasured_links=unmeasured,
    )
    partitions = tuple(
        ModelPartition(node.id, LayerRange(s, e), t)
        for (node, s, e), t in zip(stages, est, strict=True)
    )
    return Plan(partitions, strategy, slowest, quality)


def _stage_times(stages: Sequence[Stage], costs: Costs) -> tuple[list[float], list[float], int]:
    compute, send, unmeasured = [], [], 0
    for i, (node, s, e) in enumerate(stages):
        compute.append(costs.compute_ms(node, s, e))
        if i + 1 == len(stages):
            send.append(0.0)
            continue
        link = link_between(node, stages[i + 1][0])
        if link is None:
            unmeasured += 1
        send.append(link.transfer_ms(int(costs.boundary[e])) if link else 0.0)
    return compute, send, unmeasured


def resolve(
    plan: Plan, layers: Iterable[LayerInfo], nodes: Iterable[NodeCapability], context_tokens: int
) -> tuple[list[Stage], Costs, tuple[NodeCapability, ...]]:
    """Check that `plan` covers `layers` contiguously on known nodes; pair stages with nodes."""
    costs = Costs.of(layers, context_tokens)
    ordered = sorted_nodes(nodes)
    by_id = {node.id: node for node in ordered}
    position = 0
    stages: list[Stage] = []
    for stage in plan.stages:
        if stage.node not in by_id:
            raise InvalidConfiguration(f"the plan uses node {stage.node}, which is not listed")
        if stage.layers.start != position:
            raise InvalidConfiguration(
                f"the plan's stages must cover the layers in order; stage {len(stages)} "
                f"starts at layer {stage.layers.start}, expected {position}"
            )
        stages.append((by_id[stage.node], stage.layers.start, stage.layers.end))
        position = stage.layers.end
    if position != costs.n or not stages:
        raise InvalidConfiguration(f"the plan covers layers [0, {position}) of {costs.n}")
    return stages, costs, ordered


def estimate_quality(
    plan: Plan,
    layers: Iterable[LayerInfo],
    nodes: Iterable[NodeCapability],
    *,
    context_tokens: int = DEFAULT_CONTEXT_TOKENS,
) -> Quality:
    """Recompute `plan`'s expected costs against (possibly newer) layer and node facts."""
    stages, costs, ordered = resolve(plan, layers, nodes, context_tokens)
    return build_plan(plan.strategy, stages, costs, ordered).quality


def estimate_per_token_ms(
    plan: Plan,
    layers: Iterable[LayerInfo],
    nodes: Iterable[NodeCapability],
    *,
    context_tokens: int = DEFAULT_CONTEXT_TOKENS,
    per_hop_ms: float = 0.0,
) -> float:
    """The estimate to hold against a measured per-token decode latency.

    Sum of stage compute and link transfers, plus `per_hop_ms` for each boundary: the
    software cost of a hop (framing, waking the receiving process), which the links'
    latency does not include when it was measured with a bare ping.
    """
    stages, costs, ordered = resolve(plan, layers, nodes, context_tokens)
    quality = build_plan(plan.strategy, stages, costs, ordered, per_hop_ms=per_hop_ms).quality
    return quality.per_token_latency_ms
