"""The gateway-capable nodes' copies of the tasks, so the acting gateway's death loses
nothing.

Every gateway-capable node keeps a task store (`schedule.store`, SQLite) in its data
directory. The acting gateway writes to its own and copies to the others:

- an accepted task, before the 202 that hands out its id: each standby the failure
  detector does not call failed is asked (`TaskCopy`) and the 202 waits for its answer,
  for at most `COPY_TIMEOUT_S` (or `network.step_timeout_ms` if shorter): a standby that
  dies meanwhile holds up the API that long at most, and another one alive has the copy;
- every `coordination.checkpoint_frequency` tokens, the running task's generation: the
  tokens so far, the sampling RNG's state after the last one, the plan epoch
  (`TaskCheckpoint`, one-way; kept in the acting gateway's own store too, so a restart
  resumes from it as well); and, when an audit withdraws a run's tokens, an empty one of
  the next attempt at once, before the re-run's (`schedule.store.Checkpoint.attempt`);
- a task's end, with its result (`TaskSettled`, one-way), so finished results stay
  readable from whichever gateway acts next; a cancel's end is asked for, and the
  client told "cancelled" only once a standby holds it (`cancelled`): sent one-way
  after the answer, the standby taking over still held the task queued and ran it;
- from each standby when it starts acting, the unfinished tasks only the standby holds
  (`pull`: a gateway that acted while this one was down accepted them), and the last
  `SYNC_RESULTS` results it holds, for tasks this node lacks or holds unfinished: a
  gateway that acted while this one was down may have finished tasks it could not copy
  here (the whole cluster stopped before `keep_standbys` caught this node up), and
  without them their ids would be unknown here, their results unreadable for good
  (tests/test_shutdown.py waited 300 s for three such results); from a standby that did
  not answer then (it was down, with tasks it accepted alone before it died), the same
  once it is back, its unfinished tasks queued here (`resync`);
- to each standby when it starts acting, and to a standby that missed a copy (it was
  failed, or a copy to it was lost) once it is healthy again, everything it may lack:
  every unfinished task with its checkpoint, the last `RESYNC_RESULTS` results, and
  the ends alone of the older finished tasks (`keep_standbys`): a task the standby
  lacks then answers, once it acts, that it ended on a gateway that did not copy its
  result (`TaskNotHeld`), where it answered that no such task was ever accepted; one
  it holds unfinished stays so (a completed end without its result is never written
  over a task, `schedule.store.FINISH`: run again with its seed, it gives the result
  again). An end that reaches a standby before the task's copy (a cancel answered while
  the catch-up had not copied the task yet) is kept and is the task's once the copy
  comes (`schedule.store.END_ELSEWHERE`). A standby that
  was down while tasks were accepted thus holds them before the acting gateway can die
  in turn.

Direct messages, not the agreed log: a task concerns only the gateway-capable nodes (two
by default), not all n; PBFT would cost three all-to-all phases per task and caps an
operation at 64 KiB where a prompt may be megabytes; and the order that matters (the
copy before the 202, a checkpoint before the next) is one sender's order on one
connection. Measured (`bench/gateway_copy.py`: n = 4, f = 1, one process, in-memory
transport, 100 samples): a copy to the standby, written to its SQLite store, takes
0.25 ms median (p90 0.79 ms); ordering one command through the agreement 6.9 ms median
(p90 9.2 ms), 27 times as long, before any prompt of size. With four processes on
loopback TCP (tiny model, 100 tasks, two runs while other clusters ran on the machine),
the 202 took 2.57 and 2.31 ms median with the copy to one standby, 1.47 and 1.79 ms
with no standby (`cluster.gateways = [0]`).

A standby acting later re-queues the unfinished tasks it holds (`Gateway`) and the engine
resumes each from its checkpoint (`dataplane.engine`): with the same RNG state and the
same history, the tokens are those the dead gateway would have produced.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from butterfly.control.gateway_role import GatewayRole
from butterfly.net.conn import Reply
from butterfly.net.framing import Envelope
from butterfly.net.transport import Transport, unless_failed
from butterfly.schedule.group_commit import GroupCommit
from butterfly.schedule.state import TaskState, TaskStatus
from butterfly.schedule.store import (
    Checkpoint,
    TaskStore,
    result_from_json,
    result_to_json,
    task_from_json,
    task_to_json,
)
from butterfly.types.errors import (
    ButterflyError,
    CircuitOpen,
    ServiceUnavailable,
    TaskAlreadyExists,
)
from butterfly.types.ids import Epoch, NodeId, RequestId
from butterfly.types.tasks import InferenceResult, InferenceTask
from butterfly.types.wire.frames import Message
from butterfly.types.wire.standby import (
    TaskCheckpoint,
    TaskCopied,
    TaskCopy,
    TaskSettled,
    TaskSync,
    TaskSyncReply,
)
from butterfly.wiring.task_sync import sync_payload, take_all

log = logging.getLogger(__name__)
OUTBOX = 4096
"""Checkpoints and ends waiting to be sent; beyond, the oldest go (a later checkpoint of
the same task supersedes it, and an end lost here is re-run from the checkpoint)."""
COPY_TIMEOUT_S = 5.0
"""The longest an accepted task's 202 waits for one standby's copy (a copy is a small
control message and one SQLite insert: milliseconds, megabytes of prompt included)."""
CIRCUIT_RETRY_S = 0.05  # a copy to a peer heard again, while its circuit is still open
CIRCUIT_WAIT_S = 1.5  # the longest a copy waits on a circuit (it half-opens within 1 s)
RESYNC_RESULTS = 1024
"""Finished results a returning standby is given (the most recent; older ones stay
readable from the gateways that hold them, and the standby is given their ends only:
tens of bytes each where a result with its signed records is tens of KB)."""
RESYNC_ENDS = 16384
"""Ends alone (no result) of the finished tasks older than those, the most recent: each a
control message of tens of bytes, sent one after another by the acting gateway's loop.
Retention alone (`scheduling.result_ttl_s`) bounds them at over a million after an hour
at the API's 450 requests/s; an older task's id answers that no such task exists."""
SYNC_RESULTS = 128
"""Finished results a standby hands a gateway that starts acting (`pull`), the most
recent: those it may have finished while acting itself, with that gateway away. Each
carries its stages' signed records (tens of KB for a few dozen tokens), and the pull
is on the takeover's path, so fewer than `RESYNC_RESULTS`."""
WATCH_STANDBYS_S = 0.05
"""How often the acting gateway looks for standbys that came back: each moment one is
back and not yet given the tasks it missed is one in which this gateway's death loses
them (0.5 s, and a review killed it in that window)."""
RESYNC_MAX_WAIT_S = 2.0  # the longest wait before a failed resync is tried again
RESYNC_AT_ONCE = 16
"""Copies a resync has in flight at once: one at a time, sixty tasks took a returning
standby most of a second to be given."""
PROBE_WAIT_S = 0.05
"""How long a 202 waits for its copy to a standby no copy reached lately: one that
answers again has it before the 202, one still cut off holds the 202 this long."""
SEND_TIMEOUT_S = 1.0
"""How long one one-way copy may take before that standby is skipped for it."""


