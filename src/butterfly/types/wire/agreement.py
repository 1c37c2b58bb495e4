"""Agreement messages (PBFT), signed stage-step records, coordination: one tagged type each.

Each message names its `kind`, the protocol `version`, the `epoch` (membership and config
generation) it belongs to and its `sender`, who signs it. A signature covers every field
but itself (`signing_bytes`), so signed messages can be relayed by anyone and still prove
who wrote them; that is what turns a primary's two different pre-prepares into evidence.
Signing and verifying need keys and live in `butterfly.protocol.sign`.

`encode`/`decode` are the only way these cross the network (inside an `AgreementFrame`'s
payload): msgpack maps checked field by field by the one codec (`wire.codec`); a wrong
type, unknown kind or oversized message is `InvalidMessage`.

    kind            sent by            answered by / effect
    heartbeat       every node         feeds the peer's failure detector (wire.control)
    request         client (gateway)   pre-prepare by the primary, reply by every replica
    pre_prepare     primary            prepare
    prepare         backups            commit once 2f prepares match
    commit          replicas           execution once 2f+1 commits match
    reply           replicas           the client accepts f+1 matching replies
    checkpoint      replicas           2f+1 matching votes make a checkpoint stable (GC)
    view_change     replicas           new_view from the next primary on 2f+1
    new_view        new primary        replicas enter the view
    status          replicas           peers retransmit what the sender is missing
    state_transfer  replicas           a lagging replica installs a certified log prefix
    state_snapshot  replicas           a replica behind its peers' pruned log installs
                                       the executed state f+1 of them sent alike
    evidence        any replica        two conflicting messages signed by one node
    proof           stage nodes        the signed record of one stage step
    dispatch        the gateway        its word for one stage step batch: the entries,
                                       the route and whom to answer (travels inside the
                                       step, `StageStep.dispatch`)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Annotated, ClassVar

from butterfly.types.errors import InvalidMessage
from butterfly.types.hashing import NULL_DIGEST, sha256
from butterfly.types.ids import Epoch, NodeId, RequestId, StageIndex
from butterfly.types.wire.base import PROTOCOL_VERSION, Blob, Digest, Signature
from butterfly.types.wire.checks import MAX_MESSAGE_BYTES, Size
from butterfly.types.wire.codec import Codec
from butterfly.types.wire.control import Heartbeat

# --- PBFT -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    """A client's operation; `timestamp` orders one client's requests and dedups retries."""

    kind: ClassVar[str] = "request"
    sender: NodeId
    epoch: Epoch
    timestamp: int
    operation: Blob
    version: int = PROTOCOL_VERSION
    signature: Signature = b""


@dataclass(frozen=True, slots=True)
class PrePrepare:
    """The primary binds `digest` to (`view`, `seq`).

    The request travels beside the signed header (`UNSIGNED`) as in the PBFT paper, so
    prepares and view changes can quote the header without the request body.
    """

    kind: ClassVar[str] = "pre_prepare"
    UNSIGNED: ClassVar[tuple[str, ...]] = ("request",)
    sender: NodeId
    epoch: Epoch
    view: int
    seq: int
    digest: Digest
    request: Request | None = None
    version: int = PROTOCOL_VERSION
    signature: Signature = b""

    def header(self) -> PrePrepare:
        return replace(self, request=None)


@dataclass(frozen=True, slots=True)
class Prepare:
    """A backup's vote; `pp_signature` is the primary's signature over the header it saw,
    so a replica holding a different pre-prepare for the same slot can prove equivocation.
    """

    kind: ClassVar[str] = "prepare"
    sender: NodeId
    epoch: Epoch
    view: int
    seq: int
    digest: Digest
    pp_signature: Signature
    version: int = PROTOCOL_VERSION
    signature: Signature = b""


@dataclass(frozen=True, slots=True)
class Veto:
    """A backup declines to prepare the current primary's pre-prepare (`PbftConfig.veto`:
    its own view of the cluster, such as a takeover of a gateway it still hears). Enough
    of them show the slot cannot prepare (`pbft_order.veto_quorum`), and every replica
    that sees them changes view at once: the slot held every later one, executed in
    order, until the request timer ran out (10 s in a cluster), and no relay helps a
    primary whose own proposal its peers refuse."""

    kind: ClassVar[str] = "veto"
    sender: NodeId
    epoch: Epoch
    view: int
    seq: int
    digest: Digest
    version: int = PROTOCOL_VERSION
    signature: Signature = b""


@dataclass(frozen=True, slots=True)
class Commit:
    kind: ClassVar[str] = "commit"
    sender: NodeId
    epoch: Epoch
    view: int
    seq: int
    digest: Digest
    version: int = PROTOCOL_VERSION
    signature: Signature = b""


@dataclass(frozen=True, slots=True)
class Reply:
    kind: ClassVar[str] = "reply"
    sender: NodeId
    epoch: Epoch
    view: int
    client: NodeId
    timestamp: int
    seq: int
    digest: Digest
    version: int = PROTOCOL_VERSION
    signature: Signature = b""


@dataclass(frozen=True, slots=True)
class CheckpointVote:
    """`digest` is the log digest after executing `seq`; 2f+1 matching votes are a proof."""

    kind: ClassVar[str] = "checkpoint"
    sender: NodeId
    epoch: Epoch
    seq: int
    digest: Digest
    version: int = PROTOCOL_VERSION
    signature: Signature = b""


@dataclass(frozen=True, slots=True)
class PreparedCertificate:
    """A pre-prepare (with request) and 2f matching prepares: proof a value prepared."""

    pre_prepare: PrePrepare
    prepares: tuple[Prepare, ...]


@dataclass(frozen=True, slots=True)
class ViewChange:
    """`prepared` carries what must survive into the next view; `pre_prepared` carries the
    headers this replica accepted, so peers can spot a primary that told them otherwise.
    """

    kind: ClassVar[str] = "view_change"
    sender: NodeId
    epoch: Epoch
    view: int
    stable_seq: int
    stable_digest: Digest
    stable_proof: tuple[CheckpointVote, ...]
    prepared: tuple[PreparedCertificate, ...]
    pre_prepared: tuple[PrePrepare, ...]
    version: int = PROTOCOL_VERSION
    signature: Signature = b""


@dataclass(frozen=True, slots=True)
class NewView:
    kind: ClassVar[str] = "new_view"
    sender: NodeId
    epoch: Epoch
    view: int
    view_changes: tuple[ViewChange, ...]
    pre_prepares: tuple[PrePrepare, ...]
    version: int = PROTOCOL_VERSION
    signature: Signature = b""


@dataclass(frozen=True, slots=True)
class Status:
    """Periodic summary; peers answer with what the sender lacks (retransmission)."""

    kind: ClassVar[str] = "status"
    sender: NodeId
    epoch: Epoch
    view: int
    in_view_change: bool
    last_executed: int
    executed_digest: Digest
    stable_seq: int
    version: int = PROTOCOL_VERSION
    signature: Signature = b""


@dataclass(frozen=True, slots=True)
class StateTransfer:
    """A certified log prefix: `entries` end at `seq` with log digest `digest`, which
    `proof` (2f+1 checkpoint votes) vouches for, so the sender needs no trust.
    """

    kind: ClassVar[str] = "state_transfer"
    sender: NodeId
    epoch: Epoch
    seq: int
    digest: Digest
    proof: tuple[CheckpointVote, ...]
    entries: tuple[PrePrepare, ...]
    version: int = PROTOCOL_VERSION
    signature: Signature = b""


SnapshotState = Annotated[bytes, Size(0, 1 << 19)]
"""A driver's executed state, opaque to PBFT; half a frame, so one snapshot always fits."""


