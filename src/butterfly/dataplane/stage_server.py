"""The node side of the data path: hold one stage, run steps, forward the activations.

Steps travel as a chain: the gateway sends a step to the first stage's node, each node
computes and sends the result straight to the next node of the route, and the last one
answers the gateway. For N stages that is N + 1 hops per token, against 2N when every
activation returns through the gateway.

Torch runs on one worker thread per node, so the event loop (votes, other requests'
frames) never waits behind a long forward pass (a prefill, an audit). Decode steps of a
few tokens run on the event loop itself when the worker is idle: the hand-off to the
worker and back cost two thread wake-ups per stage and token, more than the few
milliseconds the loop then waits (see docs/PERFORMANCE-LOG.md). Heartbeats have threads of
their own (control.heartbeats), so neither delays them.

KV caches are bounded whatever the gateway does (`kv_table.KvTable`): a request whose
cache was evicted gets a retriable error on its next step naming why, and the gateway
replays it from its token history.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import torch

from butterfly.dataplane.kv_table import CACHE_TTL_S, MAX_CACHES, KvTable
from butterfly.dataplane.proving import Prover, check_records, decode_proofs, route_signers
from butterfly.dataplane.received import Received
from butterfly.net.framing import Envelope
from butterfly.protocol.dispatch import Refusal, Serials, dispatched
from butterfly.runtime.kvcache import KVCache
from butterfly.runtime.linear import timed_on_threads
from butterfly.runtime.loader import load_stage
from butterfly.runtime.precision import FP32, Precision
from butterfly.runtime.stage import (
    Stage,
    forward_floats,
    forward_packed,
    forward_rows,
    packs,
    prefill_outputs,
)
from butterfly.runtime.torch_thread import TorchThread, single_threaded
from butterfly.runtime.wire import WireTensor, decode_tensor, encode_tensor, read_tensor
from butterfly.types.errors import ButterflyError, InvalidMessage, StageLost
from butterfly.types.ids import Epoch, NodeId, RequestId, StageIndex
from butterfly.types.model import LayerRange
from butterfly.types.plan import StagePlan
from butterfly.types.wire.control import PlanAck, PlanAssign
from butterfly.types.wire.data import (
    AuditReply,
    AuditRequest,
    CacheLengths,
    CacheQuery,
    InputsHeld,
    InputsQuery,
    KvAppend,
    StageStep,
    StepError,
    StepResult,
)
from butterfly.types.wire.frames import Message

log = logging.getLogger(__name__)


def _prefill_groups(
    request_ids: tuple[RequestId, ...], lengths: tuple[int, ...]
) -> list[list[int]]:
    """Indices of the multi-token entries, grouped by length: a group runs as one batch of
    rows (one set of matrix products for all of them; a short prefill costs mostly fixed
    per-operation overhead, 2.3x per request one by one against four at once). A request
    named twice in a step (a replay next to a stale entry) keeps every entry on its own,
    in order, as each must see the cache the one before it left."""
    multi = [i for i, length in enumerate(lengths) if length > 1]
    if len(set(request_ids)) < len(request_ids):
        return [[i] for i in multi]
    groups: dict[int, list[int]] = {}
    for i in multi:
        groups.setdefault(lengths[i], []).append(i)
    return list(groups.values())


EARLY_STEP_WAIT_S = 10.0
"""How long a step for an epoch this node has not reached waits for that plan."""


@dataclass(frozen=True)
class Outbound:
    """A message for the node's dispatcher to deliver (to a peer, or to itself)."""

    peer: NodeId
    msg: Message
    payload: bytes = b""


