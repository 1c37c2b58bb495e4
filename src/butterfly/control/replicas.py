"""Replicated placement: every layer range on `copies` distinct nodes.

Verification needs every layer range held by at least f+1 distinct nodes (DESIGN.md
section 3): the chain runs on one holder, an audit re-runs on another, and the same
replicas are the standbys that take a stage over when its node dies.
"""

from __future__ import annotations

from collections.abc import Sequence

from butterfly.types.errors import InsufficientResources
from butterfly.types.ids import Epoch, NodeId
from butterfly.types.plan import StagePlan


def split_for_replication(members: list[NodeId], copies: int) -> tuple[list[NodeId], list[NodeId]]:
    """(chain nodes, spare nodes): with n nodes and `copies` holders per range, the chain
    gets n // copies nodes and the rest hold the copies.

        >>> split_for_replication([0, 1, 2, 3], 2)
        ([0, 1], [2, 3])
    """
    if copies <= 1:
        return list(members), []
    stages = len(members) // copies
    if stages < 1:
        raise InsufficientResources(
            f"{len(members)} live nodes cannot hold every layer range {copies} times; "
            f"add nodes or lower partition.replication / byzantine.f"
        )
    return list(members[:stages]), list(members[stages : stages * copies])


def promote_standbys(plan: StagePlan, epoch: Epoch, alive: list[NodeId]) -> StagePlan | None:
    """The plan of `epoch` where every chain node that is not alive is replaced by a live
    standby of its range, other stages unchanged (they keep their KV caches); None when
    some range has no live holder left.

        >>> from butterfly.types.model import LayerRange as R
        >>> p = StagePlan(1, ((0, R(0, 2)), (1, R(2, 4))), ((2, R(0, 2)), (3, R(2, 4))))
        >>> q = promote_standbys(p, 2, [0, 2, 3])
        >>> q.epoch, q.nodes, [n for n, _ in q.replicas]
        (2, (0, 3), [2])
    """
    live = set(alive)
    replicas = [(n, r) for n, r in plan.replicas if n in live]
    stages = []
    for node, layers in plan.stages:
        if node not in live:
            standby = next(((n, r) for n, r in replicas if r == layers), None)
            if standby is None:
                return None
            replicas.remove(standby)
            node = standby[0]
        stages.append((node, layers))
    return StagePlan(epoch, tuple(stages), tuple(replicas))


def add_replicas(plan: StagePlan, spares: list[NodeId]) -> StagePlan:
    """The plan with the spare nodes holding the chain's ranges, round robin."""
    if not spares:
        return plan
    ranges = [r for _, r in plan.stages]
    replicas = tuple((node, ranges[i % len(ranges)]) for i, node in enumerate(spares))
    return StagePlan(plan.epoch, plan.stages, replicas)


def add_standbys(plan: StagePlan, epoch: Epoch, joined: Sequence[NodeId], copies: int) -> StagePlan:
    """The plan of `epoch`: `plan` with each joined node (in order) holding a copy of
    the range with the fewest holders while one has fewer than `copies`; the chain and
    every holder keep their ranges. Nodes beyond that stay out, as placement leaves
    them out (`split_for_replication`).

        >>> from butterfly.types.model import LayerRange as R
        >>> p = StagePlan(4, ((0, R(0, 2)), (3, R(2, 4))), ((2, R(0, 2)),))
        >>> add_standbys(p, 5, [1], 2).replicas
        ((2, LayerRange(start=0, end=2)), (1, LayerRange(start=2, end=4)))
    """
    replicas = list(plan.replicas)
    ranges = [r for _, r in plan.stages]
    for node in joined:
        count = {r: len([n for n, x in (*plan.stages, *replicas) if x == r]) for r in ranges}
        fewest = min(ranges, key=lambda r: count[r])  # the first in chain order on a tie
        if count[fewest] >= copies:
            break
        replicas.append((node, fewest))
    return StagePlan(epoch, plan.stages, tuple(replicas))
