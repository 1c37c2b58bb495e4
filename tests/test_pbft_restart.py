"""A replica that crashes and restarts is never convicted of equivocation.

Its peers keep its pre-prepares (the log until the first stable checkpoint, `orphans`
after), so a restarted primary that signed another request at a (view, seq) it had used
handed every one of them signed evidence against it, and the gateway evicted an honest
node for restarting (`control.recovery.watch_evidence`; DESIGN.md section 3: a node that
restarts rejoins, only a proven liar stays out). The driver persists how far the replica
signed (`pbft_state.Signed`, `agreement.signed_mark`) and the restarted replica votes
only past it (`pbft_state.may_sign`); a backup's prepares and commits likewise.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from butterfly.agreement import signed_mark
from butterfly.protocol import pbft, pbft_state
from butterfly.protocol.sign import sign_message
from butterfly.types.ids import Epoch, NodeId
from butterfly.types.wire.agreement import (
    Commit,
    Message,
    NewView,
    Prepare,
    PrePrepare,
    ViewChange,
    request_digest,
)
from tests.protocol_util import KEYS, Net, config, replicas, request

SETTINGS = {"initial_view": 1, "checkpoint_interval": 128, "window": 256}  # the cluster's


def ops(state: pbft.ReplicaState) -> list[bytes]:
    return [pp.request.operation for pp in state.executed if pp.request is not None]


def accusations(net: Net) -> dict[int, list[tuple[int, str, int, int]]]:
    return {
        i: [(e.accused, e.first.kind, e.first.view, e.first.seq) for e in s.evidence]
        for i, s in enumerate(net.states)
        if s.evidence
    }


def healed(src: NodeId, dst: NodeId, m: Message) -> bool:
    return False


def node_1_down(src: NodeId, dst: NodeId, m: Message) -> bool:
    return 1 in (src, dst)


def restart_after_the_view_change(*, persisted: bool) -> Net:
    """Node 1, view 1's primary, orders A at seq 1 and crashes; the others move to view 2;
    node 1 restarts in view 1 (with or without what its driver persisted) and B reaches
    it before its peers' relays do."""
    net = Net(replicas(**SETTINGS))
    net.broadcast_request(request(1, b"A"))
    net.run()
    assert [s.last_executed for s in net.states] == [1] * 4
    net.drop = node_1_down
    for i in (0, 2, 3):  # their failure detectors declare the primary failed
        net.feed(i, pbft.SuspectPrimary(view=1))
    net.run()
    assert [net.states[i].view for i in (0, 2, 3)] == [2, 2, 2]
    signed = net.states[1].signed if persisted else None
    net.states[1] = pbft.new_replica(config(1, **SETTINGS), KEYS[1], signed)
    net.drop = healed
    net.broadcast_request(request(2, b"B"))
    net.run()
    net.advance(2.0)
    return net


def test_a_restarted_primary_is_not_convicted_and_catches_up() -> None:
    net = restart_after_the_view_change(persisted=True)
    assert accusations(net) == {}
    assert all(ops(s) == [b"A", b"B"] for s in net.states)
    assert all(s.view == 2 and s.active for s in net.states)


def test_without_what_it_signed_the_restarted_primary_is_convicted() -> None:
    """What the mark prevents: the scenario above really reuses view 1's seq 1."""
    net = restart_after_the_view_change(persisted=False)
    found = accusations(net)
    assert found and all(e == [(1, "pre_prepare", 1, 1)] for e in found.values())


def test_a_primary_restarted_before_its_peers_moved_on_orders_past_its_old_slots() -> None:
    """Back before any failure detector fired: still view 1's primary, it orders B at
    seq 2 at once, never at the seq 1 its peers hold A's pre-prepare for."""
    net = Net(replicas(**SETTINGS))
    net.broadcast_request(request(1, b"A"))
    net.run()
    signed = net.states[1].signed
    assert signed is not None and (signed.view, signed.seq) == (1, 1)
    net.states[1] = pbft.new_replica(config(1, **SETTINGS), KEYS[1], signed)
    net.broadcast_request(request(2, b"B"))
    net.run()
    net.advance(1.0)
    assert accusations(net) == {}
    assert all(ops(s) == [b"A", b"B"] for s in net.states)
    assert all(s.view == 1 for s in net.states)
    assert all(s.log[2].decided is not None for s in net.states)


