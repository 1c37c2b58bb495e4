"""The composition root: one node built from a frozen config and its edges, and its run.

`build_node` builds every part in dependency order and hands each what it needs by
keyword; nothing reaches back into the node. Where two parts need each other, the later
one is given to the earlier when it starts (`Router.start(routes)`, `Membership.run(link,
on_status_change)`, `Recovery.run(on_replanned)`) or they meet through a channel (the
agreement's evidence queue). The edges (transport, heartbeats, clock, measured facts) and
the torch thread are injected: `run` gives the network's, `butterfly.testing.inprocess`
in-memory ones. Policy lives in the parts: recovery and eviction in `control.policy`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from butterfly.agreement.build import NodeAgreement, build_agreement, open_config
from butterfly.agreement.driver import AgreementDriver
from butterfly.config import ButterflyConfig, ConfigManager
from butterfly.config.data_lock import lock_data_dir
from butterfly.config.gateways import gateway_nodes
from butterfly.config.reload import Subscriber, UpdateResult, follow_files
from butterfly.config.roster import Roster
from butterfly.control.agreed_state import AgreedState
from butterfly.control.gateway_role import GatewayRole
from butterfly.control.heartbeats import BeatSource
from butterfly.control.live_config import (
    agreement_wait_s,
    follow_agreement_config,
    follow_config,
    follow_roster,
)
from butterfly.control.membership import Link, Membership
from butterfly.control.plans import AgreedPlans, PlanIntake
from butterfly.control.recovery import Recovery
from butterfly.control.status import ClusterReport, NodeReport
from butterfly.dataplane.engine import PipelineEngine
from butterfly.dataplane.routes import StageRoutes
from butterfly.dataplane.stage_server import StageServer
from butterfly.metrics.prometheus import Metrics
from butterfly.metrics.tracing import Tracing
from butterfly.net.tcp import Identity
from butterfly.protocol.keys import key_path, load_or_create_key, public_keys
from butterfly.runtime.tokenizer import TextCodec
from butterfly.runtime.torch_thread import TorchThread
from butterfly.types.ids import NodeId
from butterfly.types.wire import control as c
from butterfly.types.wire import data as d
from butterfly.types.wire import standby as s
from butterfly.types.wire.agreement import Evidence
from butterfly.types.wire.commands import EvictNode, NewPlan, ResumeNode, SuspendNode, TakeOver
from butterfly.wiring import parts
from butterfly.wiring.edges import Edges, NetworkEdges
from butterfly.wiring.logs import set_log_level
from butterfly.wiring.metrics_http import MetricsServer
from butterfly.wiring.process import (
    end_process,
    exempt_from_collections,
    prepare_process,
    run_until_signalled,
)
from butterfly.wiring.routing import Router, Routes, by_envelope
from butterfly.wiring.standby import TaskReplicas
from butterfly.wiring.supervise import supervised

if TYPE_CHECKING:
    from butterfly.wiring.gateway import Gateway

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Node:
    """One node's parts, as `build_node` wired them."""

    id: NodeId
    model_hash: str
    config: ConfigManager
    router: Router
    routes: Routes
    stage_server: StageServer
    membership: Membership
    heartbeats: Callable[[], Link]  # the link is made (its socket bound) when serving
    report: NodeReport
    agreement: NodeAgreement
    plans: AgreedPlans
    evidence: asyncio.Queue[Evidence]
    recovery: Recovery
    engine: PipelineEngine
    gateway: Gateway | None  # on the gateway-capable nodes (cluster.gateways) only
    role: GatewayRole
    metrics: Metrics
    tracing: Tracing
    scrape: MetricsServer | None  # GET /metrics of this node (metrics.listen), if set

    async def serve(self, stop: asyncio.Event, config_files: Sequence[Path] = ()) -> None:
        """Run until `stop` is set, then drain and return; `config_files` (what the node
        started from) are followed: an edit applies as an update would (`follow_files`)."""
        cfg = self.config.current
        await self.router.start(self.routes)
        scrape = self.scrape
        if scrape is not None:
            await scrape.start()
        log.info(
            "node %s (%s) listening on %s, model sha256 %s%s",
            self.id,
            cfg.metadata.environment,
            cfg.node.listen,
            self.model_hash,
            " with mutual TLS" if cfg.security.tls.enabled else "",
        )
        link = self.heartbeats()
        try:
            async with asyncio.TaskGroup() as tg:
                loops: dict[str, Callable[[], Awaitable[None]]] = {
                    "membership": partial(
                        self.membership.run, link, self.recovery.on_status_change
                    ),
                    "agreement": self.agreement.driver.run,
                    "evidence": partial(self.recovery.watch_evidence, self.evidence),
                    "kv-expiry": self.stage_server.expire_idle,
                }
                if config_files:
                    loops["config-files"] = partial(
                        follow_files,
                        self.config,
                        config_files,
                        stop=stop,
                        env=os.environ,
                        on_result=_cluster_wide_left,
                    )
                for name, loop in loops.items():
                    tg.create_task(supervised(name, loop, self.metrics.emit))
                gateway = tg.create_task(self.gateway.serve(stop)) if self.gateway else None
                await stop.wait()
                if gateway is not None:  # its API closes before the node's transport does
                    await gateway
                raise _Stop
        except* _Stop:
            pass
        finally:
            if scrape is not None:
                await scrape.close()
            await self.router.close()
            self.stage_server.close()
            self.config.history.close()
            self.tracing.close()


