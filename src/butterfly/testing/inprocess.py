"""Whole nodes in one process: in-memory transport, a heartbeat hub and a fake clock.

`InProcessCluster` builds every node with `node.build_node`, as `node.run` does, but with
these edges, so recovery and eviction run in one process, deterministically: heartbeats
flow only when the test calls `BeatHub.tick`, and the failure detector's time moves only
then. A node is killed by cutting it off: its heartbeats stop and the network drops its
frames both ways.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from butterfly.agreement.driver import AgreementDriver
from butterfly.cli.launcher import node_configs
from butterfly.config import ButterflyConfig, load_config
from butterfly.control.facts import NodeFacts, Probe
from butterfly.control.heartbeats import BeatSource
from butterfly.control.membership import Link
from butterfly.dataplane.stage_server import StageServer
from butterfly.metrics.events import Emit
from butterfly.net.memory import FIRST_EPOCH, MemoryNetwork
from butterfly.net.tcp import Identity
from butterfly.net.transport import Transport
from butterfly.node import Node, build_node
from butterfly.runtime.torch_thread import TorchThread
from butterfly.schedule.engine import Streamed
from butterfly.types.ids import Epoch, NodeId
from butterfly.types.plan import StagePlan
from butterfly.types.tasks import InferenceResult, InferenceTask
from butterfly.types.wire.control import Heartbeat
from butterfly.wiring.edges import LocalState, OnBeat

FACTS = NodeFacts(flops_per_s=1e11, memory_bytes=8 << 30)
"""Every in-process node reports the same facts: placement is then decided by the
partitioner's deterministic tie-breaks alone, and nothing is measured."""


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


class _HubLink:
    def __init__(self, hub: BeatHub, node: NodeId, state: LocalState, on_beat: OnBeat) -> None:
        self.hub, self.node, self.state, self.on_beat = hub, node, state, on_beat
        self.silenced = False

    def start(self) -> None:
        self.hub.links[self.node] = self

    def loop_ticked(self) -> None:
        """Nothing to watch: beats leave when the test ticks, never from a thread."""

    def silence(self, silent: bool) -> None:
        self.silenced = silent

    def close(self) -> None:
        if self.hub.links.get(self.node) is self:
            del self.hub.links[self.node]


class BeatHub:
    """Heartbeats between the nodes of one process, sent when the test says."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.links: dict[NodeId, _HubLink] = {}
        self.silent: set[NodeId] = set()  # killed: they send no more beats
        self.cut: set[tuple[NodeId, NodeId]] = set()  # (sender, receiver): beats lost
        self._seq = itertools.count(1)

    def link(self, node: NodeId, state: LocalState, on_beat: OnBeat) -> Link:
        return _HubLink(self, node, state, on_beat)

    def tick(self, seconds: float) -> None:
        """Move time on by `seconds`, then every live node beats to every other."""
        self.clock.now += seconds
        live = [s for s in self.links.values() if s.node not in self.silent and not s.silenced]
        for sender in live:
            layers, requests = sender.state()
            beat = Heartbeat(
                sender.node, FIRST_EPOCH, next(self._seq), self.clock.now, layers, requests
            )
            for receiver in list(self.links.values()):
                if receiver is not sender and (sender.node, receiver.node) not in self.cut:
                    receiver.on_beat(sender.node, beat)


class _FixedProbe:
    def __init__(self, facts: NodeFacts) -> None:
        self._facts = facts

    async def facts(self) -> NodeFacts:
        return self._facts


class _SharedSpans(SpanExporter):
    """Every node's spans into one exporter, which a node that stops (or restarts) does
    not shut for the others."""

    def __init__(self, exporter: SpanExporter) -> None:
        self._exporter = exporter

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self._exporter.export(spans)

    def shutdown(self) -> None:
        """The cluster's exporter outlives each node's tracer."""

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._exporter.force_flush(timeout_millis)


class MemoryEdges:
    """One node's edges onto the shared in-memory network and heartbeat hub."""

    def __init__(
        self,
        net: MemoryNetwork,
        hub: BeatHub,
        spans: SpanExporter | None = None,
        facts: NodeFacts = FACTS,
    ) -> None:
        self._net, self._hub, self._spans, self._facts = net, hub, spans, facts

    def clock(self) -> float:
        return self._hub.clock()

    def transport(self, identity: Identity, emit: Emit, epoch: Callable[[], Epoch]) -> Transport:
        return self._net.transport(identity.node, emit, epoch)

    def heartbeats(
        self,
        source: BeatSource,
        local_state: LocalState,
        on_beat: OnBeat,
        members: Mapping[NodeId, str],
    ) -> Link:
        return self._hub.link(source.node, local_state, on_beat)

    def probe(
        self, node: NodeId, peers: Sequence[NodeId], transport: Transport, torch: TorchThread
    ) -> Probe:
        return _FixedProbe(self._facts)

    def spans(self) -> SpanExporter | None:
        return _SharedSpans(self._spans) if self._spans is not None else None


