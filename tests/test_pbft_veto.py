"""Vetoed slots end the view at once (`protocol.pbft_veto`), in one process.

The review's cut (twenty-fifth session, real processes in network namespaces): node 1 is
PBFT's primary and the standby gateway, and only its link to the acting gateway, node 0,
is cut. Node 1 proposes a takeover and orders it as primary; nodes 0, 2 and 3 hear node 0
and veto it. That slot cannot prepare, and the gateway's plan, ordered after it, waited
for the backups' request timer (10 s) and a view change. Here every replica that sees
f + 1 vetoes of the slot changes view at once, and the plan executes within a view
change's time. The other tests pin that fewer vetoes, or vetoes of a slot that prepared,
leave the view alone, and that a liar's vetoes count once and never for another slot.
"""

from __future__ import annotations

import dataclasses
import random

import pytest

from butterfly.config import ButterflyConfig
from butterfly.protocol import pbft
from butterfly.protocol.failure_detector import PhiAccrualFailureDetector
from butterfly.protocol.keys import veto_grace
from butterfly.protocol.pbft_veto import veto_quorum
from butterfly.protocol.sign import sign_message
from butterfly.types.ids import Epoch, NodeId
from butterfly.types.wire.agreement import Message, PrePrepare, Request, Veto
from tests.protocol_util import CLIENT, KEYS, Net, config, replicas, request

TAKEOVER, PLAN = b"takeover", b"new_plan"
TIMER_S = 10.0  # the request timer a cluster runs with (coordination.view_change_timeout_ms)


def refuse_takeover(r: Request) -> str | None:
    return "the gateway is alive here" if r.operation == TAKEOVER else None


def ops(state: pbft.ReplicaState) -> list[bytes]:
    return [pp.request.operation for pp in state.executed if pp.request is not None]


def cluster(vetoing: set[int], **overrides: object) -> list[pbft.ReplicaState]:
    states = replicas(request_timeout=TIMER_S, initial_view=1, **overrides)
    for i in vetoing:
        cfg = dataclasses.replace(states[i].config, veto=refuse_takeover)
        states[i] = pbft.new_replica(cfg, KEYS[i])
    return states


def cut_0_1(src: NodeId, dst: NodeId, m: Message) -> bool:
    """The link between the gateway (0) and the primary (1), both ways; the primary's
    takeover reaches only the primary (its client copy to the others is lost)."""
    if isinstance(m, Request) and src == CLIENT and m.operation == TAKEOVER:
        return dst != 1
    return {src, dst} == {0, 1}


def test_a_plan_behind_a_vetoed_takeover_executes_without_waiting_for_the_timer() -> None:
    net = Net(cluster({0, 2, 3}), drop=cut_0_1)
    net.feed(1, request(1, TAKEOVER))  # the primary orders its own takeover
    net.broadcast_request(request(2, PLAN))  # then the gateway's plan
    net.run()
    net.advance(3.0)  # a view change (1 s timer), well inside the 10 s request timer
    assert [ops(s) for s in net.states[2:]] == [[PLAN]] * 2
    assert ops(net.states[0]) == [PLAN]
    assert [s.view for s in net.states[2:]] == [2, 2]
    assert all(TAKEOVER not in ops(s) for s in net.states)


def test_without_the_vetoes_the_plan_waits_for_the_request_timer() -> None:
    """The same cut with the vetoes lost: what the review saw, and what the test above
    would show without them."""

    def no_vetoes(src: NodeId, dst: NodeId, m: Message) -> bool:
        return cut_0_1(src, dst, m) or isinstance(m, Veto)

    net = Net(cluster({0, 2, 3}), drop=no_vetoes)
    net.feed(1, request(1, TAKEOVER))
    net.broadcast_request(request(2, PLAN))
    net.run()
    net.advance(3.0)
    assert not any(ops(s) for s in net.states)
    assert [s.view for s in net.states] == [1] * 4


def test_a_replica_whose_detector_catches_up_within_the_grace_votes_and_keeps_the_view() -> None:
    """Replicas 2 and 3 decline the takeover for 0.3 s (their failure detectors fire a
    beat after the proposer's), less than `veto_grace`: they vote once they accept it,
    without a status to resend the pre-prepare, and nobody changes view."""
    alive = {"gateway": True}

    def behind(r: Request) -> str | None:
        return "still hear the gateway" if alive["gateway"] and r.operation == TAKEOVER else None

    states = replicas(request_timeout=TIMER_S, initial_view=1)
    for i in (2, 3):
        states[i] = pbft.new_replica(dataclasses.replace(states[i].config, veto=behind), KEYS[i])
    net = Net(states)
    net.feed(1, request(1, TAKEOVER))
    net.run()
    net.advance(0.3)
    assert not any(ops(s) for s in net.states) and not net.to_client
    alive["gateway"] = False
    net.advance(0.2)
    assert [ops(s) for s in net.states] == [[TAKEOVER]] * 4
    assert [(s.view, s.active) for s in net.states] == [(1, True)] * 4
    assert not any(v for s in net.states for slot in s.log.values() for v in slot.vetoes.values())