def test_a_restarted_primary_does_not_announce_a_view_it_may_have_announced() -> None:
    """A new view carries pre-prepares too. Node 1 announced view 1 (re-proposing A, which
    prepared in view 0) and crashed. A restarted replica starts in the last view it voted
    in, so it never leads an earlier one again; should it still be handed that view's
    changes in view 0 (here by setting its mark by hand), it stays silent rather than
    sign view 1's slots again, and the view times out to the next."""
    vcs: list[ViewChange] = []

    def no_commits_record_vcs(src: NodeId, dst: NodeId, m: Message) -> bool:
        if isinstance(m, ViewChange) and m.view == 1 and dst == 1:
            vcs.append(m)
        return m.kind == "commit"  # A prepares in view 0 but decides nowhere

    net = Net(replicas(), drop=no_commits_record_vcs)
    net.broadcast_request(request(1, b"A"))
    net.run()
    for i in range(4):
        net.feed(i, pbft.SuspectPrimary(view=0))
    net.run()
    signed = net.states[1].signed
    assert signed is not None and (signed.view, signed.seq) == (1, 1)
    assert len(vcs) >= 2
    assert pbft.new_replica(config(1), KEYS[1], signed).view == 1
    restarted = pbft.new_replica(config(1), KEYS[1])
    restarted.signed = restarted.signed_before = signed
    restarted, _ = pbft.step(restarted, pbft.SuspectPrimary(view=0), net.now)  # its own vote
    sent: list[Message] = []
    for vc in vcs:
        restarted, out = pbft.step(restarted, vc, net.now)
        sent.extend(s.message for s in out)
    assert restarted.view == 1 and restarted.in_view_change
    assert not [m for m in sent if isinstance(m, NewView | PrePrepare)]
    fresh = pbft.new_replica(config(1), KEYS[1])  # without the mark it would sign again
    fresh, _ = pbft.step(fresh, pbft.SuspectPrimary(view=0), net.now)
    for vc in vcs:
        fresh, out = pbft.step(fresh, vc, net.now)
        sent.extend(s.message for s in out)
    assert [m for m in sent if isinstance(m, NewView)]


def test_a_replica_back_in_an_older_epoch_than_it_signed_in_never_orders() -> None:
    """It cannot know what it signed there: its requests time out and a view change
    replaces it, which costs a timer but never a conviction."""
    state = pbft.new_replica(config(1, initial_view=1), KEYS[1], pbft.Signed(5, 1, 1))
    state, out = pbft.step(state, request(1, b"A"), 0.0)
    assert not [s for s in out if isinstance(s.message, PrePrepare)]
    assert state.pending and state.signed == pbft.Signed(5, 1, 1)


def test_the_mark_survives_in_the_data_dir_and_an_unreadable_one_forbids_ordering(
    tmp_path: Path,
) -> None:
    path = tmp_path / "data" / signed_mark.MARK_FILE
    assert signed_mark.load(path, 3) is None
    signed_mark.store(path, pbft.Signed(3, 5, 17))
    assert signed_mark.load(path, 3) == pbft.Signed(3, 5, 17)
    path.write_text("{not json")
    unknown = signed_mark.load(path, 3)
    state = pbft.new_replica(config(1, initial_view=1), KEYS[1], unknown)
    state, out = pbft.step(state, request(1, b"A"), 0.0)
    assert not [s for s in out if isinstance(s.message, PrePrepare)]


def test_a_restarted_backup_does_not_prepare_a_lying_primarys_other_pre_prepare() -> None:
    """Primary 1 lies: it sends backup 2 a pre-prepare of A for (view 1, seq 1), which 2
    prepares, and after 2 restarts, one of B for the same slot. The peers hold 2's first
    prepare; a second one would convict 2 alongside the liar. It sits the slot out (the
    others decide it; it executes from their commits) and votes again on the next."""
    states = replicas(**SETTINGS)

    def pp(seq: int, op: bytes) -> PrePrepare:
        r = request(seq * 10 + len(op), op)
        unsigned = PrePrepare(NodeId(1), Epoch(0), 1, seq, request_digest(r), r)
        return sign_message(unsigned, KEYS[1])

    two, out = pbft.step(states[2], pp(1, b"A"), 0.0)
    assert [m.message.digest for m in out if isinstance(m.message, Prepare)] == [pp(1, b"A").digest]
    assert two.signed == pbft.Signed(0, 1, 1)

    def prepares_after_restart(signed: pbft.Signed | None, op: bytes) -> list[Prepare]:
        restarted = pbft.new_replica(config(2, **SETTINGS), KEYS[2], signed)
        restarted, out = pbft.step(restarted, pp(1, op), 1.0)
        restarted, more = pbft.step(restarted, pp(2, b"C"), 1.0)
        return [s.message for s in out + more if isinstance(s.message, Prepare)]

    assert [p.seq for p in prepares_after_restart(two.signed, b"B")] == [2]
    assert [p.seq for p in prepares_after_restart(None, b"B")] == [1, 2]  # the conviction


