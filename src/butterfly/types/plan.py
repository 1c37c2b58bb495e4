"""The stage plan of one epoch: which node runs which layer range, and who holds copies.

Shared by the data plane (where a step goes), the control plane (what recovery decides)
and the agreement (what is ordered), so it lives below all three.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

from butterfly.types.errors import InvalidMessage
from butterfly.types.ids import Epoch, NodeId
from butterfly.types.model import LayerRange
from butterfly.types.wire.control import PlanAssign


@dataclass(frozen=True)
class StagePlan:
    """The plan of one epoch: `stages[i]` is (node, layers) of pipeline position i."""

    epoch: Epoch
    stages: tuple[tuple[NodeId, LayerRange], ...]
    # further holders of the same ranges: auditors of the chain's work and standbys
    replicas: tuple[tuple[NodeId, LayerRange], ...] = ()

    @classmethod
    def from_message(cls, msg: PlanAssign) -> StagePlan:
        if len(msg.replicas) % 3:
            raise InvalidMessage(f"plan of epoch {msg.epoch}: replicas are not triples")
        replicas = tuple(
            (NodeId(msg.replicas[i]), LayerRange(msg.replicas[i + 1], msg.replicas[i + 2]))
            for i in range(0, len(msg.replicas), 3)
        )
        flat = msg.stages
        if len(flat) % 3 or not flat:
            raise InvalidMessage(f"plan of epoch {msg.epoch} is not a list of (node, start, end)")
        stages = tuple(
            (NodeId(flat[i]), LayerRange(flat[i + 1], flat[i + 2])) for i in range(0, len(flat), 3)
        )
        if stages[0][1].start != 0 or any(
            a[1].end != b[1].start for a, b in itertools.pairwise(stages)
        ):
            raise InvalidMessage(f"plan of epoch {msg.epoch} does not chain its layer ranges")
        return cls(msg.epoch, stages, replicas)

    def to_message(self, model_hash: str) -> PlanAssign:
        flat = tuple(v for node, r in self.stages for v in (node, r.start, r.end))
        reps = tuple(v for node, r in self.replicas for v in (node, r.start, r.end))
        return PlanAssign(self.epoch, flat, model_hash, reps)

    def layers_of(self, node: NodeId) -> LayerRange | None:
        return self._ranges.get(node)

    @functools.cached_property
    def members(self) -> frozenset[NodeId]:
        """Every node the plan gives layers to, chain and standbys."""
        return frozenset(self._ranges)

    def holders(self, layers: LayerRange) -> tuple[NodeId, ...]:
        """Every node holding `layers`, the chain's own first."""
        return self._holders.get(layers, ())

    def position_of(self, layers: LayerRange) -> int | None:
        """The chain position of the stage running `layers`, None if no stage does."""
        return self._positions.get(layers)

    # Indexes, built once per plan: a node asks them on every step of every request
    # (who may send it a step, where its range stands, whom to copy its caches to).
    @functools.cached_property
    def _ranges(self) -> dict[NodeId, LayerRange]:
        ranges: dict[NodeId, LayerRange] = {}
        for n, r in (*self.stages, *self.replicas):
            ranges.setdefault(n, r)
        return ranges

    @functools.cached_property
    def _holders(self) -> dict[LayerRange, tuple[NodeId, ...]]:
        holders: dict[LayerRange, tuple[NodeId, ...]] = {}
        for n, r in (*self.stages, *self.replicas):
            holders[r] = (*holders.get(r, ()), n)
        return holders

    @functools.cached_property
    def _positions(self) -> dict[LayerRange, int]:
        positions: dict[LayerRange, int] = {}
        for i, (_, r) in enumerate(self.stages):
            positions.setdefault(r, i)
        return positions

    @functools.cached_property
    def nodes(self) -> tuple[NodeId, ...]:
        """The chain's nodes in order. Kept: a gateway asks for them several times a step
        (each request's route, each batch), and made anew each time they were 2.8% of
        its samples under bench/api.py (py-spy, Intel Xeon, thirty-first session)."""
        return tuple(n for n, _ in self.stages)
