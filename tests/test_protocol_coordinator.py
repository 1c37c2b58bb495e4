"""The coordinator: routing, barrier, and epochs changed only through PBFT."""

from __future__ import annotations

from collections import deque

from butterfly.protocol import coordinator
from butterfly.protocol.coordinator import (
    NEXT,
    ROUTES,
    Barrier,
    CoordinatorState,
    Phase,
    Route,
    mark_ready,
    new_coordinator,
    plan_digest,
    propose_plan,
    route,
)
from butterfly.protocol.inputs import Tick
from butterfly.protocol.pbft_state import Send
from butterfly.protocol.sign import sign_message
from butterfly.types.ids import Epoch, NodeId
from butterfly.types.wire.agreement import (
    KINDS,
    BarrierReady,
    Evidence,
    Message,
    PrePrepare,
    Reconfigure,
    Request,
    Suspicion,
    decode,
    request_digest,
)
from butterfly.types.wire.control import Heartbeat
from tests.protocol_util import KEYS

N = 4


class Cluster:
    def __init__(self) -> None:
        self.nodes: list[CoordinatorState] = [
            new_coordinator(NodeId(i), KEYS[:N], KEYS[i], f=1) for i in range(N)
        ]
        self.queue: deque[tuple[int, Message]] = deque()
        self.now = 0.0
        self.down: set[int] = set()

    def post(self, src: int, sends: list[Send]) -> None:
        for s in sends:
            targets = [s.to] if s.to is not None else [j for j in range(N) if j != src]
            for dst in targets:
                if dst < N and src not in self.down and dst not in self.down:
                    self.queue.append((dst, s.message))

    def feed(self, i: int, message: Message | Tick) -> None:
        self.nodes[i], sends = coordinator.step(self.nodes[i], message, self.now)
        self.post(i, sends)

    def run(self) -> None:
        for _ in range(50000):
            if not self.queue:
                return
            dst, message = self.queue.popleft()
            self.feed(dst, message)

    def beat(self, seconds: float) -> None:
        """Heartbeats every 100 ms from live nodes, ticks in between."""
        end = self.now + seconds
        while self.now < end:
            self.now = round(self.now + 0.05, 9)
            if round(self.now * 20) % 2 == 0:
                for src in set(range(N)) - self.down:
                    hb = sign_message(Heartbeat(NodeId(src), Epoch(0), seq=0), KEYS[src])
                    for dst in set(range(N)) - self.down - {src}:
                        self.feed(dst, hb)
            for i in set(range(N)) - self.down:
                self.feed(i, Tick())
            self.run()


def start(cluster: Cluster) -> None:
    cluster.post(0, propose_plan(cluster.nodes[0], tuple(map(NodeId, range(N))), "start", 0.0))
    cluster.run()
    for i in range(N):
        cluster.post(i, mark_ready(cluster.nodes[i]))
    cluster.run()


def test_every_kind_has_a_route() -> None:
    assert set(ROUTES) == set(KINDS)
    assert ROUTES["prepare"] is Route.CONSENSUS and ROUTES["heartbeat"] is Route.DETECTOR
    hb = Heartbeat(NodeId(1), Epoch(0), seq=1)
    assert route(hb) is Route.DETECTOR


def test_barrier_counts_only_members_of_this_epoch_and_plan() -> None:
    digest = plan_digest(Epoch(1), (NodeId(0), NodeId(1)))
    barrier = Barrier(Epoch(1), digest, frozenset({NodeId(0), NodeId(1)}))
    barrier = barrier.arrive(NodeId(0), Epoch(0), digest)  # stale epoch
    barrier = barrier.arrive(NodeId(0), Epoch(1), bytes(32))  # another plan
    barrier = barrier.arrive(NodeId(7), Epoch(1), digest)  # not a member
    assert barrier.arrived == frozenset() and not barrier.complete
    barrier = barrier.arrive(NodeId(0), Epoch(1), digest).arrive(NodeId(1), Epoch(1), digest)
    assert barrier.complete and barrier.waiting_for == frozenset()


