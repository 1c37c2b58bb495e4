"""Metrics: every event moves its collector, the text is valid Prometheus, no global state."""

from __future__ import annotations

import socket
import typing
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from butterfly.metrics.events import (
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
from butterfly.metrics.prometheus import CONTENT_TYPE, Metrics
from butterfly.testing.inprocess import InProcessCluster
from butterfly.types.ids import NodeId
from butterfly.wiring.metrics_http import MetricsServer

REQUIRED = {
    "butterfly_task_latency_seconds",
    "butterfly_tasks",
    "butterfly_time_to_first_token_seconds",
    "butterfly_time_per_output_token_seconds",
    "butterfly_bytes_transferred",
    "butterfly_messages_sent",
    "butterfly_messages_received",
    "butterfly_messages_dropped",
    "butterfly_partition_computation_duration_seconds",
    "butterfly_partition_cache_hit_ratio",
    "butterfly_consensus_rounds",
    "butterfly_phase_transitions",
    "butterfly_node_failures",
    "butterfly_queue_depth",
    "butterfly_gateway_refusing_tasks",
    "butterfly_node_status",
    "butterfly_byzantine_evictions",
    "butterfly_suspensions",
    "butterfly_recovery_seconds",
    "butterfly_verifications",
    "butterfly_prompt_tokens",
    "butterfly_generated_tokens",
    "butterfly_stage_step_seconds",
    "butterfly_hop_seconds",
    "butterfly_pipeline_traversals",
    "butterfly_draft_tokens",
    "butterfly_draft_accepted_tokens",
}

ONE_OF_EACH: list[MetricsEvent] = [
    TaskSubmitted(priority=2, prompt_tokens=17),
    TaskFinished("completed", 0.2),
    TokenProduced(True, 0.05),
    TokenProduced(False, 0.003),
    MessageSent("stage_step", 4200, 4096),
    MessageReceived("stage_result", 4100),
    MessageDropped("oversized"),
    PartitionComputed(0.002, cache_hit=False),
    ConsensusRound(),
    PhaseTransition("normal", "view_change"),
    NodeFailure(NodeId(3)),
    QueueDepth(7),
    NodeStatus(NodeId(2), "suspected"),
    Eviction(NodeId(1)),
    Suspension(NodeId(2)),
    RecoveryCompleted(0.8),
    CheckpointCopied(2048),
    PeerError(NodeId(2), "connection_failed", retriable=True),
    Verification("audit", "verified"),
    LoopRestarted("result_expiry"),
    GatewayRefusing(True),
    StageStepTimed(stage=1, seconds=0.004),
    HopTimed(NodeId(2), 0.0002),
    Traversed(drafted=4, accepted=3),
    PromptChunked(positions=8),
]


def value(m: Metrics, name: str, **labels: str) -> float | None:
    found = m.registry.get_sample_value(name, labels)
    return None if found is None else float(found)


def test_one_event_of_every_kind_is_covered() -> None:
    kinds = set(typing.get_args(MetricsEvent))
    assert {type(e) for e in ONE_OF_EACH} == kinds


def test_each_event_moves_its_metric() -> None:
    m = Metrics()
    for event in ONE_OF_EACH:
        m.emit(event)
    assert value(m, "butterfly_tasks_submitted_total") == 1
    assert value(m, "butterfly_tasks_total", status="completed") == 1
    assert value(m, "butterfly_tasks_total", status="failed") == 0
    assert value(m, "butterfly_task_latency_seconds_sum") == 0.2
    assert value(m, "butterfly_time_to_first_token_seconds_count") == 1
    assert value(m, "butterfly_time_per_output_token_seconds_sum") == 0.003
    assert value(m, "butterfly_bytes_transferred_total") == 4096
    assert value(m, "butterfly_messages_sent_total", kind="stage_step") == 1
    assert value(m, "butterfly_messages_received_total", kind="stage_result") == 1
    assert value(m, "butterfly_messages_dropped_total", reason="oversized") == 1
    assert value(m, "butterfly_partition_computation_duration_seconds_count") == 1
    assert value(m, "butterfly_consensus_rounds_total") == 1
    transition = {"from_phase": "normal", "to_phase": "view_change"}
    assert value(m, "butterfly_phase_transitions_total", **transition) == 1
    assert value(m, "butterfly_node_failures_total") == 1
    assert value(m, "butterfly_checkpoint_bytes_sum") == 2048
    assert value(m, "butterfly_view_changes_total") == 1
    assert value(m, "butterfly_queue_depth") == 7
    assert value(m, "butterfly_gateway_refusing_tasks") == 1
    assert value(m, "butterfly_peer_errors_total", node="2", error="connection_failed") == 1
    assert value(m, "butterfly_node_status", node="2", butterfly_node_status="suspected") == 1
    assert value(m, "butterfly_node_status", node="2", butterfly_node_status="healthy") == 0
    assert value(m, "butterfly_loop_restarts_total", loop="result_expiry") == 1
    assert value(m, "butterfly_prompt_tokens_total") == 17
    assert value(m, "butterfly_generated_tokens_total") == 2  # one TokenProduced each
    assert value(m, "butterfly_stage_step_seconds_count", stage="1") == 1
    assert value(m, "butterfly_stage_step_seconds_sum", stage="1") == 0.004
    assert value(m, "butterfly_hop_seconds_count", peer="2") == 1
    assert value(m, "butterfly_pipeline_traversals_total") == 1
    assert value(m, "butterfly_draft_tokens_total") == 4
    assert value(m, "butterfly_draft_accepted_tokens_total") == 3
    assert value(m, "butterfly_prompt_chunk_positions_count") == 1
    assert value(m, "butterfly_prompt_chunk_positions_bucket", le="4.0") == 0
    assert value(m, "butterfly_prompt_chunk_positions_bucket", le="8.0") == 1


def test_a_peer_that_fails_straight_from_healthy_counts_as_suspected_once() -> None:
    """The membership check samples the detector every 100 ms; a killed peer often passes
    the suspected band between two samples, and 3 of 8 kills were never counted."""
    m = Metrics()
    for status in ("healthy", "failed", "healthy", "suspected", "failed", "healthy"):
        m.emit(NodeStatus(NodeId(3), status))  # type: ignore[arg-type]
    assert value(m, "butterfly_suspicions_total", node="3") == 2


def test_kv_gauges_read_the_caches_at_each_scrape() -> None:
    m = Metrics()
    held = [(0, 0)]
    m.watch_kv(3, lambda: held[0])
    assert value(m, "butterfly_kv_cache_bytes", node="3") == 0
    held[0] = (2, 4096)
    assert value(m, "butterfly_kv_cache_bytes", node="3") == 4096
    assert value(m, "butterfly_kv_caches", node="3") == 2


async def test_a_node_without_the_api_serves_its_metrics() -> None:
    m = Metrics()
    m.emit(StageStepTimed(stage=2, seconds=0.01))
    server = MetricsServer("127.0.0.1:0", m.render)
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            ok = await client.get("/metrics")
            missing = await client.get("/other")
    finally:
        await server.close()
    assert ok.status_code == 200 and ok.headers["content-type"] == CONTENT_TYPE
    families = {f.name for f in text_string_to_metric_families(ok.text)}
    assert "butterfly_stage_step_seconds" in families
    assert missing.status_code == 404


async def test_a_taken_metrics_port_is_refused_naming_metrics_listen() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=rf"metrics\.listen 127\.0\.0\.1:{port}"):
            await MetricsServer(f"127.0.0.1:{port}", lambda: b"").start()
    finally:
        taken.close()