@dataclass(frozen=True, slots=True)
class StateSnapshot:
    """The sender's executed state after the stable checkpoint `seq` (`state`: what its
    driver made of every command up to there), with the log digest there and its proof.
    A replica whose peers pruned their log past it cannot replay the log; it installs
    the state once f+1 distinct replicas sent the same one at the same `seq` and
    `digest` (one of them is honest) and the proof certifies the digest.
    """

    kind: ClassVar[str] = "state_snapshot"
    sender: NodeId
    epoch: Epoch
    seq: int
    digest: Digest
    proof: tuple[CheckpointVote, ...]
    state: SnapshotState
    version: int = PROTOCOL_VERSION
    signature: Signature = b""


Conflicting = PrePrepare | Prepare | Commit | CheckpointVote


@dataclass(frozen=True, slots=True)
class Evidence:
    """Two messages `accused` signed that cannot both come from an honest node."""

    kind: ClassVar[str] = "evidence"
    sender: NodeId
    epoch: Epoch
    accused: NodeId
    first: Conflicting
    second: Conflicting
    version: int = PROTOCOL_VERSION
    signature: Signature = b""


# --- verified stage steps -----------------------------------------------------------------


def fingerprint_entries(k: int, chunk: int, positions: int, width: int) -> int:
    """Number of (index, value) pairs a fingerprint of this shape holds."""
    full, rest = divmod(positions, chunk)
    return full * min(k, chunk * width) + (min(k, rest * width) if rest else 0)


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """Top-k activations per chunk of positions (TOPLOC-style): little-endian uint32
    indices within the chunk and float32 values, chunk after chunk.
    """

    k: int
    chunk: int
    positions: int
    width: int
    indices: bytes
    values: bytes

    def __post_init__(self) -> None:
        if self.k < 1 or self.chunk < 1:
            raise ValueError(f"fingerprint k={self.k} and chunk={self.chunk} must be >= 1")
        n = fingerprint_entries(self.k, self.chunk, self.positions, self.width)
        if len(self.indices) != 4 * n or len(self.values) != 4 * n:
            raise ValueError(
                f"fingerprint of {self.positions}x{self.width} (k={self.k}, chunk={self.chunk})"
                f" holds {n} entries, got {len(self.indices)} index and {len(self.values)}"
                " value bytes"
            )


