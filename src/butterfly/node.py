"""The composition root: one node built from a frozen config, and its run loop.

Start-up follows the specification's order: metrics, network, partition (plan),
coordination (membership), scheduling, API. Every part is built here and handed what it
needs by keyword; no part reaches for a global or builds another.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import uvicorn

from butterfly.api.app import create_app
from butterfly.api.settings import ApiSettings
from butterfly.cluster.commands import (
    ConfigAbort,
    ConfigUpdate,
    EvictNode,
    InvalidCommand,
    NewPlan,
    decode_command,
)
from butterfly.cluster.membership import Membership
from butterfly.cluster.node_agreement import build_agreement, open_config
from butterfly.cluster.pipeline import PipelineEngine
from butterfly.cluster.planner import decide_plan, distribute_plan, gather_status
from butterfly.cluster.stage_server import Outbound, StageServer
from butterfly.config import ButterflyConfig
from butterfly.config.reload import Subscriber
from butterfly.metrics.events import MessageDropped
from butterfly.metrics.prometheus import Metrics
from butterfly.net.framing import Envelope
from butterfly.net.tcp import Identity, TcpTransport, TransportLimits
from butterfly.protocol.failure_detector import PhiAccrualFailureDetector
from butterfly.runtime.loader import model_args
from butterfly.runtime.tokenizer import TextCodec
from butterfly.runtime.weights import model_hash
from butterfly.schedule.engine import ClusterHealth, NodeHealth
from butterfly.schedule.queue import QueuePolicy
from butterfly.schedule.scheduler import Scheduler
from butterfly.schedule.store import TaskStore
from butterfly.types.ids import NodeId
from butterfly.types.messages import (
    AgreementFrame,
    ConfigPrepare,
    ConfigStatusQuery,
    ConfigSync,
    Heartbeat,
    Message,
    PlanAssign,
    Release,
    StageStep,
    StatusQuery,
    StatusReply,
    StepError,
    StepResult,
)

log = logging.getLogger(__name__)
GATEWAY = NodeId(0)


def parse_address(hostport: str) -> tuple[str, int]:
    host, _, port = hostport.rpartition(":")
    return host, int(port)


def measure_flops(seconds: float = 0.2) -> float:
    """This node's matmul rate, the compute fact it reports for placement."""
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        n += 1
    return 2 * 256**3 * n / (time.perf_counter() - start)