def test_f_vetoes_leave_the_view_and_the_slot_commits() -> None:
    """One replica (f = 1) refuses: the other three prepare and commit, and nobody
    changes view for it."""
    net = Net(cluster({3}))
    net.broadcast_request(request(1, TAKEOVER))
    net.run()
    net.advance(0.5)
    assert [ops(s) for s in net.states] == [[TAKEOVER]] * 4
    assert [(s.view, s.active) for s in net.states] == [(1, True)] * 4
    assert veto_quorum(net.states[0].config) == 2


def test_vetoes_of_a_prepared_slot_do_not_end_the_view() -> None:
    """Two vetoes arrive at a replica where the slot already prepared (a liar's veto
    beside an honest one that changed its mind later is possible): it stays."""
    states = cluster(set())
    net = Net(states)
    net.broadcast_request(request(1, PLAN))
    net.run()
    assert [ops(s) for s in net.states] == [[PLAN]] * 4
    pp = net.states[2].log[1].pre_prepares[1]
    for sender in (0, 3):
        v = sign_message(Veto(NodeId(sender), Epoch(0), 1, pp.seq, pp.digest), KEYS[sender])
        net.feed(2, v)
    assert (net.states[2].view, net.states[2].active) == (1, True)


def test_a_liars_vetoes_count_once_and_not_from_the_primary() -> None:
    """Replica 3 sends two vetoes of one slot and the primary (1) vetoes its own: one
    veto counts, below f + 1, so replica 2 keeps its view."""
    states = cluster(set())
    pp = sign_message(PrePrepare(NodeId(1), Epoch(0), 1, 1, b"\x01" * 32, None), KEYS[1])
    two = states[2]
    for sender, digest in ((3, pp.digest), (3, b"\x02" * 32), (1, pp.digest)):
        v = sign_message(Veto(NodeId(sender), Epoch(0), 1, 1, digest), KEYS[sender])
        two, _ = pbft.step(two, v, 0.0)
    assert (two.view, two.active) == (1, True)
    assert set(two.log[1].vetoes[1]) == {3}


def test_vetoes_lost_when_sent_are_resent_with_the_status_answers() -> None:
    """Replicas 2 and 3 veto (node 0, cut from the primary, has no pre-prepare to veto
    at first) and both vetoes are lost when sent: neither holds two. Once vetoes get
    through, a replica answering a peer's status in the same view resends the slot's
    vetoes it holds, and the view changes all the same."""

    def vetoes_lost(src: NodeId, dst: NodeId, m: Message) -> bool:
        return cut_0_1(src, dst, m) or isinstance(m, Veto)

    net = Net(cluster({2, 3}), drop=vetoes_lost)
    net.feed(1, request(1, TAKEOVER))
    net.broadcast_request(request(2, PLAN))
    net.run()
    net.advance(0.5)
    assert [s.view for s in net.states] == [1] * 4 and not any(ops(s) for s in net.states)
    net.drop = cut_0_1  # statuses and the resent vetoes get through from now on
    net.advance(3.0)
    assert [ops(s) for s in net.states[2:]] == [[PLAN]] * 2
    assert [s.view for s in net.states[2:]] == [2, 2]


def test_the_quorum_of_vetoes_for_larger_clusters() -> None:
    sizes = ((4, 1), (5, 1), (7, 2), (8, 2))
    assert [veto_quorum(config(0, n, f)) for n, f in sizes] == [2, 2, 3, 3]


def _plan_waits_after_the_cut_heals(propose_takeover: bool) -> tuple[list[float], list[bool]]:
    """The cut above, healed after 3 s; then node 3 crashes and six plans are ordered
    by the three left (n - f). Returns how long each waited to execute at 0, 1 and 2, and
    whether each replica was in a view 30 s after the heal."""
    net = Net(cluster({0, 2, 3}), drop=cut_0_1)
    if propose_takeover:
        net.feed(1, request(1, TAKEOVER))
    net.broadcast_request(request(2, PLAN))
    net.run()
    net.advance(3.0)
    assert PLAN in ops(net.states[0])
    net.drop = lambda src, dst, m: False
    net.advance(30.0)
    active = [s.active for s in net.states]
    net.drop = lambda src, dst, m: 3 in (src, dst)
    waits: list[float] = []
    for k in range(6):
        op = b"plan-%d" % k
        net.broadcast_request(request(10 + k, op))
        net.run()
        start = net.now
        while net.now - start < 20.0 and not all(op in ops(s) for s in net.states[:3]):
            net.advance(0.1)
        waits.append(round(net.now - start, 1))
        net.advance(3.0)
    return waits, active


def test_the_proposer_of_a_vetoed_takeover_stops_waiting_for_it_and_stays_in_the_view() -> None:
    """Leaving the view over the vetoes, node 1 drops its takeover (`pbft_order.forget`).
    It used to keep it pending and timed: 10 s into each view it started a view change
    nobody joined, so with node 3 down too plans waited 11 s, again and again."""
    waits, active = _plan_waits_after_the_cut_heals(propose_takeover=True)
    assert all(active), active
    assert max(waits) <= 1.0, waits