def _cluster_wide_left(result: UpdateResult) -> None:
    """A node's file is its own: the cluster's options move only by agreement."""
    if result.pending is not None:
        keys = sorted(result.pending.keys)
        log.warning(
            "config file: cluster-wide options %s differ from the agreed ones and are left as "
            "agreed; change them with `butterfly config update --file F --url U`",
            keys,
        )


def _execute(
    plans: AgreedPlans,
    role: GatewayRole,
    command: EvictNode | SuspendNode | ResumeNode | NewPlan | TakeOver,
) -> None:
    """Every node, in agreement order: a takeover moves the gateway role, the rest are
    plans and evictions."""
    if isinstance(command, TakeOver):
        role.execute(command)
    else:
        plans.execute(command)


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
    digest = parts.checked_model_hash(config, model_dir)
    metrics = Metrics()
    emit = metrics.emit
    key = load_or_create_key(key_path(cfg, Path(cfg.node.data_dir)))
    # the members as last agreed: every part reads these two dicts, updated in place
    roster = Roster(cfg, public_keys(cfg, key))
    members, keys = roster.addresses, roster.keys
    server = parts.stage_server(cfg, model_dir, key, torch_thread, stage_server_type, keys)
    metrics.watch_kv(me, server.kv_usage)
    o = cfg.observability
    tracing = Tracing(
        node=me, exporter=edges.spans(), enabled=o.tracing, sample_rate=o.trace_sample_rate
    )
    identity = Identity(me, cfg.cluster.id, digest, key=key, keys=keys)
    transport = edges.transport(identity, emit, server.current_epoch)
    transport.set_peers(members)
    probe = edges.probe(me, sorted(members), transport, torch_thread)
    report = NodeReport(node=me, server=server, probe=probe)
    membership = parts.membership(cfg, members, report.local_state, edges.clock)
    plans, evidence = AgreedPlans(), asyncio.Queue[Evidence]()
    role = GatewayRole(
        gateways=gateway_nodes(cfg),
        status=membership.status,
        evicted=lambda: plans.evicted,
        never_heard_for=membership.never_heard_for,
        never_heard_s=cfg.coordination.never_heard_s,
    )
    router = Router(
        node=me,
        transport=transport,
        cluster_id=cfg.cluster.id,
        epoch=server.current_epoch,
        ask_timeout_s=partial(parts.step_timeout_s, config),
        emit=emit,
        plan=server.current_plan,
        gateway=role.gateway,
    )
    agreement = build_agreement(
        manager=config,
        transport=transport,
        on_command=partial(_execute, plans, role),
        on_evidence=evidence.put,
        emit=emit,
        live=membership.is_live,
        gateway=role.gateway,
        takeover=role.refusal,
        veto=role.veto,
        driver_type=agreement_type,
        roster=roster,
    )
    executed = AgreedState(plans=plans, role=role, config=agreement.replica)
    agreement.driver.keep_state(executed.snapshot, executed.restore)  # pbft_snapshot
    recovery = Recovery(
        node=me,
        members=sorted(members),
        status=membership.status,
        holder=server,
        plans=plans,
        propose=agreement.propose,
        agree_timeout_s=agreement_wait_s(cfg),
        transport=transport,
        model_hash=digest,
        placing=parts.placing(cfg, model_dir),
        suspect_primary=agreement.driver.suspect_primary,
        emit=emit,
        acting=lambda: role.acting == me,  # the gateway evicts: whichever node acts
        healthy_for=membership.healthy_for,
        loaded=membership.layers_of,
        heard_at=membership.heard_at,
        interval_s=cfg.coordination.heartbeat_interval_ms / 1000,
        clock=edges.clock,
    )
    timeouts = parts.step_timeouts(config, membership.status, recovery.suspend, recovery.suspended)
    codec = TextCodec.load(model_dir) if (model_dir / "tokenizer.json").is_file() else None
    replicas = TaskReplicas(
        node=me,
        path=Path(cfg.node.data_dir) / "tasks.sqlite",
        role=role,
        transport=transport,
        status=membership.status,
        timeout_s=partial(parts.step_timeout_s, config),
    )
    health = ClusterReport(
        members=members, membership=membership, server=server, recovery=recovery, failed=role.failed
    )
    metrics.watch_status(health.statuses)  # node_status says what /health says
    engine = parts.engine(
        cfg,
        model_dir,
        config=config,
        server=server,
        deliver=router.deliver,
        ask=router.ask,
        transport=transport,
        health=health,
        keys=keys,
        timeouts=timeouts,
        on_liars=recovery.evict_liars,
        codec=codec,
        torch_thread=torch_thread,
        emit=emit,
        on_checkpoint=replicas.checkpoint,
        resume=lambda request_id: replicas.store.checkpoint(request_id),
        tracing=tracing,
        failed=lambda node: membership.status(node) == "failed",
        unserved=lambda: recovery.unserved,
    )
    # every dynamic option reaches the part that uses it (control.live_config)
    follow_config(
        config,
        engine=engine,
        stage_server=server,
        membership=membership,
        recovery=recovery,
        tracing=tracing,
    )
    follow_agreement_config(
        config, driver=agreement.driver, coordinator=agreement.coordinator, recovery=recovery
    )
    follow_roster(
        config,
        roster=roster,
        transport=transport,
        membership=membership,
        recovery=recovery,
        role=role,
    )
    stage = StageRoutes(
        node=me,
        server=server,
        deliver=router.deliver,
        emit=emit,
        gateway=role.gateway,
        gateways=lambda: role.gateways,
        tracing=tracing,
    )
    config_message = agreement.replica.on_message  # votes only for the gateway (peer)
    routes: Routes = {
        d.StageStep: stage.step,
        d.StepResult: engine.on_result,
        d.StepError: engine.on_result,
        d.AuditRequest: stage.audit,
        d.InputsQuery: stage.inputs,
        d.Release: stage.release,
        d.KvAppend: stage.kv_append,
        d.CacheQuery: stage.cache_query,
        c.PlanAssign: PlanIntake(
            node=me, plans=plans, apply=server.apply_plan, emit=emit, gateway=role.gateway
        ),
        c.StatusQuery: report.on_status_query,
        d.Ping: report.on_ping,
        c.AgreementFrame: by_envelope(agreement.driver.on_frame),
        c.ConfigPrepare: config_message,
        c.ConfigStatusQuery: config_message,
        c.ConfigSync: config_message,
        c.ConfigLocal: config_message,
    }
    gateway = None
    if role.capable(me):  # acting, or standing by to take over
        # imported here: the HTTP API it brings (FastAPI, the OpenAI routes) took 0.25 s of
        # CPU of each node's start (AMD EPYC), and only gateway-capable nodes serve it
        from butterfly.wiring.gateway import Gateway

        routes = {
            **routes,
            s.TaskCopy: replicas.on_copy,
            s.TaskCheckpoint: replicas.on_checkpoint,
            s.TaskSettled: replicas.on_settled,
            s.TaskSync: replicas.on_sync,
        }
        gateway = Gateway(
            node=me,
            members=members.keys(),
            config=config,
            transport=transport,
            report=report,
            recovery=recovery,
            engine=engine,
            coordinator=agreement.coordinator,
            metrics=metrics,
            codec=codec,
            model_name=cfg.model.served_name or model_dir.name,
            role=role,
            replicas=replicas,
            propose=agreement.propose,
            status=membership.status,
            silence=membership.silence,
        )
    beats = BeatSource(me, cfg.cluster.id, key, keys)
    heartbeats = partial(
        edges.heartbeats, beats, report.local_state, membership.on_heartbeat, members
    )
    return Node(
        *(me, digest, config, router, routes, server, membership, heartbeats, report),
        *(agreement, plans, evidence, recovery, engine, gateway, role, metrics, tracing),
        # metrics.enabled off serves GET /metrics nowhere (it was served here regardless)
        MetricsServer(cfg.metrics.listen, metrics.render)
        if cfg.metrics.listen and cfg.metrics.enabled
        else None,
    )


