"""What a node measures about itself and its links, and how those facts travel.

Placement is computed by the gateway from facts every node reported about itself: its
compute rate, the fixed cost of a layer beyond its FLOPs, its memory, and the latency and
bandwidth of its links to the other nodes (`StatusReply`). This module measures them and
turns peers' reports back into the partitioner's `NodeCapability`, refusing reports that
could not be true.

When. A node measures once, when the gateway first asks for its status during cluster
start-up, not while its process is still starting. The gateway asks one node at a time
after every node is reachable (`rollout.gather_status`), so nodes sharing a machine, as
the local cluster does, do not measure each other's start-up or measurement load (four
nodes measuring at once on two cores would each see whatever share of the cores the
scheduler happened to give it, and identical nodes would get different plans). Later
queries (re-planning) reuse the first measurement, so a busy node does not look slow
because it is serving.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from butterfly.net.transport import Transport
from butterfly.partition.capability import Link, NodeCapability
from butterfly.runtime.torch_thread import TorchThread
from butterfly.types.errors import ButterflyError, InvalidMessage
from butterfly.types.ids import NodeId
from butterfly.types.wire.control import StatusReply
from butterfly.types.wire.data import Ping

log = logging.getLogger(__name__)

STREAM_ROWS, STREAM_COLS, STREAM_MATRICES = 4096, 1024, 6
"""Weights one streaming pass multiplies: 6 x 16 MiB of float32, more than the last-level
cache of the CPUs we run on (32 MiB here), so every pass reads from memory as decoding a
model larger than the cache does."""

FAST_QUANTILE = 0.1
"""Which trial time a measurement reports: the fastest tenth. Another process can only
make a trial slower, never faster, so the fast end shows what the node itself does (as
`timeit` takes the minimum); a tenth rather than the single fastest, so one trial timed
across a clock hiccup cannot set the figure."""

MODEL_PROBE_CONTEXT = 128
"""Tokens already in the KV cache when a served model's layer is timed (attention cost
grows with the context; this is the benchmark's prompt length)."""

SMALL_PROBES, BIG_PROBES = 11, 5
BIG_PROBE_BYTES = 1 << 20
"""Link probes: round trips of an empty ping (latency) and of a 1 MiB one (bandwidth)."""


