"""Data-path messages: stage steps and their results, audits, KV copies, link probes.

They travel as frame bodies (`butterfly.types.wire.frames`): the envelope names the
kind, the epoch and the authenticated sender, so the bodies carry neither. Payloads
(tensors, padding) travel beside the body as raw bytes.

    kind            sent by                 answered by / effect
    stage_step      gateway, chain nodes    the next stage runs; the last sends step_result
                                            (a step's start is also its rollback: each stage
                                            cuts its KV cache back to it first)
    step_result     last chain node         the gateway samples (one-way, to `reply_to`)
    step_error      any chain node          the gateway re-routes or fails the request
    audit_request   gateway                 audit_reply
    inputs_query    gateway                 inputs_held (a dispute: what a stage received)
    release         gateway                 KV caches freed
    kv_append       chain node              standbys extend their KV copies
    cache_query     gateway                 cache_lengths
    ping            gateway (link probe)    pong
    chunk           any node                reassembled by the connection (net.framing)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

from butterfly.types.ids import Epoch, NodeId, RequestId, StageIndex
from butterfly.types.wire.base import Ask, Text
from butterfly.types.wire.checks import Size

TraceContext = Annotated[bytes, Size(0, 24)]
"""A traced request's trace id (16 bytes) and request span id (8); empty when untraced
(butterfly.metrics.tracing)."""


@dataclass(frozen=True, slots=True)
class StageStep:
    """Run a batch of request steps through the next stage.

    Entry i is request `request_ids[i]` at positions [starts[i], starts[i] + lengths[i]).
    The payload is the stage input with every entry's tokens side by side along the
    sequence dimension. `route` lists the nodes still to run after this one; the last of
    the chain sends a `StepResult` to `reply_to`. `trace`: each entry's trace context
    when any entry of the batch is traced, else empty; an empty one is left out of the
    frame (`OMIT_EMPTY`), so with tracing off a step is as long as it ever was.
    `LATENCY_BOUND`: a token waits on it, so a connection writes it at once rather than
    at the end of the loop's turn with other short frames (net.conn.COALESCE_BELOW).
    """

    kind: ClassVar[str] = "stage_step"
    OMIT_EMPTY: ClassVar[tuple[str, ...]] = ("trace", "dispatch")
    LATENCY_BOUND: ClassVar[bool] = True
    request_ids: tuple[RequestId, ...]
    steps: tuple[int, ...]
    starts: tuple[int, ...]
    lengths: tuple[int, ...]
    route: tuple[NodeId, ...]
    reply_to: NodeId
    last_only: bool
    proofs: tuple[bytes, ...] = ()  # signed records (wire.agreement.Proof) so far
    trace: tuple[TraceContext, ...] = ()
    dispatch: bytes = b""  # the gateway's signed `wire.agreement.Dispatch`, when verifying


@dataclass(frozen=True, slots=True)
class StepResult:
    """Output of the last stage for a batch (payload: logits or hidden states, entries
    side by side as in the step). `widths`: each entry's rows of the payload, when the
    step asked for every position (`StageStep.last_only` false: a speculative verify
    step, dataplane.speculate); empty when each entry has one row, and then left out of
    the frame (`OMIT_EMPTY`), so a plain decode's result is as long as it ever was."""

    kind: ClassVar[str] = "step_result"
    OMIT_EMPTY: ClassVar[tuple[str, ...]] = ("widths",)
    LATENCY_BOUND: ClassVar[bool] = True  # as StageStep's
    request_ids: tuple[RequestId, ...]
    steps: tuple[int, ...]
    node: NodeId
    proofs: tuple[bytes, ...] = ()  # every stage's signed record of every entry
    widths: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class StepError:
    kind: ClassVar[str] = "step_error"
    LATENCY_BOUND: ClassVar[bool] = True  # as StageStep's
    request_ids: tuple[RequestId, ...]
    steps: tuple[int, ...]
    node: NodeId
    error_type: str
    message: Text
    retriable: bool


@dataclass(frozen=True, slots=True)
class AuditReply:
    """The stage's output for every position (payload), or why it could not run.

    No signed record of it: the gateway judges an auditor by re-executing (an auditor
    that contradicts the re-execution is named a liar without evidence of its own), and
    a record fingerprints every position, so that of a sequence of about 1,000 positions
    (64 bytes each at byzantine.fingerprint_top_k 8) outgrew the 64 KiB frame header:
    the reply was never sent and the audit waited out its timeout."""

    kind: ClassVar[str] = "audit_reply"
    request_id: RequestId
    node: NodeId
    error: Text