def test_after_the_whole_cluster_restarts_one_view_change_leads_past_the_used_slots() -> None:
    """Every replica restarts at once with its mark after four views (the log is gone
    everywhere, sequence numbers start again at 1). No replica may vote at seq 1..4 in
    views up to 5; each starts in view 5 rather than 1, so the first request waits for
    the request timer and one view change to view 6, not one view change per view."""
    timers = {"request_timeout": 10.0, "view_change_timeout": 5.0}
    net = Net(replicas(**SETTINGS, **timers))
    for ts in range(1, 5):
        net.broadcast_request(request(ts, b"x%d" % ts))
        net.run()
        for i in range(4):
            net.feed(i, pbft.SuspectPrimary(view=net.states[i].view))
        net.run()
        net.advance(0.5)
    assert [(s.view, s.last_executed) for s in net.states] == [(5, 4)] * 4
    marks = [s.signed for s in net.states]
    net.states = [
        pbft.new_replica(config(i, **SETTINGS, **timers), KEYS[i], marks[i]) for i in range(4)
    ]
    assert [s.view for s in net.states] == [5] * 4
    start = net.now
    net.broadcast_request(request(100, b"after"))
    net.run()
    while net.now - start < 60.0 and not all(ops(s) == [b"after"] for s in net.states):
        net.steps = 0
        net.advance(0.5)
    assert net.now - start <= 10.0 + 5.0 + 1.0
    assert accusations(net) == {}


def _until(net: Net, done: Callable[[], bool], limit: float) -> float:
    start = net.now
    while net.now - start < limit and not done():
        net.steps = 0
        net.advance(0.5)
    return net.now - start


def test_a_backup_restarted_after_a_whole_cluster_restart_votes_in_the_new_view() -> None:
    """After a restart of every node the new view orders from seq 1 again, below the
    numbers the marks hold from the old view. The mark keeps the seq of its highest view
    only (`pbft_state.Signed`), so a backup restarted later still prepares the view's next
    slots; with the two maxima kept apart it sat out the view, and one more crash (within
    f = 1) left too few voters: the next command waited for the request timer and a view
    change instead of being ordered at once."""
    timers = {"request_timeout": 10.0, "view_change_timeout": 5.0}
    net = Net(replicas(**SETTINGS, **timers))
    for ts in range(1, 4):  # three agreed commands in view 1 (primary: node 1)
        net.broadcast_request(request(ts, b"x%d" % ts))
        net.run()
    assert [s.last_executed for s in net.states] == [3] * 4
    marks = [s.signed for s in net.states]
    # every node restarts; 0, 2 and 3 are up first, node 1 (view 1's primary) later
    net.states = [
        pbft.new_replica(config(i, **SETTINGS, **timers), KEYS[i], marks[i]) for i in range(4)
    ]
    net.drop = node_1_down
    net.broadcast_request(request(100, b"first-after-restart"))
    net.run()
    _until(net, lambda: ops(net.states[0]) == [b"first-after-restart"], 60.0)
    assert ops(net.states[0]) == [b"first-after-restart"] and net.states[0].view == 2
    net.drop = healed
    net.advance(3.0)
    assert all(ops(s) == [b"first-after-restart"] and s.view == 2 for s in net.states)
    mark = net.states[3].signed
    assert mark is not None and (mark.view, mark.seq) == (2, 1)  # view 2's own number

    # later backup 3 crashes and restarts with its mark, and catches up from statuses
    net.states[3] = pbft.new_replica(config(3, **SETTINGS, **timers), KEYS[3], mark)
    net.advance(3.0)
    assert ops(net.states[3]) == [b"first-after-restart"] and net.states[3].view == 2
    mine: list[Prepare] = []
    post = net.post

    def recording(src: NodeId, sends: list[pbft.Send]) -> None:
        mine.extend(
            s.message for s in sends if isinstance(s.message, Prepare) and s.message.sender == 3
        )
        post(src, sends)

    net.post = recording  # type: ignore[method-assign]
    # then backup 0 crashes: the one failure f = 1 allows; 1, 2 and 3 order on their own
    net.drop = lambda src, dst, m: 0 in (src, dst)
    net.broadcast_request(request(101, b"next"))
    net.run()
    waited = _until(net, lambda: all(ops(net.states[i])[-1:] == [b"next"] for i in (1, 2, 3)), 40.0)
    assert [(p.view, p.seq) for p in mine] == [(2, 2)]
    assert waited < 2.0 and accusations(net) == {}