def fast_quantile(samples: list[float]) -> float:
    """The FAST_QUANTILE of `samples` (durations: smaller is faster)."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(FAST_QUANTILE * len(ordered)))]


Step = Callable[[], object]


def streaming_pass() -> tuple[Step, float]:
    """One decode-shaped pass and its FLOPs: a single activation row times every matrix.

    Decoding a token multiplies one row by every weight matrix of the model, each read
    once from memory, so the rate that predicts decoding is that of one-row products over
    weights larger than the caches (bound by memory bandwidth), not of a square in-cache
    matmul (bound by arithmetic; about 20x faster on this machine, which made per-token
    estimates optimistic by as much).
    """
    weights = [torch.full((STREAM_ROWS, STREAM_COLS), 0.01) for _ in range(STREAM_MATRICES)]
    x = torch.full((1, STREAM_COLS), 0.5)

    def step() -> None:
        for w in weights:
            F.linear(x, w)

    return step, 2.0 * STREAM_ROWS * STREAM_COLS * STREAM_MATRICES


def model_layer_step(model_dir: Path) -> tuple[Step, float] | None:
    """One decode step through one middle layer of the served model, and its FLOPs.

    The per-layer cost that no FLOP count shows depends on the model's layer code and
    shapes: attention over the cache, norms, rotary tables, the cache write, matrices
    whose shapes stream slower than the probe's. On the small demo model (one thread) a
    layer's decode step took 4.1 ms, of which 3.3 ms were matrix products where the
    streaming rate predicted 2.9; the stand-in block (`stand_in_layer_step`) accounted
    for 0.4 ms of the difference, and per-token estimates came out a quarter short. So
    when the node knows its model it times the real thing: layer 1 (no embedding, no
    head) with its checkpoint weights, loaded with the runtime's own code, after a
    prefill of MODEL_PROBE_CONTEXT tokens, as Petals measures a server's throughput on a
    real block. None when the model has fewer than three layers or keeps no KV cache.
    """
    from butterfly.runtime.loader import layer_infos, load_stage  # torch-heavy: lazily
    from butterfly.types.model import LayerRange

    infos = layer_infos(model_dir)
    if len(infos) < 3:
        return None
    stage = load_stage(model_dir, LayerRange(1, 2))
    cache = stage.new_cache()
    if cache is None:  # a stateless stack (vector input): no decode step to time
        return None
    width = infos[0].output_size
    context = min(MODEL_PROBE_CONTEXT, stage.max_context - 1)
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        stage.forward(torch.randn(1, context, width, generator=generator), cache, 0)
    x = torch.randn(1, 1, width, generator=generator)

    def step() -> None:
        with torch.inference_mode():
            stage.forward(x, cache, context, last_only=True)
        cache.truncate(context)  # every step sees the same context

    return step, infos[1].compute_cost


def stand_in_layer_step() -> tuple[Step, float]:
    """A decoder layer's decode step when the served model cannot be timed, and its FLOPs.

    A block of the usual shape (RMS norms, fused q/k/v, rotary embedding, a KV cache
    write, attention, output projection, gated MLP) at a width of 64, where the
    arithmetic is microseconds and what remains is the per-operation cost every layer
    pays whatever its size.
    """
    d, heads, ctx = 64, 4, 32
    hd = d // heads
    norm_w = torch.ones(d)
    wqkv, wo = torch.full((3 * d, d), 0.01), torch.full((d, d), 0.01)
    w13, w2 = torch.full((8 * d, d), 0.01), torch.full((d, 4 * d), 0.01)
    keys, values = torch.zeros(1, heads, ctx, hd), torch.zeros(1, heads, ctx, hd)
    cos, sin = torch.ones(1, 1, 1, hd), torch.zeros(1, 1, 1, hd)
    x = torch.full((1, 1, d), 0.5)

    def norm(h: torch.Tensor) -> torch.Tensor:
        return norm_w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5))

    def rotary(t: torch.Tensor) -> torch.Tensor:
        a, b = t.chunk(2, dim=-1)
        return t * cos + torch.cat((-b, a), dim=-1) * sin

    def step() -> torch.Tensor:
        with torch.inference_mode():
            q, k, v = torch.split(F.linear(norm(x), wqkv), [d, d, d], -1)
            q = rotary(q.view(1, 1, heads, hd).transpose(1, 2))
            keys[:, :, -1:] = rotary(k.view(1, 1, heads, hd).transpose(1, 2))
            values[:, :, -1:] = v.view(1, 1, heads, hd).transpose(1, 2)
            out = F.scaled_dot_product_attention(q, keys, values)
            h = x + F.linear(out.transpose(1, 2).reshape(1, 1, d), wo)
            gate, up = F.linear(norm(h), w13).chunk(2, dim=-1)
            return h + F.linear(F.silu(gate) * up, w2)

    flops = 2.0 * (wqkv.numel() + wo.numel() + w13.numel() + w2.numel() + 2 * heads * ctx * hd)
    return step, flops


@dataclass(frozen=True)
class Compute:
    """A node's compute facts: decode-shaped FLOP/s and the fixed cost of a layer, from
    `trials` timings of each."""

    flops_per_s: float
    layer_overhead_ms: float
    trials: int = 0


def measure_compute(seconds: float = 0.5, *, model_dir: Path | None = None) -> Compute:
    """This node's compute rate and per-layer overhead, timed together.

    Trials alternate one streaming pass (the rate) and one layer step (the served
    model's, else the stand-in's), so both see the same moments of whatever else runs
    on the machine; each is reported at FAST_QUANTILE. The overhead is the layer's time
    beyond its FLOPs at the measured rate. Runs on torch's configured intra-op threads,
    as stages do.
    """
    stream, stream_flops = streaming_pass()
    layer: tuple[Step, float] | None = None
    if model_dir is not None:
        try:
            layer = model_layer_step(model_dir)
        except Exception as e:  # a model we cannot time this way still gets a figure
            log.warning("timing a layer of %s failed (%s); using a stand-in block", model_dir, e)
    layer_step, layer_flops = layer or stand_in_layer_step()
    with torch.inference_mode():
        stream()  # first touch: page faults and thread-pool start are not the rate
        layer_step()
    stream_s: list[float] = []
    layer_s: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(stream_s) < 5:
        started = time.perf_counter()
        with torch.inference_mode():
            stream()
        middle = time.perf_counter()
        layer_step()
        stream_s.append(middle - started)
        layer_s.append(time.perf_counter() - middle)
    rate = stream_flops / max(fast_quantile(stream_s), 1e-9)
    overhead_ms = fast_quantile(layer_s) * 1000.0 - 1000.0 * layer_flops / rate
    return Compute(rate, max(0.0, overhead_ms), len(stream_s))


def available_memory_bytes(limit_bytes: int = 0) -> int:
    """The memory this node offers for weights and KV caches.

    The configured `resources.memory_limit_bytes` when set; otherwise what the machine
    (and its cgroup, in a container) has available now, which is what loading a stage
    can actually use.
    """
    if limit_bytes > 0:
        return limit_bytes
    candidates: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                candidates.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        used = (cgroup / "memory.current").read_text().strip()
        if limit.isdigit() and used.isdigit():
            candidates.append(max(0, int(limit) - int(used)))
    except OSError:
        pass
    if not candidates:
        try:
            candidates.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError):
            return 0
    return min(candidates)


def room_to_load(limit_bytes: int = 0) -> int:
    """The bytes this process may still load (a range the gateway re-executes to audit
    it): under `resources.memory_limit_bytes`, the limit less what the process holds
    now; else four fifths of what the machine has available, the rest left to the KV
    caches and the machine's other work."""
    if limit_bytes > 0:
        try:
            resident = int(Path("/proc/self/statm").read_text().split()[1])
        except (OSError, ValueError, IndexError):
            return 0
        return max(0, limit_bytes - resident * os.sysconf("SC_PAGE_SIZE"))
    return available_memory_bytes() * 4 // 5


