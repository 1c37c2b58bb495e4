"""Recovery and eviction policy, as pure functions: the next plan, and who leaves.

Everything the gateway decides when a node fails or is proven a liar is here, readable in
one place and tested without a network (tests/test_policy.py); `control.recovery` only
carries the decisions out (agreement, distribution, the loop that notices failures).

The rules, in order:

- A node of the plan that failed or was evicted is gone; the plan of the next epoch is
  decided over the members still alive.
- After crashes only (some node departed, none evicted), each gone chain node's range
  goes to a live standby of that range (`promote`): no weights move, and the standby's
  copies of the KV caches carry on. A live member the old plan left idle (a spare: every
  range had its copies) then becomes the standby of a range left short of `copies`
  holders, so a removed or crashed standby does not end the audits of its range.
- A liar's range is never handed to a standby by promotion (its copies came from the
  liar's own stage), and when some range has no live standby left, the plan is decided
  again: with no replicas in play, from the old plan with as few layers moved as the
  partitioner allows (`replan`); otherwise placed from scratch over the chain nodes, the
  rest holding copies (`place`).
- Only the gateway evicts, never itself; a proven liar is evicted once, and leaves the
  plan even when the agreed log already held its eviction.
- A holder that acknowledged the plan and whose heartbeats then say it holds other
  layers (none: it restarted within the failure detector's tolerance, which never saw
  it fail) has left the plan as a failed node has (`restarted`); only heartbeats that
  arrived after its acknowledgement count (`says_other_layers`); it is not charged
  as withholding for the steps it cannot run. A second such restart within
  `RESTARTS_FORGOTTEN_S` is a suspension: claiming restarts is no way out of one.
- A node that left the plan by failing (or by not taking a plan up, by restarting, or
  by not being up when the first plan was made) comes back once it has been healthy
  without a break for `rejoin_hold_s` (`returning`), heard from since it left
  (`back_for`); an evicted node never does. When
  the chain cannot grow, a returning node joins as a standby of the ranges with the
  fewest holders (`join`, `replicas.add_standbys`): no other node's layers move and no
  cache is lost; otherwise the plan is placed again.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from butterfly.control.planner import Placement, place, replan_after
from butterfly.control.replicas import (
    add_replicas,
    add_standbys,
    promote_standbys,
    split_for_replication,
)
from butterfly.metrics.events import Emit, discard
from butterfly.partition.service import PartitionService
from butterfly.types.ids import GATEWAY, Epoch, NodeId
from butterfly.types.model import LayerInfo, LayerRange
from butterfly.types.plan import StagePlan
from butterfly.types.wire.agreement import Evidence
from butterfly.types.wire.control import StatusReply


@dataclass(frozen=True)
class Placing:
    """What deciding a plan needs beside the membership: the model and the settings."""

    layers: tuple[LayerInfo, ...]
    strategy: str  # partition.strategy
    copies: int  # holders of every layer range (config.validate.replication_factor)
    gateway: NodeId = GATEWAY  # sends the first step and takes the last result
    result_bytes: int = 0  # one row of logits, the last hop's size
    service: PartitionService | None = None  # the node's own, so its cache outlives a call


REJOIN_HOLD_BEATS = 5
"""Heartbeat intervals a returning node must stay healthy before a plan takes it back."""
STRIKES_FORGOTTEN_S = 60.0
"""A node away for good this long since its last departure starts again at one strike."""
MAX_DOUBLINGS = 6
SUSPENSION_S = 30.0
"""How long a node that heartbeats but leaves its work unanswered (`dataplane.unresponsive`)
first stays out of the plans: doubled for each suspension in a row, up to
`SUSPENSION_MAX_S`. It is not evicted: nothing proves it lied (an honest node behind a
TCP cut, its datagrams still arriving, looks the same, and one was evicted for good: a
review); a withholding liar costs a detection each time it is taken back, ever more
rarely."""
SUSPENSION_MAX_S = 3600.0
RESTART_BEATS = 3
"""Heartbeat intervals a holder's heartbeats must say other layers than the plan it
acknowledged, in beats that arrived after its acknowledgement, before it counts as
restarted (`restarted`): a beat sent before it applied the plan may still be in flight
when its acknowledgement arrives."""
RESTARTS_FORGOTTEN_S = 2 * SUSPENSION_MAX_S
"""A holder that restarts (`restarted`) again within this of its last restart is
suspended rather than let go: its heartbeats are its own word, and a withholding node
that claimed a restart each time it was about to be charged was never suspended. One
free restart per two hours is what the doubling suspension allows a withholder anyway."""


@dataclass(frozen=True)
class NextPlan:
    plan: StagePlan
    how: Literal["promote", "join", "replan", "place"]
    placement: Placement | None = None  # when placed: its estimate, reported by /health


def holders(plan: StagePlan) -> tuple[NodeId, ...]:
    """Every node the plan gives layers to: the chain, then the standbys."""
    return (*plan.nodes, *(n for n, _ in plan.replicas))


def gone(
    plan: StagePlan, status: Callable[[NodeId], str], evicted: Collection[NodeId]
) -> list[NodeId]:
    """The plan's nodes that failed or were evicted: the plan must change without them."""
    return [n for n in holders(plan) if n in evicted or status(n) == "failed"]


