"""The gateway's sending of steps: batched down the chain, or relayed around a refusal.

A step goes to the first stage's node (a direct call when that is this node) and its
answer comes back from the last stage's node through `intake.Intake`, matched by
(request id, step) in the shared `InFlight` table this module fills.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from butterfly.dataplane.inflight import Entry, InFlight, Relayed, StepFailed
from butterfly.dataplane.intake import OnLiars
from butterfly.dataplane.lanes import Lane
from butterfly.dataplane.proving import RECORD_MISMATCH, digest
from butterfly.metrics.events import Emit, HopTimed, discard
from butterfly.net.framing import MAX_HEADER
from butterfly.protocol.dispatch import Dispatcher
from butterfly.runtime.wire import encode_tensor
from butterfly.types.errors import (
    ButterflyError,
    SendTimeout,
    ServiceUnavailable,
    StageLost,
)
from butterfly.types.ids import NodeId, RequestId
from butterfly.types.plan import StagePlan
from butterfly.types.wire.data import StageStep
from butterfly.types.wire.frames import Message

Deliver = Callable[[NodeId, Message, bytes], Awaitable[None]]

MIN_ROWS = 4
"""Fewest steps in a micro-batch. A decode step costs a stage nearly the same for 1 row
as for 4 (the weights are read once either way), so thinner slices would cost each stage
more time than the overlap saves."""


def micro_batches(count: int, stages: int, min_rows: int = MIN_ROWS) -> list[range]:
    """Split `count` queued steps into at most `stages` micro-batches of at least
    `min_rows`, as even as can be, in order.

    One batch of every running request goes round the chain as a unit: while it is on
    one stage (or on a link) every other stage waits, and each link's latency is paid
    by the whole batch. Several micro-batches in flight keep the stages busy with one
    while another crosses a link; once they come back at different times they stay apart.
    Example: 16 steps over 4 stages -> 4 x 4; 10 over 4 -> 2 (5 + 5); 7 -> one batch.
    """
    parts = max(1, min(stages, count // max(1, min_rows)))
    size, extra = divmod(count, parts)
    out, at = [], 0
    for i in range(parts):
        n = size + (1 if i < extra else 0)
        out.append(range(at, at + n))
        at += n
    return out


HEADER_ROOM = MAX_HEADER - 8192
"""What the signed records of one step may take of its frame header (at most 64 KiB: the
envelope, the request ids, starts and lengths take the rest, with a wide margin)."""
RECORD_FIXED_BYTES = 512
"""One signed record without its fingerprint: ids, hashes, Merkle root, signature, and
msgpack's framing of them (about 300 bytes measured; the rest is margin)."""


LATE_S = 0.05
"""How long a step that timed out still waits for an answer before it is judged: the
gateway's event loop, busy when the timer fell due, may not have read an answer already in
its socket, and the node that sent it was charged (a review)."""


