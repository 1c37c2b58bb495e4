"""Live agreement: one PBFT replica per node, driven over the node's transport.

`butterfly.protocol.pbft` is a pure reducer; this driver is its only owner in a running
node. It feeds the replica every `AgreementFrame` that arrives (decoded by the protocol's
strict codec, so a malformed or forged frame never reaches the state), feeds it a `Tick`
at `next_deadline`, and sends what comes back on the `control` channel, where votes never
wait behind tensors. Every step runs on the event loop, one at a time, so the replica
needs no lock.

Executed commands leave in sequence order through one queue, to `on_commit(seq, command)`
on every node; `propose(command)` signs a client request with the node key, submits it to
every replica (so backups time a primary that ignores it, and relay it to a primary
this node cannot reach: `pbft_order.relay`) and returns the sequence number once this
node has executed it. A retried or relayed request runs once (PBFT orders a
duplicate but the driver skips it, keyed by client and timestamp).

Each command kind has one authorized proposer (`agreement.authority`, given to the
replica as `PbftConfig.authorize`): the replica never orders or prepares another's, the
driver counts such requests as they arrive, skips one at execution should more than f
liars have agreed it, and `propose` refuses one at once (and one this node would veto
itself: `PbftConfig.veto`). The check at execution runs in the executor, one command
after the other: a rule that depends on what earlier commands did (who the acting gateway is after
a takeover) sees their effect, on every node alike.

Equivocation evidence (two conflicting votes one node signed for one slot, recorded by
this replica or checked from a peer's report; `butterfly.protocol.evidence`) leaves
through `on_evidence`, once per accused slot, so the node can evict the signer.

A restarted node starts from an empty replica: its peers relay what it missed (commit
certificates, or a certified state transfer below their stable checkpoint), and the
driver hands every command to `on_commit` again from sequence number 1, so the commit
handler must recognise what it already applied. A restarted *primary* cannot vouch for
the pre-prepares it sent before the crash; its peers relay those pre-prepares back to it
with their commit certificates (`pbft.OWN_RELAYED`), so it executes the slots it ordered.
It must never sign another pre-prepare for one of those slots, even before the relays
arrive (its peers would hold two and convict it of equivocation), nor a backup a second
prepare or commit, so the driver writes how far the replica signed votes to the node's
data directory before any leaves (`agreement.signed_mark`), and the restarted replica
votes only past it.

The replica set changes at an agreed command (`protocol.pbft_members`): the replica holds
after any config update (`PbftConfig.barrier`), and once `on_commit` applied it the driver
resumes it with the keys the node now holds (`replica_keys`, the roster). When they
changed, the next epoch begins: the driver's peers follow the new members, it records its
executed state at the change (what a joining node takes), and a command this node
proposed that the old epoch had not executed is proposed again in the new one.

Sends go through a bounded queue per peer: a dead or slow peer loses frames rather than
stalling the others, which is safe because PBFT retransmits on its own (`Status`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeGuard

import msgpack

from butterfly.agreement import signed_mark
from butterfly.agreement.authority import UnauthorizedCommand
from butterfly.metrics.events import ConsensusRound, Emit, MessageDropped, PhaseTransition, discard
from butterfly.net.framing import Envelope
from butterfly.net.transport import Transport
from butterfly.protocol import pbft, pbft_members, pbft_snapshot
from butterfly.protocol.pbft_order import refusal, vetoed
from butterfly.protocol.pbft_state import PbftConfig, ReplicaState, Send
from butterfly.protocol.sign import SigningKey, sign_message
from butterfly.types.errors import ButterflyError, ConsensusTimeout, InvalidMessage
from butterfly.types.ids import NodeId
from butterfly.types.wire.agreement import (
    Commit,
    Evidence,
    Message,
    NewView,
    Prepare,
    PrePrepare,
    Reply,
    Request,
    decode,
    encode,
)
from butterfly.types.wire.control import AgreementFrame

log = logging.getLogger(__name__)

OnCommit = Callable[[int, bytes], Awaitable[None]]
Snapshot = Callable[[], bytes]
Restore = Callable[[bytes], Awaitable[None]]
ReplicaKeys = Callable[[], tuple[bytes, ...]]
OnEvidence = Callable[[Evidence], Awaitable[None]]
VOTES = (PrePrepare, Prepare, Commit)
"""What a replica signs for a slot; see `pbft_state.Signed`."""
INPUTS: tuple[type, ...] = typing.get_args(pbft.Input)
"""Message classes a replica consumes; anything else in a frame is dropped."""
MAX_FRAME = 1 << 20
MIN_TICK_S = 0.005
RESEND_BACKOFF_MAX = 16
"""An unexecuted proposal is sent again after the replica's retransmit interval, doubling
up to this many intervals (1.6 s by default): PBFT's client retransmission."""


