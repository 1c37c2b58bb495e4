"""Faulty stage servers: a node composed with one of these lies in a specific way.

They are whole parts, swapped in by composition (`build_node(..., stage_server_type=...)`),
never switches inside the production types. Each signs exactly what it sends (a liar
holding its own key signs whatever it likes, and the checks must hold either way), except
the ones whose lie is precisely the gap between the two: `SignHonestSendCorrupt` signs
its honest output and sends another, `HonestFingerprint` signs the hash of what it sends
beside a fingerprint of its honest output, `OmitRecords` leaves its records out of the
steps it lies on.
"""

from __future__ import annotations

import asyncio
import contextvars
from dataclasses import replace
from typing import ClassVar

import torch

from butterfly.dataplane.proving import RecordMismatch
from butterfly.dataplane.stage_server import Outbound, StageServer
from butterfly.net.framing import Envelope
from butterfly.protocol.sign import sign_message
from butterfly.runtime.kvcache import KVCache
from butterfly.runtime.linear import Int8Weight
from butterfly.runtime.native import BlockedWeight
from butterfly.runtime.stage import Stage
from butterfly.runtime.wire import WireTensor, decode_tensor, encode_tensor, read_tensor
from butterfly.types.errors import InvalidInput
from butterfly.types.ids import NodeId, RequestId, StageIndex
from butterfly.types.model import LayerRange
from butterfly.types.wire.agreement import Proof, decode, encode
from butterfly.types.wire.control import PlanAck, PlanAssign
from butterfly.types.wire.data import AuditReply, AuditRequest, StageStep


class CorruptStageServer(StageServer):
    """Perturbs every activation it sends."""

    def tamper(self, out: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(self.node))
        return out + 0.5 * torch.randn(out.shape, generator=g, dtype=out.dtype)


def skew(out: torch.Tensor) -> torch.Tensor:
    """`out` with each row's runner-up pushed far above its top entry: logits that make
    another token win, or activations that send the next stage elsewhere."""
    rows = out.reshape(-1, out.shape[-1]).clone()
    runner_up = rows.topk(min(2, rows.shape[-1]), dim=-1).indices[:, -1]
    rows[torch.arange(rows.shape[0]), runner_up] += 100.0 + rows.abs().max()
    return rows.reshape(out.shape)


class SignHonestSendCorruptStageServer(StageServer):
    """Signs the records of its honest output, then sends `skew`ed bytes in their place
    (as last stage: logits favouring another token; as a middle stage: activations)."""

    async def compute(
        self, msg: StageStep, epoch: int, payload: bytes, route: tuple[NodeId, ...] = ()
    ) -> tuple[bytes, tuple[bytes, ...]]:
        sent, proofs = await super().compute(msg, epoch, payload, route)
        return encode_tensor(skew(decode_tensor(sent))), proofs


_lying: contextvars.ContextVar[bool] = contextvars.ContextVar("lying", default=False)


class _SometimesLying(StageServer):
    """Skews its output (and signs what it sends) on the steps `lies_on` picks; the
    choice holds for one step's task only (a context variable, not shared state)."""

    def lies_on(self, msg: StageStep) -> bool:
        return False  # the subclasses pick their steps

    def tamper(self, out: torch.Tensor) -> torch.Tensor:
        return skew(out) if _lying.get() else out

    async def compute(
        self, msg: StageStep, epoch: int, payload: bytes, route: tuple[NodeId, ...] = ()
    ) -> tuple[bytes, tuple[bytes, ...]]:
        token = _lying.set(self.lies_on(msg))
        try:
            return await super().compute(msg, epoch, payload, route)
        finally:
            _lying.reset(token)


class UncopiedStageServer(_SometimesLying):
    """Skews (and signs) everything it sends, and copies no KV cache to its standbys,
    which nothing obliges a liar to do: when it fails, the standby that takes its stage
    holds nothing of a request, which replays from position 0."""

    def lies_on(self, msg: StageStep) -> bool:
        return True

    def kv_deltas(self, request_ids: tuple[RequestId, ...]) -> list[Outbound]:
        return []