@dataclass(frozen=True, slots=True)
class Proof:
    """The signed record of one stage step (DESIGN.md section 3).

    `input_hash`/`output_hash` are exact (same-machine replays), `fingerprint` survives
    float noise across machines, and `merkle_root` over per-layer output hashes lets an
    auditor pinpoint the first wrong layer.
    """

    kind: ClassVar[str] = "proof"
    sender: NodeId
    epoch: Epoch
    request_id: RequestId
    step: int
    stage: StageIndex
    layer_start: int
    layer_end: int
    input_hash: Digest
    output_hash: Digest
    fingerprint: Fingerprint
    merkle_root: Digest
    version: int = PROTOCOL_VERSION
    signature: Signature = b""


@dataclass(frozen=True, slots=True)
class Dispatch:
    """The acting gateway's signed word for one stage step batch (DESIGN.md section 3:
    each message kind is acted on only from the peer entitled to send it). A stage runs a
    step only under one, from the node before it on `route` (every node that runs the
    batch, in order), and answers only `reply_to`: a holder of the previous layer range
    that is on no route can no longer send a node steps that cut its KV cache back,
    compute on bytes of its choosing, or make it answer the gateway for them. `serial`
    grows with every dispatch of the gateway, so a stage runs one only if it is newer than
    the last it ran for each of its requests: an old one replayed is refused."""

    kind: ClassVar[str] = "dispatch"
    sender: NodeId
    epoch: Epoch
    serial: int
    request_ids: tuple[RequestId, ...]
    steps: tuple[int, ...]
    starts: tuple[int, ...]
    lengths: tuple[int, ...]
    route: tuple[NodeId, ...]
    reply_to: NodeId
    last_only: bool
    version: int = PROTOCOL_VERSION
    signature: Signature = b""


Message = (
    Heartbeat
    | Request
    | PrePrepare
    | Prepare
    | Veto
    | Commit
    | Reply
    | CheckpointVote
    | ViewChange
    | NewView
    | Status
    | StateTransfer
    | StateSnapshot
    | Evidence
    | Proof
    | Dispatch
)

MESSAGE_TYPES: tuple[type[Message], ...] = (
    Heartbeat,
    Request,
    PrePrepare,
    Prepare,
    Veto,
    Commit,
    Reply,
    CheckpointVote,
    ViewChange,
    NewView,
    Status,
    StateTransfer,
    StateSnapshot,
    Evidence,
    Proof,
    Dispatch,
)
KINDS: dict[str, type[Message]] = {cls.kind: cls for cls in MESSAGE_TYPES}
_CODEC = Codec(KINDS, version=PROTOCOL_VERSION, error=InvalidMessage)


def encode(message: Message) -> bytes:
    return _CODEC.encode(message)


def decode(data: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """Decode and validate one message from a peer; raises `InvalidMessage` on anything odd."""
    message: Message = _CODEC.decode(data, max_bytes=max_bytes)
    return message


def signing_bytes(message: Message) -> bytes:
    """What a signature covers: every field but the signature (and a class's `UNSIGNED`)."""
    return _CODEC.signing_bytes(message)


def request_digest(request: Request | None) -> bytes:
    """What replicas agree on: the signed content of the request, not its signature."""
    if request is None:
        return NULL_DIGEST
    return sha256(_CODEC.signing_bytes(request))