class Node:
    """One running node: its parts, its dispatcher, and (on node 0) the gateway."""

    def __init__(self, cfg: ButterflyConfig, model_dir: Path) -> None:
        self.config = open_config(cfg)  # every part below sees the values last agreed on
        cfg = self.config.current
        self.cfg, self.id, self.model_dir = cfg, NodeId(cfg.node.id), model_dir
        self.members = {NodeId(i): a for i, a in enumerate(cfg.cluster.members)} or {
            self.id: cfg.node.listen
        }
        self.metrics = Metrics()
        self.model_hash = model_hash(model_dir)
        self.flops = measure_flops()
        self.transport = TcpTransport(
            identity=Identity(self.id, cfg.cluster.id, self.model_hash),
            listen=parse_address(cfg.node.listen),
            peers={n: parse_address(a) for n, a in self.members.items()},
            emit=self.metrics.emit,
            epoch=lambda: self.stage_server.epoch,
            limits=TransportLimits(
                max_frame_bytes=cfg.network.max_frame_bytes,
                connect_timeout_s=cfg.network.connect_timeout_ms / 1000,
                connect_attempts=cfg.network.retry_attempts,
            ),
        )
        self.stage_server = StageServer(
            node=self.id, model_dir=model_dir, max_tensor_bytes=cfg.network.max_frame_bytes
        )
        c = cfg.coordination
        self.membership = Membership(
            node=self.id,
            members=self.members,
            transport=self.transport,
            detector=PhiAccrualFailureDetector(
                c.heartbeat_interval_ms, c.phi_suspect, c.phi_failed
            ),
            interval_s=c.heartbeat_interval_ms / 1000,
            local_state=self._local_state,
        )
        family, args = model_args(model_dir)
        has_tokenizer = (model_dir / "tokenizer.json").is_file()
        self.codec = TextCodec.load(model_dir) if has_tokenizer else None
        self.engine = PipelineEngine(
            node=self.id,
            deliver=self.deliver,
            plan=lambda: self.stage_server.plan,
            health=self.health,
            max_context=int(getattr(args, "max_context", 0)) or 1,
            input_kind="vectors" if family.name == "sequential" else "tokens",
            eos_ids=self.codec.eos_ids if self.codec else frozenset(),
            step_timeout_s=cfg.network.step_timeout_ms / 1000,
            max_tensor_bytes=cfg.network.max_frame_bytes,
        )
        agreed = build_agreement(
            manager=self.config,
            transport=self.transport,
            on_commit=self._on_commit,
            emit=self.metrics.emit,
            live=lambda n: self.membership.status(n) in ("starting", "healthy"),
        )
        self.agreement, self.config_replica = agreed.driver, agreed.replica
        self.config_coordinator = agreed.coordinator

    def _local_state(self) -> tuple[tuple[int, ...], int]:
        plan = self.stage_server.plan
        layers = plan.layers_of(self.id) if plan else None
        return ((layers.start, layers.end) if layers else ()), len(self.stage_server.caches)

    async def deliver(self, peer: NodeId, msg: Message, payload: bytes = b"") -> None:
        """Send to a peer, or hand to this node's own dispatcher without a socket."""
        if peer == self.id:
            env = Envelope(
                msg, self.id, self.stage_server.epoch, self.cfg.cluster.id, 0, False, payload
            )
            await self.handle(env)
        else:
            await self.transport.send(peer, msg, payload)

    async def _on_commit(self, seq: int, data: bytes) -> None:
        """Every command the cluster agreed on, in agreement order, on every node."""
        try:
            command = decode_command(data)
        except InvalidCommand as e:
            self.metrics.emit(MessageDropped(reason="invalid_command"))
            log.warning("agreed operation %d is not a command; every node skips it: %s", seq, e)
            return
        match command:
            case ConfigUpdate() | ConfigAbort():
                self.config_replica.execute(command)
            case EvictNode() | NewPlan():
                log.info("agreed %s at %d; membership follows the gateway's plan", command.tag, seq)

    async def handle(self, env: Envelope) -> tuple[Message, bytes] | None:
        """Every incoming frame ends here, matched on its type."""
        msg = env.msg
        match msg:
            case Heartbeat():
                self.membership.on_heartbeat(env)
            case StageStep():
                out: Outbound = await self.stage_server.on_step(env)
                await self.deliver(out.peer, out.msg, out.payload)
            case StepResult() | StepError():
                self.engine.on_result(env)
            case Release():
                self.stage_server.release(msg.request_id)
            case PlanAssign():
                if env.sender != GATEWAY:
                    self.metrics.emit(MessageDropped(reason="plan_from_non_gateway"))
                    return None
                return await self.stage_server.apply_plan(msg), b""
            case StatusQuery():
                layers = (
                    self.stage_server.plan.layers_of(self.id) if self.stage_server.plan else None
                )
                reply = StatusReply(
                    self.id,
                    self.stage_server.epoch,
                    (layers.start, layers.end) if layers else (),
                    len(self.stage_server.caches),
                    self.stage_server.kv_bytes,
                    self.flops,
                    self.cfg.resources.memory_limit_bytes,
                )
                return reply, b""
            case AgreementFrame():
                await self.agreement.on_frame(env)
            case ConfigPrepare() | ConfigStatusQuery() | ConfigSync():
                return await self.config_replica.on_message(env)
            case _:
                self.metrics.emit(MessageDropped(reason=f"unexpected_{msg.kind}"))
        return None

    def health(self) -> ClusterHealth:
        plan = self.stage_server.plan
        nodes = []
        for n, address in sorted(self.members.items()):
            nodes.append(
                NodeHealth(
                    node=n,
                    status=self.membership.status(n),
                    address=address,
                    layers=plan.layers_of(n) if plan else None,
                    last_seen_s=self.membership.seconds_since(n),
                    requests=self.membership.requests_of(n),
                )
            )
        planned = plan is not None and all(
            h.status == "healthy" for h in nodes if h.layers is not None
        )
        return ClusterHealth(
            healthy=planned,
            epoch=plan.epoch if plan else 0,
            nodes=tuple(nodes),
            services={"network": True, "plan": plan is not None, "scheduler": True},
        )

    # --- running ----------------------------------------------------------------------

    async def serve(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set, then drain and return."""
        await self.transport.start(self.handle)
        log.info("node %s listening on %s", self.id, self.cfg.node.listen)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.membership.run())
                tg.create_task(self.agreement.run())
                if self.id == GATEWAY:
                    tg.create_task(self._gateway(stop))
                await stop.wait()
                raise _Stop
        except* _Stop:
            pass
        finally:
            await self.transport.close()
            self.stage_server.close()
            self.config.history.close()

    async def _gateway(self, stop: asyncio.Event) -> None:
        """Node 0: decide and distribute the plan, then serve the API."""
        peers = [n for n in self.members if n != self.id]
        await gather_status(self.transport, peers, timeout_s=120.0)
        family, args = model_args(self.model_dir)
        plan = decide_plan(1, sorted(self.members), family.num_layers(args))
        await distribute_plan(
            plan=plan,
            model_hash=self.model_hash,
            node=self.id,
            members=sorted(self.members),
            transport=self.transport,
            apply_local=self.stage_server.apply_plan,
            timeout_s=300.0,
        )
        codec = self.codec
        data_dir = Path(self.cfg.node.data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        store = TaskStore(data_dir / "tasks.sqlite")
        s = self.cfg.scheduling
        scheduler = Scheduler(
            engine=self.engine,
            store=store,
            emit=self.metrics.emit,
            max_concurrent=max(1, s.dispatch_batch_size),
            queue_capacity=s.max_queue,
            policy=QueuePolicy(s.policy),
            detokenize=codec.decode if codec else None,
        )
        a = self.cfg.api
        settings = ApiSettings(
            max_request_bytes=a.max_request_bytes,
            max_new_tokens_limit=s.max_new_tokens_limit,
            default_max_new_tokens=s.default_max_new_tokens,
            api_tokens=frozenset(a.tokens),
            rate_limit_per_s=a.rate_limit,
            rate_limit_burst=a.rate_limit_burst,
        )
        app = create_app(
            scheduler=scheduler,
            engine=self.engine,
            codec=codec,
            metrics=self.metrics,
            model_name=self.model_dir.name,
            settings=settings,
            config=self.config_coordinator,
        )
        server = uvicorn.Server(
            uvicorn.Config(app, host=a.host, port=a.port, log_level="warning", lifespan="off")
        )
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(scheduler.run())
                tg.create_task(self.engine.serve_batches())
                tg.create_task(self.config_coordinator.monitor())
                tg.create_task(server.serve())
                await stop.wait()
                server.should_exit = True
                scheduler.shutdown(grace_s=3.0)
        finally:
            store.close()


def _set_log_level(old: ButterflyConfig, new: ButterflyConfig) -> None:
    if old.observability.log_level != new.observability.log_level:
        logging.getLogger().setLevel(new.observability.log_level.upper())


class _Stop(Exception):
    """Unwinds the node's task group when it is asked to stop."""


def run(
    cfg: ButterflyConfig,
    model_dir: Path,
    *,
    subscribers: Sequence[tuple[str, Subscriber, Subscriber | None]] = (),
) -> int:
    """Run a node in the foreground until SIGINT/SIGTERM; returns the exit code.

    `subscribers` are extra components' (name, on_change, check) for config changes;
    `butterfly.testing.config_faults` composes a node that refuses a value this way.
    """
    import signal

    if cfg.resources.threads:
        torch.set_num_threads(cfg.resources.threads)
    # The event loop hands work to the torch and SQLite threads and takes results back;
    # with Python's default 5 ms GIL switch interval each hand-off could wait that long
    # while the loop thread is busy (measured: 6.7 ms to accept a task, 0.1 ms of work).
    sys.setswitchinterval(0.0005)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        node = Node(cfg, model_dir)
        node.config.subscribe("logging", _set_log_level)  # hot: no restart for the level
        for name, on_change, check in subscribers:
            node.config.subscribe(name, on_change, check=check)
        await node.serve(stop)

    asyncio.run(main())
    return 0