async def measure_link(transport: Transport, peer: NodeId, *, timeout_s: float = 10.0) -> Link:
    """Latency and bandwidth to `peer`, timed over the data channel tensors travel on.

    Latency is half the round trip of an empty ping: the one-way cost of a frame through
    both transports and event loops, as an activation's hop pays it. Bandwidth is the
    extra time a 1 MiB payload takes over the empty ping, so the fixed cost is not counted
    twice. Both round trips are taken at `FAST_QUANTILE` of several probes. A peer that
    answers with a count of bytes other than what was sent is not measured.
    """

    async def round_trip(seq: int, size: int) -> float:
        started = time.perf_counter()
        pong, _ = await transport.ask(
            peer, Ping(seq), b"\0" * size, timeout=timeout_s, channel="data"
        )
        elapsed = time.perf_counter() - started
        if pong.received != size:
            raise InvalidMessage(
                f"node {peer} answered a {size}-byte ping with {pong.received} bytes", blame=peer
            )
        return elapsed

    await round_trip(0, 0)  # connection set-up is not latency
    small = [await round_trip(1 + i, 0) for i in range(SMALL_PROBES)]
    big = [await round_trip(100 + i, BIG_PROBE_BYTES) for i in range(BIG_PROBES)]
    rtt, rtt_big = fast_quantile(small), fast_quantile(big)
    extra = max(rtt_big - rtt, 1e-6)  # a faster big probe is noise: call it 1 TB/s
    return Link(latency_ms=rtt / 2 * 1000.0, bandwidth_bytes_per_s=BIG_PROBE_BYTES / extra)


@dataclass(frozen=True)
class NodeFacts:
    """One node's own measurements, as it reports them."""

    flops_per_s: float
    memory_bytes: int
    links: Mapping[NodeId, Link] = field(default_factory=dict)
    layer_overhead_ms: float = 0.0

    def link_fields(self) -> tuple[tuple[NodeId, ...], tuple[float, ...], tuple[float, ...]]:
        """The links as StatusReply's parallel tuples (peer, latency, bandwidth)."""
        peers = tuple(sorted(self.links))
        return (
            peers,
            tuple(self.links[p].latency_ms for p in peers),
            tuple(self.links[p].bandwidth_bytes_per_s for p in peers),
        )


class Probe(Protocol):
    """Where a node's facts come from: measured (`FactProbe`), or fixed in a test."""

    async def facts(self) -> NodeFacts: ...