def says_other_layers(
    plan: StagePlan,
    node: NodeId,
    loaded: Callable[[NodeId], LayerRange | None],
    heard_at: Callable[[NodeId], float | None],
    acked_at: Mapping[NodeId, float],
) -> bool | None:
    """Whether `node`'s heartbeats say other layers (`loaded`: its latest one's) than
    `plan` gives it; None when they say nothing of it yet: its latest heartbeat arrived
    (`heard_at`) no later than its acknowledgement of the plan (`acked_at`), or it has
    none. A heartbeat sent before the node applied the plan (a node busy as it loads its
    layers sends none for a while after its ack) was taken as its word, and an honest
    node was let go as restarted, taken back, "restarted" again and suspended (a review).

        >>> from butterfly.types.model import LayerRange as R
        >>> plan = StagePlan(1, ((0, R(0, 2)), (1, R(2, 4))))
        >>> [says_other_layers(plan, 1, {1: None}.get, {1: t}.get, {1: 5.0}) for t in (4.0, 6.0)]
        [None, True]
    """
    heard, acked = heard_at(node), acked_at.get(node)
    if heard is None or acked is None or heard <= acked:
        return None
    return loaded(node) != plan.layers_of(node)


def restarted(
    plan: StagePlan,
    loaded: Callable[[NodeId], LayerRange | None],
    differs_since: Mapping[NodeId, float],
    now: float,
    grace_s: float,
    *,
    heard_at: Callable[[NodeId], float | None],
    acked_at: Mapping[NodeId, float],
) -> list[NodeId]:
    """The plan's holders that acknowledged it (it loaded their layers, at `acked_at`)
    and whose heartbeats, arrived since (`says_other_layers`), have said other layers
    (`loaded`: none, after a restart) since `differs_since` for `grace_s` or more:
    restarted within `coordination.acceptable_pause_ms`, so the failure detector never
    saw them fail, and each step sent to them would time out and charge an honest node
    as withholding (a review). The grace: a heartbeat sent before a node applied the
    plan may still be in flight when its acknowledgement arrives.

        >>> from butterfly.types.model import LayerRange as R
        >>> plan = StagePlan(1, ((0, R(0, 2)), (1, R(2, 4))), ((2, R(0, 2)), (3, R(2, 4))))
        >>> loaded = {1: None, 2: R(0, 2), 3: None}.get
        >>> acked = {1: 0.0, 2: 0.0, 3: 0.0}
        >>> heard = {1: 10.0, 2: 10.0, 3: 10.0}.get
        >>> restarted(plan, loaded, {1: 0.0, 3: 9.9}, 10.0, 0.3, heard_at=heard, acked_at=acked)
        [1]
    """
    return [
        n
        for n in holders(plan)
        if n in differs_since
        and says_other_layers(plan, n, loaded, heard_at, acked_at)
        and now - differs_since[n] >= grace_s
    ]


