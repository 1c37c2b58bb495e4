"""PBFT replicas fed by hand with a fake clock: each test breaks if its rule breaks."""

from __future__ import annotations

import dataclasses

import pytest

from butterfly.protocol import pbft
from butterfly.protocol.evidence import valid_evidence
from butterfly.protocol.pbft_state import clone
from butterfly.protocol.quorum import check_fault_tolerance, max_faulty
from butterfly.protocol.sign import sign_message
from butterfly.types.errors import InsufficientNodes
from butterfly.types.ids import Epoch, NodeId
from butterfly.types.wire.agreement import (
    Commit,
    Evidence,
    NewView,
    Prepare,
    PrePrepare,
    ViewChange,
    request_digest,
)
from tests.protocol_util import KEYS, Net, config, replicas, request


def executed_ops(state: pbft.ReplicaState) -> list[bytes | None]:
    return [pp.request.operation if pp.request else None for pp in state.executed]


def test_five_nodes_refuse_two_byzantine_with_the_rule_and_the_largest_safe_f() -> None:
    with pytest.raises(InsufficientNodes) as info:
        check_fault_tolerance(5, 2)
    assert "5 nodes tolerate at most f=1 Byzantine nodes (n >= 3f+1); f=2 needs 7" in str(
        info.value
    )
    assert [max_faulty(n) for n in (1, 3, 4, 6, 7, 10)] == [0, 0, 1, 1, 2, 3]
    with pytest.raises(InsufficientNodes):
        config(0, n=5, f=2)


def test_normal_case_orders_requests_identically_and_replies() -> None:
    net = Net(replicas())
    for t in (1, 2, 3):
        net.broadcast_request(request(t, f"op{t}".encode()))
    net.run()
    logs = [executed_ops(s) for s in net.states]
    assert logs[0] == [b"op1", b"op2", b"op3"]
    assert all(log == logs[0] for log in logs)
    assert all(s.digests == net.states[0].digests for s in net.states)
    assert len([m for m in net.to_client if m.kind == "reply"]) == 4 * 3


def test_a_single_replica_cluster_decides_alone() -> None:
    net = Net(replicas(n=1, f=0))
    net.broadcast_request(request(1))
    net.run()
    assert executed_ops(net.states[0]) == [b"op"]


def test_unsigned_forged_and_stale_messages_change_nothing() -> None:
    states = replicas()
    req = request(1)
    pp = sign_message(
        PrePrepare(NodeId(0), Epoch(0), view=0, seq=1, digest=request_digest(req), request=req),
        KEYS[0],
    )
    before = clone(states[1])
    for bad in (
        dataclasses.replace(pp, signature=b""),  # unsigned
        sign_message(pp, KEYS[2]),  # signed by someone else than its sender
        sign_message(dataclasses.replace(pp, epoch=Epoch(1)), KEYS[0]),  # another epoch
        dataclasses.replace(pp, digest=bytes(32)),  # tampered after signing
    ):
        state, out = pbft.step(states[1], bad, 0.0)
        assert out == [] and state.log == before.log and state.pending == before.pending
    _, out = pbft.step(states[1], pp, 0.0)
    assert [s.message.kind for s in out] == ["prepare"]


def test_primary_equivocation_yields_verifiable_evidence() -> None:
    states = replicas()
    a, b = request(1, b"a"), request(2, b"b")
    pp_a, pp_b = (
        sign_message(PrePrepare(NodeId(0), Epoch(0), 0, 1, request_digest(r), r), KEYS[0])
        for r in (a, b)
    )
    # replica 1 accepted a; replica 2 accepted b and says so in its prepare
    states[1], _ = pbft.step(states[1], pp_a, 0.0)
    states[2], out = pbft.step(states[2], pp_b, 0.0)
    prepare_b = next(s.message for s in out if isinstance(s.message, Prepare))
    states[1], out = pbft.step(states[1], prepare_b, 0.0)
    [evidence] = states[1].evidence
    assert evidence.accused == 0 and {evidence.first.digest, evidence.second.digest} == {
        pp_a.digest,
        pp_b.digest,
    }
    assert valid_evidence(evidence, config(0).keys)
    assert any(isinstance(s.message, Evidence) for s in out)
    # a third replica checks the evidence itself before keeping it
    states[3], _ = pbft.step(states[3], evidence, 0.0)
    assert states[3].evidence == [evidence]
    forged = sign_message(dataclasses.replace(evidence, second=evidence.first), KEYS[1])
    assert not valid_evidence(forged, config(0).keys)