class OmitRecordsStageServer(_SometimesLying):
    """Honest with a signed record on prefills; lies on every decode step and sends no
    record of it."""

    def lies_on(self, msg: StageStep) -> bool:
        return max(msg.lengths) == 1

    async def compute(
        self, msg: StageStep, epoch: int, payload: bytes, route: tuple[NodeId, ...] = ()
    ) -> tuple[bytes, tuple[bytes, ...]]:
        sent, proofs = await super().compute(msg, epoch, payload, route)
        return sent, (() if self.lies_on(msg) else proofs)


class IntermittentStageServer(_SometimesLying):
    """Honest, but every `every`-th step it lies, signing the lie."""

    every = 3

    def lies_on(self, msg: StageStep) -> bool:
        return any(step % self.every == 0 for step in msg.steps)


class ColludingStageServer(_SometimesLying):
    """Always sends `skew`ed outputs and signs them; every node composed with it tells
    the very same lie, so `f` of them agree with each other (auditing each other's
    work, or as disjoint replicate lanes)."""

    def lies_on(self, msg: StageStep) -> bool:
        return True

    async def audit(self, msg: AuditRequest, payload: bytes) -> tuple[AuditReply, bytes]:
        token = _lying.set(True)
        try:
            return await super().audit(msg, payload)
        finally:
            _lying.reset(token)


_honest: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
    "honest", default=None
)


class HonestFingerprintStageServer(_SometimesLying):
    """Sends `skew`ed bytes and signs them (each record's hashes are of what it sends),
    but each record's fingerprint is of its honest output: what an audit compares, so
    unless a receiver holds the fingerprint to the bytes, the audit passes the lie."""

    def lies_on(self, msg: StageStep) -> bool:
        return True

    def tamper(self, out: torch.Tensor) -> torch.Tensor:
        _honest.set(out)
        return super().tamper(out)

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
        signed = super()._sign(msg, epoch, index, layers, x, out, offsets, traces)
        honest = _honest.get()
        if honest is None or self.prover is None:
            return signed
        of_honest = super()._sign(msg, epoch, index, layers, x, honest, offsets, traces)
        swapped = []
        for sent, fair in zip(signed, of_honest, strict=True):
            record, fair_record = decode(sent), decode(fair)
            assert isinstance(record, Proof) and isinstance(fair_record, Proof)
            lie = replace(record, fingerprint=fair_record.fingerprint)
            swapped.append(encode(sign_message(lie, self.prover.key)))
        return tuple(swapped)


def raise_hidden_runner_up(out: torch.Tensor) -> torch.Tensor:
    """`out` with, in each row whose largest-magnitude entry is negative, another entry
    raised above the row's largest (positive) one but still below that magnitude: logits
    that make another token win where a fingerprint of the single largest entry does not
    show it."""
    rows = out.reshape(-1, out.shape[-1]).clone()
    for row in rows:
        big, top = float(row.abs().max()), int(row.argmax())
        if float(row[top]) >= big or row.numel() < 3:
            continue
        others = row.clone()
        others[top], others[int(row.abs().argmax())] = -float("inf"), -float("inf")
        row[int(others.argmax())] = (float(row[top]) + big) / 2
    return rows.reshape(out.shape)


class SignsShape(StageServer):
    """Signs its records in the fingerprint shape `sign_k` values per `sign_chunk`
    positions (None: the cluster's), whatever the cluster agreed."""

    sign_k: ClassVar[int | None] = None
    sign_chunk: ClassVar[int | None] = None

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
        if self.prover is not None:
            k, chunk = self.sign_k or self.prover.k, self.sign_chunk or self.prover.chunk
            self.prover = replace(self.prover, k=k, chunk=chunk)
        return super()._sign(msg, epoch, index, layers, x, out, offsets, traces)


class WeakFingerprintStageServer(SignsShape):
    """Signs fingerprints of one value per position (k = 1, not the cluster's top-k) and,
    as the last stage, `raise_hidden_runner_up`s its logits: another greedy token, signed
    exactly as sent, that the one value fingerprinted does not show (found by a review,
    where every such answer came back marked verified); elsewhere it halves all but each
    position's largest activation (a review: its honest next stage was evicted)."""

    sign_k = 1

    def tamper(self, out: torch.Tensor) -> torch.Tensor:
        if self.stage is not None and self.stage.is_last:
            return raise_hidden_runner_up(out)
        rows = out.reshape(-1, out.shape[-1]).clone()  # elsewhere: all but the largest halved
        top = rows.abs().argmax(dim=-1, keepdim=True)
        kept = rows.gather(-1, top)
        return (rows * 0.5).scatter(-1, top, kept).reshape(out.shape)


