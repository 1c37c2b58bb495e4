"""The composition root: one node built from a frozen config, and its run loop.

Start-up follows the specification's order: metrics, network, partition (plan),
coordination (membership), scheduling, API. Every part is built here and handed what it
needs by keyword; no part reaches for a global or builds another.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

import torch
import uvicorn
import uvloop

from butterfly.agreement.build import build_agreement, open_config
from butterfly.agreement.driver import AgreementDriver
from butterfly.api.app import create_app
from butterfly.api.live import follow_config as follow_api_config
from butterfly.api.settings import ApiSettings
from butterfly.config import ButterflyConfig
from butterfly.config.reload import Subscriber
from butterfly.config.validate import replication_factor
from butterfly.control.facts import FactProbe
from butterfly.control.heartbeats import BeatSource, HeartbeatLink
from butterfly.control.live_config import (
    agreement_wait_s,
    follow_agreement_config,
    follow_config,
)
from butterfly.control.membership import Membership
from butterfly.control.planner import Placement, distribute_plan, gather_status, place, replan_after
from butterfly.control.plans import AgreedPlans
from butterfly.control.recovery import Recovery
from butterfly.control.replicas import add_replicas, promote_standbys, split_for_replication
from butterfly.dataplane.audit import Auditor, Referee
from butterfly.dataplane.engine import PipelineEngine
from butterfly.dataplane.proving import Prover
from butterfly.dataplane.replicate import Replicator
from butterfly.dataplane.stage_server import Outbound, StageServer
from butterfly.dataplane.unresponsive import StepTimeouts
from butterfly.metrics.events import CheckpointCopied, Eviction, MessageDropped, NodeStatus
from butterfly.metrics.prometheus import Metrics
from butterfly.net.framing import Envelope, answer_to, as_message
from butterfly.net.tcp import Identity, TcpTransport, TransportLimits
from butterfly.net.tls import TlsFiles, contexts
from butterfly.partition.service import PartitionService
from butterfly.protocol.failure_detector import PhiAccrualFailureDetector
from butterfly.protocol.keys import key_path, load_or_create_key, public_keys
from butterfly.protocol.proof import Tolerance
from butterfly.runtime.loader import layer_infos, model_args
from butterfly.runtime.tokenizer import TextCodec
from butterfly.runtime.torch_thread import TorchThread, confine_to_one_thread
from butterfly.runtime.weights import model_hash
from butterfly.schedule.engine import ClusterHealth, NodeHealth
from butterfly.schedule.queue import QueuePolicy
from butterfly.schedule.scheduler import Scheduler
from butterfly.schedule.store import TaskStore
from butterfly.types.errors import (
    ButterflyError,
    ConfigError,
    InvalidMessage,
    SendTimeout,
    ServiceUnavailable,
)
from butterfly.types.ids import GATEWAY, Epoch, NodeId, RequestId
from butterfly.types.plan import StagePlan
from butterfly.types.wire.agreement import Evidence
from butterfly.types.wire.base import Ask
from butterfly.types.wire.commands import (
    ConfigAbort,
    ConfigUpdate,
    EvictNode,
    InvalidCommand,
    NewPlan,
    decode_command,
)
from butterfly.types.wire.control import (
    AgreementFrame,
    ConfigPrepare,
    ConfigStatusQuery,
    ConfigSync,
    PlanAck,
    PlanAssign,
    StatusQuery,
    StatusReply,
)
from butterfly.types.wire.data import (
    AuditReply,
    AuditRequest,
    CacheQuery,
    KvAppend,
    Ping,
    Pong,
    Release,
    StageStep,
    StepError,
    StepResult,
)
from butterfly.types.wire.frames import Message

log = logging.getLogger(__name__)
R = TypeVar("R")
AGREED_PLAN_WAIT_S = 10.0
"""How long a node waits for its own execution of the plan the gateway hands it."""


def parse_address(hostport: str) -> tuple[str, int]:
    host, _, port = hostport.rpartition(":")
    return host, int(port)


class Node:
    """One running node: its parts, its dispatcher, and (on node 0) the gateway."""

    def __init__(
        self,
        cfg: ButterflyConfig,
        model_dir: Path,
        *,
        stage_server_type: type[StageServer] = StageServer,
        agreement_type: type[AgreementDriver] = AgreementDriver,
        torch_threads: int = 0,
    ) -> None:
        """`stage_server_type` and `agreement_type` let `butterfly.testing` compose a node
        with a faulty stage server or lying votes without any test switch in the
        production types. `torch_threads`: torch's own choice for this process, used when
        `resources.threads` is 0 (see `run`)."""
        self.config = open_config(cfg)  # every part below sees the values last agreed on
        cfg = self.config.current
        self.cfg, self.id, self.model_dir = cfg, NodeId(cfg.node.id), model_dir
        self.members = {NodeId(i): a for i, a in enumerate(cfg.cluster.members)} or {
            self.id: cfg.node.listen
        }
        self.metrics = Metrics()
        self.model_hash = model_hash(model_dir)
        expected = cfg.model.expected_sha256
        if expected and expected != self.model_hash:
            raise ConfigError(
                f"model.expected_sha256 is {expected[:16]}..., but the model in {model_dir} "
                f"hashes to {self.model_hash[:16]}...: not the checkpoint this cluster runs"
            )
        net, tls = cfg.network, cfg.security.tls
        self.transport = TcpTransport(
            identity=Identity(self.id, cfg.cluster.id, self.model_hash),
            listen=parse_address(cfg.node.listen),
            peers={n: parse_address(a) for n, a in self.members.items()},
            emit=self.metrics.emit,
            epoch=lambda: self.stage_server.epoch,
            limits=TransportLimits(
                max_frame_bytes=net.max_frame_bytes,
                connect_timeout_s=net.connect_timeout_ms / 1000,
                connect_attempts=net.retry_attempts,
                retry_backoff_s=net.retry_backoff_ms / 1000,
                retry_max_backoff_s=net.retry_max_backoff_ms / 1000,
                compression="" if net.compression == "none" else net.compression,
                compression_min_bytes=net.compression_min_bytes,
                send_timeout_s=net.send_timeout_ms / 1000,
                max_connections=net.max_connections,
            ),
            tls=contexts(TlsFiles(Path(tls.ca), Path(tls.cert), Path(tls.key)))
            if tls.enabled
            else None,
        )
        self.key = load_or_create_key(key_path(cfg, Path(cfg.node.data_dir)))
        self.public_keys = {NodeId(i): k for i, k in enumerate(public_keys(cfg, self.key))}
        # records are signed wherever a replica can check them (f+1 holders per range),
        # so byzantine.verification may move among audit, replicate and none at run time
        verify = replication_factor(cfg) > 1
        # every model computation of this process runs on this one thread (see its module)
        self.torch = TorchThread(cfg.resources.threads or torch_threads, name=f"torch-{self.id}")
        self.stage_server = stage_server_type(
            torch_thread=self.torch,
            node=self.id,
            model_dir=model_dir,
            max_tensor_bytes=cfg.network.max_frame_bytes,
            prover=Prover(
                self.id, self.key, cfg.byzantine.fingerprint_top_k, cfg.byzantine.fingerprint_chunk
            )
            if verify
            else None,
            # replicate's lanes already keep every range's caches on two nodes
            snapshot_every=0
            if cfg.byzantine.verification == "replicate"
            else cfg.coordination.checkpoint_frequency,
            # the audit takes the gateway's own stage as computed (dataplane.audit)
            keep_outputs=self.id == GATEWAY and verify and cfg.byzantine.verification == "audit",
        )
        # Measured when the gateway first asks (one node at a time; see control.facts).
        self.probe = FactProbe(
            node=self.id,
            peers=sorted(self.members),
            transport=self.transport,
            memory_limit_bytes=cfg.resources.memory_limit_bytes,
            model_dir=model_dir,
            torch_thread=self.torch,
        )
        self.facts: dict[NodeId, StatusReply] = {}  # every node's, gathered by the gateway
        self.placement: Placement | None = None
        c = cfg.coordination
        self.membership = Membership(
            node=self.id,
            members=self.members,
            detector=PhiAccrualFailureDetector(
                c.heartbeat_interval_ms,
                c.phi_suspect,
                c.phi_failed,
                min_std_ms=c.min_std_ms,
                acceptable_pause_ms=c.acceptable_pause_ms,
            ),
            interval_s=c.heartbeat_interval_ms / 1000,
            local_state=self._local_state,
            on_status_change=self._on_status_change,
        )
        self.recovery = Recovery(
            members=sorted(self.members),
            status=self.membership.status,
            current_plan=lambda: self.stage_server.plan,
            replan=self._replan,
            on_replanned=lambda: self.engine.plan_changed(),
            emit=self.metrics.emit,
        )
        family, args = model_args(model_dir)
        self.layers = layer_infos(model_dir)
        max_context = int(getattr(args, "max_context", 0)) or 1
        self.partitions = PartitionService(
            cache_size=self.cfg.partition.cache_size, context_tokens=max_context
        )
        self.result_bytes = int(getattr(args, "vocab_size", 0)) * 4  # one row of logits
        self.timeouts = StepTimeouts(  # the gateway's rule for silent and slow nodes
            gateway=self.id,
            limit=lambda: self.config.current.byzantine.max_step_timeouts,
            status=self.membership.status,
            declare=self._on_liars,
        )
        has_tokenizer = (model_dir / "tokenizer.json").is_file()
        self.codec = TextCodec.load(model_dir) if has_tokenizer else None
        self.engine = PipelineEngine(
            node=self.id,
            deliver=self.deliver,
            ask=self._ask,
            plan=lambda: self.stage_server.plan,
            health=self.health,
            max_context=int(getattr(args, "max_context", 0)) or 1,
            input_kind=family.input_kind,
            eos_ids=self.codec.eos_ids if self.codec else frozenset(),
            step_timeout_s=cfg.network.step_timeout_ms / 1000,
            max_tensor_bytes=cfg.network.max_frame_bytes,
            auditor=Auditor(
                ask=self._ask_audit,
                keys=self.public_keys,
                referee=Referee(model_dir, self.torch),
                tolerance=Tolerance(rtol=cfg.byzantine.rtol, atol=cfg.byzantine.atol),
                max_tensor_bytes=cfg.network.max_frame_bytes,
                gateway=self.id,
                own_outputs=self.stage_server.outputs_of,
            )
            if verify
            else None,
            audit_fraction=cfg.byzantine.audit_fraction,
            on_liars=self._on_liars,
            timeouts=self.timeouts,
            replicator=Replicator(
                plan=lambda: self.stage_server.plan,
                f=cfg.byzantine.f,
                keys=self.public_keys,
                referee=Referee(model_dir, self.torch),
                tolerance=Tolerance(rtol=cfg.byzantine.rtol, atol=cfg.byzantine.atol),
                on_liars=self._on_liars,
                timeouts=self.timeouts,
                emit=self.metrics.emit,
            )
            if verify
            else None,
            verification=cfg.byzantine.verification,
            emit=self.metrics.emit,
        )
        agreed = build_agreement(
            manager=self.config,
            transport=self.transport,
            on_commit=self._on_commit,
            on_evidence=self._on_evidence,
            emit=self.metrics.emit,
            live=lambda n: self.membership.status(n) in ("starting", "healthy"),
            driver_type=agreement_type,
        )
        self.agreement, self.config_replica = agreed.driver, agreed.replica
        self.config_coordinator = agreed.coordinator
        self.plans = AgreedPlans(
            propose=lambda command, timeout: self.agreement.propose(command, timeout=timeout),
            timeout_s=agreement_wait_s(cfg),
        )
        follow_config(  # every dynamic option reaches the part that uses it
            self.config,
            engine=self.engine,
            stage_server=self.stage_server,
            membership=self.membership,
            recovery=self.recovery,
        )
        follow_agreement_config(
            self.config, driver=self.agreement, coordinator=agreed.coordinator, plans=self.plans
        )

    def _on_status_change(self, peer: NodeId, status: str) -> None:
        if status in ("starting", "healthy", "suspected", "failed"):
            self.metrics.emit(NodeStatus(node=peer, status=status))  # type: ignore[arg-type]
        self.recovery.notify(peer, status)
        if status == "failed":
            self.agreement.suspect_primary(peer)

    async def _replan(self, epoch: Epoch, alive: list[NodeId], promote: bool = False) -> None:
        """Decide the plan of `epoch` over `alive` nodes, agree on it, put it in force.

        `promote` (a crash, not an eviction): standbys take over the ranges of nodes that
        are gone, so no weights move and their copies of the KV caches carry on.
        """
        old = self.stage_server.plan
        promoted = promote_standbys(old, epoch, alive) if promote and old is not None else None
        plan = promoted or await self._decide_replan(epoch, alive)
        plan = await self.plans.agree(plan)
        await distribute_plan(
            plan=plan,
            model_hash=self.model_hash,
            node=self.id,
            members=sorted(n for n, _ in (*plan.stages, *plan.replicas)),
            transport=self.transport,
            apply_local=self.stage_server.apply_plan,
            timeout_s=300.0,
        )

    async def _decide_replan(self, epoch: Epoch, alive: list[NodeId]) -> StagePlan:
        chain, spares = split_for_replication(sorted(alive), replication_factor(self.cfg))
        old = self.stage_server.plan
        if old is not None and not spares and not old.replicas:
            # a membership change: keep existing ranges where that costs little
            plan, _moved = replan_after(
                old,
                chain,
                self.facts,
                layers=self.layers,
                strategy=self.config.current.partition.strategy,
                emit=self.metrics.emit,
            )
            return plan
        return add_replicas(self._decide(epoch, chain), spares)

    async def _ask(self, node: NodeId, msg: Ask[R]) -> R:
        """Request/response with a node, this one included (no socket then)."""
        if node == self.id:
            request = as_message(msg)
            env = Envelope(request, self.id, self.stage_server.epoch, self.cfg.cluster.id)
            answer = await self.handle(env)
            if answer is None:
                raise ServiceUnavailable(f"node {node} has no answer to {request.kind}")
            return answer_to(msg, answer[0], node)
        reply, _ = await self.transport.ask(
            node, msg, timeout=self.config.current.network.step_timeout_ms / 1000, channel="control"
        )
        return reply

    async def _ask_audit(
        self, node: NodeId, request: AuditRequest, payload: bytes
    ) -> tuple[AuditReply, bytes]:
        if node == self.id:
            return await self.stage_server.audit(request, payload)
        try:
            answer = await self.transport.ask(
                node, request, payload, timeout=self.config.current.network.step_timeout_ms / 1000
            )
        except SendTimeout:
            await self.timeouts.timed_out(node, f"audit of {request.request_id}")
            raise
        except InvalidMessage:  # an answer of the wrong kind: the auditor judges it
            self.timeouts.answered((node,))
            raise
        self.timeouts.answered((node,))
        return answer

    async def _on_liars(self, liars: tuple[NodeId, ...], reason: str) -> None:
        """An audit proved these nodes wrong: the eviction is agreed through PBFT (every
        node records it), then the gateway re-plans without them."""
        fresh = tuple(n for n in liars if n not in self.plans.evicted)
        if not fresh:  # a later audit of a request the liar served before it left
            log.info("already evicted %s: %s", liars, reason)
            return
        log.error("evicting %s: %s", fresh, reason)
        for liar in fresh:
            try:
                await self.plans.evict(liar, reason)
            except ButterflyError as e:  # not agreed (yet): it still leaves this gateway's plan
                log.error("eviction of node %s not agreed: %s", liar, e)
            self.metrics.emit(Eviction(node=liar))
        await self.recovery.evict(fresh)

    async def _on_evidence(self, evidence: Evidence) -> None:
        """Two conflicting votes one node signed for one slot (signatures checked, so the
        reporter need not be trusted): the gateway evicts the signer."""
        first = evidence.first
        reason = (
            f"node {evidence.accused} signed two conflicting {first.kind} votes for "
            f"seq {first.seq} (evidence from node {evidence.sender})"
        )
        if self.id != GATEWAY:
            log.error("equivocation: %s; the gateway evicts it", reason)
            return
        await self._on_liars((evidence.accused,), reason)

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
                self.plans.execute(command)

    async def handle(self, env: Envelope) -> tuple[Message, bytes] | None:
        """Every incoming frame ends here, matched on its type."""
        msg = env.msg
        match msg:
            case StageStep():
                out: Outbound = await self.stage_server.on_step(env)
                try:
                    await self.deliver(out.peer, out.msg, out.payload)
                except ButterflyError as e:  # the next stage is gone: tell the gateway now
                    lost = StepError(
                        msg.request_ids,
                        msg.steps,
                        self.id,
                        "stage_lost",
                        f"node {out.peer} unreachable: {e}",
                        True,
                    )
                    await self.deliver(msg.reply_to, lost)
                    return None
                await self._copy_caches(msg.request_ids)
            case StepResult() | StepError():
                self.engine.on_result(env)
            case AuditRequest():
                return await self.stage_server.audit(msg, env.payload)
            case Release():
                for request_id in msg.request_ids:
                    self.stage_server.release(request_id)
            case KvAppend():
                self.stage_server.on_kv_append(msg, env.payload)
            case CacheQuery():
                return self.stage_server.cache_lengths(msg), b""
            case PlanAssign():
                if env.sender != GATEWAY:
                    self.metrics.emit(MessageDropped(reason="plan_from_non_gateway"))
                    return None
                return await self._apply_agreed(msg), b""
            case StatusQuery():
                return await self._status(), b""
            case Ping():
                return Pong(msg.seq, len(env.payload)), b""
            case AgreementFrame():
                await self.agreement.on_frame(env)
            case ConfigPrepare() | ConfigStatusQuery() | ConfigSync():
                return await self.config_replica.on_message(env)
            case _:
                self.metrics.emit(MessageDropped(reason=f"unexpected_{msg.kind}"))
        return None

    async def _copy_caches(self, request_ids: tuple[RequestId, ...]) -> None:
        """Send the standbys what the step added to the caches, off the step's path."""
        for copy in self.stage_server.kv_deltas(request_ids):
            self.metrics.emit(CheckpointCopied(bytes=len(copy.payload)))
            try:
                await self.deliver(copy.peer, copy.msg, copy.payload)
            except ButterflyError as e:  # a dead standby is the detector's business
                log.debug("KV copy to node %s lost: %s", copy.peer, e)

    async def _apply_agreed(self, msg: PlanAssign) -> PlanAck:
        """Apply a plan handed out by the gateway only if it is the one agreed for its
        epoch: the gateway decides, but no node acts on a plan PBFT did not order."""
        try:
            plan = StagePlan.from_message(msg)
        except ButterflyError as e:
            return PlanAck(msg.epoch, self.id, False, str(e))
        refusal = await self.plans.refusal(plan, wait_s=AGREED_PLAN_WAIT_S)
        if refusal is not None:
            log.error("node %s refuses a plan: %s", self.id, refusal)
            return PlanAck(msg.epoch, self.id, False, refusal)
        return await self.stage_server.apply_plan(msg)

    async def _status(self) -> StatusReply:
        """This node's status with its measured facts (measuring them on first call)."""
        facts = await self.probe.facts()
        plan = self.stage_server.plan
        layers = plan.layers_of(self.id) if plan else None
        peers, latency, bandwidth = facts.link_fields()
        return StatusReply(
            self.id,
            self.stage_server.epoch,
            (layers.start, layers.end) if layers else (),
            len(self.stage_server.caches),
            self.stage_server.kv_bytes,
            facts.flops_per_s,
            facts.memory_bytes,
            peers,
            latency,
            bandwidth,
            facts.layer_overhead_ms,
        )

    def _decide(self, epoch: Epoch, members: list[NodeId]) -> StagePlan:
        """The plan of `epoch` over `members`, from the facts gathered at start-up."""
        self.placement = place(
            epoch,
            members,
            self.facts,
            layers=self.layers,
            strategy=self.config.current.partition.strategy,
            service=self.partitions,
            emit=self.metrics.emit,
            gateway=self.id,
            result_bytes=self.result_bytes,
        )
        return self.placement.stages

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
            plan=(
                self.placement.to_dict()
                if self.placement is not None
                and plan is not None
                and (self.placement.stages.epoch, self.placement.stages.stages)
                == (plan.epoch, plan.stages)
                else None
            ),
        )

    # --- running ----------------------------------------------------------------------

    async def serve(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set, then drain and return."""
        await self.transport.start(self.handle)
        log.info(
            "node %s (%s) listening on %s, model sha256 %s%s",
            self.id,
            self.cfg.metadata.environment,
            self.cfg.node.listen,
            self.model_hash,
            " with mutual TLS" if self.cfg.security.tls.enabled else "",
        )
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.membership.run(self._heartbeat_link()))
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

    def _heartbeat_link(self) -> HeartbeatLink:
        source = BeatSource(self.id, self.cfg.cluster.id, self.key, self.public_keys)
        return HeartbeatLink(
            source,
            listen=parse_address(self.cfg.node.listen),
            peers={n: parse_address(a) for n, a in self.members.items() if n != self.id},
            interval_s=self.cfg.coordination.heartbeat_interval_ms / 1000,
            local_state=self._local_state,
            on_beat=self.membership.on_heartbeat,
        )

    async def _gateway(self, stop: asyncio.Event) -> None:
        """Node 0: decide and distribute the plan, then serve the API."""
        peers = [n for n in self.members if n != self.id]
        self.facts = await gather_status(
            self.transport, peers, timeout_s=120.0, local=(self.id, self._status)
        )
        await self._replan(Epoch(1), sorted(self.members))
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
            serve_metrics=self.cfg.metrics.enabled,
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
        follow_api_config(self.config, app=app, scheduler=scheduler)
        server = uvicorn.Server(
            uvicorn.Config(app, host=a.host, port=a.port, log_level="warning", lifespan="off")
        )
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(scheduler.run())
                tg.create_task(scheduler.expire_results(s.result_ttl_s))
                tg.create_task(self.engine.serve_batches())
                tg.create_task(self.recovery.run())
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


class JsonLines(logging.Formatter):
    """observability.log_format = "json": one JSON object per line, for log shippers."""

    def __init__(self, environment: str, node: int) -> None:
        super().__init__()
        self._fixed = {"environment": environment, "node": node}

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **self._fixed,
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


class _Stop(Exception):
    """Unwinds the node's task group when it is asked to stop."""


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
    o = cfg.observability
    logging.basicConfig(  # the plan, its estimate and the measured facts are logged at info
        level=o.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        filename=o.log_file or None,
    )
    if o.log_format == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonLines(cfg.metadata.environment, cfg.node.id))
    # The event loop hands work to the torch and SQLite threads and takes results back;
    # with Python's default 5 ms GIL switch interval each hand-off could wait that long
    # while the loop thread is busy (measured: 6.7 ms to accept a task, 0.1 ms of work).
    sys.setswitchinterval(0.0005)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        node = Node(
            cfg,
            model_dir,
            stage_server_type=stage_server_type,
            agreement_type=agreement_type,
            torch_threads=torch_threads,
        )
        node.config.subscribe("logging", _set_log_level)  # hot: no restart for the level
        for name, on_change, check in subscribers:
            node.config.subscribe(name, on_change, check=check)
        await node.serve(stop)

    # uvloop: asyncio's pure-Python loop (selector, handles, the self-pipe wake-up after
    # each torch job) showed in every node's profile under many short requests; uvloop
    # runs the same loop in C (docs/PERFORMANCE.md, API throughput)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
    return 0