def back_for(
    up: float | None, ends: Sequence[float | None], heard: float | None, now: float
) -> float | None:
    """How long a node left out of the plans has been back, as taking it back goes
    (`returning`): healthy for `up` (None: not healthy now), counted from the last of
    `ends` (its suspension's end, when its restart was seen: its heartbeats never
    stopped), and only once a heartbeat arrived after that (`heard`): a node silent but
    within `coordination.acceptable_pause_ms` counts as healthy, and one taken back on
    a heartbeat older than its restart was taken for restarted again, and suspended.

        >>> back_for(2.0, [None, 9.0], 9.5, 10.0), back_for(2.0, [9.0], 8.9, 10.0)
        (1.0, None)
    """
    known = [end for end in ends if end is not None]
    if up is None or not known:
        return up
    end = max(known)
    if heard is None or heard <= end:
        return None
    return min(up, now - end)


def alive(
    members: Sequence[NodeId], status: Callable[[NodeId], str], evicted: Collection[NodeId]
) -> list[NodeId]:
    """The members a new plan may use: neither failed nor evicted."""
    return [n for n in members if n not in evicted and status(n) != "failed"]


def strike(
    previous: tuple[int, float] | None, now: float, forgotten_s: float = STRIKES_FORGOTTEN_S
) -> tuple[int, float]:
    """(departures in a row, when the last was) after one more departure at `now`: in a
    row while each comes within `forgotten_s` of the one before.

        >>> strike(None, 10.0), strike((2, 10.0), 20.0), strike((2, 10.0), 100.0)
        ((1, 10.0), (3, 20.0), (1, 100.0))
    """
    if previous is None or now - previous[1] > forgotten_s:
        return 1, now
    return previous[0] + 1, now


def suspension_s(strikes: int) -> float:
    """How long the `strikes`-th suspension in a row keeps a node out of the plans.

    >>> suspension_s(1), suspension_s(3), suspension_s(20)
    (30.0, 120.0, 3600.0)
    """
    doublings: int = min(max(strikes - 1, 0), 16)
    return min(SUSPENSION_MAX_S, SUSPENSION_S * (1 << doublings))


def rejoin_hold_s(interval_s: float, strikes: int) -> float:
    """How long a node that left the plan must stay healthy before a plan takes it back:
    REJOIN_HOLD_BEATS heartbeat intervals, doubled for every departure in a row beyond
    the first (at most MAX_DOUBLINGS times), so a flapping node costs a re-plan per
    doubling hold, not one per blip.

        >>> rejoin_hold_s(0.1, 1), rejoin_hold_s(0.1, 3), rejoin_hold_s(0.1, 50)
        (0.5, 2.0, 32.0)
    """
    doublings: int = min(max(strikes - 1, 0), MAX_DOUBLINGS)
    return interval_s * REJOIN_HOLD_BEATS * (1 << doublings)


def returning(
    out: Collection[NodeId],
    evicted: Collection[NodeId],
    healthy_for: Callable[[NodeId], float | None],
    hold_s: Callable[[NodeId], float],
) -> list[NodeId]:
    """The nodes left out of the plans (`out`: failed, not taking a plan up, or down at
    start-up) that a new plan should take back: healthy without a break for their hold,
    and never an evicted one (a proven liar stays out whatever its heartbeats say).

        >>> returning([1, 2, 3], [3], {1: 0.7, 2: 0.1, 3: 9.0}.get, lambda n: 0.5)
        [1]
    """
    back = []
    for n in sorted(out):
        up = healthy_for(n)
        if n not in evicted and up is not None and up >= hold_s(n):
            back.append(n)
    return back