def test_control_without_the_takeover_plans_execute_at_once_with_node_3_down() -> None:
    waits, active = _plan_waits_after_the_cut_heals(propose_takeover=False)
    assert all(active) and max(waits) <= 1.0, (waits, active)


def test_a_pending_request_a_replicas_own_veto_comes_to_refuse_is_no_longer_timed() -> None:
    """Node 2's detector first supports the takeover (it holds it pending and relays it
    to the primary, which refuses it), then sees the gateway alive again: its next tick
    drops the request, and no lone view change follows 10 s later. Without the refusal
    it would (the control at the end)."""
    supports = {"takeover": True}

    def detector(r: Request) -> str | None:
        return None if supports["takeover"] or r.operation != TAKEOVER else "gateway alive"

    def only_node_2_hears_it(src: NodeId, dst: NodeId, m: Message) -> bool:
        return src == CLIENT and dst != 2

    def run(flip: bool) -> pbft.ReplicaState:
        states = cluster({1})  # the primary refuses the takeover
        states[2] = pbft.new_replica(dataclasses.replace(states[2].config, veto=detector), KEYS[2])
        supports["takeover"] = True
        net = Net(states, drop=only_node_2_hears_it)
        net.broadcast_request(request(1, TAKEOVER))
        net.run()
        assert net.states[2].pending and net.states[2].timer_deadline is not None
        net.advance(2.0)
        supports["takeover"] = not flip
        net.advance(TIMER_S)
        return net.states[2]

    two = run(flip=True)
    assert not two.pending and two.timer_deadline is None
    assert (two.view, two.active) == (1, True)
    two = run(flip=False)
    assert two.view == 2 and two.in_view_change


def test_a_veto_lost_by_a_replica_that_left_the_view_is_resent_to_those_still_in_it() -> None:
    """Nodes 2 and 3 veto; node 2's one broadcast of its veto is lost, node 3's arrives.
    Node 2 holds two vetoes and leaves view 1; the others hold one and stay. Node 2, in
    its view change, answers their statuses with the vetoes it holds of view 1, so they
    leave too and the plan executes about 1 s after it was proposed. Status answers of
    the view's active replicas resent only their own vetoes, and nobody in view 1 held
    node 2's: the plan waited for the 10 s request timer."""
    lost: list[NodeId] = []

    def node_2s_broadcast_lost(src: NodeId, dst: NodeId, m: Message) -> bool:
        if src == 2 and isinstance(m, Veto) and len(lost) < 3:  # its 3 copies, once
            lost.append(dst)
            return True
        return False

    net = Net(cluster({2, 3}), drop=node_2s_broadcast_lost)
    net.feed(1, request(1, TAKEOVER))
    net.broadcast_request(request(2, PLAN))
    net.run()
    while net.now < TIMER_S + 2.0 and not all(PLAN in ops(s) for s in net.states):
        net.advance(0.1)
    assert sorted(lost) == [0, 1, 3]
    assert net.now <= 2.0, f"the plan executed everywhere only after {net.now:.1f} s"
    assert [(s.view, s.active) for s in net.states] == [(2, True)] * 4
    assert all(TAKEOVER not in ops(s) for s in net.states)


def _detection_delay(interval_s: float, jitter_s: float, seed: int) -> float:
    """Silence to phi_failed for a detector that heard 1000 beats jittering by up to
    `jitter_s` (default detector settings otherwise)."""
    rng = random.Random(seed)
    detector = PhiAccrualFailureDetector(interval_ms=interval_s * 1000)
    for k in range(1000):
        detector.record_heartbeat(NodeId(0), k * interval_s + rng.uniform(0, jitter_s))
    crossing = detector.crossing_time(NodeId(0), detector.failed_threshold)
    assert crossing is not None
    return crossing - 999 * interval_s


@pytest.mark.parametrize("interval_ms", [100, 1000])
def test_the_veto_grace_covers_detectors_that_fire_apart(interval_ms: int) -> None:
    """The proposer's detector with a clockwork history and a voter's with heartbeats
    jittering by 60 % of the interval fire this far apart; the voter must still be
    declining, not vetoing, when its own detector catches up. A fixed 1 s did not cover
    1 s heartbeats (1.7 s apart)."""
    interval = interval_ms / 1000
    apart = _detection_delay(interval, 0.6 * interval, 1) - _detection_delay(interval, 0.0, 1)
    cfg = ButterflyConfig.model_validate({"coordination": {"heartbeat_interval_ms": interval_ms}})
    grace = veto_grace(cfg)
    assert apart < grace < cfg.coordination.view_change_timeout_ms / 1000 / 2 + 1e-9
    assert grace >= 1.0


def test_the_veto_grace_stays_well_inside_the_request_timer() -> None:
    cfg = ButterflyConfig.model_validate(
        {"coordination": {"heartbeat_interval_ms": 1000, "view_change_timeout_ms": 4000}}
    )
    assert veto_grace(cfg) == 2.0
