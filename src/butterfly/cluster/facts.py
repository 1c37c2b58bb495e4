"""What a node measures about itself and its links, and how those facts travel.

Placement is computed by the gateway from facts every node reported about itself: its
compute rate, the fixed cost of a layer beyond its FLOPs, its memory, and the latency and
bandwidth of its links to the other nodes (`StatusReply`). This module measures them and
turns peers' reports back into the partitioner's `NodeCapability`, refusing reports that
could not be true.

When. A node measures once, when the gateway first asks for its status during cluster
start-up, not while its process is still starting. The gateway asks one node at a time
after every node is reachable (`planner.gather_status`), so nodes sharing a machine, as
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from butterfly.net.transport import Transport
from butterfly.partition.capability import Link, NodeCapability
from butterfly.types.errors import ButterflyError, InvalidMessage
from butterfly.types.ids import NodeId
from butterfly.types.messages import Ping, Pong, StatusReply

log = logging.getLogger(__name__)

STREAM_ROWS, STREAM_COLS, STREAM_MATRICES = 4096, 1024, 6
"""Weights cycled through by `measure_flops`: 6 x 16 MiB of float32, more than the
last-level cache of the CPUs we run on (32 MiB here), so every pass reads from memory as
decoding a model larger than the cache does."""

FAST_QUANTILE = 0.1
"""Which trial time a measurement reports: the fastest tenth. Another process can only
make a trial slower, never faster, so the fast end shows what the node itself does (as
`timeit` takes the minimum); a tenth rather than the single fastest, so one trial timed
across a clock hiccup cannot set the figure."""


def fast_quantile(samples: list[float]) -> float:
    """The FAST_QUANTILE of `samples` (durations: smaller is faster)."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(FAST_QUANTILE * len(ordered)))]


SMALL_PROBES, BIG_PROBES = 11, 5
BIG_PROBE_BYTES = 1 << 20
"""Link probes: round trips of an empty ping (latency) and of a 1 MiB one (bandwidth)."""


def measure_flops(seconds: float = 0.25) -> float:
    """This node's floating-point rate on decode-shaped work, in FLOP/s.

    Decoding a token multiplies one activation row by every weight matrix of the model,
    each read once from memory, so the rate that predicts decoding is that of one-row
    products over weights larger than the caches (bound by memory bandwidth), not of a
    square in-cache matmul (bound by arithmetic; about 20x faster on this machine, which
    made per-token estimates optimistic by as much). Short trials of one pass each,
    reported at `FAST_QUANTILE`. Runs on torch's configured intra-op threads, as stages
    do.
    """
    weights = [torch.full((STREAM_ROWS, STREAM_COLS), 0.01) for _ in range(STREAM_MATRICES)]
    x = torch.full((1, STREAM_COLS), 0.5)
    flops_per_pass = 2.0 * STREAM_ROWS * STREAM_COLS * STREAM_MATRICES
    times: list[float] = []
    with torch.inference_mode():
        for w in weights:  # first touch: page faults and thread-pool start are not the rate
            F.linear(x, w)
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(times) < 3:
            started = time.perf_counter()
            for w in weights:
                F.linear(x, w)
            times.append(time.perf_counter() - started)
    return flops_per_pass / max(fast_quantile(times), 1e-9)