class TaskReplicas:
    """This node's task store, and its part in copying tasks among the gateways."""

    def __init__(
        self,
        *,
        node: NodeId,
        path: Path,
        role: GatewayRole,
        transport: Transport,
        status: Callable[[NodeId], str],
        timeout_s: Callable[[], float],
    ) -> None:
        """`status`: the failure detector's; `timeout_s`: network.step_timeout_ms (read on
        every task), which bounds the wait for a standby's copy below `COPY_TIMEOUT_S`."""
        self.node, self._path, self._role, self._transport = node, path, role, transport
        self._status, self._timeout_s = status, timeout_s
        self._store: TaskStore | None = None
        self._writes: GroupCommit | None = None  # a standby's copies and ends: `_group`
        self._outbox: asyncio.Queue[tuple[Message, bytes]] = asyncio.Queue(OUTBOX)
        self.copies = 0  # tasks a standby acknowledged, for tests and health
        self._missed: set[NodeId] = set()  # standbys that lack a copy: `keep_standbys`
        self._resyncing: set[NodeId] = set()  # standbys being given what they missed
        # standbys that may hold tasks this node lacks: down (or not answering) while it
        # took over, or since; taken from when next resynced (`resync`)
        self._unpulled: set[NodeId] = set()
        # standbys a copy could not reach (a circuit that stayed open, no answer): no 202
        # waits for them, and no copy on a circuit, until a copy reaches one (`accepted`)
        self._unreachable: set[NodeId] = set()
        # one copy at a time to each unreachable standby, not waited for (`accepted`)
        self._probes: dict[NodeId, asyncio.Task[bool]] = {}
        # standby -> (not before, wait): when its failed resync is tried again
        self._waits: dict[NodeId, tuple[float, float]] = {}
        self._closed = False

    @property
    def store(self) -> TaskStore:
        """The store, opened when first needed (by the gateway, or a copy arriving);
        `ServiceUnavailable` once closed (a copy arriving as the node stops)."""
        if self._closed:
            raise ServiceUnavailable(f"node {self.node} is stopping: its task store is closed")
        if self._store is None:
            self._store = TaskStore(self._path)
        return self._store

    def _group(self) -> GroupCommit:
        """The standby's writes of one loop turn in one commit: the acting gateway sends a
        copy and an end per task, as fast as clients send tasks, and a commit each was
        two SQLite transactions per request on this node's event loop (which also runs
        a stage of the pipeline)."""
        store = self.store
        if self._writes is None:
            self._writes = GroupCommit(store)
        return self._writes

    def close(self) -> None:
        self._closed = True
        for probe in self._probes.values():
            probe.cancel()
        if self._store is not None:
            self._store.close()
            self._store = None
            self._writes = None

    def holds_every_task(self, peer: NodeId) -> bool:
        """Whether standby `peer` was given every task this acting gateway holds (no copy
        to it missed since it was last resynced)."""
        return peer not in self._missed and peer not in self._resyncing

    def _failed(self, node: NodeId) -> bool:
        return self._status(node) == "failed"

    def standbys(self) -> list[NodeId]:
        """The other gateway-capable nodes, but for those the detector calls failed (each
        of which then misses what is being sent)."""
        alive = []
        for g in self._role.gateways:
            if g == self.node:
                continue
            if self._failed(g):
                self._missed.add(g)
                self._unpulled.add(g)
            else:
                alive.append(g)
        return alive

    # --- the acting gateway -------------------------------------------------------------

    async def accepted(self, task: InferenceTask) -> None:
        """Copy `task` to every standby alive and wait for their answers (bounded), so the
        202 hands out an id a standby holds too (`_confirm`)."""
        took = await self._confirm(TaskCopy(task.task_id), task_to_json(task).encode())
        if took is not None:
            self.copies += len(took)

    async def cancelled(self, task_id: RequestId, state: TaskState) -> None:
        """Give every standby alive a cancelled task's end and wait for their answers
        (bounded), before the client is told "cancelled": one-way, like other ends, it
        was still on its way when the gateway died, and the standby that took over ran
        the task from its copy, still queued there (a review). `ServiceUnavailable` (503,
        retriable) if there are standbys and none took it: the cancel is recorded here,
        and reaches them when they are resynced (`keep_standbys`), but until then this
        gateway's death would run the task after all. A completed or failed task's end
        stays one-way: a standby running it again gives the same tokens (its seed is
        stored with it: `Scheduler.submit`), or fails it again."""
        took = await self._confirm(_settled(task_id, state), b"")
        if took is not None and not took:
            raise ServiceUnavailable(
                f"task {task_id} is cancelled on this gateway, but no standby gateway took the "
                "cancel yet: were this gateway to fail now, the task could still run; it "
                "reaches them once they answer again"
            )

    async def _confirm(self, msg: TaskCopy | TaskSettled, payload: bytes) -> list[NodeId] | None:
        """Send `msg` to every standby alive and wait for their answers (bounded): the
        standbys that took it, or None if there were none to ask. One a copy could not
        reach since (its circuit stayed open, or it timed out: heard by the detector, it
        was cut off over TCP) is not waited for: it is owed `msg`, given it by
        `keep_standbys` once a copy reaches it. Every 202 waited out the copy's whole
        timeout for such a standby, 5 s each (a review)."""
        peers = self.standbys()
        probes = [
            probe
            for peer in self._unreachable.intersection(peers)
            if (probe := self._probe(peer, msg, payload)) is not None
        ]
        if probes:  # one that answers again has the copy before the 202
            await asyncio.wait(probes, timeout=PROBE_WAIT_S)
        took = [p for p in peers if self._probed(p, probes) and _took(self._probes[p])]
        asked = [p for p in peers if p not in self._unreachable and not self._probed(p, probes)]
        if not peers:
            return None
        answers = await asyncio.gather(*(self._copy(peer, msg, payload) for peer in asked))
        took += [peer for peer, ok in zip(asked, answers, strict=True) if ok]
        if asked and not any(answers):
            log.warning("%s %s: no standby gateway holds it (%s)", msg.kind, msg.task_id, asked)
        return took

    def _probe(
        self, peer: NodeId, msg: TaskCopy | TaskSettled, payload: bytes
    ) -> asyncio.Task[bool] | None:
        """Send unreachable `peer` `msg` (this task's copy, or its end), waited for
        `PROBE_WAIT_S` at most, unless a copy is on its way to it already (then None: `msg` is
        owed, and given by the resync). Once one reaches it, the 202s wait for it again and it
        is resynced at once. Skipped altogether, a standby that answered again got no copy until
        its resync's wait was over, up to 2 s in which the gateway's death lost the tasks
        accepted meanwhile (a review)."""
        self._missed.add(peer)
        running = self._probes.get(peer)
        if running is not None and not running.done():
            return None
        probe = asyncio.create_task(self._copy(peer, msg, payload, quiet=True))
        self._probes[peer] = probe
        return probe

    def _probed(self, peer: NodeId, probes: list[asyncio.Task[bool]]) -> bool:
        """Whether this task's copy went to `peer` as a probe (answered or not)."""
        return self._probes.get(peer) in probes

    async def _copy(
        self, peer: NodeId, msg: TaskCopy | TaskSettled, payload: bytes, *, quiet: bool = False
    ) -> bool:
        """Whether `peer` took `msg`, a task's copy or its end (`quiet`: failures are the
        caller's to log). A peer the detector hears while the transport's circuit to it is still
        open (it came back: `net.breaker`) is tried again until the circuit lets calls through,
        for up to `CIRCUIT_WAIT_S`: the 202 went out with no standby holding the task, and the
        gateway's death right after lost it (a review). A peer whose circuit stayed open that
        long is not waited for again until a copy reaches it: every 202 waited out the copy's
        timeout for a standby it could not dial (a review)."""
        deadline = time.monotonic() + min(COPY_TIMEOUT_S, self._timeout_s())
        circuit_until = time.monotonic() + CIRCUIT_WAIT_S
        while True:
            try:
                reply, _ = await self._transport.ask(
                    peer,
                    msg,
                    payload,
                    timeout=max(0.01, deadline - time.monotonic()),
                    channel="control",
                )
                break
            except CircuitOpen as e:
                error: ButterflyError = e
                healthy = self._status(peer) == "healthy" and peer not in self._unreachable
                now = time.monotonic()
                if healthy and now + CIRCUIT_RETRY_S < min(deadline, circuit_until):
                    await asyncio.sleep(CIRCUIT_RETRY_S)
                    continue
                self._unreachable.add(peer)
            except ButterflyError as e:
                error = e
                self._unreachable.add(peer)
            if not quiet:
                log.warning("%s %s not sent to node %s: %s", msg.kind, msg.task_id, peer, error)
            self._missed.add(peer)
            return False
        if peer in self._unreachable:
            self._unreachable.discard(peer)
            self._waits.pop(peer, None)  # resynced at the next look, not after a wait
        if not reply.ok:
            if not quiet:
                log.warning("node %s refused %s %s: %s", peer, msg.kind, msg.task_id, reply.error)
            self._missed.add(peer)
        return reply.ok

    def checkpoint(self, request_id: RequestId, checkpoint: Checkpoint) -> None:
        """The engine's hook: keep the checkpoint here, and send it to the standbys."""
        self.store.save_checkpoint(request_id, checkpoint)
        msg = TaskCheckpoint(
            request_id, checkpoint.tokens, Epoch(checkpoint.epoch), checkpoint.attempt
        )
        self._post(msg, checkpoint.rng_state)

    def finished(
        self, task_id: RequestId, state: TaskState, result: InferenceResult | None
    ) -> None:
        """The scheduler's hook: a terminal state committed here goes to the standbys."""
        payload = result_to_json(result).encode() if result is not None else b""
        self._post(_settled(task_id, state), payload)

    def _post(self, msg: Message, payload: bytes) -> None:
        if self._outbox.full():
            self._outbox.get_nowait()
        self._outbox.put_nowait((msg, payload))

    async def send_copies(self) -> None:
        """Forever (while acting): send what `_post` queued, in order, to each standby;
        everything queued at once goes out in one turn of the loop, so the connection
        writes it as one piece (`net.conn.COALESCE_BELOW`), not one write per request."""
        while True:
            queued = [await self._outbox.get()]
            while not self._outbox.empty():
                queued.append(self._outbox.get_nowait())
            await asyncio.gather(*(self._send_all(p, queued) for p in self.standbys()))

    async def _send_all(self, peer: NodeId, queued: list[tuple[Message, bytes]]) -> None:
        for msg, payload in queued:
            await self._send(peer, msg, payload)

    async def _send(self, peer: NodeId, msg: Message, payload: bytes) -> None:
        try:
            async with asyncio.timeout(SEND_TIMEOUT_S):
                await self._transport.send(peer, msg, payload, channel="control")
        except (ButterflyError, TimeoutError) as e:
            log.debug("%s to node %s lost: %s", msg.kind, peer, e)
            self._missed.add(peer)

    async def keep_standbys(self, adopt: Callable[[list[InferenceTask]], None]) -> None:
        """Forever (while acting): give every standby what it may lack (`resync`) when
        this node starts acting, when one becomes a gateway (`cluster.gateways`: one
        added later was said to hold every task and was never given them, a review),
        and whenever one that missed a copy is healthy. Each standby on its own: one
        whose copies waited on its circuit held the others' back. One whose resync
        failed is tried again after a doubling wait: checked every 50 ms, one that kept
        refusing was sent up to 1024 results twenty times a second (a review).
        `adopt` queues the unfinished tasks a standby held and this node did not."""
        known: set[NodeId] = set()
        waits = self._waits
        running: dict[NodeId, asyncio.Task[None]] = {}
        try:
            while True:
                standbys = {g for g in self._role.gateways if g != self.node}
                self._missed |= standbys - known  # new ones are owed everything
                known = standbys
                self._missed &= standbys  # a removed standby is owed nothing
                for peer in sorted(self._missed):
                    now = time.monotonic()
                    busy = peer in running and not running[peer].done()
                    if busy or self._status(peer) != "healthy":
                        continue
                    if now < waits.get(peer, (0.0, 0.0))[0]:
                        continue
                    resync = self._resync_one(peer, waits, adopt)
                    running[peer] = asyncio.create_task(resync)
                await asyncio.sleep(WATCH_STANDBYS_S)
        finally:
            for task in running.values():
                task.cancel()

    async def _resync_one(
        self,
        peer: NodeId,
        waits: dict[NodeId, tuple[float, float]],
        adopt: Callable[[list[InferenceTask]], None],
    ) -> None:
        self._missed.discard(peer)  # a copy lost meanwhile adds it again
        self._resyncing.add(peer)
        done = False
        try:
            done = await self.resync(peer, adopt)
        finally:
            self._resyncing.discard(peer)
            if done:
                waits.pop(peer, None)
            else:  # failed, or raised: still owed, and tried again later
                self._missed.add(peer)
                last = waits.get(peer, (0.0, WATCH_STANDBYS_S))[1]
                wait = min(RESYNC_MAX_WAIT_S, 2 * last)
                waits[peer] = (time.monotonic() + wait, wait)

    async def resync(self, peer: NodeId, adopt: Callable[[list[InferenceTask]], None]) -> bool:
        """Copy to `peer` every unfinished task with its checkpoint, then the recent
        results; True if it took every task (False: tried again later). A copy refused
        or failed ends it there (the rest would fail alike), with one line logged.

        First, from a standby that was down or silent while this node took over (or has
        been down since), the tasks it holds and this node lacks: it may have accepted
        them while acting, and died before it could copy them here. Those unfinished go
        to `adopt`. Before, they stayed unfinished in its store, unknown to the acting
        gateway, for as long as that node did not act again (a test)."""
        if peer in self._unpulled:
            try:
                taken = await self._pull_from(peer)
            except ServiceUnavailable:
                return False
            self._unpulled.discard(peer)
            if taken:
                log.warning("took %d task(s) only node %s held, or held finished", len(taken), peer)
            adopt([t for t in taken if t is not None])
        store = self.store
        room = asyncio.Semaphore(RESYNC_AT_ONCE)
        failed: list[RequestId] = []

        async def give(task: InferenceTask, checkpoint: Checkpoint | None) -> bool:
            async with room:
                if failed:
                    return False
                copy = TaskCopy(task.task_id)
                took = await self._copy(peer, copy, task_to_json(task).encode(), quiet=True)
                if not took:
                    failed.append(task.task_id)
                elif checkpoint is not None:
                    msg = TaskCheckpoint(
                        task.task_id, checkpoint.tokens, Epoch(checkpoint.epoch), checkpoint.attempt
                    )
                    await self._send(peer, msg, checkpoint.rng_state)
                return took

        unfinished = store.unfinished()
        given = await asyncio.gather(*(give(t, c) for t, c in unfinished))
        if not all(given):
            log.warning(
                "node %s not given the tasks it missed (%d of %d, task %s failed); "
                "trying again later",
                peer,
                sum(given),
                len(unfinished),
                failed[0] if failed else "?",
            )
            return False
        # a task finishing between the reads puts one in both (its end twice: no change);
        # off the loop: up to 1,024 results of tens of KB and 16,384 ends
        results, older = await asyncio.to_thread(
            lambda: (
                store.recently_finished(RESYNC_RESULTS),
                store.finished_ids(RESYNC_RESULTS, RESYNC_ENDS),
            )
        )
        for done in results:
            task_id = done.task.task_id
            copy = TaskCopy(task_id)
            if not await self._copy(peer, copy, task_to_json(done.task).encode(), quiet=True):
                break  # the results are a courtesy (readable from this gateway too)
            result = result_to_json(done.result).encode() if done.result else b""
            await self._send(peer, _settled(task_id, done.state), result)
        else:
            for task_id, state in older:  # one-way, tens of bytes each
                await self._send(peer, _settled(task_id, state), b"")
                if peer in self._missed:  # lost: the next resync sends them again
                    break
        if peer in self._missed:  # a send was lost: not done, and the next try waits longer
            return False
        log.info("node %s holds every unfinished task again", peer)
        return True

    async def pull(self) -> int:
        """Take into this node's store the unfinished tasks (and checkpoints) each standby
        holds that it lacks, and the standby's recent results of tasks it lacks or holds
        unfinished; returns how many tasks changed here (new, or now finished). A standby
        that does not answer in time, or that the failure detector declares failed
        meanwhile, is skipped (taken from when it is resynced, `keep_standbys`): a
        gateway watches for failures only once this is done, and a standby that died
        as it was asked held every re-plan for the ask's 5 s."""
        changed = 0
        for peer in self.standbys():
            try:
                changed += len(await self._pull_from(peer))
            except ServiceUnavailable:
                self._unpulled.add(peer)
        if changed:
            log.warning("took %d task(s) only a standby held, or held finished", changed)
        return changed

    async def _pull_from(self, peer: NodeId) -> list[InferenceTask | None]:
        """What `peer` holds that this node lacks, taken into its store: per task changed
        here, the task if it is new and unfinished (to be queued), else None (it is now
        finished here). `ServiceUnavailable` if `peer` did not answer. The reply (up to
        `SYNC_RESULTS` results with their signed records, megabytes) is read and
        written off the event loop, which a returning standby now interrupts while this
        node serves, not only as it starts acting."""
        try:
            asking = self._transport.ask(
                peer, TaskSync(), timeout=COPY_TIMEOUT_S, channel="control"
            )
            reply, payload = await unless_failed(
                peer, asking, self._failed, "hand-over of its tasks"
            )
            if reply.error:
                raise ServiceUnavailable(f"node {peer} could not read its tasks: {reply.error}")
            return await asyncio.to_thread(take_all, self.store, peer, payload)
        except (ButterflyError, ValueError, sqlite3.Error) as e:  # this node's store too
            log.warning("unfinished tasks of node %s not taken: %s", peer, e)
            raise ServiceUnavailable(f"node {peer} did not hand over its tasks: {e}") from e

    # --- a standby: the router's handlers (only the acting gateway may send these) ------

    async def on_sync(self, peer: NodeId, env: Envelope) -> Reply | None:
        if not isinstance(env.msg, TaskSync):
            return None
        try:
            unfinished = self.store.unfinished()
            finished = self.store.recently_finished(SYNC_RESULTS)
        except ButterflyError:  # stopping: the asker goes on without this node's tasks
            return None
        except sqlite3.Error as e:  # answered: the asker asks again when it resyncs this node
            log.error("could not read the tasks node %s asked for: %s", peer, e)
            return TaskSyncReply(self.node, 0, f"{type(e).__name__}: {e}"), b""
        return TaskSyncReply(self.node, len(unfinished)), sync_payload(unfinished, finished)

    async def on_copy(self, peer: NodeId, env: Envelope) -> Reply | None:
        msg = env.msg
        if not isinstance(msg, TaskCopy):
            return None
        try:
            task = task_from_json(msg.task_id, env.payload.decode())
            # committed, with the other writes of this loop turn, before the answer
            await self._group().add(task)
        except TaskAlreadyExists:
            pass  # a second copy of one task is the same task, not an error
        except (ValueError, KeyError, TypeError, ButterflyError, sqlite3.Error) as e:
            return TaskCopied(self.node, msg.task_id, False, f"{type(e).__name__}: {e}"), b""
        return TaskCopied(self.node, msg.task_id, True), b""

    async def on_checkpoint(self, peer: NodeId, env: Envelope) -> Reply | None:
        msg = env.msg
        if isinstance(msg, TaskCheckpoint):
            checkpoint = Checkpoint(msg.tokens, env.payload, msg.epoch, msg.attempt)
            try:
                self.store.save_checkpoint(RequestId(msg.task_id), checkpoint)
            except ButterflyError:  # stopping: the next one will do
                pass
            except sqlite3.Error as e:  # the disk full: the next one may fit
                log.warning("checkpoint of task %s not kept: %s", msg.task_id, e)
        return None

    async def on_settled(self, peer: NodeId, env: Envelope) -> Reply | None:
        """Record a task's end; answered (`TaskCopied`) once committed, for the acting
        gateway that waits for it (a cancel: `cancelled`); sent one-way, the answer goes
        nowhere (`net.conn` answers requests only)."""
        msg = env.msg
        if not isinstance(msg, TaskSettled):
            return None
        try:
            state = TaskState(TaskStatus(msg.status), msg.reason, msg.error_type)
            if not state.terminal:
                raise ValueError(f"task {msg.task_id} sent as settled in state {msg.status!r}")
            result = result_from_json(msg.task_id, env.payload.decode()) if env.payload else None
            await self._group().finish(RequestId(msg.task_id), state, result)
        except (ValueError, KeyError, TypeError, ButterflyError, sqlite3.Error) as e:
            return TaskCopied(self.node, msg.task_id, False, f"{type(e).__name__}: {e}"), b""
        return TaskCopied(self.node, msg.task_id, True), b""


def _settled(task_id: RequestId, state: TaskState) -> TaskSettled:
    """A task's end as sent to a standby (the reason cut to fit a control message)."""
    return TaskSettled(task_id, state.status.value, state.reason[:4000], state.error_type)


def _took(probe: asyncio.Task[bool]) -> bool:
    """Whether a probe (`TaskReplicas._probe`) has answered that its standby took it."""
    return probe.done() and not probe.cancelled() and probe.result()


__all__ = ["TaskReplicas"]