def test_the_mark_holds_the_numbers_of_its_highest_view_only() -> None:
    state = pbft.new_replica(config(2, **SETTINGS), KEYS[2], pbft.Signed(0, 3, 9))
    assert pbft_state.may_sign(state, 4, 1) and pbft_state.may_sign(state, 3, 10)
    assert not pbft_state.may_sign(state, 3, 9) and not pbft_state.may_sign(state, 2, 50)
    pbft_state.note_signed(state, 4, 2)
    assert state.signed == pbft.Signed(0, 4, 2)  # a new view: its own numbers
    pbft_state.note_signed(state, 4, 1)
    pbft_state.note_signed(state, 3, 20)  # never happens; it must not raise the mark either
    assert state.signed == pbft.Signed(0, 4, 2)


def test_a_replica_with_an_unreadable_mark_follows_the_views_and_votes_in_no_slot(
    tmp_path: Path,
) -> None:
    """Node 3 restarts with a damaged pbft_signed.json. It starts in the initial view and
    follows its peers: when primary 1 crashes, the view change of 0, 2 and 3 (the 2f+1
    it needs) leads to view 2, and 3 executes what the others order there, signing no
    pre-prepare, prepare or commit in this epoch (`pbft_state.new_replica`). Started in
    the mark's view 2**62, it joined no view change, and the survivors changed views for
    good. Its lost vote is not won back (the cluster orders with 1 back up here)."""
    timers = {"request_timeout": 10.0, "view_change_timeout": 5.0}
    net = Net(replicas(**SETTINGS, **timers))
    votes: list[Message] = []
    post = net.post

    def recording(src: NodeId, sends: list[pbft.Send]) -> None:
        kinds = (PrePrepare, Prepare, Commit)
        votes.extend(
            s.message
            for s in sends
            if src == 3 and isinstance(s.message, kinds) and s.message.sender == 3
        )
        post(src, sends)

    net.post = recording  # type: ignore[method-assign]
    net.broadcast_request(request(1, b"before"))
    net.run()
    old = set(votes)  # its first life's; relayed back to it, they may leave it again
    path = tmp_path / signed_mark.MARK_FILE
    path.write_text('{"epoch": 0, "view": 1, "se')
    mark = signed_mark.load(path, net.states[3].config.epoch)
    net.states[3] = pbft.new_replica(config(3, **SETTINGS, **timers), KEYS[3], mark)
    assert net.states[3].view == 1
    net.advance(2.0)
    assert net.states[3].last_executed == 1
    net.drop = node_1_down
    for i in (0, 2, 3):  # their failure detectors declare the primary failed
        net.feed(i, pbft.SuspectPrimary(view=1))
    net.run()
    _until(net, lambda: all(net.states[i].active for i in (0, 2, 3)), 30.0)
    assert [(net.states[i].view, net.states[i].active) for i in (0, 2, 3)] == [(2, True)] * 3
    net.drop = healed
    net.broadcast_request(request(2, b"after"))
    net.run()
    _until(net, lambda: all(ops(s)[-1:] == [b"after"] for s in net.states), 30.0)
    assert all(ops(s) == [b"before", b"after"] for s in net.states)
    assert old and set(votes) == old  # no new vote of its own
    assert net.states[3].signed == mark and accusations(net) == {}