def measure_layer_overhead_ms(flops_per_s: float, seconds: float = 0.1) -> float:
    """Fixed milliseconds a decoder layer costs on this node beyond its FLOPs.

    Runs one decode step of a decoder block of the usual shape (RMS norms, fused q/k/v,
    rotary embedding, a KV cache write, attention, output projection, gated MLP) at a
    width of 64, where the arithmetic is microseconds and what remains is the per-
    operation cost every layer pays whatever its size. The block's own FLOPs at
    `flops_per_s` are subtracted so they are not counted twice. Many steps, reported at
    `FAST_QUANTILE`.
    """
    d, heads, ctx = 64, 4, 32
    hd = d // heads
    norm_w = torch.ones(d)
    wqkv, wo = torch.full((3 * d, d), 0.01), torch.full((d, d), 0.01)
    w13, w2 = torch.full((8 * d, d), 0.01), torch.full((d, 4 * d), 0.01)
    keys, values = torch.zeros(1, heads, ctx, hd), torch.zeros(1, heads, ctx, hd)
    cos, sin = torch.ones(1, 1, 1, hd), torch.zeros(1, 1, 1, hd)

    def norm(h: torch.Tensor) -> torch.Tensor:
        return norm_w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5))

    def rotary(t: torch.Tensor) -> torch.Tensor:
        a, b = t.chunk(2, dim=-1)
        return t * cos + torch.cat((-b, a), dim=-1) * sin

    def block(h: torch.Tensor) -> torch.Tensor:
        q, k, v = torch.split(F.linear(norm(h), wqkv), [d, d, d], -1)
        q = rotary(q.view(1, 1, heads, hd).transpose(1, 2))
        keys[:, :, -1:] = rotary(k.view(1, 1, heads, hd).transpose(1, 2))
        values[:, :, -1:] = v.view(1, 1, heads, hd).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, keys, values)
        h = h + F.linear(out.transpose(1, 2).reshape(1, 1, d), wo)
        gate, up = F.linear(norm(h), w13).chunk(2, dim=-1)
        return h + F.linear(F.silu(gate) * up, w2)

    flops = 2.0 * (wqkv.numel() + wo.numel() + w13.numel() + w2.numel() + 2 * heads * ctx * hd)
    x = torch.full((1, 1, d), 0.5)
    times: list[float] = []
    with torch.inference_mode():
        block(x)
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(times) < 5:
            started = time.perf_counter()
            block(x)
            times.append(time.perf_counter() - started)
    arithmetic_ms = 1000.0 * flops / flops_per_s if flops_per_s > 0 else 0.0
    return max(0.0, fast_quantile(times) * 1000.0 - arithmetic_ms)


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
        env = await transport.request(
            peer, Ping(seq), b"\0" * size, timeout=timeout_s, channel="data"
        )
        elapsed = time.perf_counter() - started
        reply = env.msg
        if not isinstance(reply, Pong) or reply.received != size:
            got = (
                f"{reply.kind} of {reply.received} bytes" if isinstance(reply, Pong) else reply.kind
            )
            raise InvalidMessage(f"node {peer} answered a {size}-byte ping with {got}")
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

    def link_fields(self) -> tuple[tuple[int, ...], tuple[float, ...], tuple[float, ...]]:
        """The links as StatusReply's parallel tuples (peer, latency, bandwidth)."""
        peers = tuple(sorted(self.links))
        return (
            tuple(int(p) for p in peers),
            tuple(self.links[p].latency_ms for p in peers),
            tuple(self.links[p].bandwidth_bytes_per_s for p in peers),
        )


class FactProbe:
    """Measures this node's facts once, on first request, and remembers them."""

    def __init__(
        self,
        *,
        node: NodeId,
        peers: Sequence[NodeId],
        transport: Transport,
        memory_limit_bytes: int,
        flops_seconds: float = 0.25,
    ) -> None:
        self.node, self._peers, self._transport = node, list(peers), transport
        self._memory_limit, self._flops_seconds = memory_limit_bytes, flops_seconds
        self._lock = asyncio.Lock()
        self._facts: NodeFacts | None = None

    @property
    def measured(self) -> NodeFacts | None:
        return self._facts

    async def facts(self) -> NodeFacts:
        """The measured facts; the first call measures (compute off the event loop, so
        heartbeats keep flowing), concurrent callers wait for that one measurement."""
        async with self._lock:
            if self._facts is None:
                flops = await asyncio.to_thread(measure_flops, self._flops_seconds)
                overhead = await asyncio.to_thread(measure_layer_overhead_ms, flops)
                links: dict[NodeId, Link] = {}
                for peer in self._peers:
                    if peer == self.node:
                        continue
                    try:
                        links[peer] = await measure_link(self._transport, peer)
                    except ButterflyError as e:
                        log.warning("node %s: link to node %s not measured: %s", self.node, peer, e)
                memory = available_memory_bytes(self._memory_limit)
                self._facts = NodeFacts(flops, memory, links, overhead)
                log.info(
                    "node %s measured %.2f GFLOP/s, %.3f ms per layer, %.2f GiB, links %s",
                    self.node,
                    flops / 1e9,
                    overhead,
                    self._facts.memory_bytes / 2**30,
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
        links[NodeId(peer)] = Link(latency, bandwidth)
    return NodeCapability(node, reply.compute_flops, reply.memory_bytes, links, overhead)
