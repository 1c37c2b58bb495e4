"""Messages nodes exchange on the data and membership paths: frozen, tagged, versioned.

Every message travels inside an envelope that names the protocol version, the cluster id,
the epoch and the sender (see `butterfly.net.framing`). Bodies are msgpack maps whose
keys must be exactly the dataclass's fields, each of the declared primitive type: a peer
that sends anything else is refused at the boundary, never trusted further in.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from butterfly.types.errors import WireFormatError

PROTOCOL_VERSION = 1


@dataclass(frozen=True, slots=True)
class Hello:
    """First frame on every connection; the acceptor checks all of it."""

    kind: ClassVar[str] = "hello"
    node: int
    cluster_id: str
    model_hash: str
    channel: str  # "control" (heartbeats, votes) or "data" (tensors)


@dataclass(frozen=True, slots=True)
class HelloAck:
    kind: ClassVar[str] = "hello_ack"
    node: int
    accepted: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Heartbeat:
    kind: ClassVar[str] = "heartbeat"
    seq: int
    sent_at: float  # sender's monotonic clock, for round-trip estimates only
    layers: tuple[int, ...]  # the stage the sender runs, [start, end), or () if none
    requests: int  # KV caches it holds


@dataclass(frozen=True, slots=True)
class StageStep:
    """Run a batch of request steps through the next stage.

    Entry i is request `request_ids[i]` at positions [starts[i], starts[i] + lengths[i]).
    The payload is the stage input with every entry's tokens side by side along the
    sequence dimension. `route` lists the nodes still to run after this one; the last of
    the chain sends a `StepResult` to `reply_to`.
    """

    kind: ClassVar[str] = "stage_step"
    request_ids: tuple[str, ...]
    steps: tuple[int, ...]
    starts: tuple[int, ...]
    lengths: tuple[int, ...]
    route: tuple[int, ...]
    reply_to: int
    last_only: bool
    proofs: tuple[bytes, ...] = ()  # signed records (protocol.messages.Proof) so far


@dataclass(frozen=True, slots=True)
class StepResult:
    """Output of the last stage for a batch (payload: logits or hidden states, entries
    side by side as in the step)."""

    kind: ClassVar[str] = "step_result"
    request_ids: tuple[str, ...]
    steps: tuple[int, ...]
    node: int
    proofs: tuple[bytes, ...] = ()  # every stage's signed record of every entry


@dataclass(frozen=True, slots=True)
class StepError:
    kind: ClassVar[str] = "step_error"
    request_ids: tuple[str, ...]
    steps: tuple[int, ...]
    node: int
    error_type: str
    message: str
    retriable: bool


@dataclass(frozen=True, slots=True)
class AuditRequest:
    """Re-run `request_id`'s whole sequence (the payload: this stage's input for every
    position) through the receiver's stage as one prefill; answered by AuditReply."""

    kind: ClassVar[str] = "audit_request"
    request_id: str
    stage: int
    layer_start: int
    layer_end: int
    outputs_from: int = 0  # a last stage answers positions [outputs_from, T) only


@dataclass(frozen=True, slots=True)
class AuditReply:
    """The stage's output for every position (payload) and the signed record of it."""

    kind: ClassVar[str] = "audit_reply"
    request_id: str
    node: int
    proof: bytes
    error: str


@dataclass(frozen=True, slots=True)
class Release:
    """Free these requests' KV caches (cancelled or finished). One frame carries every
    request that finished in one turn of the gateway's event loop, so a node receives one
    per batch rather than one per request."""

    kind: ClassVar[str] = "release"
    request_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class KvAppend:
    """Positions [start, start + T) of a request's KV cache, from the chain node of a
    layer range to its standbys; the payload is one tensor [2 * layers, B, H_kv, T, D]
    (keys then values per layer). A standby that takes the stage over resumes there."""

    kind: ClassVar[str] = "kv_append"
    request_id: str
    layer_start: int
    layer_end: int
    start: int


@dataclass(frozen=True, slots=True)
class CacheQuery:
    """How many positions of these requests' KV caches a node holds (after recovery,
    a request resumes at the fewest any stage holds)."""

    kind: ClassVar[str] = "cache_query"
    request_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class CacheLengths:
    kind: ClassVar[str] = "cache_lengths"
    request_ids: tuple[str, ...]
    lengths: tuple[int, ...]  # 0 where the node holds no cache for the request


@dataclass(frozen=True, slots=True)
class PlanAssign:
    """The stage plan of an epoch: `stages` is a flat tuple of (node, start, end) triples."""

    kind: ClassVar[str] = "plan_assign"
    epoch: int
    stages: tuple[int, ...]
    model_hash: str
    replicas: tuple[int, ...] = ()  # further holders of the same ranges, same triples


@dataclass(frozen=True, slots=True)
class PlanAck:
    kind: ClassVar[str] = "plan_ack"
    epoch: int
    node: int
    ok: bool
    error: str


@dataclass(frozen=True, slots=True)
class Ping:
    """Link probe on the data channel; the payload is padding whose transfer is timed."""

    kind: ClassVar[str] = "ping"
    seq: int


@dataclass(frozen=True, slots=True)
class Pong:
    """Answer to a Ping, with no payload; `received` is the padding length that arrived."""

    kind: ClassVar[str] = "pong"
    seq: int
    received: int


@dataclass(frozen=True, slots=True)
class StatusQuery:
    kind: ClassVar[str] = "status_query"