@dataclass(frozen=True)
class RecordSize:
    """How large the signed records a step gathers grow, from the cluster's fingerprint
    shape (`byzantine.fingerprint_top_k` values per `fingerprint_chunk` positions, each
    an index and a float: 8 bytes). The records travel in the frame headers of the step
    and of its result, which hold at most 64 KiB, so a step must not gather more.

    >>> size = RecordSize(top_k=8, chunk=1)
    >>> size.max_positions(stages=2)
    439
    >>> size.split([250] * 6, stages=2)
    [range(0, 1), range(1, 2), range(2, 3), range(3, 4), range(4, 5), range(5, 6)]
    >>> size.split([1] * 8, stages=2)
    [range(0, 8)]
    """

    top_k: int
    chunk: int

    def cost(self, lengths: Sequence[int], stages: int) -> int:
        """Header bytes of the records of a batch of entries `lengths` long, on a chain
        of `stages`: every stage signs a record of every entry, each fingerprinting
        every position it outputs (the last stage too, when it answers every row)."""
        entry = 8 * self.top_k
        per_record = RECORD_FIXED_BYTES + entry  # a partial last chunk rounds up
        fingerprints = sum(math.ceil(n / self.chunk) * entry for n in lengths)
        return stages * (len(lengths) * per_record + fingerprints)

    def max_positions(self, stages: int, room: int = HEADER_ROOM) -> int:
        """The most positions one entry's step may carry (at least 1; 0, no limit, for
        a chain of no stage, which signs nothing)."""
        if stages <= 0:
            return 0
        n = 1
        while self.cost([2 * n], stages) <= room:
            n *= 2
        low, high = n, 2 * n  # cost([low]) fits, cost([high]) does not
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if self.cost([mid], stages) <= room else (low, mid)
        return low

    def covering(self, other: RecordSize) -> RecordSize:
        """A size no smaller than either: while nodes move from one fingerprint shape to
        the other at their own moment of the agreed change, a step is sized for both."""
        return RecordSize(max(self.top_k, other.top_k), min(self.chunk, other.chunk))

    def split(self, lengths: Sequence[int], stages: int, room: int = HEADER_ROOM) -> list[range]:
        """Consecutive runs of the entries whose records fit the header together (an
        entry too long on its own goes alone: the engine sends no such entry)."""
        out: list[range] = []
        start = 0
        for i in range(1, len(lengths) + 1):
            if i == len(lengths) or self.cost(lengths[start : i + 1], stages) > room:
                out.append(range(start, i))
                start = i
        return out


