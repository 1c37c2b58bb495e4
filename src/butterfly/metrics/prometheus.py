"""Prometheus collectors fed by metrics events.

`Metrics` owns its own `CollectorRegistry` rather than using prometheus-client's global
one: several nodes run in one test process, and a global registry would refuse the second
node's collectors (duplicate names) or, worse, mix the nodes' figures together.

Names follow seed 001's "Key Metrics" with a `butterfly_` prefix, plus time to first
token and time per output token, which are what users of a generation service compare.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import assert_never

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from butterfly.metrics.events import (
    NODE_STATES,
    CheckpointCopied,
    ConsensusRound,
    Eviction,
    GatewayRefusing,
    HopTimed,
    LoopRestarted,
    MessageDropped,
    MessageReceived,
    MessageSent,
    MetricsEvent,
    NodeFailure,
    NodeStatus,
    PartitionComputed,
    PeerError,
    PhaseTransition,
    PromptChunked,
    QueueDepth,
    RecoveryCompleted,
    StageStepTimed,
    Suspension,
    TaskFinished,
    TaskSubmitted,
    TokenProduced,
    Traversed,
    Verification,
)

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
"""The text exposition format every Prometheus server reads (`version=0.0.4`)."""

NAMESPACE = "butterfly"

# Buckets sized for this workload: a whole request takes milliseconds (tiny model) to
# minutes (long generations on CPU); one decode step takes well under a millisecond to
# about a second.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TOKEN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
PARTITION_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5)
# A stage step: a decode step of a few layers takes well under a millisecond to tens of
# milliseconds; a long prompt's prefill up to tens of seconds on CPU.
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, 30)
# Handing a frame to the next node: microseconds for a decode step's activations, up to
# seconds for a long prefill's over a slow link.
HOP_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1, 5)
# Positions of a prompt's chunk: 1 up to the largest generation.prefill_chunk in use.
CHUNK_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class Metrics:
    """The collectors of one node, and `emit` to update them from events.

    `emit` may be called from any thread (prometheus-client's collectors are thread-safe
    and the cache-ratio counts are guarded), so a worker thread can report directly.
    """

    def __init__(self) -> None:
        self._statuses: Callable[[], Mapping[int, str]] | None = None  # `watch_status`
        self.registry = CollectorRegistry(auto_describe=True)
        r, ns = self.registry, NAMESPACE
        self.tasks_submitted = Counter(
            "tasks_submitted", "Tasks accepted", namespace=ns, registry=r
        )
        self.prompt_tokens = Counter(
            "prompt_tokens", "Prompt tokens of the tasks accepted", namespace=ns, registry=r
        )
        self.generated_tokens = Counter(
            "generated_tokens",
            "Tokens generated (sampled by this gateway), retracted ones included",
            namespace=ns,
            registry=r,
        )
        self.kv_cache_bytes = Gauge(
            "kv_cache_bytes",
            "Bytes of KV cache this node holds (its stage's and its standby copies)",
            ["node"],
            namespace=ns,
            registry=r,
        )
        self.kv_caches = Gauge(
            "kv_caches",
            "KV caches (one per request and stage) this node holds",
            ["node"],
            namespace=ns,
            registry=r,
        )
        self.stage_step = Histogram(
            "stage_step_seconds",
            "One step batch on this node's stage (input decode, forward, records)",
            ["stage"],
            namespace=ns,
            registry=r,
            buckets=STEP_BUCKETS,
        )
        self.hop = Histogram(
            "hop_seconds",
            "Handing a stage's output to the next node (encode, write, link back-pressure)",
            ["peer"],
            namespace=ns,
            registry=r,
            buckets=HOP_BUCKETS,
        )
        self.prompt_chunk = Histogram(
            "prompt_chunk_positions",
            "Positions of each chunk a prompt (or replay) was sent in (generation.prefill_chunk "
            "at most; fewer while others decode, schedule.chunks)",
            namespace=ns,
            registry=r,
            buckets=CHUNK_BUCKETS,
        )
        self.traversals = Counter(
            "pipeline_traversals",
            "Steps a gateway sent down the whole chain for generations (divided by "
            "generated_tokens: traversals per token, which speculative decoding lowers)",
            namespace=ns,
            registry=r,
        )
        self.draft_tokens = Counter(
            "draft_tokens",
            "Draft tokens verified (generation.speculative)",
            namespace=ns,
            registry=r,
        )
        self.draft_accepted = Counter(
            "draft_accepted_tokens",
            "Draft tokens the model confirmed (generation.speculative)",
            namespace=ns,
            registry=r,
        )
        self.task_latency = Histogram(
            "task_latency_seconds",
            "Time from acceptance to a terminal state",
            namespace=ns,
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.tasks = Counter(
            "tasks", "Tasks finished, by terminal status", ["status"], namespace=ns, registry=r
        )
        self.ttft = Histogram(
            "time_to_first_token_seconds",
            "Time from acceptance to the first generated token",
            namespace=ns,
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.tpot = Histogram(
            "time_per_output_token_seconds",
            "Time between consecutive generated tokens of one task",
            namespace=ns,
            registry=r,
            buckets=TOKEN_BUCKETS,
        )
        self.bytes_transferred = Counter(
            "bytes_transferred", "Payload bytes moved between nodes", namespace=ns, registry=r
        )
        self.messages_sent = Counter(
            "messages_sent", "Peer messages sent", ["kind"], namespace=ns, registry=r
        )
        self.messages_received = Counter(
            "messages_received", "Peer messages received", ["kind"], namespace=ns, registry=r
        )
        self.messages_dropped = Counter(
            "messages_dropped",
            "Peer messages refused (malformed, oversized, unsigned, stale)",
            ["reason"],
            namespace=ns,
            registry=r,
        )
        self.partition_duration = Histogram(
            "partition_computation_duration_seconds",
            "Time to compute a stage plan",
            namespace=ns,
            registry=r,
            buckets=PARTITION_BUCKETS,
        )
        self.partition_cache_hit_ratio = Gauge(
            "partition_cache_hit_ratio",
            "Share of stage-plan lookups served from the cache",
            namespace=ns,
            registry=r,
        )
        self.consensus_rounds = Counter(
            "consensus_rounds", "Agreement rounds completed", namespace=ns, registry=r
        )
        self.phase_transitions = Counter(
            "phase_transitions",
            "Protocol phase changes",
            ["from_phase", "to_phase"],
            namespace=ns,
            registry=r,
        )
        self.node_failures = Counter(
            "node_failures", "Nodes declared failed", namespace=ns, registry=r
        )
        self.suspicions = Counter(
            "suspicions",
            "Times a peer became suspected (or failed straight from healthy: the check "
            "samples the detector, and a killed peer may pass the suspected band between "
            "two checks)",
            ["node"],
            namespace=ns,
            registry=r,
        )
        self._status: dict[int, str] = {}  # the last status each peer was reported in
        self.evictions = Counter(
            "byzantine_evictions", "Nodes evicted on evidence of lying", namespace=ns, registry=r
        )
        self.suspensions = Counter(
            "suspensions",
            "Nodes put out of the plans for a while for leaving their work unanswered",
            namespace=ns,
            registry=r,
        )
        self.recovery_seconds = Histogram(
            "recovery_seconds",
            "From a node's failure being declared (the detector's time to declare it, about "
            "0.5 s by default, not included) or its eviction to its stages running elsewhere",
            namespace=ns,
            registry=r,
        )
        self.view_changes = Counter(
            "view_changes", "Agreement view changes started", namespace=ns, registry=r
        )
        self.checkpoint_bytes = Histogram(
            "checkpoint_bytes",
            "Size of each KV-cache copy a chain node sends its standbys",
            buckets=tuple(float(4**i) for i in range(5, 16)),
            namespace=ns,
            registry=r,
        )
        self.verifications = Counter(
            "verifications",
            "Results by check and outcome",
            ["check", "outcome"],
            namespace=ns,
            registry=r,
        )
        self.peer_errors = Counter(
            "peer_errors",
            "Steps failed with an error blamed on a node (the error's `blame`)",
            ["node", "error"],
            namespace=ns,
            registry=r,
        )
        self.queue_depth = Gauge(
            "queue_depth", "Tasks waiting for an execution slot", namespace=ns, registry=r
        )
        self.gateway_refusing_tasks = Gauge(
            "gateway_refusing_tasks",
            "1 while this acting gateway refuses new tasks: it lost a quorum of the members",
            namespace=ns,
            registry=r,
        )
        self.node_status = Enum(
            "node_status",
            "Each node's state as this node sees it",
            ["node"],
            namespace=ns,
            registry=r,
            states=list(NODE_STATES),
        )
        self.loop_restarts = Counter(
            "loop_restarts",
            "A node's long-running loop failed unexpectedly and was restarted",
            ["loop"],
            namespace=ns,
            registry=r,
        )
        for status in ("completed", "failed", "cancelled"):
            self.tasks.labels(status=status)  # present at 0, so rate() works from the start
        self._cache_lock = threading.Lock()
        self._cache_hits = 0
        self._cache_lookups = 0
        # labelled children by label value: `labels()` checks and hashes its arguments
        # under a lock on every call, and the frame and step events (about 24 per request
        # on a gateway under bench/api.py) went through it each time; a dict lookup does not
        self._sent: dict[str, Counter] = {}
        self._received: dict[str, Counter] = {}
        self._steps: dict[int, Histogram] = {}
        self._hops: dict[int, Histogram] = {}

    def emit(self, event: MetricsEvent) -> None:
        """Update the collectors for one event; the `Emit` handed to components."""
        # a step's events first (frames in and out, the step and hop timings): `match`
        # tries the cases in order, and the two timings, at the end of the list, took
        # 1.7-1.9 µs an event against 1.25 at the top (warm, AMD EPYC)
        match event:
            case MessageSent(kind=kind, payload_bytes=n):
                sent = self._sent.get(kind)
                if sent is None:
                    sent = self._sent[kind] = self.messages_sent.labels(kind=kind)
                sent.inc()
                if n:
                    self.bytes_transferred.inc(n)
            case MessageReceived(kind=kind, payload_bytes=n):
                received = self._received.get(kind)
                if received is None:
                    received = self._received[kind] = self.messages_received.labels(kind=kind)
                received.inc()
                if n:
                    self.bytes_transferred.inc(n)
            case StageStepTimed(stage=stage, seconds=seconds):
                step = self._steps.get(stage)
                if step is None:
                    step = self._steps[stage] = self.stage_step.labels(stage=str(stage))
                step.observe(seconds)
            case HopTimed(peer=peer, seconds=seconds):
                hop = self._hops.get(peer)
                if hop is None:
                    hop = self._hops[peer] = self.hop.labels(peer=str(peer))
                hop.observe(seconds)
            case TokenProduced(first=first, seconds=seconds):
                (self.ttft if first else self.tpot).observe(seconds)
                self.generated_tokens.inc()
            case Traversed(drafted=drafted, accepted=accepted):
                self.traversals.inc()
                if drafted:
                    self.draft_tokens.inc(drafted)
                    self.draft_accepted.inc(accepted)
            case PromptChunked(positions=positions):
                self.prompt_chunk.observe(positions)
            case TaskSubmitted(prompt_tokens=prompt):
                self.tasks_submitted.inc()
                self.prompt_tokens.inc(prompt)
            case TaskFinished(status=status, latency_s=latency):
                self.tasks.labels(status=status).inc()
                self.task_latency.observe(latency)
            case MessageDropped(reason=reason):
                self.messages_dropped.labels(reason=reason).inc()
            case PartitionComputed(seconds=seconds, cache_hit=hit):
                self.partition_duration.observe(seconds)
                with self._cache_lock:
                    self._cache_lookups += 1
                    self._cache_hits += int(hit)
                    ratio = self._cache_hits / self._cache_lookups
                self.partition_cache_hit_ratio.set(ratio)
            case ConsensusRound(rounds=rounds):
                self.consensus_rounds.inc(rounds)
            case PhaseTransition(from_phase=a, to_phase=b):
                self.phase_transitions.labels(from_phase=a, to_phase=b).inc()
                if b == "view_change":
                    self.view_changes.inc()
            case NodeFailure():
                self.node_failures.inc()
            case Eviction():
                self.evictions.inc()
            case Suspension():
                self.suspensions.inc()
            case RecoveryCompleted(seconds=seconds):
                self.recovery_seconds.observe(seconds)
            case CheckpointCopied(bytes=size):
                self.checkpoint_bytes.observe(size)
            case Verification(check=check, outcome=outcome):
                self.verifications.labels(check=check, outcome=outcome).inc()
            case PeerError(node=node, error=error):
                self.peer_errors.labels(node=str(node), error=error).inc()
            case QueueDepth(depth=depth):
                self.queue_depth.set(depth)
            case GatewayRefusing(refusing=refusing):
                self.gateway_refusing_tasks.set(1 if refusing else 0)
            case NodeStatus(node=node, status=status):
                self.node_status.labels(node=str(node)).state(status)
                before, self._status[node] = self._status.get(node), status
                if status == "suspected" or (status == "failed" and before != "suspected"):
                    self.suspicions.labels(node=str(node)).inc()
            case LoopRestarted(loop=loop):
                self.loop_restarts.labels(loop=loop).inc()
            case _:
                assert_never(event)

    def watch_kv(self, node: int, caches: Callable[[], tuple[int, int]]) -> None:
        """Read this node's KV caches, (count, bytes), whenever the metrics are scraped:
        a gauge that is always current without a hook on every cache change."""
        self.kv_caches.labels(node=str(node)).set_function(lambda: caches()[0])
        self.kv_cache_bytes.labels(node=str(node)).set_function(lambda: caches()[1])

    def watch_status(self, statuses: Callable[[], Mapping[int, str]]) -> None:
        """Read every member's status from `statuses` whenever the metrics are scraped,
        over what the status events last set: a member never heard from in
        `coordination.never_heard_s` changes no detector state (no event says so), yet
        GET /health shows it "failed" (control.status.ClusterReport), and
        `node_status` must say what /health says."""
        self._statuses = statuses

    def render(self) -> bytes:
        """The registry in Prometheus text format (serve with `CONTENT_TYPE`)."""
        if self._statuses is not None:
            for node, status in self._statuses().items():
                self.node_status.labels(node=str(node)).state(status)
        return generate_latest(self.registry)


__all__ = ["CONTENT_TYPE", "Metrics"]
