"""State snapshots (`butterfly.protocol.pbft_snapshot`): a replica behind what its peers
pruned installs the executed state f+1 of them offer alike at their stable checkpoint,
and continues from there; fewer than f+1 alike, or an offer whose proof does not
certify its digest, installs nothing."""

from __future__ import annotations

import dataclasses

from butterfly.protocol import pbft
from butterfly.protocol.pbft_snapshot import offer, record
from butterfly.protocol.pbft_state import sign
from butterfly.types.ids import NodeId
from butterfly.types.wire.agreement import Message, StateSnapshot
from tests.protocol_util import Net, replicas, request

HISTORY = 2


def executed(seq: int) -> bytes:
    """What an honest driver's state is after `seq`: a function of the log alone."""
    return f"state after {seq}".encode()


def drive(net: Net, lying: dict[int, bytes] | None = None) -> None:
    """What each driver does after a step: take the executed entries, record its state
    at every checkpoint it reached (a liar records its own), prune."""
    for i, s in enumerate(net.states):
        for seq in range(s.low, s.last_executed + 1):
            if seq % s.config.checkpoint_interval == 0:
                record(s, seq, (lying or {}).get(i, executed(seq)))
        pbft.prune(s, s.last_executed)


def cut_off_run(net: Net, cut: dict[str, bool], requests: int) -> None:
    for t in range(1, requests + 1):
        net.broadcast_request(request(t, f"op{t}".encode()))
        net.run()
        drive(net)
    cut["on"] = False


def lagging_net() -> tuple[Net, dict[str, bool]]:
    cut = {"on": True}
    net = Net(replicas(history=HISTORY), drop=lambda src, dst, m: cut["on"] and 3 in (src, dst))
    return net, cut


def test_a_replica_behind_the_pruned_log_installs_the_state_and_goes_on() -> None:
    net, cut = lagging_net()
    cut_off_run(net, cut, 15)
    peer, laggard = net.states[0], net.states[3]
    assert peer.base > 0 and laggard.last_executed == 0  # no log can bring it forward
    for _ in range(40):
        net.advance(0.2)
        drive(net)
        if laggard.installed is not None:
            break
    assert laggard.installed is not None
    seq, state = laggard.installed
    assert state == executed(seq) and seq % laggard.config.checkpoint_interval == 0
    assert pbft.digest_at(laggard, seq) == pbft.digest_at(peer, seq) or peer.base >= seq
    assert laggard.low == seq and laggard.last_executed >= seq
    laggard.installed = None  # the driver took it
    net.broadcast_request(request(16, b"op16"))  # and it orders with the others again
    net.run()
    net.advance(1.0)
    assert laggard.last_executed == peer.last_executed == 16
    assert pbft.digest_at(laggard, 16) == pbft.digest_at(peer, 16)


def test_one_liar_offering_another_state_installs_nothing_until_f_plus_1_agree() -> None:
    net, cut = lagging_net()
    cut["on"] = True
    for t in range(1, 16):
        net.broadcast_request(request(t, f"op{t}".encode()))
        net.run()
        drive(net, lying={0: b"a forged state"})
    laggard = net.states[3]
    offers = [offer(net.states[i]) for i in range(3)]
    assert all(o is not None for o in offers)
    liar, first, second = offers
    assert liar is not None and first is not None and second is not None
    assert liar.state == b"a forged state" and first.state == second.state

    def give(message: Message) -> None:
        net.states[3], _ = pbft.step(net.states[3], message, net.now)  # type: ignore[arg-type]

    give(liar)
    give(first)
    assert laggard.installed is None  # one vote each: neither has f+1 = 2
    give(liar)  # the same liar again is still one replica
    assert laggard.installed is None
    give(second)
    assert laggard.installed == (first.seq, first.state)


def test_an_offer_whose_proof_does_not_certify_its_digest_is_ignored() -> None:
    net, cut = lagging_net()
    cut["on"] = True
    for t in range(1, 16):
        net.broadcast_request(request(t, f"op{t}".encode()))
        net.run()
        drive(net)
    laggard = net.states[3]
    forged: list[StateSnapshot] = []
    for i in range(3):
        honest = offer(net.states[i])
        assert honest is not None
        other = dataclasses.replace(honest, digest=bytes(32), signature=b"")
        forged.append(sign(net.states[i], other))  # signed by each: liars beyond f
    for snapshot in forged:
        net.states[3], _ = pbft.step(net.states[3], snapshot, net.now)
    assert laggard.installed is None and laggard.last_executed == 0


def test_replicas_within_the_history_replay_the_log_and_are_offered_no_state() -> None:
    net = Net(replicas(history=1000))
    seen: list[str] = []

    def watch(src: NodeId, dst: NodeId, message: Message) -> bool:
        seen.append(message.kind)
        return False  # nothing lost

    net.drop = watch
    for t in range(1, 6):
        net.broadcast_request(request(t, f"op{t}".encode()))
        net.run()
        drive(net)
    assert "state_snapshot" not in seen
    assert {(s.low, s.last_executed) for s in net.states} == {(4, 5)}
    assert all(s.installed is None for s in net.states)
