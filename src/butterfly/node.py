"""The composition root: one node built from a frozen config and its edges, and its run loop.

`build_node` builds every part in dependency order and hands each what it needs by
keyword; nothing reaches back into the node. Where two parts need each other, the later
one is given to the earlier when it starts (`Router.start(routes)`, `Membership.run(link,
on_status_change)`, `Recovery.run(on_replanned)`), or they meet through a channel (the
agreement's evidence queue). The edges (transport, heartbeats, clock, measured facts) and
the torch thread are injected: `run` gives the network ones, `butterfly.testing.inprocess`
in-memory ones. Policy lives in the parts (`control.policy` for recovery and eviction).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import uvloop

from butterfly.agreement.build import NodeAgreement, build_agreement, open_config
from butterfly.agreement.driver import AgreementDriver
from butterfly.config import ButterflyConfig, ConfigManager
from butterfly.config.reload import Subscriber
from butterfly.config.validate import replication_factor
from butterfly.control.heartbeats import BeatSource
from butterfly.control.membership import Membership
from butterfly.control.plans import AgreedPlans, PlanIntake
from butterfly.control.policy import Placing
from butterfly.control.recovery import Recovery
from butterfly.control.status import ClusterReport, NodeReport
from butterfly.dataplane.audit import Auditor, Referee
from butterfly.dataplane.engine import PipelineEngine
from butterfly.dataplane.proving import Prover
from butterfly.dataplane.replicate import Replicator
from butterfly.dataplane.routes import AuditAsk, StageRoutes
from butterfly.dataplane.stage_server import StageServer
from butterfly.dataplane.unresponsive import StepTimeouts
from butterfly.metrics.prometheus import Metrics
from butterfly.net.tcp import Identity
from butterfly.partition.service import PartitionService
from butterfly.protocol.failure_detector import PhiAccrualFailureDetector
from butterfly.protocol.keys import key_path, load_or_create_key, public_keys
from butterfly.protocol.messages import Evidence
from butterfly.protocol.proof import Tolerance
from butterfly.runtime.loader import layer_infos, model_args
from butterfly.runtime.tokenizer import TextCodec
from butterfly.runtime.torch_thread import TorchThread, confine_to_one_thread
from butterfly.runtime.weights import model_hash
from butterfly.types.errors import ConfigError
from butterfly.types.ids import GATEWAY, NodeId
from butterfly.types.messages import (
    AgreementFrame,
    AuditRequest,
    CacheQuery,
    ConfigPrepare,
    ConfigStatusQuery,
    ConfigSync,
    KvAppend,
    Ping,
    PlanAssign,
    Release,
    StageStep,
    StatusQuery,
    StepError,
    StepResult,
)
from butterfly.wiring.edges import Edges, NetworkEdges
from butterfly.wiring.gateway import Gateway
from butterfly.wiring.logs import configure_logging, set_log_level
from butterfly.wiring.routing import Router, Routes, by_envelope

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Node:
    """One node's parts, as `build_node` wired them, and its run loop."""

    id: NodeId
    model_hash: str
    config: ConfigManager
    metrics: Metrics
    edges: Edges
    router: Router
    routes: Routes
    stage_server: StageServer
    membership: Membership
    beats: BeatSource
    report: NodeReport
    agreement: NodeAgreement
    plans: AgreedPlans
    evidence: asyncio.Queue[Evidence]
    recovery: Recovery
    engine: PipelineEngine
    gateway: Gateway | None  # on the acting gateway (node 0) only

    async def serve(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set, then drain and return."""
        cfg = self.config.current
        await self.router.start(self.routes)
        log.info(
            "node %s (%s) listening on %s, model sha256 %s%s",
            self.id,
            cfg.metadata.environment,
            cfg.node.listen,
            self.model_hash,
            " with mutual TLS" if cfg.security.tls.enabled else "",
        )
        link = self.edges.heartbeats(
            self.beats, self.report.local_state, self.membership.on_heartbeat
        )
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.membership.run(link, self.recovery.on_status_change))
                tg.create_task(self.agreement.driver.run())
                tg.create_task(self.recovery.watch_evidence(self.evidence))
                gateway = tg.create_task(self.gateway.serve(stop)) if self.gateway else None
                await stop.wait()
                if gateway is not None:  # its API closes before the node's transport does
                    await gateway
                raise _Stop
        except* _Stop:
            pass
        finally:
            await self.router.close()
            self.stage_server.close()
            self.config.history.close()


class _Stop(Exception):
    """Unwinds the node's task group when it is asked to stop."""


def build_node(
    cfg: ButterflyConfig,
    model_dir: Path,
    *,
    edges: Edges,
    torch_thread: TorchThread,
    stage_server_type: type[StageServer] = StageServer,
    agreement_type: type[AgreementDriver] = AgreementDriver,
) -> Node:
    """`torch_thread`: every model computation of this node runs on it (see its module).
    `stage_server_type` and `agreement_type` let `butterfly.testing` compose a node with a
    faulty stage server or lying votes, without any test switch in the production types."""
    config = open_config(cfg)  # every part below sees the values last agreed on
    cfg = config.current
    me = NodeId(cfg.node.id)
    members = {NodeId(i): a for i, a in enumerate(cfg.cluster.members)} or {me: cfg.node.listen}
    metrics = Metrics()
    digest = model_hash(model_dir)
    expected = cfg.model.expected_sha256
    if expected and expected != digest:
        config.history.close()
        raise ConfigError(
            f"model.expected_sha256 is {expected[:16]}..., but the model in {model_dir} "
            f"hashes to {digest[:16]}...: not the checkpoint this cluster runs"
        )
    key = load_or_create_key(key_path(cfg, Path(cfg.node.data_dir)))
    keys = {NodeId(i): k for i, k in enumerate(public_keys(cfg, key))}
    byz, copies = cfg.byzantine, replication_factor(cfg)
    verify = byz.verification != "none" and copies > 1  # f+1 holders: records are auditable
    server = stage_server_type(
        torch_thread=torch_thread,
        node=me,
        model_dir=model_dir,
        max_tensor_bytes=cfg.network.max_frame_bytes,
        prover=Prover(me, key, byz.fingerprint_top_k, byz.fingerprint_chunk) if verify else None,
        # replicate's lanes already keep every range's caches on two nodes
        snapshot_every=0
        if byz.verification == "replicate"
        else cfg.coordination.checkpoint_frequency,
        # the audit takes the gateway's own stage as computed (dataplane.audit)
        keep_outputs=me == GATEWAY and verify and byz.verification == "audit",
    )
    transport = edges.transport(
        Identity(me, cfg.cluster.id, digest), metrics.emit, server.current_epoch
    )
    step_timeout_s = cfg.network.step_timeout_ms / 1000
    router = Router(
        node=me,
        transport=transport,
        cluster_id=cfg.cluster.id,
        epoch=server.current_epoch,
        ask_timeout_s=step_timeout_s,
        emit=metrics.emit,
    )
    report = NodeReport(
        node=me, server=server, probe=edges.probe(me, sorted(members), transport, torch_thread)
    )
    c = cfg.coordination
    membership = Membership(
        node=me,
        members=members,
        detector=PhiAccrualFailureDetector(
            c.heartbeat_interval_ms,
            c.phi_suspect,
            c.phi_failed,
            min_std_ms=c.min_std_ms,
            acceptable_pause_ms=c.acceptable_pause_ms,
        ),
        interval_s=c.heartbeat_interval_ms / 1000,
        local_state=report.local_state,
        clock=edges.clock,
    )
    plans = AgreedPlans()
    evidence: asyncio.Queue[Evidence] = asyncio.Queue()
    agreement = build_agreement(
        manager=config,
        transport=transport,
        on_command=plans.execute,
        on_evidence=evidence.put,
        emit=metrics.emit,
        live=membership.is_live,
        driver_type=agreement_type,
    )
    family, args = model_args(model_dir)
    max_context = int(getattr(args, "max_context", 0)) or 1
    recovery = Recovery(
        node=me,
        members=sorted(members),
        status=membership.status,
        holder=server,
        plans=plans,
        propose=agreement.propose,
        agree_timeout_s=2 * (c.view_change_timeout_ms + c.phase_timeout_ms) / 1000,
        transport=transport,
        model_hash=digest,
        placing=Placing(
            layers=tuple(layer_infos(model_dir)),
            strategy=cfg.partition.strategy,
            copies=copies,
            gateway=me,
            result_bytes=int(getattr(args, "vocab_size", 0)) * 4,  # one row of logits
            service=PartitionService(
                cache_size=cfg.partition.cache_size, context_tokens=max_context
            ),
        ),
        suspect_primary=agreement.driver.suspect_primary,
        emit=metrics.emit,
    )
    timeouts = StepTimeouts(  # the gateway's rule for silent and slow nodes
        gateway=me,
        limit=lambda: config.current.byzantine.max_step_timeouts,  # live
        status=membership.status,
        declare=recovery.evict_liars,
    )
    tolerance = Tolerance(rtol=byz.rtol, atol=byz.atol)
    codec = TextCodec.load(model_dir) if (model_dir / "tokenizer.json").is_file() else None
    engine = PipelineEngine(
        node=me,
        deliver=router.deliver,
        ask=router.ask,
        plan=server.current_plan,
        health=ClusterReport(
            members=members, membership=membership, server=server, recovery=recovery
        ),
        max_context=max_context,
        input_kind="vectors" if family.name == "sequential" else "tokens",
        eos_ids=codec.eos_ids if codec else frozenset(),
        step_timeout_s=step_timeout_s,
        max_tensor_bytes=cfg.network.max_frame_bytes,
        auditor=Auditor(
            ask=AuditAsk(
                node=me,
                local=server.audit,
                transport=transport,
                timeouts=timeouts,
                timeout_s=step_timeout_s,
            ),
            keys=keys,
            referee=Referee(model_dir, torch_thread),
            tolerance=tolerance,
            max_tensor_bytes=cfg.network.max_frame_bytes,
            gateway=me,
            own_outputs=server.outputs_of,
        )
        if byz.verification == "audit" and copies > 1
        else None,
        audit_fraction=byz.audit_fraction,
        on_liars=recovery.evict_liars,
        timeouts=timeouts,
        replicator=Replicator(
            plan=server.current_plan,
            f=byz.f,
            keys=keys,
            referee=Referee(model_dir, torch_thread),
            tolerance=tolerance,
            on_liars=recovery.evict_liars,
            timeouts=timeouts,
            emit=metrics.emit,
        )
        if byz.verification == "replicate" and copies > 1
        else None,
        emit=metrics.emit,
    )
    stage = StageRoutes(node=me, server=server, deliver=router.deliver, emit=metrics.emit)
    config_message = by_envelope(agreement.replica.on_message)
    routes: Routes = {
        StageStep: stage.step,
        StepResult: engine.on_result,
        StepError: engine.on_result,
        AuditRequest: stage.audit,
        Release: stage.release,
        KvAppend: stage.kv_append,
        CacheQuery: stage.cache_query,
        PlanAssign: PlanIntake(node=me, plans=plans, apply=server.apply_plan, emit=metrics.emit),
        StatusQuery: report.on_status_query,
        Ping: report.on_ping,
        AgreementFrame: by_envelope(agreement.driver.on_frame),
        ConfigPrepare: config_message,
        ConfigStatusQuery: config_message,
        ConfigSync: config_message,
    }
    gateway = (
        Gateway(
            node=me,
            members=tuple(sorted(members)),
            config=config,
            transport=transport,
            report=report,
            recovery=recovery,
            engine=engine,
            coordinator=agreement.coordinator,
            metrics=metrics,
            codec=codec,
            model_name=model_dir.name,
        )
        if me == GATEWAY
        else None
    )
    return Node(
        me,
        digest,
        config,
        metrics,
        edges,
        router,
        routes,
        server,
        membership,
        BeatSource(me, cfg.cluster.id, key, keys),
        report,
        agreement,
        plans,
        evidence,
        recovery,
        engine,
        gateway,
    )


def run(
    cfg: ButterflyConfig,
    model_dir: Path,
    *,
    stage_server_type: type[StageServer] = StageServer,
    agreement_type: type[AgreementDriver] = AgreementDriver,
    subscribers: Sequence[tuple[str, Subscriber, Subscriber | None]] = (),
) -> int:
    """Run a node in the foreground until SIGINT/SIGTERM; returns the exit code.

    `subscribers` are extra components' (name, on_change, check) for config changes;
    `butterfly.testing.config_faults` composes a node that refuses a value this way.
    """
    import signal

    # torch's parallel work runs on the node's TorchThread; the event loop's own small
    # tensor work stays on this thread alone (runtime.torch_thread)
    torch_threads = confine_to_one_thread()
    # replicas and auditors compare activations: no kernel may pick a racy algorithm
    torch.use_deterministic_algorithms(cfg.advanced.deterministic)
    configure_logging(cfg)
    # The event loop hands work to the torch and SQLite threads and takes results back;
    # with Python's default 5 ms GIL switch interval each hand-off could wait that long
    # while the loop thread is busy (measured: 6.7 ms to accept a task, 0.1 ms of work).
    sys.setswitchinterval(0.0005)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        node = build_node(
            cfg,
            model_dir,
            edges=NetworkEdges(cfg, model_dir),
            torch_thread=TorchThread(
                cfg.resources.threads or torch_threads, name=f"torch-{cfg.node.id}"
            ),
            stage_server_type=stage_server_type,
            agreement_type=agreement_type,
        )
        node.config.subscribe("logging", set_log_level)  # hot: no restart for the level
        for name, on_change, check in subscribers:
            node.config.subscribe(name, on_change, check=check)
        await node.serve(stop)

    # uvloop: asyncio's pure-Python loop (selector, handles, the self-pipe wake-up after
    # each torch job) showed in every node's profile under many short requests; uvloop
    # runs the same loop in C (docs/PERFORMANCE.md, API throughput)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
    return 0
