"""Control-path messages: handshake, heartbeat, plans, status, config agreement.

Frame bodies like the data path (`butterfly.types.wire.frames`), sent on the control
channel so a vote is never queued behind a tensor; the heartbeat goes over UDP and is
also an input of the failure detector's reducer (`protocol.failure_detector.step`).

    kind                  sent by        answered by / effect
    hello                 both ends      the acceptor's opens every connection (its nonce);
                                         the dialer's answers it, signed (net.handshake)
    hello_ack             accepting      accepted or refused; signed when accepted
    heartbeat             every node     feeds the peers' failure detectors (UDP)
    plan_assign           gateway        plan_ack once the stage is loaded
    status_query          gateway        status_reply (placement facts, load)
    agreement             every node     one PBFT message as the payload (wire.agreement)
    config_prepare        gateway        config_vote
    config_status_query   gateway        config_status
    config_sync           gateway        config_status after adopting the agreed values
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

from butterfly.types.ids import Epoch, NodeId
from butterfly.types.wire.base import PROTOCOL_VERSION, Ask, Signature, Text
from butterfly.types.wire.checks import Size

Nonce = Annotated[bytes, Size(0, 32)]
"""A handshake challenge: 32 random bytes (checked by net.handshake; empty is refused)."""


@dataclass(frozen=True, slots=True)
class HelloAck:
    """The acceptor's verdict; when accepted, `signature` is its Ed25519 signature over
    both nonces (net.handshake.proof_bytes), so the dialer knows whom it reached."""

    kind: ClassVar[str] = "hello_ack"
    node: NodeId
    accepted: bool
    reason: Text
    signature: Signature = b""


@dataclass(frozen=True, slots=True)
class Hello(Ask[HelloAck]):
    """Sent by both ends: the acceptor's opens the connection with its `nonce` (and no
    signature: it has nothing to answer yet); the dialer's carries its own nonce and its
    signature over both (net.handshake). The acceptor checks all of it."""

    kind: ClassVar[str] = "hello"
    node: NodeId
    cluster_id: str
    model_hash: str
    channel: str  # "control" (votes, plans) or "data" (tensors); "" in the acceptor's
    nonce: Nonce = b""
    signature: Signature = b""


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """A node is alive, and what it runs. Over UDP the whole frame is signed (see
    control.heartbeats) and `signature` stays empty; `sign_message` fills it where a beat
    is relayed on its own."""

    kind: ClassVar[str] = "heartbeat"
    sender: NodeId
    epoch: Epoch
    seq: int
    sent_at: float = 0.0  # sender's monotonic clock, for round-trip estimates only
    layers: tuple[int, ...] = ()  # the stage the sender runs, [start, end), or () if none
    requests: int = 0  # KV caches it holds
    version: int = PROTOCOL_VERSION
    signature: Signature = b""


@dataclass(frozen=True, slots=True)
class PlanAck:
    kind: ClassVar[str] = "plan_ack"
    epoch: Epoch
    node: NodeId
    ok: bool
    error: Text


@dataclass(frozen=True, slots=True)
class PlanAssign(Ask[PlanAck]):
    """The stage plan of an epoch: `stages` is a flat tuple of (node, start, end) triples."""

    kind: ClassVar[str] = "plan_assign"
    epoch: Epoch
    stages: tuple[int, ...]
    model_hash: str
    replicas: tuple[int, ...] = ()  # further holders of the same ranges, same triples


@dataclass(frozen=True, slots=True)
class StatusReply:
    kind: ClassVar[str] = "status_reply"
    node: NodeId
    epoch: Epoch
    layers: tuple[int, ...]
    requests: int
    kv_bytes: int
    compute_flops: float  # measured at start-up, for placement
    memory_bytes: int
    # Links this node measured, as parallel tuples (index i: one peer); see control.facts.
    link_peers: tuple[NodeId, ...] = ()
    link_latency_ms: tuple[float, ...] = ()
    link_bandwidth_bytes_per_s: tuple[float, ...] = ()
    layer_overhead_ms: float = 0.0  # fixed time per layer beyond its FLOPs, measured too


@dataclass(frozen=True, slots=True)
class StatusQuery(Ask[StatusReply]):
    kind: ClassVar[str] = "status_query"


@dataclass(frozen=True, slots=True)
class AgreementFrame:
    """One PBFT message, encoded by `wire.agreement.encode`, as the payload.

    The envelope's sender is only the relay: the author and its Ed25519 signature are
    inside the payload, so replicas can forward each other's votes (retransmission).
    """

    kind: ClassVar[str] = "agreement"


@dataclass(frozen=True, slots=True)
class ConfigVote:
    """A node's signed PREPARE answer. `last_seq` is the last agreed config sequence number
    it applied: the change activates at the next one, on every node alike."""

    kind: ClassVar[str] = "config_vote"
    node: NodeId
    digest: str
    ok: bool
    reason: Text
    last_seq: int
    signature: bytes  # Ed25519 over (digest, last_seq) when ok, else empty


@dataclass(frozen=True, slots=True)
class ConfigPrepare(Ask[ConfigVote]):
    """PREPARE of a cluster-wide config change; the payload is the proposal's canonical
    JSON, whose sha256 is `digest`."""

    kind: ClassVar[str] = "config_prepare"
    digest: str


@dataclass(frozen=True, slots=True)
class ConfigStatus:
    """A node's config position (payload: cluster-scoped values as canonical JSON, when
    asked). `error` says why the agreed change at `failed_seq` failed here ("" and 0 when
    none did), so the gateway can tell a diverged node from a slow one."""

    kind: ClassVar[str] = "config_status"
    node: NodeId
    config_version: int  # the node's config history version
    config_hash: str
    cluster_hash: str
    seq: int
    error: Text
    failed_seq: int


@dataclass(frozen=True, slots=True)
class ConfigStatusQuery(Ask[ConfigStatus]):
    """Ask a node where its config stands; `values` asks for its cluster-scoped values."""

    kind: ClassVar[str] = "config_status_query"
    values: bool


@dataclass(frozen=True, slots=True)
class ConfigSync(Ask[ConfigStatus]):
    """Adopt the cluster-scoped config f+1 peers agree on."""

    kind: ClassVar[str] = "config_sync"


@dataclass(frozen=True, slots=True)
class ConfigLocal(Ask[ConfigStatus]):
    """Adopt these node-local options of the gateway's role, as the acting gateway did
    (payload: their dotted values as canonical JSON): a standby gateway enforces the same
    tokens and limits once it takes over (`config.gateways.gateway_role`). The reply's
    payload: the keys that changed there, a JSON list (empty: they were in force)."""

    kind: ClassVar[str] = "config_local"


ControlMessage = (
    Hello
    | HelloAck
    | Heartbeat
    | PlanAssign
    | PlanAck
    | StatusQuery
    | StatusReply
    | AgreementFrame
    | ConfigPrepare
    | ConfigVote
    | ConfigStatusQuery
    | ConfigStatus
    | ConfigSync
    | ConfigLocal
)