class InProcessCluster:
    """`n` nodes of one cluster in this process; node 0 is the first gateway (the API of
    each gateway-capable node on any free port, unused by the tests that drive its parts
    directly)."""

    def __init__(
        self,
        model: Path,
        n: int,
        data_dir: Path,
        *,
        f: int = 1,
        settings: dict[str, Any] | None = None,
        stage_servers: dict[int, type[StageServer]] | None = None,
        agreements: dict[int, type[AgreementDriver]] | None = None,
        spans: SpanExporter | None = None,
        absent: Collection[int] = (),
        facts: dict[int, NodeFacts] | None = None,
    ) -> None:
        """`stage_servers` and `agreements`: the faulty parts (`butterfly.testing.liars`,
        `butterfly.testing.liar_votes`) some nodes are composed with. `spans`: where every
        node's trace spans go (an in-memory exporter), with observability.tracing on.
        `absent`: nodes not started with the others (as a process that was never
        launched), until `start`. `facts`: what some nodes report measuring instead of
        `FACTS`."""
        self.clock = FakeClock()
        self.hub = BeatHub(self.clock)
        paths = node_configs(
            nodes=n, f=f, model=model, api_port=0, data_dir=data_dir, settings=settings
        )
        first = load_config([paths[0]], env={})  # the frame and message limits are cluster-wide
        self.net = MemoryNetwork(
            cluster_id="local",
            max_frame_bytes=first.network.max_frame_bytes,
            max_message_bytes=first.network.max_message_bytes,
        )
        self._model, self._paths = model, paths
        self._stage_servers, self._agreements = stage_servers or {}, agreements or {}
        self._spans = spans
        self._facts = facts or {}
        self.nodes: list[Node] = [self._build(i) for i in range(len(paths))]
        self._stops = [asyncio.Event() for _ in self.nodes]
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._absent = set(absent)
        self.net.down.update(NodeId(i) for i in self._absent)  # a connection is refused

    def _build(self, i: int) -> Node:
        """Node `i` as a fresh process builds it, from its config file and data directory."""
        return build_node(
            load_config([self._paths[i]], env={}),
            self._model,
            edges=MemoryEdges(self.net, self.hub, self._spans, self._facts.get(i, FACTS)),
            torch_thread=TorchThread(1, name=f"torch-{i}"),
            stage_server_type=self._stage_servers.get(i, StageServer),
            agreement_type=self._agreements.get(i, AgreementDriver),
        )

    @property
    def gateway(self) -> Node:
        return self.nodes[0]

    async def __aenter__(self) -> InProcessCluster:
        for i, (node, stop) in enumerate(zip(self.nodes, self._stops, strict=True)):
            if i not in self._absent:
                self._tasks[i] = asyncio.create_task(node.serve(stop))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for stop in self._stops:
            stop.set()
        tasks = list(self._tasks.values())
        done = await asyncio.wait(tasks, timeout=5.0)
        for task in done[1]:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
        for i in self._absent:  # built, never served: their files are still open
            self.nodes[i].stage_server.close()
            self.nodes[i].config.history.close()

    def start(self, node: int) -> Node:
        """Start a node that was `absent` so far, as a late process launch."""
        self._absent.discard(node)
        self.net.down.discard(NodeId(node))
        self._tasks[node] = asyncio.create_task(self.nodes[node].serve(self._stops[node]))
        return self.nodes[node]

    def join(self, cfg: ButterflyConfig) -> Node:
        """Start a node that was not a member when the cluster started (`cluster
        add-member`), from its own config: the roster it lists is the agreed one."""
        i = cfg.node.id
        if i != len(self.nodes):
            raise ValueError(f"node {i} joins as node {len(self.nodes)}: ids are appended")
        node = build_node(
            cfg,
            self._model,
            edges=MemoryEdges(self.net, self.hub, self._spans, FACTS),
            torch_thread=TorchThread(1, name=f"torch-{i}"),
        )
        self.nodes.append(node)
        self._stops.append(asyncio.Event())
        self._tasks[i] = asyncio.create_task(node.serve(self._stops[i]))
        return node

    async def restart(self, node: int) -> Node:
        """Stop `node` as a SIGTERM would (it drains and closes its files), then start a
        new one from the same config and data directory: what survives is what it wrote
        there, and what its peers replay to it."""
        self._stops[node].set()
        await asyncio.wait_for(self._tasks[node], 10.0)
        self.nodes[node] = self._build(node)
        self.revive(node)  # a new process: reachable whatever happened to the old one
        self._stops[node] = asyncio.Event()
        self._tasks[node] = asyncio.create_task(self.nodes[node].serve(self._stops[node]))
        return self.nodes[node]

    def kill(self, node: int) -> None:
        """Cut `node` off: no more heartbeats, no frames in or out."""
        self.hub.silent.add(NodeId(node))
        self.net.down.add(NodeId(node))

    def revive(self, node: int) -> None:
        """Undo `kill`: the node, which kept running on its own (a frozen process that
        thawed, a partition healed), beats, sends and receives as before."""
        self.hub.silent.discard(NodeId(node))
        self.net.down.discard(NodeId(node))

    async def until(self, check: Callable[[], bool], what: str, *, beats: int = 400) -> None:
        """Beat (100 ms of fake time each) and yield until `check()` holds; at most
        `beats` rounds, then AssertionError naming `what`."""
        for _ in range(beats):
            if check():
                return
            self.hub.tick(0.1)
            await asyncio.sleep(0.005)
        raise AssertionError(f"{what}: not within {beats} heartbeats")

    async def first_plan(self) -> StagePlan:
        """The gateway's plan, once it has one (`until`)."""
        await self.until(lambda: self.gateway.stage_server.plan is not None, "the first plan")
        plan = self.gateway.stage_server.plan
        assert plan is not None
        return plan

    async def infer(self, task: InferenceTask, *, beats: int = 2000) -> InferenceResult:
        """Run `task` on node 0's engine, beating (`until`) while it runs: the heartbeats
        are fake time, so a request that nobody beats for never sees its plan move."""
        return await self.infer_killing(task, None, 0, beats=beats)

    async def infer_killing(
        self, task: InferenceTask, node: int | None, at: int, *, beats: int = 2000
    ) -> InferenceResult:
        """`infer`, killing `node` (`kill`) when the request's `at`-th token comes: a
        failure mid-request, at a position the test chooses."""
        streamed = 0

        def on_token(token: Streamed) -> None:
            nonlocal streamed
            streamed += 1
            if node is not None and streamed == at:
                self.kill(node)

        run = asyncio.create_task(self.gateway.engine.run(task, on_token))
        await self.until(run.done, f"request {task.task_id}", beats=beats)
        return run.result()


__all__ = ["BeatHub", "FakeClock", "InProcessCluster", "MemoryEdges"]