def _replica_input(message: Message) -> TypeGuard[pbft.Input]:
    return isinstance(message, INPUTS)


@dataclass(frozen=True)
class DriverLimits:
    queue_per_peer: int = 4096  # frames waiting for one peer; the oldest is dropped beyond


async def _ignore(seq: int, command: bytes) -> None:
    """An `on_commit` for drivers whose commands need no action (benchmarks, tests)."""


async def _log_evidence(evidence: Evidence) -> None:
    log.error("node %s signed conflicting votes; nothing here acts on it", evidence.accused)


class AgreementDriver:
    """Runs one PBFT replica; `run()` inside the node's task group, `on_frame` from its
    dispatcher."""

    def __init__(
        self,
        *,
        config: PbftConfig,
        key: SigningKey,
        transport: Transport,
        on_commit: OnCommit = _ignore,
        on_evidence: OnEvidence = _log_evidence,
        emit: Emit = discard,
        clock: Callable[[], float] = time.monotonic,
        limits: DriverLimits = DriverLimits(),
        replica_keys: ReplicaKeys | None = None,
        signed_path: Path | None = None,
    ) -> None:
        """`replica_keys`: the replica set's keys as this node now holds them (read after
        each config update executes; None: the set never changes). `signed_path`: where
        the replica's `pbft_state.Signed` survives a restart (`agreement.signed_mark`;
        None: nowhere, for tests and benchmarks that never restart a primary)."""
        self._signed_path = signed_path
        self._persisted = (
            None if signed_path is None else signed_mark.load(signed_path, config.epoch)
        )
        self._state: ReplicaState = pbft.new_replica(config, key, self._persisted)
        self._replica_keys = replica_keys
        self._key, self._transport, self._on_commit = key, transport, on_commit
        self._emit, self._clock, self._limits = emit, clock, limits
        self.me = config.replica
        self.peers = tuple(i for i in config.members if i != self.me)
        self._outbox = {p: asyncio.Queue[bytes](limits.queue_per_peer) for p in self.peers}
        self._senders: dict[NodeId, asyncio.Task[None]] = {}
        self._group: asyncio.TaskGroup | None = None  # run()'s, for a new member's sender
        self._commands: dict[tuple[NodeId, int], bytes] = {}  # proposed, not yet executed
        self._requests: dict[tuple[NodeId, int], Request] = {}  # their signed requests
        # executed requests in order, or (seq, bytes): a state snapshot installed at seq
        self._commits: asyncio.Queue[tuple[int, Request | bytes]] = asyncio.Queue()
        self._wake = asyncio.Event()
        self._sleeping_until: float | None = None  # the deadline the ticker waits for
        self._delivered = 0  # highest sequence number handed to the commit queue
        self.applied = 0  # highest sequence number `on_commit` has finished
        # (client, timestamp) of executed requests -> the sequence number they ran at
        self._ran: dict[tuple[NodeId, int], int] = {}
        self._ran_horizon = 0  # entries at or below it were forgotten (`_forget_ran`)
        self._snapshot: Snapshot | None = None  # the node's executed state, as bytes
        self._restore: Restore | None = None
        self._captured = 0  # the last checkpoint whose state was recorded
        self._queued = 0  # the last sequence number handed to the executor
        self._waiters: dict[tuple[NodeId, int], asyncio.Future[int]] = {}
        self._last_ts = 0
        self._in_view_change = False
        self._on_evidence = on_evidence
        self._evidence: asyncio.Queue[Evidence] = asyncio.Queue()
        self._evidence_seen = 0  # entries of the replica's evidence list already reported
        self._warned: set[NodeId] = set()  # senders of unauthorized requests, logged once

    # --- introspection ----------------------------------------------------------------

    @property
    def view(self) -> int:
        return self._state.view

    @property
    def last_executed(self) -> int:
        return self._state.last_executed

    @property
    def primary(self) -> NodeId:
        return self._state.primary

    @property
    def state(self) -> ReplicaState:
        """The replica itself, for tests and status pages; never mutate it."""
        return self._state

    def retune(
        self, *, request_timeout: float, view_change_timeout: float, veto_grace: float | None = None
    ) -> None:
        """Changed agreement timers (coordination.view_change_timeout_ms, phase_timeout_ms,
        mapped as `protocol.keys.pbft_config` maps them), at once: timers running now are
        brought forward to the new value if it is shorter, and later ones use it. Every
        node applies this at the same agreed sequence number, so the replicas agree on
        their timers as they agree on everything else. `veto_grace` (None: unchanged)
        follows the failure detector's settings (`protocol.keys.veto_grace`)."""
        state, now = self._state, self._clock()
        grace = state.config.veto_grace if veto_grace is None else veto_grace
        if grace != state.config.veto_grace:
            state.config = dataclasses.replace(state.config, veto_grace=grace)
        if (state.config.request_timeout, state.config.view_change_timeout) == (
            request_timeout,
            view_change_timeout,
        ):
            return  # another option changed: a backed-off view-change timer stays as it is
        state.config = dataclasses.replace(
            state.config, request_timeout=request_timeout, view_change_timeout=view_change_timeout
        )
        if state.timer_deadline is not None:
            state.timer_deadline = min(state.timer_deadline, now + request_timeout)
        if state.vc_deadline is not None:
            state.vc_deadline = min(state.vc_deadline, now + view_change_timeout)
        self._wake.set()  # the ticker may sleep towards a deadline that moved closer

    def keep_state(self, snapshot: Snapshot, restore: Restore) -> None:
        """What `on_commit` built, as bytes (`control.agreed_state`): recorded at every
        checkpoint, offered to a peer behind our pruned log, and adopted from f+1 peers
        when this node is behind theirs (`protocol.pbft_snapshot`)."""
        self._snapshot, self._restore = snapshot, restore

    # --- input ------------------------------------------------------------------------

    async def on_frame(self, env: Envelope) -> None:
        """One incoming `AgreementFrame`: decode strictly, then step the replica."""
        if env.sender not in self.peers:
            self._emit(MessageDropped(reason="agreement_stranger"))
            return
        try:
            message = decode(env.payload, max_bytes=MAX_FRAME)
        except InvalidMessage as e:
            self._emit(MessageDropped(reason="agreement_invalid"))
            log.warning("dropped an agreement frame from node %s: %s", env.sender, e)
            return
        if not _replica_input(message):
            if not isinstance(message, Reply):  # replies are expected: nodes are clients
                self._emit(MessageDropped(reason=f"agreement_{message.kind}"))
            return
        request = message if isinstance(message, Request) else None
        if isinstance(message, PrePrepare):
            request = message.request
        refused = None if request is None else refusal(self._state, request)
        if refused is not None:  # the replica drops it too; here it is counted and logged
            self._emit(MessageDropped(reason="agreement_unauthorized"))
            if env.sender not in self._warned:  # once per sender: a liar cannot flood the log
                self._warned.add(env.sender)
                log.warning("node %s sent a request no replica orders: %s", env.sender, refused)
        self._step(message)

    def suspect_primary(self, node: NodeId) -> None:
        """The failure detector declared `node` failed: if it is our primary, vote for the
        next view now rather than after the request timeout."""
        if node == self._state.primary:
            self._step(pbft.SuspectPrimary(self._state.view))

    def _step(self, message: pbft.Input) -> None:
        self._state, sends = pbft.step(self._state, message, self._clock())
        self._route(sends)
        self._collect()
        due = pbft.next_deadline(self._state)
        if due is not None and (self._sleeping_until is None or due < self._sleeping_until):
            self._wake.set()  # due earlier than the ticker sleeps: it must look again

    def _persist_signed(self) -> bool:
        """Write how far the replica signed votes for slots, if it moved; False when the
        write failed (its votes must then not leave: `_route`)."""
        mark = self._state.signed
        if self._signed_path is None or mark is None or mark == self._persisted:
            return True
        try:
            signed_mark.store(self._signed_path, mark)
        except OSError as e:
            log.error(
                "could not record signed votes in %s (%s): withholding them (as primary, "
                "the backups will replace this node). Fix the data directory.",
                self._signed_path,
                e,
            )
            return False
        self._persisted = mark
        return True

    def _route(self, sends: list[Send]) -> None:
        durable = self._persist_signed()  # before any pre-prepare of ours leaves
        for send in sends:
            if isinstance(send.message, Reply):
                continue  # proposers wait for their own execution, not for f+1 replies
            if not durable and (
                isinstance(send.message, NewView)
                or (isinstance(send.message, VOTES) and send.message.sender == self.me)
            ):
                continue  # unrecorded, it could be signed again differently after a crash
            targets = self.peers if send.to is None else (send.to,)
            frame = encode(send.message)
            for peer in targets:
                box = self._outbox.get(peer)
                if box is None:
                    continue  # ourselves
                if box.full():
                    box.get_nowait()  # the oldest goes: PBFT's status will ask again
                    self._emit(MessageDropped(reason="agreement_backlog"))
                box.put_nowait(frame)

    def _collect(self) -> None:
        """Queue what the replica executed since the last step, in order."""
        state = self._state
        if state.in_view_change != self._in_view_change:
            self._in_view_change = state.in_view_change
            phases = ("normal", "view_change")
            a, b = phases if state.in_view_change else phases[::-1]
            self._emit(PhaseTransition(a, b))
        # proof of equivocation, recorded by this replica or checked from a peer's report
        while self._evidence_seen < len(state.evidence):
            self._evidence.put_nowait(state.evidence[self._evidence_seen])
            self._evidence_seen += 1
        if state.installed is not None:  # f+1 peers vouched for their state: ours now
            seq, payload = state.installed
            state.installed = None
            while not self._commits.empty():  # all at or below `seq`: superseded
                self._commits.get_nowait()
            self._delivered = self._queued = seq
            self._commits.put_nowait((seq, payload))
        while self._delivered < state.last_executed:
            self._delivered += 1
            entry = pbft.entry_at(state, self._delivered)
            self._emit(ConsensusRound())
            request = entry.request
            if request is None:
                continue  # a null request filled a gap after a view change
            key = (request.sender, request.timestamp)
            if key in self._ran:
                if state.held == self._delivered:  # a replay changes nothing: go on
                    self._route(pbft_members.resume(state, state.config.keys, self._clock()))
                continue
            self._ran[key] = self._delivered
            self._queued = self._delivered
            self._commits.put_nowait((self._delivered, request))
        if self._commits.empty() and self.applied >= self._queued:
            self._capture(self._delivered)  # every command up to here is applied
        pbft.prune(state, self._delivered)  # what every replica has past its checkpoint
        self._forget_ran(self._delivered - state.config.history)

    def _forget_ran(self, horizon: int) -> None:
        """Forget executed requests at or below `horizon`, once per checkpoint interval.

        PBFT itself refuses a request older than its kept history (the client's reply
        floor), and a snapshot carries only the requests after it (`_capture`), so a
        node that caught up from one already holds no more; kept for good, one entry per
        agreed command grew every node for its whole life.
        """
        if horizon - self._ran_horizon < self._state.config.checkpoint_interval:
            return
        self._ran = {key: seq for key, seq in self._ran.items() if seq > horizon}
        self._ran_horizon = horizon

    def _capture(self, upto: int) -> None:
        """Record our executed state at the last checkpoint at or below `upto`; the caller
        knows every command up to `upto`, and none after it, is applied."""
        state, interval = self._state, self._state.config.checkpoint_interval
        at = upto - upto % interval
        if self._snapshot is None or at <= self._captured or at < state.low:
            return
        self._captured = at
        recent = at - state.config.history  # older duplicates: refused by PBFT itself
        ran = sorted([int(c), t, s] for (c, t), s in self._ran.items() if recent < s <= at)
        payload = msgpack.packb([ran, self._snapshot()])
        pbft_snapshot.record(state, at, payload)

    async def _adopt(self, seq: int, payload: bytes) -> None:
        """Take the state f+1 peers vouched for as what executing up to `seq` left here."""
        ran, executed = msgpack.unpackb(payload)
        self._ran = {(NodeId(c), t): s for c, t, s in ran}
        if self._restore is not None:
            await self._restore(executed)
        self._captured = seq
        pbft_snapshot.record(self._state, seq, payload)  # we can vouch for it in turn
        log.warning("node %s caught up from a state snapshot at agreed seq %d", self.me, seq)

    # --- proposing --------------------------------------------------------------------

    async def propose(self, command: bytes, *, timeout: float) -> int:
        """Order `command` cluster-wide; returns its sequence number once this node has
        executed it (and `on_commit` returned). Raises `ConsensusTimeout` after `timeout`
        seconds: the command may still commit later, the caller must not assume otherwise.
        """
        self._last_ts = max(self._last_ts + 1, time.time_ns())  # unique across restarts
        unsigned = Request(
            sender=self.me, epoch=self._state.config.epoch, timestamp=self._last_ts,
            operation=command,
        )  # fmt: skip
        refused = refusal(self._state, unsigned) or vetoed(self._state, unsigned)
        if refused is not None:  # no replica would order it: say so now, not at the timeout
            raise UnauthorizedCommand(
                f"the agreement refuses this command from node {self.me}: {refused}"
            )
        request = sign_message(unsigned, self._key)
        key = (self.me, self._last_ts)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[int] = loop.create_future()
        self._waiters[key] = done
        self._commands[key] = command
        self._requests[key] = request
        try:
            # to every replica, even when we are the primary: backups time it, so a primary
            # that cannot order it (one restarted with an empty log) is replaced
            self._route([Send(None, request)])
            self._step(request)
            deadline = loop.time() + timeout
            interval = self._state.config.retransmit_interval
            while not done.done():
                left = deadline - loop.time()
                if left <= 0:
                    raise TimeoutError
                await asyncio.wait({done}, timeout=min(interval, left))
                if not done.done():
                    self._resend(done)
                    interval = min(
                        2 * interval,
                        RESEND_BACKOFF_MAX * self._state.config.retransmit_interval,
                    )
            return done.result()
        except TimeoutError:
            raise ConsensusTimeout(
                f"command not committed within {timeout:.1f} s (view {self.view}, "
                f"executed up to {self.last_executed})"
            ) from None
        finally:  # under its last key: a membership change may have proposed it again
            for k in [k for k, w in self._waiters.items() if w is done]:
                self._waiters.pop(k, None)
                self._commands.pop(k, None)
                self._requests.pop(k, None)

    def _resend(self, done: asyncio.Future[int]) -> None:
        """Send an unexecuted proposal to every replica again, as a PBFT client retransmits.

        A replica drops a request it vetoes when it arrives (a takeover its own failure
        detector does not support yet: the proposer's detector declared the gateway
        failed a few heartbeats before it), so only the proposer holds it. When the
        primary is alive, the pre-prepare it retransmits is judged again; when the primary
        died with the gateway, the new one never had the request, and the takeover waited
        for `propose`'s whole timeout (30 s) while the cluster served nothing. A replica
        that holds it already ignores the copy; one that executed it answers its reply."""
        for k, waiter in self._waiters.items():
            if waiter is done and (request := self._requests.get(k)) is not None:
                self._route([Send(None, request)])

    # --- running ----------------------------------------------------------------------

    async def run(self) -> None:
        """Tick the replica, drain the commit queue and the outboxes, until cancelled."""
        async with asyncio.TaskGroup() as tg:
            self._group = tg
            for peer in self.peers:
                self._senders[peer] = tg.create_task(self._sender(peer))
            tg.create_task(self._executor())
            tg.create_task(self._reporter())
            tg.create_task(self._ticker())

    async def _ticker(self) -> None:
        while True:
            deadline = pbft.next_deadline(self._state)
            now = self._clock()
            if deadline is not None and deadline <= now:
                self._step(pbft.Tick())
                after = pbft.next_deadline(self._state)
                if after is not None and after <= now:
                    await asyncio.sleep(MIN_TICK_S)  # the reducer kept it due: do not spin
                continue
            self._wake.clear()  # no await since the deadline was read: no step is missed
            self._sleeping_until = deadline  # a later deadline wakes us early: harmless
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
            # that arrives as the event fires, and the node would never stop
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(None if deadline is None else deadline - now):
                    await self._wake.wait()

    def _refuse_waiter(self, key: tuple[NodeId, int], reason: str) -> None:
        waiter = self._waiters.get(key)
        if waiter is not None and not waiter.done():
            waiter.set_exception(UnauthorizedCommand(f"ordered but refused at execution: {reason}"))

    async def _executor(self) -> None:
        while True:
            seq, request = await self._commits.get()
            if isinstance(request, bytes):
                try:
                    await self._adopt(seq, request)
                except Exception:  # a state f+1 vouched for, not ours to judge: logged
                    log.exception("adopting the state snapshot at seq %d failed", seq)
                self.applied = seq
                continue
            try:
                await self._execute(seq, request)
            finally:
                self._after(seq)

    async def _execute(self, seq: int, request: Request) -> None:
        """Apply one executed request through `on_commit` (or skip it, refused)."""
        self._capture(seq - 1)  # every command before this one is applied
        key = (request.sender, request.timestamp)
        refused = refusal(self._state, request)
        if refused is not None:  # only more than f liars get one here: skip it alike
            self._emit(MessageDropped(reason="agreement_unauthorized_executed"))
            log.error("agreed seq %d skipped on every node: %s", seq, refused)
            self._refuse_waiter(key, refused)
            self.applied = seq
            return
        try:
            await self._on_commit(seq, request.operation)
        except Exception:  # one bad command must not stop the ones after it
            log.exception("executing agreed command %d failed", seq)
        self.applied = seq
        waiter = self._waiters.get(key)
        if waiter is not None and not waiter.done():
            waiter.set_result(seq)
        if self._commits.empty():
            self._capture(self._delivered)  # idle: every command delivered is applied

    def _after(self, seq: int) -> None:
        """`seq` is applied: if the replica holds there (a config update), resume it with
        the replica set the node now holds, and follow it when it changed."""
        state = self._state
        if state.held != seq:
            return
        keys = state.config.keys if self._replica_keys is None else self._replica_keys()
        epoch = state.config.epoch
        try:
            sends = pbft_members.resume(state, keys, self._clock())
        except ButterflyError as e:  # an unsafe set (n < 3f+1): validation refuses it first
            log.error("agreed seq %d leaves a replica set PBFT cannot run: %s", seq, e)
            sends = pbft_members.resume(state, state.config.keys, self._clock())
        if state.config.epoch != epoch:
            self._new_epoch(seq)
        self._route(sends)
        self._collect()
        self._wake.set()

    def _new_epoch(self, seq: int) -> None:
        """The replica set changed after `seq`: peers, the state a joiner takes, and our
        own commands the old epoch left unexecuted."""
        state = self._state
        log.warning(
            "agreement epoch %d from seq %d: replicas %s",
            state.config.epoch,
            seq,
            list(state.config.members),
        )
        self.peers = tuple(i for i in state.config.members if i != self.me)
        for gone in [p for p in self._outbox if p not in self.peers]:
            del self._outbox[gone]
            task = self._senders.pop(gone, None)
            if task is not None:
                task.cancel()
        for peer in self.peers:
            if peer not in self._outbox:
                self._outbox[peer] = asyncio.Queue(self._limits.queue_per_peer)
                if self._group is not None:
                    self._senders[peer] = self._group.create_task(self._sender(peer))
        if self._snapshot is not None:  # what a node joining with the new roster takes
            recent = seq - state.config.history
            ran = sorted([int(c), t, s] for (c, t), s in self._ran.items() if recent < s <= seq)
            pbft_snapshot.record(state, seq, msgpack.packb([ran, self._snapshot()]))
            self._captured = seq
        for key in [k for k, w in self._waiters.items() if not w.done() and k not in self._ran]:
            self._propose_again(key)

    def _propose_again(self, key: tuple[NodeId, int]) -> None:
        """A command of ours the old epoch did not execute, signed for the new one (its
        old request is refused there); the caller's `propose` keeps waiting for it."""
        waiter, command = self._waiters.pop(key), self._commands.pop(key)
        self._last_ts = max(self._last_ts + 1, time.time_ns())
        request = sign_message(
            Request(self.me, self._state.config.epoch, self._last_ts, command), self._key
        )
        fresh = (self.me, self._last_ts)
        self._waiters[fresh], self._commands[fresh] = waiter, command
        self._requests.pop(key, None)
        self._requests[fresh] = request
        self._route([Send(None, request)])
        self._step(request)

    async def _reporter(self) -> None:
        """Hands each piece of equivocation evidence to `on_evidence`, once, in order."""
        while True:
            evidence = await self._evidence.get()
            try:
                await self._on_evidence(evidence)
            except Exception:  # reporting one must not stop the ones after it
                log.exception("acting on evidence against node %s failed", evidence.accused)

    async def _sender(self, peer: NodeId) -> None:
        """One peer's frames in order. A send that blocks (a peer that stopped reading)
        holds up this peer alone; its outbox then sheds the oldest frames."""
        box = self._outbox[peer]
        while True:
            frame = await box.get()
            try:
                await self._transport.send(peer, AgreementFrame(), frame, channel="control")
            except (ButterflyError, OSError) as e:
                log.debug("agreement frame to node %s lost: %s", peer, e)


__all__ = ["AgreementDriver", "DriverLimits", "OnCommit", "OnEvidence"]