@dataclass(frozen=True, slots=True)
class AuditRequest(Ask[AuditReply]):
    """Re-run `request_id`'s whole sequence (the payload: this stage's input for every
    position) through the receiver's stage as one prefill."""

    kind: ClassVar[str] = "audit_request"
    request_id: RequestId
    stage: StageIndex
    layer_start: int
    layer_end: int
    outputs_from: int = 0  # a last stage answers positions [outputs_from, T) only


@dataclass(frozen=True, slots=True)
class InputsHeld:
    """The inputs a node received for a request's steps and still holds, exactly as it
    received them (the payload: one tensor, the steps' rows side by side, `lengths[i]`
    rows for `steps[i]`). Not signed: each step's rows are bound by their hash to the
    record of the stage that sent them, which the gateway checks before using them."""

    kind: ClassVar[str] = "inputs_held"
    request_id: RequestId
    node: NodeId
    steps: tuple[int, ...]
    lengths: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class InputsQuery(Ask[InputsHeld]):
    """The rows the receiver took for these `steps` of `request_id` in the plan of
    `epoch` (or, with `sent`, those it sent on; the plan names the stage it held): when an
    audit would convict a stage, the gateway first judges it on what it received, which
    its sender's records pin only at each row's largest values."""

    kind: ClassVar[str] = "inputs_query"
    request_id: RequestId
    epoch: Epoch
    steps: tuple[int, ...]
    sent: bool = False


@dataclass(frozen=True, slots=True)
class Release:
    """Free these requests' KV caches (cancelled or finished). One frame carries every
    request that finished in one turn of the gateway's event loop, so a node receives one
    per batch rather than one per request."""

    kind: ClassVar[str] = "release"
    request_ids: tuple[RequestId, ...]


@dataclass(frozen=True, slots=True)
class KvAppend:
    """Positions [start, start + T) of a request's KV cache, from the chain node of a
    layer range to its standbys; the payload is one tensor [2 * layers, B, H_kv, T, D]
    (keys then values per layer). A standby that takes the stage over resumes there."""

    kind: ClassVar[str] = "kv_append"
    request_id: RequestId
    layer_start: int
    layer_end: int
    start: int


@dataclass(frozen=True, slots=True)
class CacheLengths:
    kind: ClassVar[str] = "cache_lengths"
    request_ids: tuple[RequestId, ...]
    lengths: tuple[int, ...]  # 0 where the node holds no cache for the request


@dataclass(frozen=True, slots=True)
class CacheQuery(Ask[CacheLengths]):
    """How many positions of these requests' KV caches a node holds (after recovery,
    a request resumes at the fewest any stage holds)."""

    kind: ClassVar[str] = "cache_query"
    request_ids: tuple[RequestId, ...]


@dataclass(frozen=True, slots=True)
class Pong:
    """Answer to a Ping, with no payload; `received` is the padding length that arrived."""

    kind: ClassVar[str] = "pong"
    seq: int
    received: int


@dataclass(frozen=True, slots=True)
class Ping(Ask[Pong]):
    """Link probe on the data channel; the payload is padding whose transfer is timed."""

    kind: ClassVar[str] = "ping"
    seq: int


@dataclass(frozen=True, slots=True)
class Chunk:
    """One piece of a message too large for one frame. The payload is the next bytes of
    the whole message's encoded frame (after its length prefix); the first chunk declares
    `total`, so the receiver refuses a message over its limit before buffering a byte of
    it. The connection reassembles chunks; no handler ever sees one."""

    kind: ClassVar[str] = "chunk"
    stream: int  # the sender's number for this message on this connection
    index: int  # 0, 1, ... in order
    total: int  # bytes of the whole encoded message
    final: bool  # the last piece: the bytes so far add up to `total`


DataMessage = (
    StageStep
    | StepResult
    | StepError
    | AuditRequest
    | AuditReply
    | InputsQuery
    | InputsHeld
    | Release
    | KvAppend
    | CacheQuery
    | CacheLengths
    | Ping
    | Pong
    | Chunk
)