class FactProbe:
    """Measures this node's facts once, on first request, and remembers them."""

    def __init__(
        self,
        *,
        node: NodeId,
        peers: Sequence[NodeId],
        transport: Transport,
        memory_limit_bytes: int,
        torch_thread: TorchThread,
        model_dir: Path | None = None,
        compute_seconds: float = 0.5,
        reserved_bytes: int = 0,
    ) -> None:
        """`torch_thread`: the node's one thread for torch (runtime.torch_thread).
        `reserved_bytes`: memory the node keeps from the planner, for what it holds beside
        its stage (a gateway's draft model), taken off what it reports. `compute_seconds`:
        how long the compute probe runs (partition.compute_probe_s)."""
        self.node, self._peers, self._transport = node, list(peers), transport
        self._torch = torch_thread
        self._memory_limit, self._compute_seconds = memory_limit_bytes, compute_seconds
        self._reserved = max(0, reserved_bytes)
        self._model_dir = model_dir
        self._lock = asyncio.Lock()
        self._facts: NodeFacts | None = None
        self.compute: Compute | None = None
        """What the compute probe measured, once it has (its trial count with it)."""

    @property
    def measured(self) -> NodeFacts | None:
        return self._facts

    async def facts(self) -> NodeFacts:
        """The measured facts; the first call measures (compute off the event loop, so
        heartbeats keep flowing), concurrent callers wait for that one measurement."""
        async with self._lock:
            if self._facts is None:
                started = time.perf_counter()
                compute = self.compute = await self._torch.run(
                    lambda: measure_compute(self._compute_seconds, model_dir=self._model_dir)
                )
                took = time.perf_counter() - started  # with the layer's load and warm-up
                links: dict[NodeId, Link] = {}
                for peer in self._peers:
                    if peer == self.node:
                        continue
                    try:
                        links[peer] = await measure_link(self._transport, peer)
                    except ButterflyError as e:
                        log.warning("node %s: link to node %s not measured: %s", self.node, peer, e)
                memory = max(0, available_memory_bytes(self._memory_limit) - self._reserved)
                self._facts = NodeFacts(
                    compute.flops_per_s, memory, links, compute.layer_overhead_ms
                )
                log.info(
                    "node %s measured %.2f GFLOP/s, %.3f ms per layer (%d trials in %.2f s), "
                    "%.2f GiB (%.2f GiB kept back), links %s",
                    self.node,
                    compute.flops_per_s / 1e9,
                    compute.layer_overhead_ms,
                    compute.trials,
                    took,
                    self._facts.memory_bytes / 2**30,
                    self._reserved / 2**30,
                    ", ".join(
                        f"{p}: {x.latency_ms:.3f} ms {x.bandwidth_bytes_per_s / 1e9:.2f} GB/s"
                        for p, x in sorted(links.items())
                    )
                    or "none",
                )
            return self._facts


def capability_of(
    node: NodeId, reply: StatusReply, members: Sequence[NodeId] = ()
) -> NodeCapability:
    """A peer's reported facts as the partitioner's NodeCapability, or InvalidMessage.

    The node's own figures must be plausible (a finite rate >= 0, memory >= 0) or the
    whole report is refused: a plan computed from an impossible figure would be wrong
    everywhere. A link entry that names a non-member or itself, or carries a figure that
    is not finite and positive, is dropped with a warning; the rest stand.
    """
    if reply.node != node:
        raise InvalidMessage(f"node {node} sent the status of node {reply.node}")
    if not (math.isfinite(reply.compute_flops) and reply.compute_flops >= 0):
        raise InvalidMessage(f"node {node} reports compute_flops = {reply.compute_flops}")
    if reply.memory_bytes < 0:
        raise InvalidMessage(f"node {node} reports memory_bytes = {reply.memory_bytes}")
    overhead = reply.layer_overhead_ms
    if not (math.isfinite(overhead) and overhead >= 0):
        raise InvalidMessage(f"node {node} reports layer_overhead_ms = {overhead}")
    n = len(reply.link_peers)
    if not len(reply.link_latency_ms) == len(reply.link_bandwidth_bytes_per_s) == n:
        raise InvalidMessage(f"node {node} reports link tuples of unequal length")
    allowed = set(members)
    links: dict[NodeId, Link] = {}
    for peer, latency, bandwidth in zip(
        reply.link_peers, reply.link_latency_ms, reply.link_bandwidth_bytes_per_s, strict=True
    ):
        plausible = (
            math.isfinite(latency) and latency >= 0 and math.isfinite(bandwidth) and bandwidth > 0
        )
        known = peer != node and (not allowed or peer in allowed) and peer not in links
        if not (plausible and known):
            log.warning(
                "dropping node %s's link to %s (%s ms, %s B/s)", node, peer, latency, bandwidth
            )
            continue
        links[peer] = Link(latency, bandwidth)
    return NodeCapability(node, reply.compute_flops, reply.memory_bytes, links, overhead)
