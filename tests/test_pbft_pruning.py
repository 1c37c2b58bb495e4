"""Agreement state stays bounded: the executed log, its digests and the replies are
pruned at stable checkpoints (less a history kept for state transfer), over long seeded
runs with lost messages, and what was pruned is never ordered again."""

from __future__ import annotations

import random

import pytest

from butterfly.protocol import pbft
from butterfly.types.wire.agreement import Message
from tests.protocol_util import Net, replicas, request

HISTORY, INTERVAL, WINDOW = 6, 2, 4


def prune_all(net: Net) -> None:
    """What the driver does after every step: it has taken every executed entry."""
    for s in net.states:
        pbft.prune(s, s.last_executed)


def size(s: pbft.ReplicaState) -> tuple[int, int, int, int]:
    return len(s.executed), len(s.digests), len(s.replies), len(s.log)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_state_stays_bounded_over_a_long_seeded_run(seed: int) -> None:
    rng = random.Random(seed)
    net = Net(
        replicas(history=HISTORY),
        drop=lambda src, dst, m: rng.random() < 0.05,  # checkpoint interval 2, window 4
    )
    requests = 300
    largest = (0, 0, 0, 0)
    for t in range(1, requests + 1):
        net.broadcast_request(request(t, f"op{t}".encode()))
        net.run()
        for _ in range(100):  # lost messages: status and retransmission bring it home
            if all(s.last_executed >= t for s in net.states):
                break
            net.advance(0.2)
            net.broadcast_request(request(t, f"op{t}".encode()))  # as a client retries
        prune_all(net)
        largest = max(largest, *(size(s) for s in net.states))
    assert all(s.last_executed >= requests for s in net.states)
    digests = {pbft.digest_at(s, requests) for s in net.states}
    assert len(digests) == 1 and None not in digests  # one history, its end still held
    bound = HISTORY + WINDOW + INTERVAL  # below low: history; above: at most a window
    assert largest[0] <= bound and largest[1] <= bound + 1 and largest[2] <= bound
    assert largest[3] <= WINDOW + INTERVAL
    assert all(s.base >= requests - bound for s in net.states)


def test_a_replica_lagging_within_the_history_catches_up_from_pruned_peers() -> None:
    cut = {"on": False}
    net = Net(replicas(history=HISTORY), drop=lambda src, dst, m: cut["on"] and 3 in (src, dst))
    for t in range(1, 12):
        cut["on"] = t > 4  # replica 3 misses requests 5 to 11
        net.broadcast_request(request(t, f"op{t}".encode()))
        net.run()
        prune_all(net)
    assert net.states[3].last_executed == 4 and net.states[0].last_executed == 11
    assert 0 < net.states[0].base <= 4  # pruned, but not past where replica 3 stands
    cut["on"] = False
    net.advance(2.0)
    assert net.states[3].last_executed == 11
    assert pbft.digest_at(net.states[3], 11) == pbft.digest_at(net.states[0], 11)


def test_a_request_whose_reply_was_pruned_is_never_ordered_again() -> None:
    net = Net(replicas(history=0))
    for t in range(1, 10):
        net.broadcast_request(request(t, f"op{t}".encode()))
        net.run()
        prune_all(net)
    before = [s.last_executed for s in net.states]
    assert all(request(1).timestamp <= s.reply_floor.get(request(1).sender, -1) for s in net.states)
    net.broadcast_request(request(1, b"op1"))  # a replay of a long-executed request
    net.run()
    net.advance(1.0)
    assert [s.last_executed for s in net.states] == before
    assert all(not s.pending for s in net.states)


def test_a_replica_behind_what_its_peers_pruned_is_not_flooded() -> None:
    """Replica 3 missed everything and its peers pruned past where it stands: no log they
    hold lets it execute, so they relay it none (it once drew the whole window's
    pre-prepares and commits on every status). With no executed state recorded by their
    drivers to offer instead (tests/test_pbft_snapshot.py), it stays behind."""
    cut = {"on": True}
    net = Net(replicas(history=HISTORY), drop=lambda src, dst, m: cut["on"] and 3 in (src, dst))
    for t in range(1, 16):
        net.broadcast_request(request(t, f"op{t}".encode()))
        net.run()
        prune_all(net)
    assert net.states[0].base > 0 and net.states[3].last_executed == 0
    cut["on"] = False
    relayed: list[str] = []

    def record(src: int, dst: int, message: Message) -> bool:
        if dst == 3:
            relayed.append(message.kind)
        return False  # nothing lost

    net.drop = record
    net.advance(2.0)
    assert not {"pre_prepare", "commit", "state_transfer"} & set(relayed)
    assert net.states[3].last_executed == 0
