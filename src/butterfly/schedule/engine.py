"""The seam between scheduling and execution.

The scheduler decides *when* a task runs; an engine decides *where* and runs it. The
running one is the gateway's `dataplane.engine.PipelineEngine`, which drives the stage
chain (a one-node cluster is a chain of one); `butterfly.testing.pipeline` runs that same
engine over stage servers in one process for the scheduler and API tests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from butterfly.types.ids import NodeId, RequestId
from butterfly.types.model import LayerRange
from butterfly.types.tasks import InferenceResult, InferenceTask, Sampled


@dataclass(frozen=True)
class Retraction:
    """Sent to a `TokenSink` when every token it was given so far is withdrawn: the check
    after the run found them wrong (a liar in the chain) and the request runs again; the
    tokens that follow replace them, from the first."""

    reason: str


@dataclass(frozen=True)
class PromptScored:
    """Sent to a `TokenSink` once the prompt is scored (a request that asked for its
    prompt's logprobs), before the first token: a stream that echoes the prompt sends
    them with it. The result holds them too (`InferenceResult.prompt_logprobs`)."""

    scores: tuple[Sampled, ...]


Token = int | Sampled
"""A produced token: its id, or with its logprobs when the request asked for them."""

Streamed = Token | Retraction | PromptScored
"""What a task's stream carries (`Scheduler.stream`), as its engine gave them."""

TokenSink = Callable[[Streamed], None]
"""Called with each new token as it is produced (for streaming), with the prompt's
scores when asked (`PromptScored`), and with a `Retraction` when those produced so far
are withdrawn; must not block."""


@dataclass(frozen=True)
class NodeHealth:
    node: NodeId
    status: str  # "healthy", "suspected", "failed", "starting"
    address: str
    layers: LayerRange | None  # the stage it runs in the current plan, if any
    last_seen_s: float | None = None  # seconds since its last heartbeat
    requests: int = 0  # KV caches it holds, as its last heartbeat said
    # evicted (a proven liar): given no layers whatever its heartbeats say (its status
    # alone showed such a node "healthy": a review)
    evicted: bool = False
    # out of the plans for a while for leaving its work unanswered (`Recovery.suspend`):
    # seconds left, or None (it looked like an idle healthy node: a review)
    suspended_s: float | None = None


@dataclass(frozen=True)
class ClusterHealth:
    healthy: bool
    epoch: int
    nodes: tuple[NodeHealth, ...] = ()
    services: dict[str, bool] = field(default_factory=dict)
    # The active plan with the facts it was computed from and its estimated cost per
    # token (JSON-ready), when the engine runs a decided plan; see control.planner.
    plan: Mapping[str, object] | None = None
    # why no plan is in force, in the nodes' own words (a checkpoint none of them can
    # load): the cluster serves no request until one is (`Recovery.unserved`)
    unserved: str | None = None


class Engine(Protocol):
    @property
    def max_context(self) -> int:
        """Positions the loaded model supports (prompt + new tokens must fit)."""

    @property
    def input_kind(self) -> str:
        """ "tokens" for language models, "vectors" for vector-input stacks."""

    @property
    def generates(self) -> bool:
        """False for an encoder: no next-token logits, so no generation."""

    async def run(self, task: InferenceTask, on_token: TokenSink) -> InferenceResult:
        """Run the task to completion. Raises a ButterflyError subclass on failure;
        `asyncio.CancelledError` when the task is cancelled, after freeing its state on
        every node. Tokens given to `on_token` that a later check finds wrong are
        withdrawn with a `Retraction` before their replacements come."""

    def health(self) -> ClusterHealth: ...


__all__ = [
    "ClusterHealth",
    "Engine",
    "NodeHealth",
    "PromptScored",
    "RequestId",
    "Retraction",
    "Streamed",
    "Token",
    "TokenSink",
]
