"""Request traces (OpenTelemetry): one span per request, a child per stage step.

The gateway decides, once per request, whether to trace it (`observability.tracing` and
`trace_sample_rate`, head sampling): an untraced request costs one random draw and
nothing on the wire. A traced one opens a `request` span on the gateway; its context
travels in each `StageStep` (`trace`, one entry per request of the batch, 24 bytes:
trace id and the request span's id), and every node that runs a step records a
`stage_step` span under it, so one trace shows the whole chain of every token, across
nodes. A node forwards the context unchanged, so every stage step is a child of the
request span (not of the stage before it): the trace reads as the request and, under
it, each step of each stage in time order.

Each node has its own `TracerProvider` (several nodes share a process in tests, and
OpenTelemetry's global provider would mix them) exporting in batches off the event loop
(`BatchSpanProcessor`), over OTLP/HTTP when `observability.otlp_endpoint` is set. Spans
of a step are recorded after it ran, with the times measured then, so tracing adds no
await and no lock to the step's path.

A context from a peer is only ever used as a parent id: one that is malformed is ignored
(the step runs untraced), so a lying peer can at most add spans to a trace of its own.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import Any

from opentelemetry import trace as api
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

log = logging.getLogger(__name__)

CONTEXT_BYTES = 24
"""A carried context: the trace id (16 bytes) and the parent span's id (8), big-endian.
Only sampled requests carry one, so no flags travel."""

Attributes = Mapping[str, str | int | float | bool]


def otlp_exporter(endpoint: str) -> SpanExporter | None:
    """The OTLP/HTTP exporter for `observability.otlp_endpoint`, or None when empty."""
    if not endpoint:
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    exporter: SpanExporter = OTLPSpanExporter(endpoint=endpoint)
    return exporter


def encode_context(ctx: api.SpanContext) -> bytes:
    return ctx.trace_id.to_bytes(16, "big") + ctx.span_id.to_bytes(8, "big")


def decode_context(data: bytes) -> api.SpanContext | None:
    """A peer's context as a remote parent, or None when it is not one."""
    if len(data) != CONTEXT_BYTES:
        return None
    ctx = api.SpanContext(
        trace_id=int.from_bytes(data[:16], "big"),
        span_id=int.from_bytes(data[16:], "big"),
        is_remote=True,
        trace_flags=api.TraceFlags(api.TraceFlags.SAMPLED),
    )
    return ctx if ctx.is_valid else None


class RequestTrace:
    """The gateway's span of one traced request; `context` is what its steps carry."""

    def __init__(self, span: api.Span) -> None:
        self._span = span
        self.context = encode_context(span.get_span_context())

    def end(self, attributes: Attributes, error: str = "") -> None:
        self._span.set_attributes(dict(attributes))
        if error:
            self._span.set_status(api.Status(api.StatusCode.ERROR, error))
        self._span.end()


class Tracing:
    """A node's tracer: `start_request` on the gateway, `record_step` on stage nodes.

    Without an exporter (no endpoint configured, none injected) it records nothing,
    whatever the settings say. `retune` applies a changed `observability.tracing` or
    `trace_sample_rate` to the next request (and, on stage nodes, the next step)."""

    def __init__(
        self,
        *,
        node: int,
        exporter: SpanExporter | None,
        enabled: bool = False,
        sample_rate: float = 0.0,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self._provider: TracerProvider | None = None
        self._tracer: api.Tracer | None = None
        if exporter is not None:
            # not Resource.create: the node's identity comes from its config, not from
            # OTEL_* variables of whatever environment started it
            resource = Resource({"service.name": "butterfly", "butterfly.node": node})
            self._provider = TracerProvider(resource=resource)
            self._provider.add_span_processor(BatchSpanProcessor(exporter))
            self._tracer = self._provider.get_tracer("butterfly")
        self.node, self._draw = node, draw
        self._enabled, self._rate = enabled, sample_rate
        if enabled and exporter is None:
            log.warning(
                "observability.tracing is on but observability.otlp_endpoint is empty: "
                "no spans are recorded"
            )

    @property
    def exports(self) -> bool:
        """Whether spans go anywhere (an exporter was given at start)."""
        return self._tracer is not None

    def retune(self, *, enabled: bool, sample_rate: float) -> None:
        self._enabled, self._rate = enabled, sample_rate

    @property
    def recording(self) -> bool:
        return self._tracer is not None and self._enabled

    def start_request(self, request_id: str, attributes: Attributes) -> RequestTrace | None:
        """A new root span for a request, when tracing is on and the draw picks it."""
        if self._tracer is None or not self._enabled or self._draw() >= self._rate:
            return None
        span = self._tracer.start_span(
            "request",
            kind=api.SpanKind.SERVER,
            attributes={"butterfly.request_id": request_id, **attributes},
        )
        return RequestTrace(span)

    def record_step(
        self, parent: bytes, start_ns: int, end_ns: int, attributes: Mapping[str, Any]
    ) -> None:
        """A `stage_step` span under a carried context, with the times it ran."""
        tracer = self._tracer
        if tracer is None or not self._enabled:
            return
        ctx = decode_context(parent)
        if ctx is None:
            return
        span = tracer.start_span(
            "stage_step",
            context=api.set_span_in_context(api.NonRecordingSpan(ctx)),
            kind=api.SpanKind.INTERNAL,
            attributes=dict(attributes),
            start_time=start_ns,
        )
        span.end(end_time=end_ns)

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Export what is buffered (tests read an in-memory exporter after this)."""
        return self._provider.force_flush(int(timeout_s * 1000)) if self._provider else True

    def close(self) -> None:
        """Export what is left and stop the export thread."""
        if self._provider is not None:
            self._provider.shutdown()


def now_ns() -> int:
    """Wall-clock time for span bounds (OpenTelemetry wants epoch nanoseconds)."""
    return time.time_ns()


__all__ = [
    "CONTEXT_BYTES",
    "RequestTrace",
    "Tracing",
    "decode_context",
    "encode_context",
    "now_ns",
    "otlp_exporter",
]