def next_plan(
    old: StagePlan | None,
    live: Sequence[NodeId],
    evicted: Collection[NodeId],
    facts: Mapping[NodeId, StatusReply],
    cfg: Placing,
    *,
    emit: Emit = discard,
) -> NextPlan:
    """The plan of the epoch after `old` (epoch 1 when there is none) over the `live`
    nodes; see the module docstring for the rules.

        >>> from butterfly.types.model import LayerRange as R
        >>> old = StagePlan(1, ((0, R(0, 2)), (1, R(2, 4))), ((2, R(0, 2)), (3, R(2, 4))))
        >>> p = next_plan(old, [0, 2, 3], (), {}, Placing((), "balanced", 2))
        >>> p.how, p.plan.epoch, p.plan.nodes
        ('promote', 2, (0, 3))
    """
    epoch = Epoch(old.epoch + 1 if old is not None else 1)
    chain, spares = split_for_replication(sorted(live), cfg.copies)
    if old is not None:
        departed = [n for n in holders(old) if n not in live]
        # nothing departed (a re-plan asked for, say a new strategy): decided afresh
        if departed and not any(n in evicted for n in departed):
            promoted = promote_standbys(old, epoch, list(live))
            if promoted is not None:
                # a live member the old plan left idle takes the copy a departed holder
                # leaves short: a range with one holder is audited by nobody
                idle = [n for n in sorted(live) if n not in holders(promoted)]
                return NextPlan(add_standbys(promoted, epoch, idle, cfg.copies), "promote")
        joined = [n for n in sorted(live) if n not in holders(old)]
        if not departed and joined and old.replicas and len(chain) <= len(old.stages):
            return NextPlan(add_standbys(old, epoch, joined, cfg.copies), "join")
    if old is not None and not spares and not old.replicas:
        # a membership change: keep existing ranges where that costs little
        plan, _moved = replan_after(
            old, chain, facts, layers=list(cfg.layers), strategy=cfg.strategy, emit=emit
        )
        return NextPlan(plan, "replan")
    placement = place(
        epoch,
        chain,
        facts,
        layers=list(cfg.layers),
        strategy=cfg.strategy,
        service=cfg.service,
        emit=emit,
        gateway=cfg.gateway,
        result_bytes=cfg.result_bytes,
    )
    return NextPlan(add_replicas(placement.stages, spares), "place", placement)


def not_served(refusals: Mapping[NodeId, str]) -> str:
    """Why no plan could be put in force, for `/health` and every request refused until
    one is: each reason once, with the nodes that gave it. A checkpoint no node can load
    gives every node the same reason, which the operator must read (the tensor and its
    shapes), not a list of nodes that "did not take up" a plan; nodes that cannot load
    their layers are not blamed for anything else.

        >>> not_served({NodeId(2): "bad shape", NodeId(0): "bad shape", NodeId(1): "timed out"})
        'no plan could be put in force: nodes [0, 2]: bad shape; node 1: timed out'
    """
    nodes: dict[str, list[int]] = {}
    for node, reason in sorted(refusals.items()):
        nodes.setdefault(reason, []).append(int(node))
    said = "; ".join(
        f"{f'node {ns[0]}' if len(ns) == 1 else f'nodes {ns}'}: {reason}"
        for reason, ns in nodes.items()
    )
    return f"no plan could be put in force: {said or 'none was taken up by all of its nodes'}"


def to_evict(
    liars: Sequence[NodeId], evicted: Collection[NodeId], gateway: NodeId = GATEWAY
) -> tuple[NodeId, ...]:
    """The liars not evicted yet (a later audit of a request a liar served before it left
    names it again). Never the gateway: its role does not move, and the agreement refuses
    its eviction (`agreement.authority`).

        >>> to_evict([NodeId(2), NodeId(0), NodeId(2), NodeId(3)], {NodeId(3)})
        (2,)
    """
    return tuple(dict.fromkeys(n for n in liars if n not in evicted and n != gateway))


def evicts(node: NodeId) -> bool:
    """Whether `node` evicts the liars it learns of: the gateway, which holds the plan."""
    return node == GATEWAY


def equivocation(evidence: Evidence) -> tuple[NodeId, str]:
    """The signer two conflicting votes for one slot prove a liar, and why. The votes'
    signatures were checked, so the reporter need not be trusted."""
    first = evidence.first
    return NodeId(evidence.accused), (
        f"node {evidence.accused} signed two conflicting {first.kind} votes for "
        f"seq {first.seq} (evidence from node {evidence.sender})"
    )


__all__ = [
    "REJOIN_HOLD_BEATS",
    "RESTARTS_FORGOTTEN_S",
    "RESTART_BEATS",
    "NextPlan",
    "Placing",
    "alive",
    "back_for",
    "equivocation",
    "evicts",
    "gone",
    "holders",
    "next_plan",
    "not_served",
    "rejoin_hold_s",
    "restarted",
    "returning",
    "says_other_layers",
    "strike",
    "to_evict",
]
