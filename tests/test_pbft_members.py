"""The replica set changes at an executed command, identically on every replica
(`protocol.pbft_members`): pure replicas fed by hand, no sockets."""

from __future__ import annotations

from butterfly.protocol import pbft, pbft_snapshot
from butterfly.protocol.pbft_members import epoch_of, resume
from butterfly.protocol.pbft_state import PbftConfig, ReplicaState
from butterfly.protocol.sign import sign_message
from butterfly.types.ids import Epoch, NodeId
from butterfly.types.wire.agreement import Commit, Request
from tests.protocol_util import CLIENT, CLIENT_KEY, KEYS, Net

OLD = tuple(k.public for k in KEYS[:4])
ADDED = (*OLD, KEYS[4].public)
REMOVED = (ADDED[0], b"", *ADDED[2:])  # node 1 removed: its id stays, as a tombstone


def is_change(request: Request) -> bool:
    return request.operation.startswith(b"members")


def config(i: int, keys: tuple[bytes, ...]) -> PbftConfig:
    return PbftConfig(
        replica=NodeId(i),
        keys=keys,
        f=1,
        clients={CLIENT: CLIENT_KEY.public},
        epoch=epoch_of(keys),
        checkpoint_interval=2,
        window=8,
        barrier=is_change,
    )


def request(timestamp: int, keys: tuple[bytes, ...], operation: bytes = b"op") -> Request:
    unsigned = Request(CLIENT, epoch_of(keys), timestamp, operation)
    return sign_message(unsigned, CLIENT_KEY)


def ops(state: ReplicaState) -> list[bytes]:
    return [pp.request.operation for pp in state.executed if pp.request is not None]


def apply_changes(net: Net, keys: tuple[bytes, ...]) -> None:
    """What each node's driver does once it applied the change: resume with the roster
    it now holds, and record its executed state at the change for joiners."""
    for i, state in enumerate(net.states):
        if state.held:
            seq = state.held
            net.post(NodeId(i), resume(state, keys, net.now))
            pbft_snapshot.record(state, seq, b"executed up to %d" % seq)
    net.run()


def test_the_epoch_is_a_function_of_the_roster_that_only_grows() -> None:
    assert (epoch_of(OLD), epoch_of(ADDED), epoch_of(REMOVED)) == (4, 5, 6)
    assert config(0, REMOVED).members == (0, 2, 3, 4)
    assert config(0, REMOVED).primary_of(1) == 2  # the removed id is never primary


def test_an_added_replica_joins_at_the_change_and_its_votes_count() -> None:
    old = [pbft.new_replica(config(i, OLD), KEYS[i]) for i in range(4)]
    joiner = pbft.new_replica(config(4, ADDED), KEYS[4])  # started with the new roster
    net = Net([*old, joiner])
    net.broadcast_request(request(1, OLD))
    net.broadcast_request(request(2, OLD, b"members+4"))
    net.run()
    assert [s.held for s in old] == [2, 2, 2, 2]  # nothing executes past the change ...
    net.broadcast_request(request(3, OLD, b"late"))
    net.run()
    assert all(s.last_executed == 2 for s in old)  # ... until the owner resumes
    apply_changes(net, ADDED)
    assert all(s.config.epoch == 5 and s.config.n == 5 for s in old)
    net.advance(0.5)  # the joiner's status: its peers offer the state at the change
    assert joiner.last_executed == 2 and joiner.installed == (2, b"executed up to 2")
    # the old epoch's request ordered after the change never executes; a vote for it is stale
    stale = sign_message(Commit(NodeId(0), Epoch(4), 0, 3, bytes(32)), KEYS[0])
    before = (dict(old[1].log), old[1].last_executed)
    state, out = pbft.step(old[1], stale, net.now)
    assert out == [] and (state.log, state.last_executed) == before
    # with node 3 cut off, 4 of 5 votes decide only if the new node's count (quorum 4)
    net.drop = lambda src, dst, m: 3 in (src, dst)
    net.broadcast_request(request(4, ADDED, b"after"))
    net.run()
    for s in (old[0], old[1], old[2], joiner):
        assert ops(s)[-1:] == [b"after"] and s.last_executed == 3
    assert all(b"late" not in ops(s) for s in net.states)
    assert old[3].last_executed == 2


def test_a_replica_behind_the_change_is_relayed_to_it_and_makes_it_too() -> None:
    states = [pbft.new_replica(config(i, OLD), KEYS[i]) for i in range(4)]
    net = Net(states, drop=lambda src, dst, m: 3 in (src, dst))
    net.broadcast_request(request(1, OLD, b"members+4"))
    net.run()
    apply_changes(net, ADDED)
    assert [s.config.epoch for s in states] == [5, 5, 5, 4]
    net.drop = lambda src, dst, m: False  # healed: node 3 is in the old epoch, behind
    net.advance(1.5)
    assert states[3].held == 1  # the retired replicas relayed the change to it
    apply_changes(net, ADDED)
    assert states[3].config.epoch == 5
    assert len({s.digests[-1] for s in states}) == 1


def test_a_removed_replica_leaves_the_quorums_and_its_votes_are_refused() -> None:
    states = [pbft.new_replica(config(i, ADDED), KEYS[i]) for i in range(5)]
    net = Net(states)
    net.broadcast_request(request(1, ADDED, b"members-1"))
    net.run()
    apply_changes(net, REMOVED)
    assert [s.config.epoch for s in states] == [6] * 5
    assert [s.config.n for s in states] == [4] * 5 and states[0].config.quorum == 3
    forged = sign_message(Commit(NodeId(1), Epoch(6), 0, 2, bytes(32)), KEYS[1])
    before = dict(states[0].log)
    state, out = pbft.step(states[0], forged, net.now)
    assert out == [] and state.log == before
    # 3 of the 4 live replicas decide; the removed one takes no part whatever it receives
    net.drop = lambda src, dst, m: 4 in (src, dst)
    net.broadcast_request(request(2, REMOVED, b"after"))
    net.run()
    for i in (0, 2, 3):
        assert ops(states[i])[-1] == b"after"
    assert states[1].last_executed == 1 and ops(states[1]) == []  # nothing since the change


def test_an_unchanged_roster_resumes_in_the_same_epoch() -> None:
    states = [pbft.new_replica(config(i, OLD), KEYS[i]) for i in range(4)]
    net = Net(states)
    net.broadcast_request(request(1, OLD, b"members (no change)"))
    net.broadcast_request(request(2, OLD, b"next"))
    net.run()
    assert all(s.held == 1 and s.last_executed == 1 for s in states)
    apply_changes(net, OLD)
    assert all(s.config.epoch == 4 and ops(s) == [b"members (no change)", b"next"] for s in states)