def test_a_replica_that_votes_twice_is_convicted_by_its_commits() -> None:
    states = replicas()
    commits = [
        sign_message(Commit(NodeId(2), Epoch(0), 0, 1, bytes([d]) * 32), KEYS[2]) for d in (1, 2)
    ]
    for c in commits:
        states[1], _ = pbft.step(states[1], c, 0.0)
    assert [e.accused for e in states[1].evidence] == [2]


def test_silent_primary_is_replaced_and_pending_requests_commit_in_the_next_view() -> None:
    net = Net(replicas(request_timeout=0.3), drop=lambda src, dst, m: src == 0 or dst == 0)
    net.broadcast_request(request(1))
    net.run()
    assert all(not s.executed for s in net.states)
    net.advance(1.0)
    for s in net.states[1:]:
        assert s.view == 1 and s.active and executed_ops(s) == [b"op"]


def test_suspecting_a_dead_primary_changes_view_before_the_request_timeout() -> None:
    # the request timer (60 s) never fires here: only the detectors' suspicion moves the view
    net = Net(replicas(request_timeout=60.0), drop=lambda src, dst, m: src == 0 or dst == 0)
    net.broadcast_request(request(1))
    net.run()
    assert all(not s.executed for s in net.states)
    for i in (1, 2, 3):
        net.feed(i, pbft.SuspectPrimary(view=0))
    net.run()
    for s in net.states[1:]:
        assert s.view == 1 and s.active and executed_ops(s) == [b"op"]


def test_suspicion_of_a_past_view_or_by_the_primary_itself_changes_nothing() -> None:
    states = replicas(initial_view=1)
    assert [s.primary for s in states] == [1, 1, 1, 1]
    stale, _ = pbft.step(clone(states[2]), pbft.SuspectPrimary(view=0), 0.0)
    own, out = pbft.step(clone(states[1]), pbft.SuspectPrimary(view=1), 0.0)
    assert (stale.view, stale.active, own.view, own.active, out) == (1, True, 1, True, [])


def test_a_prepared_value_survives_the_view_change_at_its_sequence_number() -> None:
    # view 0 prepares the request at seq 1 everywhere but every commit of view 0 is lost
    def lose_commits(src: NodeId, dst: NodeId, m: object) -> bool:
        return isinstance(m, Commit) and m.view == 0

    net = Net(replicas(request_timeout=0.3), drop=lose_commits)
    net.broadcast_request(request(1, b"keep"))
    net.run()
    assert all(not s.executed for s in net.states)
    # the primary dies; the new primary must re-propose b"keep" at seq 1, not a null
    net.drop = lambda src, dst, m: src == 0 or dst == 0 or lose_commits(src, dst, m)
    net.advance(1.5)
    views = [s.view for s in net.states[1:]]
    assert views == [1, 1, 1]
    assert all(executed_ops(s) == [b"keep"] for s in net.states[1:])
    new_view = net.states[1].new_view
    assert isinstance(new_view, NewView) and new_view.sender == 1
    assert [pp.seq for pp in new_view.pre_prepares] == [1]
    vcs = [vc for vc in new_view.view_changes if isinstance(vc, ViewChange)]
    assert all(vc.prepared and vc.prepared[0].pre_prepare.seq == 1 for vc in vcs)


def test_checkpoints_become_stable_and_collect_the_log() -> None:
    net = Net(replicas())  # checkpoint every 2, window 4
    for t in range(1, 6):
        net.broadcast_request(request(t, f"op{t}".encode()))
        net.run()
    for s in net.states:
        assert s.last_executed == 5 and s.low == 4
        assert min(s.log, default=5) > 4  # slots at or below the low water mark are gone
        assert len(s.stable_proof) >= 3 and all(v.seq == 4 for v in s.stable_proof)


