"""Seeded simulation of PBFT replicas over a hostile network, checked after every step.

One process holds N replicas, some of them liars (`sim_byzantine`), and clients that
propose values. The network reorders (random delays), drops, duplicates and partitions
messages until `heal_at`, then only delays them. Everything random comes from the seed,
so a failing schedule is replayed exactly with `replay(seed)`.

Checked after every step of an honest replica:
- safety: no two honest replicas execute different values at one sequence number;
- validity: every executed value was proposed (signed) by a client;
- no evidence ever names an honest replica.
Checked at the end:
- progress: once healed, every honest replica executes every proposed value;
- detection: a slot for which honest replicas accepted two different pre-prepares signed
  by one primary (equivocation, or Twins) yields evidence against it at an honest replica.
With more than f liars (`extra_liars`), safety may be lost; then the check is that a fork
never stays silent: some honest replica holds evidence or a divergence alarm.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from butterfly.protocol import pbft
from butterfly.protocol.pbft_state import PbftConfig, ReplicaState, new_replica, next_deadline
from butterfly.protocol.sign import SigningKey, sign_message, verify_message
from butterfly.testing.sim_byzantine import Behaviour, Board, rewrite
from butterfly.testing.sim_scenario import Scenario, scenario_for, sim_key
from butterfly.types.ids import Epoch, NodeId
from butterfly.types.wire.agreement import (
    Message,
    NewView,
    PrePrepare,
    Reply,
    Request,
    decode,
    encode,
    request_digest,
)

__all__ = [
    "Scenario",
    "ScheduleFailure",
    "ScheduleResult",
    "Simulation",
    "replay",
    "run_schedule",
    "run_schedules",
    "scenario_for",
]

CLIENT_BASE = 100
CLIENT_RETRY = 0.4
REPLICA_INPUTS = pbft.Input.__args__


class ScheduleFailure(AssertionError):
    """A broken invariant; the message carries the seed and how to replay it."""


@dataclass
class _Instance:
    node: NodeId
    state: ReplicaState
    behaviour: Behaviour | None
    tick_at: float | None = None
    seen_executed: int = 0
    seen_evidence: int = 0


@dataclass
class _Client:
    id: NodeId
    key: SigningKey
    requests: list[Request]
    index: int = 0
    replies: dict[int, dict[NodeId, tuple[int, bytes]]] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.index >= len(self.requests)


@dataclass
class ScheduleResult:
    scenario: Scenario
    events: int
    sim_time: float
    progressed: bool
    forks: int
    detected: bool
    evidence: int
    max_view: int


class Simulation:
    def __init__(self, scenario: Scenario, *, trace: Callable[[str], None] | None = None):
        self.sc = scenario
        self.rng = random.Random(scenario.seed * 7919 + 1)
        self.trace = trace
        self.now = 0.0
        self.events = 0
        self._queue: list[tuple[float, int, str, int, object]] = []
        self._counter = 0
        self._decoded: dict[bytes, Message] = {}
        self._encoded: dict[int, tuple[Message, bytes]] = {}
        keys = [sim_key(f"replica-{i}") for i in range(scenario.n)]
        self.clients = [
            _Client(NodeId(CLIENT_BASE + c), sim_key(f"client-{c}"), [])
            for c in range(scenario.clients)
        ]
        for client in self.clients:
            client.requests = [
                sign_message(
                    Request(
                        sender=client.id,
                        epoch=Epoch(0),
                        timestamp=t + 1,
                        operation=f"value {client.id}.{t}".encode(),
                    ),
                    client.key,
                )
                for t in range(scenario.requests_per_client)
            ]
        self.proposed = {request_digest(r) for c in self.clients for r in c.requests}
        liars = dict(scenario.liars)
        self.instances: list[_Instance] = []
        for i in range(scenario.n):
            config = PbftConfig(
                replica=NodeId(i),
                keys=tuple(k.public for k in keys),
                f=scenario.f,
                clients={c.id: c.key.public for c in self.clients},
                checkpoint_interval=scenario.checkpoint_interval,
                window=scenario.window,
                request_timeout=0.3,
                view_change_timeout=0.3,
                retransmit_interval=0.1,
                idle_status_interval=0.5,
            )
            copies = 2 if liars.get(NodeId(i)) is Behaviour.TWINS else 1
            for _ in range(copies):
                state = new_replica(config, keys[i])
                self.instances.append(_Instance(NodeId(i), state, liars.get(NodeId(i))))
        self.by_node: dict[NodeId, list[int]] = {}
        for idx, inst in enumerate(self.instances):
            self.by_node.setdefault(inst.node, []).append(idx)
        self.honest = [i for i, inst in enumerate(self.instances) if inst.behaviour is None]
        self.honest_ids = {self.instances[i].node for i in self.honest}
        self.decided: dict[int, bytes] = {}
        self.forks: list[tuple[int, bytes, bytes]] = []
        self.accepted: dict[tuple[NodeId, int, int], set[bytes]] = {}
        self.board = Board()
        self.peers = {
            NodeId(i): [NodeId(j) for j in range(scenario.n) if j != i] for i in range(scenario.n)
        }
        self._dirty = True  # an honest replica executed or convicted since the last check

    # --- driving ------------------------------------------------------------------------

    def _push(self, at: float, kind: str, target: int, payload: object = None) -> None:
        self._counter += 1
        heapq.heappush(self._queue, (at, self._counter, kind, target, payload))

    def run(self) -> ScheduleResult:
        for c in range(len(self.clients)):
            self._push(self.rng.uniform(0.0, 0.1), "client", c)
        for idx in range(len(self.instances)):
            self._schedule_tick(idx)
        while self._queue:
            at, _, kind, target, payload = heapq.heappop(self._queue)
            if at > self.sc.deadline:
                break
            self.now = at
            self.events += 1
            if kind == "tick":
                if self.instances[target].tick_at == at:
                    self.instances[target].tick_at = None
                    self._step(target, pbft.Tick())
            elif kind == "deliver":
                self._deliver(target, payload)
            elif kind == "reply":
                self._on_reply(target, payload)
            else:
                self._client_send(target)
            if self._dirty and self.now >= self.sc.heal_at and self._finished():
                break
        return self._verdict()

    def _deliver(self, idx: int, payload: object) -> None:
        if not isinstance(payload, bytes):
            return
        message = self._decoded.get(payload)
        if message is None:  # decoding is pure and messages are frozen: share the result
            message = self._decoded[payload] = decode(payload)
        if isinstance(message, REPLICA_INPUTS):
            self._step(idx, message)

    def _step(self, idx: int, message: pbft.Input) -> None:
        inst = self.instances[idx]
        inst.state, sends = pbft.step(inst.state, message, self.now)
        if self.trace is not None:
            self.trace(f"{self.now:8.4f} {idx}@{inst.node} <- {_brief(message)}")
        peers = self.peers[inst.node]
        if inst.behaviour is None:
            routed = [(s.to, s.message) for s in sends]
        else:
            routed = rewrite(inst.behaviour, inst.state, sends, peers, self.rng, self.board)
        for to, out in routed:
            self._send(inst.node, to, out)
        self._schedule_tick(idx)
        if inst.behaviour is None:
            self._check(idx, message)

    def _schedule_tick(self, idx: int) -> None:
        inst = self.instances[idx]
        due = next_deadline(inst.state)
        if due is not None and (inst.tick_at is None or due < inst.tick_at):
            inst.tick_at = max(due, self.now)
            self._push(inst.tick_at, "tick", idx)

    def _send(self, src: NodeId, to: NodeId | None, message: Message) -> None:
        targets = [NodeId(j) for j in range(self.sc.n) if j != src] if to is None else [to]
        hit = self._encoded.get(id(message))
        if hit is None or hit[0] is not message:  # relays resend the same stored objects
            hit = self._encoded[id(message)] = (message, encode(message))
        payload = hit[1]
        for dst in targets:
            for delay in self._network(src, dst):
                if dst >= CLIENT_BASE:
                    self._push(self.now + delay, "reply", dst - CLIENT_BASE, message)
                    continue
                for idx in self._route(dst):
                    self._push(self.now + delay, "deliver", idx, payload)

    def _network(self, src: NodeId, dst: NodeId) -> list[float]:
        """Delays of the copies of one message that arrive (none: dropped)."""
        sc, rng = self.sc, self.rng
        copies = 1
        if self.now < sc.heal_at:
            cut = sc.partition
            clients = src >= CLIENT_BASE or dst >= CLIENT_BASE
            if cut is not None and not clients and (src in cut) != (dst in cut):
                return []
            if rng.random() < sc.drop:
                return []
            if rng.random() < sc.duplicate:
                copies = 2
        return [rng.uniform(0.0005, sc.max_delay) for _ in range(copies)]

    def _route(self, dst: NodeId) -> list[int]:
        """Twins share an address: a message reaches one twin or both."""
        idxs = self.by_node.get(dst, [])
        if len(idxs) < 2:
            return idxs
        r = self.rng.random()
        return [idxs[0]] if r < 0.4 else [idxs[1]] if r < 0.8 else idxs

    def _client_send(self, c: int) -> None:
        client = self.clients[c]
        if client.done:
            return
        self._send(client.id, None, client.requests[client.index])
        self._push(self.now + CLIENT_RETRY, "client", c)

    def _on_reply(self, c: int, payload: object) -> None:
        client = self.clients[c]
        reply = payload
        if client.done or not isinstance(reply, Reply) or not 0 <= reply.sender < self.sc.n:
            return
        current = client.requests[client.index]
        if reply.timestamp != current.timestamp:
            return
        key = self.instances[self.by_node[reply.sender][0]].state.key.public
        if not verify_message(reply, key):
            return
        votes = client.replies.setdefault(reply.timestamp, {})
        votes[reply.sender] = (reply.seq, reply.digest)
        if list(votes.values()).count((reply.seq, reply.digest)) >= self.sc.f + 1:
            client.index += 1
            self._push(self.now, "client", c)

    # --- invariants ---------------------------------------------------------------------

    def _fail(self, why: str) -> None:
        raise ScheduleFailure(
            f"schedule seed={self.sc.seed} failed at t={self.now:.4f}s after "
            f"{self.events} events: {why}\n  scenario: {self.sc.describe()}\n"
            f"  replay: python -c 'from butterfly.testing.sim import replay; "
            f"replay({self.sc.seed}{', extra_liars=' + str(self._extra) if self._extra else ''})'"
        )

    @property
    def _extra(self) -> int:
        return max(0, len(self.sc.liars) - self.sc.f)

    def _check(self, idx: int, message: pbft.Input) -> None:
        inst = self.instances[idx]
        state = inst.state
        for seq in range(inst.seen_executed + 1, state.last_executed + 1):
            pp = state.executed[seq - 1]
            first = self.decided.setdefault(seq, pp.digest)
            if first != pp.digest:
                if not self.sc.beyond_f:
                    self._fail(f"safety: replica {inst.node} executed another value at seq {seq}")
                self.forks.append((seq, first, pp.digest))
            if pp.request is not None and pp.digest not in self.proposed:
                self._fail(f"validity: replica {inst.node} executed an unproposed value")
        if state.last_executed != inst.seen_executed or len(state.evidence) != inst.seen_evidence:
            self._dirty = True
        inst.seen_executed = state.last_executed
        for ev in state.evidence[inst.seen_evidence :]:
            if ev.accused in self.honest_ids:
                self._fail(f"replica {inst.node} holds evidence against honest {ev.accused}")
        inst.seen_evidence = len(state.evidence)
        headers = (
            [message]
            if isinstance(message, PrePrepare)
            else list(message.pre_prepares)
            if isinstance(message, NewView)
            else []
        )
        for pp in headers:
            slot = state.log.get(pp.seq)
            mine = slot.pre_prepares.get(pp.view) if slot is not None else None
            if mine is not None and mine.digest == pp.digest and mine.sender != inst.node:
                self.accepted.setdefault((pp.sender, pp.view, pp.seq), set()).add(pp.digest)

    def _progressed(self) -> bool:
        wanted = {(r.sender, r.timestamp) for c in self.clients for r in c.requests}
        return all(wanted <= self.instances[i].state.replies.keys() for i in self.honest)

    def _unproven(self) -> list[NodeId]:
        """Signers of conflicting accepted pre-prepares no honest replica has evidence on."""
        accused = {ev.accused for i in self.honest for ev in self.instances[i].state.evidence}
        return sorted(
            {s for (s, _, _), ds in self.accepted.items() if len(ds) > 1 and s not in accused}
        )

    def _detected(self) -> bool:
        return any(
            self.instances[i].state.evidence
            or any(a.peer in self.honest_ids for a in self.instances[i].state.alarms)
            for i in self.honest
        )

    def _finished(self) -> bool:
        self._dirty = False
        if self.sc.beyond_f:  # settled once a fork is reported, or all decided without one
            return self._detected() if self.forks else self._progressed()
        return self._progressed() and not self._unproven()

    def _verdict(self) -> ScheduleResult:
        if self.sc.beyond_f:
            if self.forks and not self._detected():
                self._fail(f"{len(self.forks)} silent forks: no honest replica noticed")
        else:
            if not self._progressed():
                missing = [
                    (self.instances[i].node, self.instances[i].state.last_executed)
                    for i in self.honest
                ]
                self._fail(f"no progress by the deadline (replica, executed): {missing}")
            if self._unproven():
                self._fail(f"equivocation by {self._unproven()} left no evidence")
        return ScheduleResult(
            scenario=self.sc,
            events=self.events,
            sim_time=self.now,
            progressed=self._progressed(),
            forks=len(self.forks),
            detected=self._detected(),
            evidence=sum(len(self.instances[i].state.evidence) for i in self.honest),
            max_view=max(self.instances[i].state.view for i in self.honest),
        )


def _brief(message: object) -> str:
    fields = ("sender", "view", "seq", "last_executed", "timestamp")
    parts = [f"{f}={getattr(message, f)}" for f in fields if hasattr(message, f)]
    return f"{getattr(message, 'kind', type(message).__name__)}({', '.join(parts)})"


def run_schedule(seed: int, *, extra_liars: int = 0) -> ScheduleResult:
    """Run one seeded schedule; raises `ScheduleFailure` (with the seed) on any violation."""
    return Simulation(scenario_for(seed, extra_liars=extra_liars)).run()


def replay(seed: int, *, extra_liars: int = 0) -> ScheduleResult:
    """Re-run a schedule printing every step, to debug what `run_schedule` reported."""
    scenario = scenario_for(seed, extra_liars=extra_liars)
    print(f"replaying seed={seed}: {scenario.describe()}")
    return Simulation(scenario, trace=print).run()


def run_schedules(count: int, *, start: int = 0, extra_liars: int = 0) -> list[ScheduleResult]:
    return [run_schedule(s, extra_liars=extra_liars) for s in range(start, start + count)]
