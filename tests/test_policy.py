"""The recovery and eviction policy (control.policy), as plain functions: no network."""

from __future__ import annotations

from collections.abc import Callable

from butterfly.control.policy import (
    RESTARTS_FORGOTTEN_S,
    STRIKES_FORGOTTEN_S,
    SUSPENSION_MAX_S,
    Placing,
    alive,
    back_for,
    equivocation,
    evicts,
    gone,
    next_plan,
    not_served,
    rejoin_hold_s,
    restarted,
    returning,
    says_other_layers,
    strike,
    to_evict,
)
from butterfly.types.ids import Epoch, NodeId
from butterfly.types.model import LayerRange as R
from butterfly.types.plan import StagePlan
from butterfly.types.wire.agreement import Commit, Evidence
from tests.test_planner import layers, reply

N = [NodeId(i) for i in range(4)]
FACTS = {n: reply(n) for n in N}
REPLICATED = StagePlan(3, ((N[0], R(0, 6)), (N[1], R(6, 12))), ((N[2], R(0, 6)), (N[3], R(6, 12))))
CHAIN = StagePlan(3, ((N[0], R(0, 4)), (N[1], R(4, 8)), (N[2], R(8, 12))))


def placing(copies: int) -> Placing:
    return Placing(tuple(layers(12)), "load_balanced", copies)


def status_of(failed: set[int]) -> Callable[[NodeId], str]:
    return lambda n: "failed" if n in failed else "healthy"


def test_the_first_plan_is_placed_over_every_member_with_copies_on_the_rest() -> None:
    decided = next_plan(None, N, (), FACTS, placing(2))
    assert decided.how == "place" and decided.placement is not None
    assert decided.plan.epoch == 1
    assert decided.plan.nodes == (0, 1)
    assert [n for n, _ in decided.plan.replicas] == [2, 3]
    assert [r for _, r in decided.plan.replicas] == [r for _, r in decided.plan.stages]


def test_a_crashed_chain_node_hands_its_range_to_its_standby() -> None:
    decided = next_plan(REPLICATED, [N[0], N[2], N[3]], (), FACTS, placing(2))
    assert decided.how == "promote" and decided.placement is None
    assert decided.plan.epoch == 4
    assert decided.plan.stages == ((0, R(0, 6)), (3, R(6, 12)))  # same ranges: no load
    assert decided.plan.replicas == ((2, R(0, 6)),)


def test_a_departed_holder_s_copy_goes_to_an_idle_member() -> None:
    """A fifth member the plan left idle (every range had its two holders) takes the copy
    a departed standby leaves short, so audits go on; before, the range kept one holder
    and every request after a removal or crash of a standby went unverified."""
    five = [N[0], N[1], N[2], NodeId(4)]  # node 3, the standby of 6-12, is gone
    decided = next_plan(REPLICATED, five, (), {**FACTS, NodeId(4): reply(4)}, placing(2))
    assert decided.how == "promote" and decided.plan.stages == REPLICATED.stages
    assert decided.plan.replicas == ((2, R(0, 6)), (4, R(6, 12)))
    crashed = next_plan(REPLICATED, [N[0], N[2], N[3], NodeId(4)], (), FACTS, placing(2))
    assert crashed.plan.stages == ((0, R(0, 6)), (3, R(6, 12)))  # promoted, as before
    assert crashed.plan.replicas == ((2, R(0, 6)), (4, R(6, 12)))


def test_a_liars_range_is_not_promoted_but_placed_again() -> None:
    """Its standby's copies of the caches came from the liar's own stage."""
    decided = next_plan(REPLICATED, [N[0], N[2], N[3]], {N[1]}, FACTS, placing(2))
    assert decided.how == "place"
    assert decided.plan.epoch == 4
    assert 1 not in decided.plan.nodes and 1 not in {n for n, _ in decided.plan.replicas}


def test_a_range_without_a_live_standby_is_placed_again() -> None:
    """Nodes 1 and 3 held [6, 12): with both gone no standby can take it."""
    decided = next_plan(REPLICATED, [N[0], N[2]], (), FACTS, placing(2))
    assert decided.how == "place"
    assert decided.plan.nodes == (0,)
    assert decided.plan.stages[0][1] == R(0, 12)
    assert [n for n, _ in decided.plan.replicas] == [2]


def test_without_replicas_a_departure_keeps_the_other_ranges_where_it_can() -> None:
    decided = next_plan(CHAIN, [N[0], N[2]], (), FACTS, placing(1))
    assert decided.how == "replan"
    assert decided.plan.epoch == 4
    assert set(decided.plan.nodes) == {0, 2}
    assert decided.plan.stages[0][1].start == 0 and decided.plan.stages[-1][1].end == 12


def test_gone_and_alive_count_the_evicted_and_the_failed() -> None:
    status = status_of({3})
    assert gone(REPLICATED, status, {N[1]}) == [1, 3]
    assert alive(N, status, {N[1]}) == [0, 2]
    assert gone(REPLICATED, status_of(set()), ()) == []