class WeakUncopiedStageServer(WeakFingerprintStageServer):
    """A `WeakFingerprintStageServer` that copies no KV cache to its standbys: when it
    fails, the request replays from 0, and every step it lied on is superseded."""

    def kv_deltas(self, request_ids: tuple[RequestId, ...]) -> list[Outbound]:
        return []


def pinned_only(rows: torch.Tensor, k: int) -> torch.Tensor:
    """`rows` with all but each row's k largest values (by magnitude: all a fingerprint
    of k pins) halved."""
    flat = rows.reshape(-1, rows.shape[-1])
    top = flat.abs().topk(min(k, flat.shape[-1]), dim=-1).indices
    return (flat * 0.5).scatter(-1, top, flat.gather(-1, top)).reshape(rows.shape)


class BelowFingerprintStageServer(StageServer):
    """Sends its output `pinned_only`, short of the last stage, and signs exactly that in
    the cluster's fingerprint shape: its records match every honest re-run, and the
    honest next stage, which computed on the lie, contradicted the audit's re-execution
    and was convicted in its place (a review saw two honest last stages evicted in turn)."""

    def tamper(self, out: torch.Tensor) -> torch.Tensor:
        if self.stage is None or self.stage.is_last or self.prover is None:
            return out
        return pinned_only(out, self.prover.k)


class PoisonedAuditStageServer(StageServer):
    """Answers an audit of a stage after the first with its honest re-run `pinned_only`:
    the re-run matches the chain's records, and becomes the next stage's audit input (a
    review: the honest next stage was convicted on it)."""

    async def audit(self, msg: AuditRequest, payload: bytes) -> tuple[AuditReply, bytes]:
        reply, out = await super().audit(msg, payload)
        if reply.error or msg.stage == 0 or self.prover is None:
            return reply, out
        return reply, encode_tensor(pinned_only(decode_tensor(out), self.prover.k))


_received: contextvars.ContextVar[torch.Tensor] = contextvars.ContextVar("received")