class StepSender:
    """`timeout` is the step timeout a step starts waiting with (`PipelineEngine.retune`
    changes it)."""

    def __init__(
        self,
        *,
        node: NodeId,
        deliver: Deliver,
        plan: Callable[[], StagePlan | None],
        flight: InFlight,
        keys: Mapping[NodeId, bytes] | None,
        timeout: float,
        on_liars: OnLiars,
        emit: Emit = discard,
        records: RecordSize | None = None,
        dispatcher: Dispatcher | None = None,
    ) -> None:
        """`emit`: the hop to the first stage's node is timed (`HopTimed`) as each
        stage times its own (dataplane.routes). `records`: the size of the signed
        records the stages add (None: they sign none), which bounds a batch.
        `dispatcher`: signs each step sent (when results are verified, stages run only
        steps the gateway signed: protocol.dispatch)."""
        self.records, self._dispatcher = records, dispatcher
        self.node, self._deliver, self._plan, self._flight = node, deliver, plan, flight
        self._emit = emit
        self._keys, self.timeout, self._on_liars = keys, timeout, on_liars
        self._queue: list[Entry] = []
        self._ready = asyncio.Event()

    async def serve_batches(self) -> None:
        """Send queued steps, batched: the steps queued since the last send go in
        StageSteps (per input kind), so concurrent requests share each stage's forward,
        as micro-batches (`micro_batches`) so that the stages work at once."""
        while True:
            await self._ready.wait()
            # one turn of the loop first: the requests whose answers came in with the one
            # that woke this queue their next steps too, and go in the same batch. Without
            # it a prompt's chunk and a stream answered by one delivery went down in turns,
            # each alone (chunk, decode, chunk, ...), and the chunk never shared the
            # decode step's read of the weights (runtime.stage.packs)
            await asyncio.sleep(0)
            self._ready.clear()
            batch, self._queue = self._queue, []
            plan = self._plan()
            if plan is None:
                for e in batch:
                    if not e.future.done():
                        e.future.set_exception(ServiceUnavailable("the stage plan is gone"))
                continue
            groups: dict[tuple[object, ...], list[Entry]] = {}
            for e in batch:
                key = (e.route, e.x.dtype, tuple(e.x.shape[2:]), e.last_only)
                groups.setdefault(key, []).append(e)
            for entries in groups.values():
                stages = len(entries[0].route or plan.nodes)
                for part in micro_batches(len(entries), stages):
                    batch_part = entries[part.start : part.stop]
                    for fits in self._fitting(batch_part, stages):
                        await self._send_batch(plan, batch_part[fits.start : fits.stop])

    def _fitting(self, entries: list[Entry], stages: int) -> list[range]:
        """`entries` in runs whose signed records fit a frame header: six 250-token
        prompts (or six replays after a whole-cluster restart) in one step gathered
        92 KB of records, over the 64 KiB limit, and every one of them failed."""
        if self.records is None:
            return [range(len(entries))]
        return self.records.split([e.x.shape[1] for e in entries], stages)

    def max_positions(self, stages: int) -> int:
        """The most positions one step of one request may carry (0: no limit)."""
        return 0 if self.records is None else self.records.max_positions(stages)

    async def _send_batch(self, plan: StagePlan, entries: list[Entry]) -> None:
        nodes = entries[0].route or plan.nodes
        flight = self._flight
        for e in entries:
            flight.sent_in[(e.request_id, e.step)] = plan.epoch
            flight.sent_on[(e.request_id, e.step)] = tuple(nodes)
            if self._keys is not None and e.request_id in flight.checked:
                flight.sent_digest[(e.request_id, e.step)] = digest(e.x)
        trace: tuple[bytes, ...] = ()
        if flight.traced:  # each entry's context, when any entry of the batch is traced
            trace = tuple(flight.traced.get(e.request_id, b"") for e in entries)
            trace = trace if any(trace) else ()
        msg = StageStep(
            tuple(e.request_id for e in entries),
            tuple(e.step for e in entries),
            tuple(e.start for e in entries),
            tuple(e.x.shape[1] for e in entries),
            nodes[1:],
            self.node,
            entries[0].last_only,
            (),
            trace,
        )
        msg = self._stamp(msg, nodes[0], plan.epoch)
        started = time.perf_counter()
        x = entries[0].x if len(entries) == 1 else torch.cat([e.x for e in entries], dim=1)
        payload = encode_tensor(x)
        try:
            await self._deliver(nodes[0], msg, payload)
            if nodes[0] != self.node:  # to itself, `deliver` runs the stage inline
                self._emit(HopTimed(peer=nodes[0], seconds=time.perf_counter() - started))
            else:  # and hands the step on to the next node
                handed = time.monotonic()
                for key in ((e.request_id, e.step) for e in entries):
                    if flight.awaited(key):  # not settled meanwhile: nothing to leave behind
                        flight.handed[key] = handed
        except ButterflyError as e:
            for entry in entries:
                if not entry.future.done():
                    entry.future.set_exception(e)

    async def step(
        self,
        request_id: RequestId,
        step: int,
        start_pos: int,
        x: torch.Tensor,
        route: Lane = (),
        *,
        last_only: bool = True,
    ) -> torch.Tensor:
        """One step down `route` (the plan's chain when empty); a refusal of its input by
        a later node of the route (`RecordMismatch`) is settled by a relay (`relay`).
        `last_only`: the last stage answers the last position only; a speculative verify
        step needs every position's logits (dataplane.speculate)."""
        flight = self._flight
        key = (request_id, step)
        fut: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
        flight.waiting[key] = fut
        flight.rows[key] = 1 if last_only else int(x.shape[1])
        self._queue.append(Entry(request_id, step, start_pos, x, fut, route, last_only))
        self._ready.set()
        refused_by: NodeId | None = None
        nodes = self._route_of(route)
        timed_out = False
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for loses a cancellation (a
            # DELETE /tasks) that lands as the step's answer arrives, and the task runs on
            async with asyncio.timeout(self.timeout):
                return await asyncio.shield(fut)
        except TimeoutError as e:
            with contextlib.suppress(TimeoutError):  # an answer the loop had not read yet
                async with asyncio.timeout(LATE_S):
                    return await asyncio.shield(fut)
            if len(nodes) < 2 or self._theirs(key, nodes):
                raise SendTimeout(
                    f"step {step} of {request_id} got no answer within {self.timeout:.1f} s",
                    blame=None if len(nodes) < 2 else nodes[1],
                ) from e
            timed_out = True  # settled below, once this attempt's bookkeeping is gone
        except StepFailed as e:
            err = e.error
            if err.error_type == RECORD_MISMATCH and e.sender in nodes[1:]:
                refused_by = e.sender  # settled below, once this attempt's bookkeeping is gone
            else:
                raise e.failure(step, nodes) from None
        finally:
            flight.settled(key)
        if timed_out:
            return await self.isolate(request_id, step, start_pos, x, nodes, last_only=last_only)
        assert refused_by is not None  # every other way out of the try returns or raises
        return await self.relay(
            request_id, step, start_pos, x, nodes, nodes.index(refused_by), last_only=last_only
        )

    def _theirs(self, key: tuple[RequestId, int], nodes: tuple[NodeId, ...]) -> bool:
        """Whether a step that timed out down the gateway's own first stage and one other
        node was that node's to answer for: the gateway handed it on with at least half
        the step timeout left. Else it is re-run one node at a time (`isolate`): the
        gateway's own slowness was charged to the other node (a review), while one that
        held back every first attempt and answered the re-run was never charged (the
        next review)."""
        handed = self._flight.handed.get(key)
        return (
            len(nodes) == 2
            and nodes[0] == self.node
            and handed is not None
            and time.monotonic() - handed >= self.timeout / 2
        )

    def _stamp(self, msg: StageStep, first: NodeId, epoch: int) -> StageStep:
        return msg if self._dispatcher is None else self._dispatcher.stamp(msg, first, epoch)

    def _route_of(self, route: Lane) -> tuple[NodeId, ...]:
        plan = self._plan()
        return route or (plan.nodes if plan is not None else ())

    async def relay(
        self,
        request_id: RequestId,
        step: int,
        start: int,
        x: torch.Tensor,
        nodes: tuple[NodeId, ...],
        split: int,
        *,
        last_only: bool = True,
    ) -> torch.Tensor:
        """Re-run a step whose input node `nodes[split]` refused (`RecordMismatch`) with
        the gateway between it and its sender, so the gateway sees the bytes itself.

        The sender's half answers the gateway, which checks the bytes against its signed
        records (a lie convicts the sender: `Intake.on_result`); the gateway then forwards
        those very bytes and records to the receiver. A receiver that refuses them again
        lies, and is convicted. Either way the lie costs its teller, never the honest side."""
        plan = self._plan()
        if plan is None:
            raise StageLost("the stage plan is gone")
        sent = digest(x)
        try:
            out, proofs = await self._half(request_id, step, start, (x, ()), nodes, 0, split, sent)
        except StepFailed as e:  # an earlier node refused its input: relay there instead
            if e.error.error_type == RECORD_MISMATCH and e.sender in nodes[1:split]:
                earlier = nodes.index(e.sender)
                return await self.relay(
                    request_id, step, start, x, nodes, earlier, last_only=last_only
                )
            raise e.failure(step, nodes[:split]) from None
        return await self._tail(
            request_id, step, start, (out, proofs), nodes, split, sent, last_only
        )

    async def isolate(
        self,
        request_id: RequestId,
        step: int,
        start: int,
        x: torch.Tensor,
        nodes: tuple[NodeId, ...],
        *,
        last_only: bool = True,
    ) -> torch.Tensor:
        """Re-run a step that timed out down a chain of several nodes one node at a time,
        each answering the gateway, which forwards its bytes and records to the next: the
        node that withholds it is then the one whose hop times out (`SendTimeout.blame`,
        which the gateway counts against it; the gateway's own hop blames nobody). Down
        the chain, any of them might have held it back, and nobody was charged: a
        withholding middle stage failed every request through it, for ever; and where the
        gateway held the first stage, the time its own stage took counted against the
        other node's (reviews, twenty-first session)."""
        if self._plan() is None:
            raise StageLost("the stage plan is gone")
        sent = digest(x)
        got: tuple[torch.Tensor, tuple[bytes, ...]] = (x, ())
        for i in range(len(nodes) - 1):
            try:
                got = await self._half(request_id, step, start, got, nodes, i, i + 1, sent)
            except StepFailed as e:
                raise e.failure(step, nodes[i : i + 1]) from None
        last = len(nodes) - 1
        return await self._tail(request_id, step, start, got, nodes, last, sent, last_only)

    async def _half(
        self,
        request_id: RequestId,
        step: int,
        start: int,
        got: tuple[torch.Tensor, tuple[bytes, ...]],
        nodes: tuple[NodeId, ...],
        first: int,
        split: int,
        sent: bytes,
    ) -> tuple[torch.Tensor, tuple[bytes, ...]]:
        """Stages [first, split) of a step, `nodes[first:split]` from the input `got`
        (bytes and the records of the stages before), answering the gateway: their output
        and records. `sent`: the digest of what the gateway sent stage 0. A hop that
        times out is blamed on its one node, when it has one."""
        plan = self._plan()
        if plan is None:
            raise StageLost("the stage plan is gone")
        flight, key = self._flight, (request_id, step)
        answer: Relayed = asyncio.get_running_loop().create_future()
        flight.relaying[key] = (answer, split)
        flight.sent(key, plan.epoch, nodes[first:split], sent)  # that half answers
        x, proofs = got
        try:
            msg = StageStep(
                (request_id,),
                (step,),
                (start,),
                (x.shape[1],),
                nodes[first + 1 : split],
                self.node,
                True,
                proofs,
            )
            msg = self._stamp(msg, nodes[first], plan.epoch)
            await self._deliver(nodes[first], msg, encode_tensor(x))
            async with asyncio.timeout(self.timeout):
                return await answer
        except TimeoutError as e:
            blame = nodes[first] if split - first == 1 else None  # the gateway: nobody
            raise SendTimeout(f"relayed step {step} of {request_id}: no answer", blame=blame) from e
        finally:
            flight.settled(key)

    async def _tail(
        self,
        request_id: RequestId,
        step: int,
        start: int,
        got: tuple[torch.Tensor, tuple[bytes, ...]],
        nodes: tuple[NodeId, ...],
        split: int,
        sent: bytes,
        last_only: bool,
    ) -> torch.Tensor:
        """Stages [split, end) of a step, from the output and records `got` of the ones
        before (which the gateway checked), answering as the whole step does."""
        plan = self._plan()
        if plan is None:
            raise StageLost("the stage plan is gone")
        flight, key = self._flight, (request_id, step)
        flight.sent(key, plan.epoch, nodes[split:], sent)  # the receiver's half answers
        receiver = nodes[split]
        second: asyncio.Future[torch.Tensor] = asyncio.get_running_loop().create_future()
        flight.waiting[key] = second
        out, proofs = got
        # the rows its result must hold, as `step` set them (settled since: a relayed
        # verify step answered with one row failed the request: a review)
        flight.rows[key] = 1 if last_only else int(out.shape[1])
        try:
            tail = StageStep(
                (request_id,),
                (step,),
                (start,),
                (out.shape[1],),
                nodes[split + 1 :],
                self.node,
                last_only,
                proofs,
            )
            tail = self._stamp(tail, receiver, plan.epoch)
            await self._deliver(receiver, tail, encode_tensor(out))
            async with asyncio.timeout(self.timeout):
                return await second
        except TimeoutError as e:
            blame = receiver if len(nodes) - split == 1 else None  # the gateway: nobody
            raise SendTimeout(f"relayed step {step} of {request_id}: no answer", blame=blame) from e
        except StepFailed as e:
            if e.error.error_type == RECORD_MISMATCH and e.sender == receiver:
                reason = (
                    f"refused bytes the gateway checked against their records: {e.error.message}"
                )
                await self._on_liars((receiver,), reason)
                raise StageLost(f"node {receiver} {reason}") from None
            raise e.failure(step, nodes[split:]) from None
        finally:
            flight.settled(key)