def test_the_first_plan_is_decided_by_pbft_then_the_barrier_opens_computation() -> None:
    cluster = Cluster()
    start(cluster)
    for node in cluster.nodes:
        assert (node.epoch, node.phase) == (1, Phase.COMPUTATION)
        assert node.is_phase_complete()
        assert [t for _, t in node.transitions][-2:] == [Phase.SYNCHRONIZATION, Phase.COMPUTATION]


def test_a_dead_node_is_removed_by_a_decided_reconfiguration() -> None:
    cluster = Cluster()
    start(cluster)
    cluster.beat(1.0)
    assert all(node.epoch == 1 for node in cluster.nodes)
    cluster.down.add(3)
    cluster.beat(3.0)
    survivors = cluster.nodes[:3]
    assert {(n.epoch, n.members) for n in survivors} == {(2, (0, 1, 2))}
    assert all(n.phase is Phase.SYNCHRONIZATION for n in survivors)
    assert survivors[0].barrier is not None and survivors[0].barrier.waiting_for == {0, 1, 2}


def test_stale_and_unsigned_coordination_messages_are_ignored() -> None:
    cluster = Cluster()
    start(cluster)
    node = cluster.nodes[0]
    stale = sign_message(BarrierReady(NodeId(1), Epoch(0), bytes(32)), KEYS[1])
    unsigned = Suspicion(NodeId(1), Epoch(1), NodeId(2), phi=20.0)
    for message in (stale, unsigned, unsigned, unsigned):
        node, out = coordinator.step(node, message, 0.0)
        assert out == [] and node.phase is Phase.COMPUTATION


def test_f_plus_one_suspicions_make_a_proposal() -> None:
    cluster = Cluster()
    start(cluster)
    node = cluster.nodes[0]
    for reporter in (1, 2):
        s = sign_message(Suspicion(NodeId(reporter), Epoch(1), NodeId(3), phi=9.0), KEYS[reporter])
        node, out = coordinator.step(node, s, 0.0)
    assert node.phase is Phase.RECONFIGURATION
    assert any(o.message.kind == "request" for o in out)


def test_phase_table_has_no_shortcut_from_assignment_to_computation() -> None:
    assert Phase.COMPUTATION not in NEXT[Phase.ASSIGNMENT]
    assert all(Phase.ASSIGNMENT not in targets for targets in NEXT.values())


def test_evidence_against_a_node_makes_its_eviction_a_proposal() -> None:
    cluster = Cluster()
    start(cluster)
    req_a, req_b = (
        sign_message(Request(NodeId(1), Epoch(0), 100 + i, b"x%d" % i), KEYS[1]) for i in (0, 1)
    )
    pps = [
        sign_message(PrePrepare(NodeId(0), Epoch(0), 0, 9, request_digest(r), r), KEYS[0])
        for r in (req_a, req_b)
    ]
    evidence = sign_message(
        Evidence(NodeId(2), Epoch(0), NodeId(0), pps[0].header(), pps[1].header()), KEYS[2]
    )
    node, out = coordinator.step(cluster.nodes[1], evidence, 0.0)
    assert node.phase is Phase.RECONFIGURATION
    proposal = next(o.message for o in out if isinstance(o.message, Request))
    change = decode(proposal.operation)
    assert isinstance(change, Reconfigure) and change.members == (1, 2, 3)


def test_an_undecided_proposal_is_retransmitted() -> None:
    cluster = Cluster()
    node = cluster.nodes[1]
    sent = propose_plan(node, (NodeId(1), NodeId(2)), "test", 0.0)
    request = next(o.message for o in sent if isinstance(o.message, Request))
    node, out = coordinator.step(node, Tick(), 0.5)
    assert request not in [o.message for o in out]
    node, out = coordinator.step(node, Tick(), 1.1)
    assert request in [o.message for o in out]