class PoisonedInputStageServer(StageServer):
    """Computes on its input `pinned_only` and signs the input it received: with a
    `PoisonedAuditStageServer` feeding the audit the same poison, its output matched the
    audit's re-runs and a wrong answer came back verified (two colluders, a review)."""

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
        received = wire.tensor()
        _received.set(received)
        k = self.prover.k if self.prover is not None else 8
        poisoned = read_tensor(encode_tensor(pinned_only(received, k)))
        return await super()._compute_tensors(
            msg, epoch, poisoned, stage, caches, kind, prove, offsets, index
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
        return super()._sign(msg, epoch, index, layers, _received.get(x), out, offsets, traces)


class FalseAccuserStageServer(StageServer):
    """Claims on every decode step that its input does not match its sender's records,
    to frame that honest sender."""

    async def compute(
        self, msg: StageStep, epoch: int, payload: bytes, route: tuple[NodeId, ...] = ()
    ) -> tuple[bytes, tuple[bytes, ...]]:
        if max(msg.lengths) == 1:
            raise RecordMismatch(f"step {msg.steps} input does not match (a false claim)")
        return await super().compute(msg, epoch, payload, route)


class ClaimsInvalidInputStageServer(StageServer):
    """Honest on prefills; answers every decode step with a non-retriable error saying
    its input is invalid, to fail the task of whoever it serves. An error carries no
    record, so it signs nothing; `claimed` counts the lies told."""

    claimed = 0

    async def compute(
        self, msg: StageStep, epoch: int, payload: bytes, route: tuple[NodeId, ...] = ()
    ) -> tuple[bytes, tuple[bytes, ...]]:
        if max(msg.lengths) == 1:
            self.claimed += 1
            raise InvalidInput(f"step {msg.steps}: token ids out of range (a false claim)")
        return await super().compute(msg, epoch, payload, route)


class MisshapenStageServer(_SometimesLying):
    """On decode steps sends (and signs) outputs one column wider than the model's: the
    honest next stage, checking the bytes against the records, finds them vouched for,
    cannot compute on them and says so, a claim that must cost neither of them a task."""

    def lies_on(self, msg: StageStep) -> bool:
        return max(msg.lengths) == 1

    def tamper(self, out: torch.Tensor) -> torch.Tensor:
        return torch.cat([out, out[..., :1]], dim=-1) if _lying.get() else out


class AuditFailsStageServer(StageServer):
    """Honest, but every audit it is asked for reports that it could not run (as a node
    out of memory would): that is no lie, and must not get it evicted."""

    async def audit(self, msg: AuditRequest, payload: bytes) -> tuple[AuditReply, bytes]:
        return AuditReply(msg.request_id, self.node, "out of memory"), b""


class WrongLayerStageServer(StageServer):
    """Skips the last layer of its stage: with that block's output projections zeroed the
    block adds nothing to the residual stream, exactly as if it were not run. Zeroed in
    place on whatever kernel holds them (a plain tensor, the blocked layout the compiled
    layers read, int8), so the stage computes the same lie on either path; a packed
    oneDNN weight, which cannot be written, is replaced by zeros."""

    async def apply_plan(self, msg: PlanAssign) -> PlanAck:
        ack = await super().apply_plan(msg)
        blocks = getattr(self.stage, "blocks", None)
        if blocks:
            for name in ("wo", "w2"):
                weight = getattr(blocks[-1], name, None)
                if isinstance(weight, BlockedWeight):
                    weight.blocks.zero_()
                elif isinstance(weight, Int8Weight):
                    weight.q.zero_()
                elif isinstance(weight, torch.Tensor) and weight.is_mkldnn:  # oneDNN's own
                    zeros = torch.zeros(weight.shape, dtype=weight.dtype)  # bf16 packs too
                    object.__setattr__(blocks[-1], name, zeros)
                elif isinstance(weight, torch.Tensor):
                    weight.zero_()
        return ack


class SlowStageServer(StageServer):
    """Correct, but `delay_s` late on every step and audit: later than a test's
    `network.step_timeout_ms`, so every answer arrives after the gateway gave up."""

    delay_s = 5.0

    async def compute(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        await asyncio.sleep(self.delay_s)
        return await super().compute(*args, **kwargs)

    async def audit(self, msg: AuditRequest, payload: bytes) -> tuple[AuditReply, bytes]:
        await asyncio.sleep(self.delay_s)
        return await super().audit(msg, payload)


class SilentStageServer(StageServer):
    """Heartbeats (the node's membership runs) but never answers a step or an audit; its
    votes are silenced by `butterfly.testing.liar_votes.SilentDriver`."""

    async def on_step(self, env: Envelope, route: tuple[NodeId, ...] = ()):  # type: ignore[no-untyped-def]
        await asyncio.Event().wait()

    async def audit(self, msg: AuditRequest, payload: bytes) -> tuple[AuditReply, bytes]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


class WithholdingStageServer(StageServer):
    """Takes its first plan up, then never acknowledges (nor refuses) another: a member
    that withholds its ack, or one whose plan change hangs; it keeps heartbeating."""

    async def apply_plan(self, msg: PlanAssign) -> PlanAck:
        if self.plan is not None:
            await asyncio.Event().wait()
        return await super().apply_plan(msg)


BEHAVIOURS: dict[str, type[StageServer]] = {
    "honest": StageServer,
    "corrupt": CorruptStageServer,
    "wrong-layer": WrongLayerStageServer,
    "slow": SlowStageServer,
    "silent": SilentStageServer,
    "withhold-ack": WithholdingStageServer,
    "sign-honest-send-corrupt": SignHonestSendCorruptStageServer,
    "omit-records": OmitRecordsStageServer,
    "intermittent": IntermittentStageServer,
    "colluding": ColludingStageServer,
    "audit-fails": AuditFailsStageServer,
    "false-accuser": FalseAccuserStageServer,
    "claims-invalid-input": ClaimsInvalidInputStageServer,
    "misshapen": MisshapenStageServer,
    "honest-fingerprint": HonestFingerprintStageServer,
    "weak-fingerprint": WeakFingerprintStageServer,
    "below-fingerprint": BelowFingerprintStageServer,
    "equivocate": StageServer,  # an honest data path; its votes lie (testing.liar_votes)
}
