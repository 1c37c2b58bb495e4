"""What components report about themselves, as plain values.

Components never touch Prometheus: they are handed an `Emit` callable and call it with one
of these frozen events. That keeps every component testable with `events.append` as its
sink, keeps label sets and bucket choices in one place (`prometheus.py`), and lets a
second sink (a log, a test recorder) be composed in without changing a component.

Events are cheap to build and `emit` must not block: it runs on the event loop, in the
middle of request handling.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from butterfly.types.ids import NodeId

TaskOutcome = Literal["completed", "failed", "cancelled"]
NodeState = Literal["starting", "healthy", "suspected", "failed"]
NODE_STATES: tuple[NodeState, ...] = ("starting", "healthy", "suspected", "failed")


@dataclass(frozen=True)
class TaskSubmitted:
    """A task was accepted (persisted and queued), with `prompt_tokens` of input."""

    priority: int = 0
    prompt_tokens: int = 0


@dataclass(frozen=True)
class TaskFinished:
    """A task reached a terminal state, `latency_s` after it was accepted."""

    status: TaskOutcome
    latency_s: float


@dataclass(frozen=True)
class TokenProduced:
    """A new token; `seconds` since acceptance when `first`, else since the previous one."""

    first: bool
    seconds: float


@dataclass(frozen=True, slots=True)
class MessageSent:
    """A frame written to a peer: `size_bytes` in all, `payload_bytes` of them the
    payload (activations, snapshots), counted as bytes moved between nodes. One event
    for both: an event costs a relaying node 1.5 µs warm and 13 µs on caches another
    process has flushed (AMD EPYC, docs/PERFORMANCE-LOG.md, "Frame bodies checked in C")."""

    kind: str
    size_bytes: int
    payload_bytes: int = 0


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """A frame read from a peer, as `MessageSent`."""

    kind: str
    size_bytes: int
    payload_bytes: int = 0


@dataclass(frozen=True)
class MessageDropped:
    """A peer message refused before use: malformed, oversized, unsigned, stale epoch."""

    reason: str


@dataclass(frozen=True)
class PartitionComputed:
    seconds: float
    cache_hit: bool


@dataclass(frozen=True)
class ConsensusRound:
    """One agreement instance completed (PBFT pre-prepare through commit)."""

    rounds: int = 1


@dataclass(frozen=True)
class PhaseTransition:
    """A protocol moved from one phase to another (e.g. normal -> view change)."""

    from_phase: str
    to_phase: str


@dataclass(frozen=True)
class NodeFailure:
    """The failure detector declared a node failed (not merely suspected)."""

    node: NodeId


@dataclass(frozen=True)
class QueueDepth:
    """Tasks waiting for a slot, reported whenever the queue changes."""

    depth: int


@dataclass(frozen=True)
class NodeStatus:
    node: NodeId
    status: NodeState


@dataclass(frozen=True)
class Eviction:
    """A node proven to lie was evicted (Byzantine fault, not a crash)."""

    node: NodeId


@dataclass(frozen=True)
class Suspension:
    """A node that heartbeats but left its work unanswered was put out of the plans for
    a while (`control.policy.SUSPENSION_S`): not evicted, nothing proves it lied."""

    node: NodeId


@dataclass(frozen=True)
class RecoveryCompleted:
    """A failed or evicted node's stages run elsewhere again, after `seconds`."""

    seconds: float


@dataclass(frozen=True)
class CheckpointCopied:
    """A chain node sent a standby `bytes` of KV cache (a checkpoint of its stage)."""

    bytes: int


@dataclass(frozen=True)
class PeerError:
    """A step failed with an error that names the peer behind it (`ButterflyError.blame`):
    counted per node, so an operator sees which node keeps failing work it was given."""

    node: NodeId
    error: str  # the error's kind, e.g. `connection_failed`
    retriable: bool


@dataclass(frozen=True)
class StageStepTimed:
    """This node ran one step batch of chain position `stage` in `seconds` (decoding the
    input, the forward pass and signing its records; not the wait for the next node)."""

    stage: int
    seconds: float


@dataclass(frozen=True)
class HopTimed:
    """This node handed a step's output to `peer` in `seconds`: encoding the frame and
    writing it, waiting for the link when its buffer is full. One-way network delay is
    not in it (that needs synchronised clocks; a trace shows the gaps between nodes)."""

    peer: NodeId
    seconds: float


@dataclass(frozen=True)
class Traversed:
    """The gateway sent one step of a generation down the whole chain (a prefill chunk,
    a decode step, or a speculative verify step with `drafted` draft tokens of which
    `accepted` were kept). Traversals over generated tokens is what speculative decoding
    lowers (dataplane.speculate)."""

    drafted: int = 0
    accepted: int = 0


@dataclass(frozen=True)
class PromptChunked:
    """The gateway sent `positions` of a longer prompt (or replay) as one chunk: the sizes
    shrink while other requests decode on a CPU whose positions are dear
    (schedule.chunks), which this shows."""

    positions: int


@dataclass(frozen=True)
class Verification:
    """The check a result went through (`audit`, `replicate`) and how it ended
    (`recomputed`: the audit found the answer wrong, blamed nobody, and had the request
    computed again from fresh caches: `audit.Verdict.recompute`)."""

    check: str
    outcome: Literal["verified", "unverified", "liar_found", "recomputed"]


@dataclass(frozen=True)
class LoopRestarted:
    """A node's long-running loop failed unexpectedly and is being restarted."""

    loop: str


@dataclass(frozen=True)
class GatewayRefusing:
    """The acting gateway starts (True) or stops (False) refusing new tasks: the members
    it lost, and cannot reach, could agree a takeover without it."""

    refusing: bool


MetricsEvent = (
    TaskSubmitted
    | TaskFinished
    | TokenProduced
    | MessageSent
    | MessageReceived
    | MessageDropped
    | PartitionComputed
    | ConsensusRound
    | PhaseTransition
    | NodeFailure
    | QueueDepth
    | NodeStatus
    | Eviction
    | Suspension
    | RecoveryCompleted
    | CheckpointCopied
    | PeerError
    | Verification
    | LoopRestarted
    | GatewayRefusing
    | StageStepTimed
    | HopTimed
    | Traversed
    | PromptChunked
)

Emit = Callable[[MetricsEvent], None]
"""The sink components receive; `Metrics.emit` in production, `list.append` in tests."""


def discard(event: MetricsEvent) -> None:
    """An `Emit` for callers that want no metrics (one-off tools, unit tests)."""


__all__ = [
    "NODE_STATES",
    "ConsensusRound",
    "Emit",
    "HopTimed",
    "LoopRestarted",
    "MessageDropped",
    "MessageReceived",
    "MessageSent",
    "MetricsEvent",
    "NodeFailure",
    "NodeState",
    "NodeStatus",
    "PartitionComputed",
    "PeerError",
    "PhaseTransition",
    "PromptChunked",
    "QueueDepth",
    "StageStepTimed",
    "TaskFinished",
    "TaskOutcome",
    "TaskSubmitted",
    "TokenProduced",
    "Traversed",
    "discard",
]