def run(
    cfg: ButterflyConfig,
    model_dir: Path,
    *,
    stage_server_type: type[StageServer] = StageServer,
    agreement_type: type[AgreementDriver] = AgreementDriver,
    subscribers: Sequence[tuple[str, Subscriber, Subscriber | None]] = (),
    config_files: Sequence[Path] = (),
) -> NoReturn:
    """Run a node in the foreground until SIGINT/SIGTERM, then end the process with exit
    code 0 without the interpreter's slow teardown (`wiring.process.end_process`).

    `config_files`: what `cfg` was loaded from, reloaded when edited.
    `subscribers` are extra components' (name, on_change, check) for config changes;
    `butterfly.testing.config_faults` composes a node that refuses a value this way.

    The process holds its data directory's lock from before it reads anything there
    until it ends (`config.data_lock`): a second node on the same directory, or an
    offline `config update`/`rollback`, is refused while it runs.
    """
    lock = lock_data_dir(  # released by the kernel when the process ends, however it ends
        Path(cfg.node.data_dir),
        then="each node needs its own node.data_dir; stop that node first to run this one",
    )
    torch_threads = prepare_process(cfg)

    async def main(stop: asyncio.Event) -> None:
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
        exempt_from_collections()  # the node's own parts, built now, live as long
        await node.serve(stop, config_files)

    with lock:
        run_until_signalled(main)
    end_process(0)