def test_a_liar_is_evicted_once_and_only_by_the_gateway() -> None:
    assert to_evict((N[1], N[2], N[1]), {N[2]}) == (1,)
    assert to_evict((N[2],), {N[2]}) == ()
    assert evicts(NodeId(0)) and not evicts(NodeId(1))


def test_equivocation_names_the_signer_not_the_reporter() -> None:
    first = Commit(NodeId(2), Epoch(0), 1, 7, b"a")
    second = Commit(NodeId(2), Epoch(0), 1, 7, b"b")
    accused, reason = equivocation(Evidence(NodeId(3), Epoch(0), NodeId(2), first, second))
    assert accused == 2
    assert "node 2 signed two conflicting commit votes for seq 7" in reason
    assert "evidence from node 3" in reason


def test_a_re_plan_with_nothing_departed_is_decided_afresh_not_promoted() -> None:
    """A re-plan asked for while every node lives (partition.strategy changed) must place
    again with the new strategy: promotion would hand back the same ranges."""
    old = StagePlan(Epoch(1), ((NodeId(0), R(0, 2)), (NodeId(1), R(2, 4))))
    facts = {NodeId(0): reply(0), NodeId(1): reply(1)}
    decided = next_plan(
        old, [NodeId(0), NodeId(1)], (), facts, Placing(tuple(layers(4)), "uniform", 1)
    )
    assert decided.how != "promote"
    assert decided.plan.epoch == 2


def test_the_gateway_never_evicts_itself_nor_anyone_twice() -> None:
    """Its role does not move (the agreement refuses that eviction too); a liar named by
    several audits is evicted once."""
    assert to_evict([N[0], N[2], N[2], N[3]], {N[3]}) == (N[2],)
    assert to_evict([N[0]], ()) == ()


PROMOTED = StagePlan(4, ((N[0], R(0, 6)), (N[3], R(6, 12))), ((N[2], R(0, 6)),))
"""REPLICATED after node 1 died: its range has one holder left, so nothing audits it."""


def test_a_returning_node_joins_as_the_standby_of_the_range_short_of_holders() -> None:
    """No layers move for anyone else (the chain keeps its caches), and every range has
    two holders again, so audits resume."""
    decided = next_plan(PROMOTED, N, (), FACTS, placing(2))
    assert decided.how == "join" and decided.plan.epoch == 5
    assert decided.plan.stages == PROMOTED.stages
    assert decided.plan.replicas == ((2, R(0, 6)), (1, R(6, 12)))


def test_a_returning_node_with_no_range_short_of_holders_changes_nothing() -> None:
    five = [*N, NodeId(4)]
    decided = next_plan(REPLICATED, five, (), {**FACTS, NodeId(4): reply(4)}, placing(2))
    assert decided.how == "join"
    assert (decided.plan.stages, decided.plan.replicas) == (REPLICATED.stages, REPLICATED.replicas)


def test_a_return_that_allows_a_longer_chain_places_again() -> None:
    """Two failures left one stage with one standby; with all four back, two stages."""
    one = StagePlan(5, ((N[0], R(0, 12)),), ((N[2], R(0, 12)),))
    decided = next_plan(one, N, (), FACTS, placing(2))
    assert decided.how == "place"
    assert len(decided.plan.nodes) == 2 and len(decided.plan.replicas) == 2


def test_a_node_returns_only_after_a_steady_hold_and_never_when_evicted() -> None:
    up = {N[1]: 0.6, N[2]: 0.2, N[3]: 5.0}
    assert returning({N[1], N[2], N[3]}, {N[3]}, up.get, lambda n: 0.5) == [1]
    assert returning({N[1]}, (), {N[1]: None}.get, lambda n: 0.5) == []  # not healthy now
    assert returning((), (), up.get, lambda n: 0.5) == []  # nobody left the plans


def test_a_flapping_node_waits_longer_each_time_until_it_stays_away() -> None:
    """Each departure within STRIKES_FORGOTTEN_S of the last doubles the hold (to a cap),
    so a node that blips every second costs a re-plan per doubling hold, not per blip."""
    strikes, t = None, 100.0
    holds = []
    for _ in range(9):
        strikes = strike(strikes, t)
        holds.append(rejoin_hold_s(0.1, strikes[0]))
        t += 1.0
    assert holds[:3] == [0.5, 1.0, 2.0]
    assert holds[-1] == holds[-2] == 32.0  # capped
    assert strike(strikes, t + STRIKES_FORGOTTEN_S + 1) == (1, t + STRIKES_FORGOTTEN_S + 1)