@dataclass(frozen=True, slots=True)
class StatusReply:
    kind: ClassVar[str] = "status_reply"
    node: int
    epoch: int
    layers: tuple[int, ...]
    requests: int
    kv_bytes: int
    compute_flops: float  # measured at start-up, for placement
    memory_bytes: int
    # Links this node measured, as parallel tuples (index i: one peer); see control.facts.
    link_peers: tuple[int, ...] = ()
    link_latency_ms: tuple[float, ...] = ()
    link_bandwidth_bytes_per_s: tuple[float, ...] = ()
    layer_overhead_ms: float = 0.0  # fixed time per layer beyond its FLOPs, measured too


@dataclass(frozen=True, slots=True)
class AgreementFrame:
    """One PBFT message, encoded by `butterfly.protocol`'s strict codec, as the payload.

    The envelope's sender is only the relay: the author and its Ed25519 signature are
    inside the payload, so replicas can forward each other's votes (retransmission).
    """

    kind: ClassVar[str] = "agreement"


@dataclass(frozen=True, slots=True)
class ConfigPrepare:
    """PREPARE of a cluster-wide config change; the payload is the proposal's canonical
    JSON, whose sha256 is `digest`. Answered with a `ConfigVote`."""

    kind: ClassVar[str] = "config_prepare"
    digest: str


@dataclass(frozen=True, slots=True)
class ConfigVote:
    """A node's signed PREPARE answer. `last_seq` is the last agreed config sequence number
    it applied: the change activates at the next one, on every node alike."""

    kind: ClassVar[str] = "config_vote"
    node: int
    digest: str
    ok: bool
    reason: str
    last_seq: int
    signature: bytes  # Ed25519 over (digest, last_seq) when ok, else empty


@dataclass(frozen=True, slots=True)
class ConfigStatusQuery:
    """Ask a node where its config stands; `values` asks for its cluster-scoped values."""

    kind: ClassVar[str] = "config_status_query"
    values: bool


@dataclass(frozen=True, slots=True)
class ConfigStatus:
    """A node's config position (payload: cluster-scoped values as canonical JSON, when
    asked). `error` says why the agreed change at `failed_seq` failed here ("" and 0 when
    none did), so the gateway can tell a diverged node from a slow one."""

    kind: ClassVar[str] = "config_status"
    node: int
    version: int
    config_hash: str
    cluster_hash: str
    seq: int
    error: str
    failed_seq: int


@dataclass(frozen=True, slots=True)
class ConfigSync:
    """Adopt the cluster-scoped config f+1 peers agree on; answered with `ConfigStatus`."""

    kind: ClassVar[str] = "config_sync"


Message = (
    Hello
    | HelloAck
    | Heartbeat
    | StageStep
    | StepResult
    | StepError
    | AuditRequest
    | AuditReply
    | Release
    | KvAppend
    | CacheQuery
    | CacheLengths
    | PlanAssign
    | PlanAck
    | Ping
    | Pong
    | StatusQuery
    | StatusReply
    | AgreementFrame
    | ConfigPrepare
    | ConfigVote
    | ConfigStatusQuery
    | ConfigStatus
    | ConfigSync
)

MESSAGE_TYPES: dict[str, type[Any]] = {cls.kind: cls for cls in typing.get_args(Message)}


Checker = Callable[[Any, str], Any]


def _checker(expected: Any) -> Checker:
    """A validator for one declared field type, built once per field at import time
    (reflecting on the annotation per message cost 40 µs a frame)."""
    origin = typing.get_origin(expected)
    if origin is tuple:
        item = _checker(typing.get_args(expected)[0])

        def check_tuple(value: Any, where: str) -> Any:
            if not isinstance(value, list | tuple):
                raise WireFormatError(f"{where} must be a list")
            return tuple(item(v, where) for v in value)

        return check_tuple
    if expected is float:

        def check_float(value: Any, where: str) -> Any:
            if isinstance(value, float):
                return value
            if isinstance(value, int) and not isinstance(value, bool):
                return float(value)
            raise WireFormatError(f"{where} must be float, got {type(value).__name__}")

        return check_float
    if expected is int:

        def check_int(value: Any, where: str) -> Any:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            raise WireFormatError(f"{where} must be int, got {type(value).__name__}")

        return check_int

    def check_plain(value: Any, where: str) -> Any:
        if isinstance(value, expected):
            return value
        raise WireFormatError(f"{where} must be {expected.__name__}, got {type(value).__name__}")

    return check_plain


def _field_checkers(cls: type[Any]) -> dict[str, Checker]:
    hints = typing.get_type_hints(cls)
    return {f.name: _checker(hints[f.name]) for f in dataclasses.fields(cls)}


_FIELDS: dict[str, dict[str, Checker]] = {k: _field_checkers(c) for k, c in MESSAGE_TYPES.items()}
_FIELD_SETS = {k: frozenset(v) for k, v in _FIELDS.items()}


def to_body(msg: Message) -> dict[str, Any]:
    return {f: getattr(msg, f) for f in _FIELDS[msg.kind]}


def from_body(kind: Any, body: Any) -> Message:
    """Build a message from an untrusted (kind, body) pair, or raise WireFormatError."""
    if not isinstance(kind, str) or kind not in MESSAGE_TYPES:
        raise WireFormatError(f"unknown message kind {kind!r}")
    fields = _FIELDS[kind]
    if not isinstance(body, dict) or body.keys() != _FIELD_SETS[kind]:
        got = sorted(body) if isinstance(body, dict) else type(body).__name__
        raise WireFormatError(f"{kind} body must have fields {sorted(fields)}, got {got}")
    values = {name: check(body[name], f"{kind}.{name}") for name, check in fields.items()}
    msg: Message = MESSAGE_TYPES[kind](**values)
    return msg