class StageServer:
    def __init__(
        self,
        *,
        node: NodeId,
        model_dir: Path,
        max_tensor_bytes: int,
        torch_thread: TorchThread,
        precision: Precision = FP32,
        prover: Prover | None = None,
        snapshot_every: int = 0,
        keep_outputs: bool = False,
        max_caches: int = MAX_CACHES,
        cache_ttl_s: float = CACHE_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`torch_thread`: the process's one thread for torch (runtime.torch_thread).
        `precision`: model.dtype and model.quantization, what the stage computes in.
        `snapshot_every`: tokens between KV-cache copies sent to the
        standbys of this node's range (0: never). `keep_outputs`: keep what this stage
        computed for each request until it is released (`outputs_of`), on the gateway,
        whose own stage the audit takes as computed instead of asking a replica to re-run
        it. `max_caches`, `cache_ttl_s`: the bounds on KV caches (resources.max_kv_caches,
        resources.kv_cache_ttl_s), timed by `clock`."""
        self.prover = prover
        self._keep_outputs = keep_outputs
        # a liar (butterfly.testing) changes its output as a tensor, in `tamper`
        self._plain_output = not keep_outputs and type(self).tamper is StageServer.tamper
        self._snapshot_every = snapshot_every
        self._plan_changed = asyncio.Event()
        self.node, self.model_dir = node, model_dir
        self._max_tensor_bytes, self._precision = max_tensor_bytes, precision
        self._torch = torch_thread
        self.stage: Stage | None = None
        self.plan: StagePlan | None = None
        self.table = KvTable(node, max_caches=max_caches, ttl_s=cache_ttl_s, clock=clock)
        # what it computed on, for a dispute over who sent what (dataplane.received)
        self.received = Received(max_caches, cache_ttl_s, clock)
        self._cache_ttl_s = cache_ttl_s
        self._serials = Serials()

    @property
    def caches(self) -> dict[RequestId, KVCache | None]:
        """Each request's KV cache (None: the stage keeps none)."""
        return self.table.caches

    @property
    def epoch(self) -> Epoch:
        return self.plan.epoch if self.plan else Epoch(0)

    def current_epoch(self) -> Epoch:
        """`epoch` as a callable, for the parts that stamp it on what they send."""
        return self.epoch

    def current_plan(self) -> StagePlan | None:
        """The plan in force here, as a callable, for the parts that read it per step."""
        return self.plan

    @property
    def kv_bytes(self) -> int:
        return self.kv_usage()[1]

    def kv_usage(self) -> tuple[int, int]:
        """(caches, bytes) held (`KvTable.usage`: safe from a metrics scrape's thread)."""
        return self.table.usage()

    def stage_index(self) -> int | None:
        """The chain position of the range this node holds, or None when it holds none."""
        return self._index_of(self.stage.layers) if self.stage is not None else None

    async def apply_plan(self, msg: PlanAssign) -> PlanAck:
        try:
            plan = StagePlan.from_message(msg)
            if self.plan is not None and plan.epoch < self.plan.epoch:
                raise InvalidMessage(
                    f"plan of epoch {plan.epoch} is stale: node {self.node} is at {self.plan.epoch}"
                )
            layers = plan.layers_of(self.node)
            stage = self.stage if layers is not None else None
            if layers is not None and (self.stage is None or self.stage.layers != layers):

                def load() -> Stage:  # one thread: every survivor of a failure loads at once
                    with timed_on_threads(torch.get_num_threads()), single_threaded():
                        return load_stage(self.model_dir, layers, precision=self._precision)

                stage = await self._torch.run(load)
            # the switch, with no await in it: steps meanwhile ran on the old stage and
            # caches. Caches of other layers are useless (same layers keep theirs), and a
            # plan skipped (this node was out: frozen, cut off) means its requests moved
            # on without it and their releases never reached it: its caches are stale
            missed = self.plan is not None and plan.epoch > self.plan.epoch + 1
            if self.stage is None or layers is None or self.stage.layers != layers or missed:
                self.table.drop_all(f"the plan of epoch {plan.epoch} moved this node's layers")
            self.stage, self.plan = stage, plan
            self._plan_changed.set()
            self._plan_changed = asyncio.Event()
            log.info("node %s: epoch %s, layers %s", self.node, plan.epoch, layers)
            return PlanAck(msg.epoch, self.node, True, "")
        except ButterflyError as e:
            log.error("node %s cannot apply the plan of epoch %s: %s", self.node, msg.epoch, e)
            return PlanAck(msg.epoch, self.node, False, str(e))

    async def _plan_of(self, epoch: int) -> None:
        """Wait (bounded) for the plan of `epoch`: the gateway switches to an agreed plan
        as soon as it has applied it and may be a step ahead of this node."""
        deadline = asyncio.get_running_loop().time() + EARLY_STEP_WAIT_S
        while self.epoch < epoch:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return
            changed = self._plan_changed
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await changed.wait()

    async def plan_of(self, epoch: int) -> StagePlan | None:
        """The plan in force once this node has reached `epoch` (a bounded wait, as for
        a step), for judging a message by the plan it was sent under. A node that holds
        no plan yet waits too: one the first plan left idle is sent the next plan's
        first steps as soon as the gateway has it, and judged by no plan it dropped
        them unanswered, to be timed out a minute later (5 nodes, 4 layers)."""
        if epoch > self.epoch:
            await self._plan_of(epoch)
        return self.plan

    def release(self, request_id: RequestId) -> None:
        self.table.release(request_id)
        self.received.release(request_id)

    def expire(self) -> int:
        """Drop the caches idle longer than the TTL; how many went (`KvTable.expire`)."""
        self.received.expire()
        return self.table.expire()

    async def expire_idle(self, every_s: float | None = None) -> None:
        """`expire` for ever, every half TTL and at least once a minute (`every_s`): the
        TTL was checked only when a new request came, so a node that got none (out of
        the plan, its gateway gone) held an abandoned cache for ever (a review)."""
        while True:
            await asyncio.sleep(every_s or min(self._cache_ttl_s / 2, 60.0))
            if gone := self.expire():
                log.info("node %s: %d idle KV cache(s) dropped", self.node, gone)

    def outputs_of(
        self, request_id: RequestId, layers: LayerRange, length: int
    ) -> torch.Tensor | None:
        """This stage's outputs for positions [0, length) of the request, as it computed
        them, or None when it did not compute all of them (another node did some after a
        recovery, or `keep_outputs` is off)."""
        if self.stage is None or self.stage.layers != layers:
            return None
        return self.table.outputs(request_id, length)

    def retune(self, *, snapshot_every: int) -> None:
        """A changed coordination.checkpoint_frequency: the next copy waits for this many
        positions (0: no more copies)."""
        self._snapshot_every = snapshot_every

    def kv_deltas(self, request_ids: tuple[RequestId, ...]) -> list[Outbound]:
        """The KV positions these requests gained since the last copy, for each standby of
        this node's range, once `snapshot_every` positions have built up. Called on the
        event loop right after a step: the request's next step cannot be running yet (it
        needs the token this step leads to), so its cache is still."""
        plan, stage = self.plan, self.stage
        if not self._snapshot_every or plan is None or stage is None:
            return []
        if self.node not in plan.nodes:
            return []
        standbys = [n for n in plan.holders(stage.layers) if n != self.node]
        out: list[Outbound] = []
        for rid in dict.fromkeys(request_ids):
            cache = self.caches.get(rid)
            if cache is None or not standbys:
                continue
            shipped = self.table.to_ship(rid, cache.length)
            if cache.length - shipped < self._snapshot_every:
                continue
            payload = encode_tensor(cache.rows(shipped, cache.length))
            msg = KvAppend(rid, stage.layers.start, stage.layers.end, shipped)
            out.extend(Outbound(n, msg, payload) for n in standbys)
            self.table.mark_shipped(rid, cache.length)
        return out

    def on_kv_append(self, msg: KvAppend, payload: bytes) -> str:
        """A chain node's copy of its cache, kept should this node take its stage over;
        why it was refused ("": taken, or of no use here). Never into a cache a step here
        computed on: the chain node wrote its rows into the cache this node was computing
        a request with (its replicate lane, or steps routed around the chain node), and
        the lanes agreed on its poison, or the standby was convicted for it (a review)."""
        stage = self.stage
        if stage is None or (stage.layers.start, stage.layers.end) != (
            msg.layer_start,
            msg.layer_end,
        ):
            return ""  # the plan moved on; the copy is of no use here
        if self.table.own(msg.request_id):
            why = f"node {self.node} computes request {msg.request_id} itself"
            log.warning("KV copy of %s refused: %s", msg.request_id, why)
            return why
        cache = self.caches.get(msg.request_id)
        if cache is None:
            if msg.start != 0:
                return ""
            if not self.table.room_for_copy(msg.request_id):
                return f"node {self.node} holds no room for copies beside its own caches"
            cache = stage.new_cache()
            if cache is None:
                return ""
        if msg.start > cache.length:
            log.warning("KV copy of %s leaves a gap at %d", msg.request_id, cache.length)
            return f"the copy leaves a gap at position {cache.length}"
        try:  # a cache a step made is an inference tensor: written to only in that mode
            with torch.inference_mode():
                cache.write(msg.start, decode_tensor(payload, self._max_tensor_bytes))
        except ButterflyError as e:
            log.warning("KV copy of %s refused: %s", msg.request_id, e)
            return str(e)
        self.table.put_copy(msg.request_id, cache, self.epoch)
        return ""

    def cache_lengths(self, query: CacheQuery) -> CacheLengths:
        return CacheLengths(query.request_ids, self.table.lengths(query.request_ids))

    def admit(
        self,
        msg: StageStep,
        peer: NodeId,
        gateway: NodeId,
        gateways: Collection[NodeId],
        epoch: int,
    ) -> tuple[NodeId, ...] | Refusal:
        """Where this node checks records (it proves its work), the route the acting
        gateway dispatched `msg` on, from `peer` (protocol.dispatch), each request newer
        than the last this node ran; else why it may not run. Elsewhere, ()."""
        prover = self.prover
        if prover is None:
            return ()
        ticket = dispatched(
            msg,
            peer=peer,
            me=self.node,
            gateway=gateway,
            gateways=gateways,
            keys=prover.keys,
            epoch=epoch,
        )
        if isinstance(ticket, Refusal):
            return ticket
        stale = self._serials.stale(ticket)
        if stale is not None:  # the gateway is told: a replay, or its clock went back
            why = f"{stale} ran here under a later dispatch of node {ticket.sender}"
            return Refusal(why, ticket.sender)
        self._serials.ran(ticket)
        return ticket.route

    async def on_step(self, env: Envelope, route: tuple[NodeId, ...] = ()) -> Outbound:
        """Compute a step; the result goes on along the route, or errors to the gateway.
        `route`: the whole route the gateway dispatched it on (`admit`), which names who
        signs each earlier stage's record."""
        msg = env.msg
        if not isinstance(msg, StageStep):
            raise TypeError(f"on_step got {msg.kind}")
        try:
            out, proofs = await self.compute(msg, env.epoch, env.payload, route)
        except Exception as e:  # a peer's bad tensor must cost it an error, not us the node
            err = e if isinstance(e, ButterflyError) else InvalidMessage(f"step failed: {e}")
            log.warning("node %s: step of %s failed: %s", self.node, msg.request_ids, e)
            error = StepError(
                msg.request_ids, msg.steps, self.node, err.kind, str(err), err.retriable
            )
            return Outbound(msg.reply_to, error)
        if msg.route:
            nxt = StageStep(
                msg.request_ids,
                msg.steps,
                msg.starts,
                msg.lengths,
                msg.route[1:],
                msg.reply_to,
                msg.last_only,
                msg.proofs + proofs,
                msg.trace,  # every stage step is a child of the request's span
                msg.dispatch,  # the gateway's word for the whole route
            )
            return Outbound(msg.route[0], nxt, out)
        widths = () if msg.last_only else msg.lengths  # a verify step: every position
        result = StepResult(msg.request_ids, msg.steps, self.node, msg.proofs + proofs, widths)
        return Outbound(msg.reply_to, result, out)

    def _check_step(self, msg: StageStep, epoch: int, shape: tuple[int, ...]) -> Stage:
        stage = self.stage
        if stage is None or self.plan is None:
            raise InvalidMessage(f"node {self.node} holds no stage (epoch {self.epoch})")
        if epoch > self.plan.epoch:  # the gateway switched first; this node's plan is coming
            raise StageLost(
                f"step for epoch {epoch} early: node {self.node} is still at epoch "
                f"{self.plan.epoch}; retry once the plan is in force"
            )
        if epoch != self.plan.epoch:  # sent before the plan moved on: the request resumes
            raise StageLost(
                f"step for epoch {epoch} refused: node {self.node} is at epoch {self.plan.epoch}"
            )
        n = len(msg.request_ids)
        if not n or not len(msg.steps) == len(msg.starts) == len(msg.lengths) == n:
            raise InvalidMessage("step entries do not line up (ids, steps, starts, lengths)")
        if min(msg.lengths) < 1 or min(msg.starts) < 0 or len(shape) < 2 or shape[0] != 1:
            raise InvalidMessage("step lengths must be >= 1, starts >= 0, input [1, tokens, ...]")
        if sum(msg.lengths) != shape[1]:
            raise InvalidMessage(f"step covers {sum(msg.lengths)} tokens, input has {shape[1]}")
        ids = stage.is_first and stage.input_kind == "tokens"
        if len(shape) != (2 if ids else 3):  # a sender's misshapen tensor: torch would broadcast it
            want = "[1, tokens] token ids" if ids else "[1, tokens, hidden] activations"
            raise InvalidMessage(f"stage {stage.layers} takes {want}, got shape {list(shape)}")
        return stage

    async def compute(
        self, msg: StageStep, epoch: int, payload: bytes, route: tuple[NodeId, ...] = ()
    ) -> tuple[bytes, tuple[bytes, ...]]:
        """Run a batch of steps on this node's stage: the encoded output, and a signed
        record per entry when this node proves its work.

        Entries of different lengths (a prompt's chunk beside decode steps) run as one
        packed sequence where the family can (`runtime.stage.packs`); otherwise
        single-token entries (decode steps) run as one batch and longer ones (prefills) as
        one batch per length. Outputs are laid side by side in the entries' order.
        """
        await self.plan_of(epoch)
        wire = read_tensor(payload, self._max_tensor_bytes)
        stage = self._check_step(msg, epoch, wire.shape)
        prove = self.prover is not None
        offsets = [sum(msg.lengths[:i]) for i in range(len(msg.lengths))]
        # the chain position of the range held: a replica's records (replicate mode's
        # lanes) name the stage they stand for (a negative index would not even decode)
        index = StageIndex(self._index_of(stage.layers))
        if prove:  # before any cache is touched: a refused step must leave them as they are
            self._check_input(msg, epoch, wire.tensor(), offsets, index, route)
        caches = [  # each cut back to its start: a re-run after recovery recomputes from there
            self.table.cache_for(rid, start, msg.request_ids, stage.new_cache, epoch)
            for rid, start in zip(msg.request_ids, msg.starts, strict=True)
        ]
        # a step's kind is its row count, rounded up to a power of two: a tiny step may run
        # inline (TorchThread.run), decided per kind once both paths are timed; keyed by
        # (entries, rows) as before, 16 concurrent requests of mixed prompt lengths made
        # so many kinds that 60-75% of steps were a kind's first runs, on the worker
        kind = ("step", 1 << (wire.shape[1] - 1).bit_length())
        if self._plain_output and not prove and max(msg.lengths) == 1:
            # decode steps on the wire's bytes (runtime.stage.forward_floats), where
            # nothing else wants the output as a tensor: records to sign, outputs to
            # keep, a liar's `tamper`; set up before anything the tensor path needs
            # (measured per hop: every line runs on caches another process flushed)
            def floats() -> bytes:
                encoded = forward_floats(stage, wire, caches, msg.starts)
                if encoded is not None:
                    return encoded
                return encode_tensor(self._tensors(stage, msg, wire.tensor(), caches))

            encoded = await self._torch.run(floats, kind)
            self._still_at(epoch, msg)
            return encoded, ()
        return await self._compute_tensors(
            msg, epoch, wire, stage, caches, kind, prove, offsets, index
        )

    def _still_at(self, epoch: int, msg: StageStep) -> None:
        """Refuse to send on a step whose plan this node left while it computed. Its
        records are signed under `epoch`, the one it was checked under, but the envelope
        the transport stamps says the node's epoch, by whose plan the next node would
        judge it (and the output may be of layers this node no longer holds); a gateway
        still switching convicted such an honest node of signing no record for the
        step's epoch (a review). Lost instead, the step is replayed, nobody blamed.
        Nothing awaits between this check and the send (over an open connection), so
        whatever goes on says `epoch` throughout."""
        if self.epoch != epoch:
            raise StageLost(
                f"steps {list(msg.steps)} of epoch {epoch}: node {self.node} took up the "
                f"plan of epoch {self.epoch} while they computed; retry on that plan"
            )

    def _tensors(
        self, stage: Stage, msg: StageStep, x: torch.Tensor, caches: list[KVCache | None]
    ) -> torch.Tensor:
        """A plain decode step's output on torch, where its bytes path does not run."""
        with torch.inference_mode():
            rows = x.reshape(len(caches), 1, *x.shape[2:])
            batch = forward_rows(stage, rows, caches, msg.starts, last_only=msg.last_only)
            return batch.reshape(1, len(caches), *batch.shape[2:])

    async def _compute_tensors(
        self,
        msg: StageStep,
        epoch: int,
        wire: WireTensor,
        stage: Stage,
        caches: list[KVCache | None],
        kind: tuple[str, int],
        prove: bool,
        offsets: list[int],
        index: StageIndex,
    ) -> tuple[bytes, tuple[bytes, ...]]:
        """`compute` on torch tensors: prefills, signed records, kept outputs, all under
        `epoch`, the epoch the step was checked under."""
        x = wire.tensor()
        n = len(caches)
        traces: list[list[torch.Tensor]] = [[] for _ in range(n)]

        def tensors() -> torch.Tensor:
            if packs(stage, msg.request_ids, msg.lengths):  # one read of the weights for all
                kept: list[torch.Tensor] | None = [] if prove else None
                with torch.inference_mode():
                    out = forward_packed(
                        stage,
                        x,
                        caches,
                        msg.starts,
                        msg.lengths,
                        last_only=msg.last_only,
                        trace=kept,
                    )
                for i, (at, length) in enumerate(zip(offsets, msg.lengths, strict=True)):
                    traces[i] = [t[:, at : at + length] for t in kept or ()]
                return out
            single = [i for i, length in enumerate(msg.lengths) if length == 1]
            if len(single) == n and not prove:  # decode steps only: x's rows as they lie
                return self._tensors(stage, msg, x, caches)
            outs: list[torch.Tensor | None] = [None] * n
            with torch.inference_mode():
                if single:
                    trace: list[torch.Tensor] | None = [] if prove else None
                    rows = torch.cat([x[:, offsets[i] : offsets[i] + 1] for i in single])
                    batch = forward_rows(
                        stage,
                        rows,
                        [caches[i] for i in single],
                        [msg.starts[i] for i in single],
                        last_only=msg.last_only,
                        trace=trace,
                    )
                    for j, i in enumerate(single):
                        outs[i] = batch[j : j + 1]
                        traces[i] = [t[j : j + 1] for t in trace or ()]
                for group in _prefill_groups(msg.request_ids, msg.lengths):
                    length = msg.lengths[group[0]]
                    trace = [] if prove else None
                    rows = torch.cat([x[:, offsets[i] : offsets[i] + length] for i in group])
                    batch = forward_rows(
                        stage,
                        rows,
                        [caches[i] for i in group],
                        [msg.starts[i] for i in group],
                        last_only=msg.last_only,
                        trace=trace,
                    )
                    for j, i in enumerate(group):
                        outs[i] = batch[j : j + 1]
                        traces[i] = [t[j : j + 1] for t in trace or ()]
            return torch.cat([o for o in outs if o is not None], dim=1)

        out = await self._torch.run(tensors, kind)
        self._still_at(epoch, msg)
        sent = self.tamper(out)
        if prove:  # the rows that crossed, for a dispute over them (dataplane.received)
            for rid, step, at, length in zip(
                msg.request_ids, msg.steps, offsets, msg.lengths, strict=True
            ):
                self.received.keep(rid, epoch, step, x[:, at : at + length], sent=False)
                if not stage.is_last:  # every row goes on, at the input's offsets
                    rows = sent[:, at : at + length]
                    self.received.keep(rid, epoch, step, rows, sent=True)
        if self._keep_outputs and not (msg.last_only and stage.is_last):
            self.table.keep(msg.request_ids, msg.starts, msg.lengths, sent, offsets)
        proofs: tuple[bytes, ...] = ()
        if prove:
            proofs = self._sign(msg, epoch, index, stage.layers, x, sent, offsets, traces)
        return encode_tensor(sent), proofs

    def _index_of(self, layers: LayerRange) -> int:
        plan = self.plan
        return (plan.position_of(layers) or 0) if plan else 0

    def _check_input(
        self,
        msg: StageStep,
        epoch: int,
        x: torch.Tensor,
        offsets: list[int],
        index: StageIndex,
        route: tuple[NodeId, ...],
    ) -> None:
        """Refuse, before computing, any entry whose bytes the earlier stages' signed
        records do not vouch for (dataplane.proving.check_records): computing on them
        would make this node sign what its sender may deny having sent."""
        plan, prover = self.plan, self.prover
        if not index or plan is None or prover is None:
            return  # the first stage's input is the gateway's own tokens
        proofs = list(decode_proofs(msg.proofs))
        # the dispatched route names who signs the stages it covers (this node at `index`)
        first = index - route.index(self.node) if self.node in route else index
        signers = route_signers(route, first, lambda j: plan.holders(plan.stages[j][1]))
        for i, (rid, step) in enumerate(zip(msg.request_ids, msg.steps, strict=True)):
            check_records(
                proofs,
                keys=prover.keys,
                request_id=rid,
                step=step,
                upto=index,
                received=x[:, offsets[i] : offsets[i] + msg.lengths[i]],
                signers=signers,
                epoch=epoch,
                described=True,
            )

    def _sign(
        self,
        msg: StageStep,
        epoch: int,
        index: StageIndex,
        layers: LayerRange,
        x: torch.Tensor,
        out: torch.Tensor,
        offsets: list[int],
        traces: list[list[torch.Tensor]],
    ) -> tuple[bytes, ...]:
        assert self.prover is not None
        records = []
        at = 0
        for i, (rid, step) in enumerate(zip(msg.request_ids, msg.steps, strict=True)):
            width = (
                1
                if msg.last_only and self.stage is not None and self.stage.is_last
                else (msg.lengths[i])
            )
            records.append(
                self.prover.prove(
                    epoch=Epoch(epoch),
                    request_id=rid,
                    step=step,
                    stage=index,
                    layers=layers,
                    x_in=x[:, offsets[i] : offsets[i] + msg.lengths[i]],
                    out=out[:, at : at + width],
                    layer_outputs=traces[i],
                )
            )
            at += width
        return tuple(records)

    def tamper(self, out: torch.Tensor) -> torch.Tensor:
        """What this node computed, as it signs and sends it; honest nodes change
        nothing. Faulty stage servers in `butterfly.testing` override this to lie, and
        `sign` and `send` to lie otherwise (sign one tensor, send another; omit records)."""
        return out

    async def audit(self, msg: AuditRequest, payload: bytes) -> tuple[AuditReply, bytes]:
        """Re-run a whole sequence through this stage as one prefill, with a fresh cache,
        on one thread (it is CPU the audit's target counts, and latency it does not)."""
        stage = self.stage
        if stage is None or (stage.layers.start, stage.layers.end) != (
            msg.layer_start,
            msg.layer_end,
        ):
            return AuditReply(msg.request_id, self.node, "this node holds other layers"), b""
        try:
            x = decode_tensor(payload, self._max_tensor_bytes)
            cache = stage.new_cache()

            def run() -> torch.Tensor:
                with torch.inference_mode(), single_threaded():
                    return prefill_outputs(stage, x, cache, outputs_from=msg.outputs_from)

            out = self.tamper(await self._torch.run(run))
        except Exception as e:  # a bad audit input costs the sender an error, not the node
            return AuditReply(msg.request_id, self.node, f"audit failed: {e}"), b""
        return AuditReply(msg.request_id, self.node, ""), encode_tensor(out)

    def inputs_held(self, msg: InputsQuery, payload: bytes = b"") -> tuple[InputsHeld, bytes]:
        """The rows this node computed on for the asked steps, as it received them, or
        those it sent on (`msg.sent`)."""
        held = self.received.held(msg.request_id, msg.epoch, msg.steps, sent=msg.sent)
        if not held:
            return InputsHeld(msg.request_id, self.node, (), ()), b""
        steps = tuple(s for s, _ in held)
        lengths = tuple(int(rows.shape[1]) for _, rows in held)
        rows = torch.cat([r for _, r in held], dim=1)
        return InputsHeld(msg.request_id, self.node, steps, lengths), encode_tensor(rows)

    def close(self) -> None:
        self._torch.close()
