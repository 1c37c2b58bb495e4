"""Request tracing and request ids in logs, through whole nodes in one process.

Four nodes (butterfly.testing.inprocess) with every node's spans going to one in-memory
exporter: a traced request gives one `request` span on the gateway and, under it, a
`stage_step` span per stage per step, recorded on the node that ran the stage, all in
the request's trace. Tracing off (or a request not drawn) puts nothing on the wire.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from butterfly.config import ConfigManager
from butterfly.metrics.events import MetricsEvent, TaskSubmitted
from butterfly.metrics.logcontext import REQUEST_ID, RequestIdFilter
from butterfly.metrics.tracing import CONTEXT_BYTES, Tracing, decode_context, otlp_exporter
from butterfly.net.conn import Reply
from butterfly.net.framing import Envelope
from butterfly.runtime.tokenizer import TextCodec
from butterfly.schedule.engine import TokenSink
from butterfly.schedule.scheduler import Scheduler
from butterfly.schedule.store import TaskStore
from butterfly.testing.inprocess import InProcessCluster
from butterfly.testing.pipeline import LocalPipeline
from butterfly.types.errors import ServiceUnavailable
from butterfly.types.ids import NodeId, RequestId
from butterfly.types.model import LayerRange
from butterfly.types.tasks import InferenceResult, InferenceTask
from butterfly.types.wire.data import StageStep
from butterfly.types.wire.frames import from_body, to_body
from butterfly.wiring.routing import Route

pytestmark = pytest.mark.timeout(120)
BASE = {"coordination.heartbeat_interval_ms": 10}
TRACED = {**BASE, "observability.tracing": True, "observability.trace_sample_rate": 1.0}
NEW = 6
REQUEST_PATH = "butterfly.dataplane.routes"


def task(model: Path, name: str) -> InferenceTask:
    ids = tuple(TextCodec.load(model).encode("Once upon a time"))
    return InferenceTask(RequestId(name), input_ids=ids, max_new_tokens=NEW)


def change(manager: ConfigManager, patch: dict[str, Any]) -> None:
    """Apply `patch` as the cluster would (local keys at once, as tests/test_live_config)."""
    result = manager.update(patch)
    if result.pending is not None:
        manager.apply_committed(result.pending, manager.history.last_cluster_seq() + 1)


def spans_of(c: InProcessCluster, exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    for node in c.nodes:
        assert node.tracing.flush()
    return list(exporter.get_finished_spans())


async def started(c: InProcessCluster) -> None:
    await c.first_plan()


async def test_a_traced_request_has_a_span_per_stage_step_under_its_own(
    tiny_model: Path, tmp_path: Path
) -> None:
    exporter = InMemorySpanExporter()
    async with InProcessCluster(tiny_model, 4, tmp_path, f=1, settings=TRACED, spans=exporter) as c:
        await started(c)
        plan = c.gateway.stage_server.plan
        assert plan is not None and len(plan.stages) >= 2
        result = await c.gateway.engine.run(task(tiny_model, "traced"), lambda token: None)
        spans = spans_of(c, exporter)
    (root,) = [s for s in spans if s.name == "request"]
    assert root.parent is None and root.context is not None
    assert root.attributes is not None
    assert root.attributes["butterfly.request_id"] == "traced"
    assert root.attributes["butterfly.generated_tokens"] == len(result.output_ids)
    steps = [s for s in spans if s.name == "stage_step"]
    for s in steps:  # one trace, each step a child of the request's span
        assert s.context is not None and s.context.trace_id == root.context.trace_id
        assert s.parent is not None and s.parent.span_id == root.context.span_id
    # one span per stage per forward pass (one pass per generated token), each recorded
    # by the node that ran the stage
    assert len(steps) == len(plan.stages) * len(result.output_ids)
    ran = {
        (
            s.attributes["butterfly.node"],
            s.attributes["butterfly.stage"],
            s.resource.attributes["butterfly.node"],
        )
        for s in steps
        if s.attributes is not None
    }
    assert ran == {(node, i, node) for i, (node, _) in enumerate(plan.stages)}
    first = min(steps, key=lambda s: s.start_time or 0)
    assert first.attributes is not None and first.attributes["butterfly.position"] == 0
    assert root.start_time is not None and root.end_time is not None
    assert all(root.start_time <= (s.start_time or 0) <= root.end_time for s in steps)


async def test_tracing_off_or_undrawn_puts_nothing_on_the_wire_then_follows_the_config(
    tiny_model: Path, tmp_path: Path
) -> None:
    """observability.tracing and trace_sample_rate are dynamic: the next request follows."""
    exporter = InMemorySpanExporter()
    sent: list[StageStep] = []
    c = InProcessCluster(tiny_model, 4, tmp_path, f=1, settings=BASE, spans=exporter)
    for node in c.nodes[1:]:  # every step a stage node receives, as it arrives
        route = node.routes[StageStep]

        async def watching(peer: NodeId, env: Envelope, route: Route = route) -> Reply | None:
            assert isinstance(env.msg, StageStep)
            sent.append(env.msg)
            return await route(peer, env)

        node.routes[StageStep] = watching
    async with c:
        await started(c)
        gw = c.gateway
        await gw.engine.run(task(tiny_model, "off"), lambda token: None)
        assert sent and all(m.trace == () and "trace" not in to_body(m) for m in sent)
        assert spans_of(c, exporter) == []

        change(gw.config, {"observability.tracing": True, "observability.trace_sample_rate": 0.0})
        await gw.engine.run(task(tiny_model, "undrawn"), lambda token: None)
        assert all(m.trace == () for m in sent) and spans_of(c, exporter) == []

        for node in c.nodes:  # stage nodes record only when their own tracing is on
            change(node.config, {"observability.tracing": True})
        change(gw.config, {"observability.trace_sample_rate": 1.0})
        sent.clear()
        await gw.engine.run(task(tiny_model, "drawn"), lambda token: None)
        assert sent and all(len(m.trace) == 1 and len(m.trace[0]) == CONTEXT_BYTES for m in sent)
        names = {s.name for s in spans_of(c, exporter)}
        assert names == {"request", "stage_step"}


def test_a_context_survives_the_wire_and_a_malformed_one_is_ignored() -> None:
    step = StageStep(
        (RequestId("a"), RequestId("b")), (1, 1), (0, 0), (1, 1), (), 0, True, (), (b"", b"x" * 24)
    )
    assert from_body("stage_step", to_body(step)) == step
    assert decode_context(b"\0" * 24) is None  # trace id 0 is no trace
    assert decode_context(b"x" * 23) is None
    exporter = InMemorySpanExporter()
    tracing = Tracing(node=1, exporter=exporter, enabled=True, sample_rate=1.0)
    tracing.record_step(b"\0" * 24, 1, 2, {})
    tracing.record_step(b"short", 1, 2, {})
    assert tracing.flush() and exporter.get_finished_spans() == ()
    tracing.close()


async def test_every_log_line_of_a_request_names_it(
    tiny_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.handler.addFilter(RequestIdFilter())
    caplog.set_level(logging.DEBUG, logger="butterfly")
    async with InProcessCluster(tiny_model, 4, tmp_path, f=1, settings=BASE) as c:
        await started(c)
        caplog.clear()
        await c.gateway.engine.run(task(tiny_model, "logged"), lambda token: None)
        during = list(caplog.records)
    # the request's path, on the gateway and on the stage nodes (other lines, such as a
    # late plan applied on a standby, are no request's and carry no id)
    path = [r for r in during if r.name in ("butterfly.dataplane.engine", REQUEST_PATH)]
    assert {getattr(r, "request_id", None) for r in path} == {"logged"}
    stage_lines = [r for r in path if r.name == REQUEST_PATH]
    nodes = {r.args[0] for r in stage_lines if isinstance(r.args, tuple)}
    assert nodes == {0, 1}  # the gateway's stage and node 1's, in their own handlers


def test_json_and_text_lines_carry_the_request_id() -> None:
    from butterfly.wiring.logs import TEXT_FORMAT, JsonLines

    record = logging.LogRecord("butterfly.x", logging.INFO, __file__, 1, "hello", None, None)
    token = REQUEST_ID.set("r-7")
    try:
        assert RequestIdFilter().filter(record)
    finally:
        REQUEST_ID.reset(token)
    assert json.loads(JsonLines("production", 3).format(record))["request_id"] == "r-7"
    text = logging.Formatter(TEXT_FORMAT)
    assert text.format(record).endswith("butterfly.x: [request r-7] hello")
    outside = logging.LogRecord("butterfly.x", logging.INFO, __file__, 1, "idle", None, None)
    RequestIdFilter().filter(outside)
    assert "request_id" not in json.loads(JsonLines("production", 3).format(outside))
    assert text.format(outside).endswith("butterfly.x: idle")


def test_spans_go_to_the_configured_otlp_endpoint() -> None:
    """observability.otlp_endpoint: spans leave as OTLP/HTTP (protobuf) POSTs."""
    received: list[tuple[str, bytes]] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, body))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        exporter = otlp_exporter(f"http://127.0.0.1:{server.server_port}/v1/traces")
        tracing = Tracing(node=0, exporter=exporter, enabled=True, sample_rate=1.0)
        trace = tracing.start_request("exported-request", {"butterfly.prompt_tokens": 3})
        assert trace is not None
        trace.end({"butterfly.generated_tokens": 1})
        assert tracing.flush()
        tracing.close()
    finally:
        server.shutdown()
        server.server_close()
    assert [path for path, _ in received] == ["/v1/traces"]
    assert b"exported-request" in received[0][1]
    assert otlp_exporter("") is None


async def test_the_schedulers_lines_about_a_task_name_it(
    tiny_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A failed task's line comes from the scheduler, after the engine gave up."""
    codec = TextCodec.load(tiny_model)

    class NoPlan(LocalPipeline):
        async def run(self, task: InferenceTask, on_token: TokenSink) -> InferenceResult:
            raise ServiceUnavailable("the cluster has no stage plan yet")

    engine = NoPlan(tiny_model, [LayerRange(0, 4)], stop_ids=codec.eos_ids)
    store = TaskStore(tmp_path / "t.db")
    events: list[MetricsEvent] = []
    scheduler = Scheduler(engine=engine, store=store, emit=events.append)
    caplog.handler.addFilter(RequestIdFilter())
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(scheduler.run())
            await scheduler.submit(task(tiny_model, "doomed"))
            await scheduler.wait("doomed", 30)
            scheduler.shutdown()
    finally:
        engine.close()
        store.close()
    failed = [r for r in caplog.records if "failed" in r.getMessage()]
    assert failed and all(getattr(r, "request_id", "") == "doomed" for r in failed)
    (submitted,) = [e for e in events if isinstance(e, TaskSubmitted)]
    assert submitted.prompt_tokens == len(task(tiny_model, "doomed").input_ids)


def test_a_stopped_node_does_not_close_the_shared_exporter_of_an_in_process_cluster() -> None:
    from butterfly.net.memory import MemoryNetwork
    from butterfly.testing.inprocess import BeatHub, FakeClock, MemoryEdges

    exporter = InMemorySpanExporter()
    edges = MemoryEdges(MemoryNetwork(), BeatHub(FakeClock()), exporter)
    stopped = Tracing(node=3, exporter=edges.spans(), enabled=True, sample_rate=1.0)
    running = Tracing(node=0, exporter=edges.spans(), enabled=True, sample_rate=1.0)
    stopped.close()  # as a node that stops or restarts does
    trace = running.start_request("after", {})
    assert trace is not None
    trace.end({})
    assert running.flush()
    assert [s.name for s in exporter.get_finished_spans()] == ["request"]
    running.close()
