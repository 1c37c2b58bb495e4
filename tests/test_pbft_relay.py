"""A backup relays a client's request to the primary (PBFT section 4.1), in one process.

Without the relay a client that reaches every replica but the primary waits out the
backups' request timer and a view change although the primary is alive: the re-plan of
a gateway cut from node 1 alone took 11 s (`tests/test_partition_primary_link.py`).
Each test here fails without the relay; together they pin that it happens once per
primary (no storms, no loops), that it carries the client's signature and authority and
never the relayer's, and that the request timer still replaces a primary that ignores it.
"""

from __future__ import annotations

from collections import Counter

from butterfly.protocol import pbft
from butterfly.protocol.pbft_state import clone
from butterfly.protocol.sign import sign_message
from butterfly.types.ids import Epoch, NodeId
from butterfly.types.wire.agreement import Message, PrePrepare, Request
from tests.protocol_util import CLIENT, CLIENT_KEY, KEYS, Net, config, replicas, request


class Relays:
    """A `Net.drop` that counts each replica-to-replica copy of a request (a relay) and
    drops what `cut` says; `Net` calls it once per copy sent."""

    def __init__(self, cut: set[tuple[int, int]] | None = None) -> None:
        self.cut = cut or set()
        self.sent: Counter[tuple[int, int]] = Counter()  # (relayer, to) -> copies

    def __call__(self, src: NodeId, dst: NodeId, m: Message) -> bool:
        if isinstance(m, Request) and src != CLIENT:
            self.sent[(src, dst)] += 1
        return (src, dst) in self.cut


def ops(state: pbft.ReplicaState) -> list[bytes | None]:
    return [pp.request.operation if pp.request else None for pp in state.executed]


def relayed(out: list[pbft.Send]) -> list[tuple[NodeId | None, Message]]:
    return [(s.to, s.message) for s in out if isinstance(s.message, Request)]


def test_a_request_the_primary_missed_is_ordered_through_a_backup_without_a_view_change() -> None:
    """The reviewer's cut in one process: view 1 (primary 1, as nodes start), the link
    0<->1 cut both ways and the client's copy to 1 lost. Before the relay nothing
    executed until the 10 s request timer moved the view; now it executes at once."""
    cut = {(0, 1), (1, 0), (CLIENT, 1)}
    relays = Relays(cut)
    net = Net(replicas(request_timeout=10.0, initial_view=1), drop=relays)
    net.broadcast_request(request(1, b"new_plan"))
    net.run()
    assert [ops(s) for s in net.states[1:]] == [[b"new_plan"]] * 3
    net.advance(0.5)  # replica 0 never hears the primary: its peers' certificates reach it
    assert ops(net.states[0]) == [b"new_plan"]
    assert [(s.view, s.active) for s in net.states] == [(1, True)] * 4
    # each backup relayed once, to the primary alone; the primary relayed nothing
    assert relays.sent == {(0, 1): 1, (2, 1): 1, (3, 1): 1}


def test_a_backup_relays_a_request_once_per_primary_however_often_it_comes() -> None:
    """Client retransmissions and the primary's own pre-prepare cause no further relay,
    and a primary never relays what it receives."""
    states = replicas()
    req = request(1)
    states[2], out = pbft.step(states[2], req, 0.0)
    assert relayed(out) == [(0, req)]
    for t in (0.1, 0.3, 0.7):  # the client retransmits
        states[2], out = pbft.step(states[2], req, t)
        assert relayed(out) == []
    states[0], out = pbft.step(states[0], req, 0.0)  # the primary orders, relays nothing
    assert relayed(out) == [] and [s.message.kind for s in out] == ["pre_prepare"]
    # a backup that saw the primary's pre-prepare first knows the primary holds it
    pp = next(s.message for s in out if isinstance(s.message, PrePrepare))
    states[3], _ = pbft.step(states[3], pp, 0.0)
    states[3], out = pbft.step(states[3], req, 0.0)
    assert relayed(out) == [] and states[3].relayed == {(CLIENT, 1): 0}
    states[1], out = pbft.step(states[1], req, 0.0)  # the one that missed it relays
    assert relayed(out) == [(0, req)]