def test_pre_prepares_beyond_the_high_water_mark_are_refused() -> None:
    states = replicas()
    req = request(1)
    far = sign_message(PrePrepare(NodeId(0), Epoch(0), 0, 5, request_digest(req), req), KEYS[0])
    states[1], out = pbft.step(states[1], far, 0.0)  # low 0 + window 4 < 5
    assert out == [] and 5 not in states[1].log


def test_a_partitioned_replica_catches_up_by_state_transfer() -> None:
    net = Net(replicas(), drop=lambda src, dst, m: dst == 3 or src == 3)
    for t in range(1, 6):
        net.broadcast_request(request(t, f"op{t}".encode()))
        net.run()
    assert net.states[3].last_executed == 0 and net.states[0].low == 4
    net.drop = lambda src, dst, m: False
    net.advance(2.0)
    assert executed_ops(net.states[3]) == executed_ops(net.states[0])
    assert net.states[3].digests == net.states[0].digests


def test_step_is_deterministic_given_the_same_inputs() -> None:
    def run() -> list[bytes]:
        net = Net(replicas(request_timeout=0.3), drop=lambda src, dst, m: src == 0)
        net.broadcast_request(request(1))
        net.run()
        net.advance(1.0)
        return [s.digests[-1] for s in net.states]

    assert run() == run()


def test_next_deadline_asks_for_the_request_timer() -> None:
    state = replicas(request_timeout=0.3)[1]
    state, _ = pbft.step(state, pbft.Tick(), 0.0)
    state, _ = pbft.step(state, request(1), 1.0)
    deadline = pbft.next_deadline(state)
    assert deadline is not None and deadline <= 1.3
    state, out = pbft.step(state, pbft.Tick(), 1.3)
    assert state.in_view_change and any(isinstance(s.message, ViewChange) for s in out)


def test_a_restarted_primary_executes_what_it_ordered_before_the_crash() -> None:
    """Primary 0 orders one request (below any checkpoint), crashes, and the others move
    to view 1. Restarted with an empty log, it can execute that slot only from its own
    pre-prepare, relayed back by its peers with the commits; then it takes part again."""
    net = Net(replicas(request_timeout=0.3))
    net.broadcast_request(request(1, b"before"))
    net.run()
    assert all(executed_ops(s) == [b"before"] for s in net.states)
    net.drop = lambda src, dst, m: src == 0 or dst == 0  # crashed
    for i in (1, 2, 3):
        net.feed(i, pbft.SuspectPrimary(view=0))
    net.run()
    assert all(s.view == 1 for s in net.states[1:])
    net.states[0] = pbft.new_replica(config(0), KEYS[0])  # restarted: empty log, view 0
    net.drop = lambda src, dst, m: False
    net.advance(2.0)
    assert executed_ops(net.states[0]) == [b"before"]
    assert net.states[0].view == 1 and net.states[0].next_seq > 1
    net.broadcast_request(request(2, b"after"))
    net.advance(1.0)
    assert all(executed_ops(s) == [b"before", b"after"] for s in net.states)


def test_only_what_a_replica_really_signed_comes_back_to_it_as_its_own() -> None:
    """Its own pre-prepares are accepted back (a restarted primary needs them); one that
    claims to be its own but another key signed, or its own prepare, is not."""
    states = replicas()
    req = request(1)
    pp = PrePrepare(NodeId(1), Epoch(0), view=1, seq=1, digest=request_digest(req), request=req)
    forged = sign_message(pp, KEYS[2])
    prepare = sign_message(
        Prepare(NodeId(1), Epoch(0), view=1, seq=1, digest=pp.digest, pp_signature=b""), KEYS[1]
    )
    for bad in (forged, prepare):
        assert not pbft.authentic(states[1], bad)
    assert pbft.authentic(states[1], sign_message(pp, KEYS[1]))