def test_a_holder_that_lost_its_layers_for_the_grace_counts_as_restarted() -> None:
    """Heartbeats arrived after its ack saying no layers, or other layers, than the
    plan's for the grace: a restart the failure detector did not see. Within the grace
    (a beat sent before the node applied the plan may be in flight when its ack
    arrives), or matching, it is not."""
    loaded = {N[1]: None, N[2]: R(6, 12), N[3]: None}.get  # N0 (the gateway): its own
    since = {N[1]: 0.0, N[2]: 0.0, N[3]: 9.9}
    acked, heard = dict.fromkeys(N, 0.0), dict.fromkeys(N, 9.95).get

    def found(
        loaded: Callable[[NodeId], R | None], since: dict[NodeId, float], now: float
    ) -> list[NodeId]:
        return restarted(REPLICATED, loaded, since, now, 0.3, heard_at=heard, acked_at=acked)

    assert found(loaded, since, 10.0) == [N[1], N[2]]  # N3: in grace
    assert found(loaded, since, 10.5) == [N[1], N[2], N[3]]
    assert found(loaded, {}, 10.0) == []  # none differed before
    holding = {N[1]: R(6, 12), N[2]: R(0, 6), N[3]: R(6, 12)}.get
    assert found(holding, since, 10.5) == []


def test_a_heartbeat_older_than_the_ack_says_nothing_of_a_restart() -> None:
    """A holder busy as it loads the plan's layers sends no heartbeat for a while after
    its ack: its latest one, sent before it applied the plan, says none of them. That
    one is no word on what it holds now: an honest node was let go as restarted, taken
    back and suspended as restarted again (a review). Only a later one counts."""
    loaded = dict.fromkeys(N).get  # every beat says no layers
    acked = {N[1]: 5.0, N[2]: 5.0, N[3]: 5.0}
    heard = {N[1]: 4.9, N[2]: 5.0, N[3]: 5.1}.get  # before, with, after the ack
    says = [says_other_layers(REPLICATED, n, loaded, heard, acked) for n in N[1:]]
    assert says == [None, None, True]
    since = dict.fromkeys(N, 0.0)
    found = restarted(REPLICATED, loaded, since, 60.0, 0.3, heard_at=heard, acked_at=acked)
    assert found == [N[3]]  # long past the grace: N1 and N2 have still said nothing
    assert restarted(REPLICATED, loaded, since, 60.0, 0.3, heard_at=heard, acked_at={}) == []
    never = dict.fromkeys(N).get  # no heartbeat at all
    assert says_other_layers(REPLICATED, N[3], loaded, never, acked) is None
    holding = {N[3]: R(6, 12)}.get
    assert says_other_layers(REPLICATED, N[3], holding, heard, acked) is False


def test_a_node_out_is_back_only_once_heard_from_after_it_left() -> None:
    """Healthy for its hold counted from its suspension's end or its restart, and only
    with a heartbeat arrived since: a node silent within acceptable_pause_ms reads as
    healthy, and taken back on a beat older than its restart it was taken for restarted
    again and suspended (a review)."""
    assert back_for(5.0, [None, None], None, 10.0) == 5.0  # nothing to count from
    assert back_for(None, [9.0], 9.5, 10.0) is None  # not healthy now
    assert back_for(5.0, [None, 8.0], 9.5, 10.0) == 2.0  # its restart was seen at 8
    assert back_for(5.0, [None, 8.0], 7.9, 10.0) is None  # silent since
    assert back_for(5.0, [None, 8.0], 8.0, 10.0) is None
    assert back_for(1.0, [6.0, 8.0], 9.9, 10.0) == 1.0  # the later end; its run, if shorter
    assert back_for(5.0, [12.0, None], 10.0, 10.0) is None  # suspended still


def test_a_second_restart_within_the_window_is_not_free() -> None:
    """One restart per window leaves without a suspension; a withholder that claimed a
    restart each time it was about to be charged gets no further than the doubling
    suspension would let it (`control.recovery` suspends the second)."""
    assert strike(None, 0.0, forgotten_s=RESTARTS_FORGOTTEN_S)[0] == 1
    assert strike((1, 0.0), 3600.0, forgotten_s=RESTARTS_FORGOTTEN_S)[0] == 2
    assert strike((1, 0.0), RESTARTS_FORGOTTEN_S + 1, forgotten_s=RESTARTS_FORGOTTEN_S)[0] == 1
    assert RESTARTS_FORGOTTEN_S >= 2 * SUSPENSION_MAX_S


def test_why_no_plan_is_in_force_gives_each_nodes_own_reason_once() -> None:
    """A checkpoint none can load gives every node the loader's same words: the operator
    reads them once, with who said them, and a node unreachable says its own."""
    why = not_served(
        {NodeId(3): "tensor 'k' has shape (64, 64)", NodeId(1): "tensor 'k' has shape (64, 64)",
         NodeId(2): "connection refused"}
    )  # fmt: skip
    assert why.count("tensor 'k' has shape (64, 64)") == 1
    assert "nodes [1, 3]: tensor 'k'" in why and "node 2: connection refused" in why
    assert "taken up" in not_served({})  # nothing refused: every plan overtaken