async def test_metrics_disabled_serves_them_on_no_metrics_listen(
    tiny_model: Path, tmp_path: Path
) -> None:
    """metrics.enabled = false was ignored where metrics.listen was set (a review)."""
    settings = {"metrics.enabled": False, "metrics.listen": "127.0.0.1:0"}
    c = InProcessCluster(tiny_model, 1, tmp_path, f=0, settings=settings, absent={0})
    node = c.nodes[0]
    try:
        assert node.scrape is None
    finally:
        node.stage_server.close()
        node.config.history.close()
    settings["metrics.enabled"] = True
    c = InProcessCluster(tiny_model, 1, tmp_path / "on", f=0, settings=settings, absent={0})
    node = c.nodes[0]
    try:
        assert node.scrape is not None
    finally:
        node.stage_server.close()
        node.config.history.close()


def test_cache_hit_ratio_tracks_lookups() -> None:
    m = Metrics()
    for hit in (True, True, False, True):
        m.emit(PartitionComputed(0.001, cache_hit=hit))
    assert value(m, "butterfly_partition_cache_hit_ratio") == 0.75


def test_render_is_valid_prometheus_text_with_every_required_metric() -> None:
    m = Metrics()
    for event in ONE_OF_EACH:
        m.emit(event)
    families = {f.name: f for f in text_string_to_metric_families(m.render().decode())}
    assert set(families) >= REQUIRED
    assert families["butterfly_task_latency_seconds"].type == "histogram"
    assert families["butterfly_tasks"].type == "counter"
    assert "version=0.0.4" in CONTENT_TYPE


def test_two_instances_share_nothing() -> None:
    a, b = Metrics(), Metrics()  # a global registry would refuse the second one
    a.emit(TaskSubmitted())
    assert value(a, "butterfly_tasks_submitted_total") == 1
    assert value(b, "butterfly_tasks_submitted_total") == 0


async def test_the_gateway_times_its_hop_to_a_remote_first_stage() -> None:
    from tests.engine_util import STAGE, chain, generate

    events: list[MetricsEvent] = []
    engine, sent = chain([], events)
    assert await generate(engine, tokens=3) == [3, 3, 3]
    hops = [e for e in events if isinstance(e, HopTimed)]
    assert [h.peer for h in hops] == [STAGE] * len(sent) == [STAGE] * 3
    assert all(h.seconds >= 0 for h in hops)