def test_replicas_that_disagree_on_the_view_do_not_relay_in_a_loop() -> None:
    """Replica 1 thinks 2 is the primary, replica 2 thinks 1 is: a copy bounced between
    them stops at the first that relayed it already."""
    one = pbft.new_replica(config(1, initial_view=2), KEYS[1])
    two = pbft.new_replica(config(2, initial_view=1), KEYS[2])
    req = request(1)
    one, out = pbft.step(one, req, 0.0)
    assert relayed(out) == [(2, req)]
    two, out = pbft.step(two, req, 0.0)
    assert relayed(out) == [(1, req)]
    one, out = pbft.step(one, req, 0.0)
    assert relayed(out) == []


def test_a_retransmission_reaches_the_next_primary_through_the_one_backup_that_hears_it() -> None:
    """The primary is dead and the client reaches replica 3 alone. 3's relay to the dead
    primary is lost and 3 times out alone; the client's retransmission is relayed to the
    primary 3 now waits for, whose timer, with 3's vote, brings the others to its view."""
    dead = {(0, j) for j in range(1, 4)} | {(j, 0) for j in range(1, 4)}
    relays = Relays(dead | {(CLIENT, 0), (CLIENT, 1), (CLIENT, 2)})
    net = Net(replicas(request_timeout=0.3), drop=relays)
    net.broadcast_request(request(1))
    net.advance(0.5)
    assert net.states[3].in_view_change and net.states[3].view == 1
    assert not any(s.executed for s in net.states)
    net.broadcast_request(request(1))  # retransmitted
    net.advance(1.5)
    assert [ops(s) for s in net.states[1:]] == [[b"op"]] * 3
    assert [s.view for s in net.states[1:]] == [1, 1, 1]
    assert relays.sent[(3, 0)] == 1 and relays.sent[(3, 1)] == 1  # once per primary
    assert relays.sent[(1, 0)] <= 1 and relays.sent[(1, 1)] == 0


def test_the_primary_judges_a_relay_by_its_client_not_by_the_relayer() -> None:
    """Only the gateway (the client here) may ask for a plan; replica 2 is a client too.
    Its honest relay of the gateway's plan is ordered; a plan it signs itself, or the
    gateway's request re-signed or altered by it, is dropped by the backups and by the
    primary alike, whoever hands it over."""
    clients = {CLIENT: CLIENT_KEY.public, NodeId(2): KEYS[2].public}

    def authorize(r: Request) -> str | None:
        return None if r.sender == CLIENT or r.operation != b"plan" else "gateway only"

    states = replicas(clients=clients, authorize=authorize)
    plan = request(1, b"plan")
    states[2], out = pbft.step(states[2], plan, 0.0)
    assert relayed(out) == [(0, plan)]  # the client's own request, its signature intact
    primary, out = pbft.step(clone(states[0]), plan, 0.0)
    assert [s.message.kind for s in out] == ["pre_prepare"]
    own = sign_message(Request(NodeId(2), Epoch(0), 2, b"plan"), KEYS[2])
    resigned = sign_message(plan, KEYS[2])
    altered = Request(CLIENT, Epoch(0), 1, b"other", signature=plan.signature)
    for laundered in (own, resigned, altered):
        backup, out = pbft.step(clone(states[3]), laundered, 0.0)
        assert out == [] and not backup.pending  # not held, not relayed
        primary, out = pbft.step(clone(states[0]), laundered, 0.0)
        assert out == [] and not primary.pending  # not ordered


def test_a_primary_that_ignores_relayed_requests_is_still_replaced_at_the_timeout() -> None:
    """The relay does not stop the backups' request timer: a primary that receives the
    request (relayed, here) yet never orders it loses its view after request_timeout."""
    relays = Relays()
    net = Net(replicas(request_timeout=0.3), drop=relays)

    def mute_primary(src: NodeId, dst: NodeId, m: Message) -> bool:
        return relays(src, dst, m) or (src == 0 and dst != CLIENT) or (src, dst) == (CLIENT, 0)

    net.drop = mute_primary
    net.broadcast_request(request(1))
    net.run()
    assert (CLIENT, 1) in net.states[0].pending  # it got the request, by relay only
    assert all(s.timer_deadline == 0.3 for s in net.states[1:])
    net.advance(0.2)
    assert [s.view for s in net.states] == [0] * 4 and not net.states[1].executed
    net.advance(1.0)
    assert [ops(s) for s in net.states[1:]] == [[b"op"]] * 3
    assert [s.view for s in net.states[1:]] == [1, 1, 1]
