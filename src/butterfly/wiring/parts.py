"""Parts whose construction is mostly reading the config: kept here so the composition
root (`node.build_node`) shows only what is wired to what.

Each function builds one part from the frozen config and the parts it needs, which it
receives already built: nothing here reaches back into a node.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

from butterfly.config import ButterflyConfig, ConfigManager
from butterfly.config.gateways import gateway_nodes
from butterfly.config.validate import replication_factor
from butterfly.control.facts import room_to_load
from butterfly.control.live_config import snapshot_every, speculation
from butterfly.control.membership import Membership
from butterfly.control.policy import Placing
from butterfly.dataplane.audit import Auditor
from butterfly.dataplane.drafter import ModelDrafter, check_draft_model
from butterfly.dataplane.engine import Asker, Deliver, PipelineEngine
from butterfly.dataplane.proving import Prover
from butterfly.dataplane.referee import Referee
from butterfly.dataplane.replicate import Replicator
from butterfly.dataplane.routes import AuditAsk
from butterfly.dataplane.sending import RecordSize
from butterfly.dataplane.stage_server import StageServer
from butterfly.dataplane.unresponsive import StepTimeouts
from butterfly.metrics.events import Emit
from butterfly.metrics.tracing import Tracing
from butterfly.net.transport import Transport
from butterfly.partition.service import PartitionService
from butterfly.protocol.dispatch import DISPATCH_MARK, Dispatcher
from butterfly.protocol.failure_detector import PhiAccrualFailureDetector
from butterfly.protocol.proof import tolerance_for
from butterfly.protocol.sign import SigningKey
from butterfly.runtime.loader import layer_infos, model_args
from butterfly.runtime.precision import Precision, verification_floor
from butterfly.runtime.tokenizer import TextCodec
from butterfly.runtime.torch_thread import TorchThread
from butterfly.runtime.weights import check_readable, declared_eos_ids, model_hash
from butterfly.schedule.engine import ClusterHealth
from butterfly.schedule.store import Checkpoint
from butterfly.types.errors import ButterflyError, ConfigError
from butterfly.types.ids import NodeId, RequestId

Liars = Callable[[tuple[NodeId, ...], str], Awaitable[None]]


def checked_model_hash(config: ConfigManager, model_dir: Path) -> str:
    """The model's sha256, refused (ConfigError) when it is not the one configured, or
    (MissingTensor) when its weights files are missing or unreadable (`check_readable`)."""
    try:
        check_readable(model_dir)
    except ButterflyError:
        config.history.close()
        raise
    digest, expected = model_hash(model_dir), config.current.model.expected_sha256
    if expected and expected != digest:
        config.history.close()
        raise ConfigError(
            f"model.expected_sha256 is {expected[:16]}..., but the model in {model_dir} "
            f"hashes to {digest[:16]}...: not the checkpoint this cluster runs"
        )
    return digest


def step_timeouts(
    config: ConfigManager,
    status: Callable[[NodeId], str],
    declare: Liars,
    out: Callable[[NodeId], bool],
) -> StepTimeouts:
    """The gateway's rule for silent and slow nodes, with the limit as last agreed;
    `declare` suspends a node, `out` says whether it still is."""
    return StepTimeouts(
        gateway=NodeId(config.current.node.id),
        limit=lambda: config.current.byzantine.max_step_timeouts,
        status=status,
        declare=declare,
        apart=lambda: config.current.network.step_timeout_ms / 1000,
        out=out,
    )


def verifying(cfg: ButterflyConfig) -> bool:
    """Records are signed wherever a replica can check them (f+1 holders per range,
    whatever the mode), so byzantine.verification may move among audit, replicate and
    none at run time, and back after a restart."""
    return replication_factor(cfg) > 1


def step_timeout_s(config: ConfigManager) -> float:
    """network.step_timeout_ms as last agreed (it is live): read on every use."""
    return config.current.network.step_timeout_ms / 1000


def precision_of(cfg: ButterflyConfig) -> Precision:
    """model.dtype and model.quantization, probed on this CPU (refused by name if not)."""
    return Precision.named(cfg.model.dtype, cfg.model.quantization)


def stage_server(
    cfg: ButterflyConfig,
    model_dir: Path,
    key: SigningKey,
    torch_thread: TorchThread,
    server_type: type[StageServer],
    keys: dict[NodeId, bytes],
) -> StageServer:
    """`keys`: the members' (the roster's, so an added member's inputs check too)."""
    me, byz = NodeId(cfg.node.id), cfg.byzantine
    verify = verifying(cfg)
    return server_type(
        torch_thread=torch_thread,
        node=me,
        model_dir=model_dir,
        max_tensor_bytes=cfg.network.max_message_bytes,
        precision=precision_of(cfg),
        prover=Prover(me, key, byz.fingerprint_top_k, byz.fingerprint_chunk, keys)
        if verify
        else None,
        snapshot_every=snapshot_every(cfg),
        # the audit takes the gateway's own stage as computed (dataplane.audit); any
        # gateway-capable node may become the gateway
        keep_outputs=me in gateway_nodes(cfg) and verify and byz.verification == "audit",
        max_caches=cfg.resources.max_kv_caches,
        cache_ttl_s=cfg.resources.kv_cache_ttl_s,
    )


def membership(
    cfg: ButterflyConfig,
    members: dict[NodeId, str],
    local_state: Callable[[], tuple[tuple[int, ...], int]],
    clock: Callable[[], float],
) -> Membership:
    c = cfg.coordination
    return Membership(
        node=NodeId(cfg.node.id),
        members=members,
        detector=PhiAccrualFailureDetector(
            c.heartbeat_interval_ms,
            c.phi_suspect,
            c.phi_failed,
            min_std_ms=c.min_std_ms,
            acceptable_pause_ms=c.acceptable_pause_ms,
        ),
        interval_s=c.heartbeat_interval_ms / 1000,
        local_state=local_state,
        clock=clock,
    )


def max_context(model_dir: Path) -> int:
    return int(getattr(model_args(model_dir)[1], "max_context", 0)) or 1


def placing(cfg: ButterflyConfig, model_dir: Path) -> Placing:
    """What the gateway plans with: the model's layers, the strategy, the copies."""
    _family, args = model_args(model_dir)
    return Placing(
        layers=tuple(layer_infos(model_dir, precision_of(cfg))),
        strategy=cfg.partition.strategy,
        copies=replication_factor(cfg),
        gateway=NodeId(cfg.node.id),
        result_bytes=int(getattr(args, "vocab_size", 0)) * 4,  # one row of logits
        service=PartitionService(
            cache_size=cfg.partition.cache_size, context_tokens=max_context(model_dir)
        ),
    )


def engine(
    cfg: ButterflyConfig,
    model_dir: Path,
    *,
    config: ConfigManager,
    server: StageServer,
    deliver: Deliver,
    ask: Asker,
    transport: Transport,
    health: Callable[[], ClusterHealth],
    keys: dict[NodeId, bytes],
    timeouts: StepTimeouts,
    on_liars: Liars,
    codec: TextCodec | None,
    torch_thread: TorchThread,
    emit: Emit,
    tracing: Tracing,
    on_checkpoint: Callable[[RequestId, Checkpoint], None] | None = None,
    resume: Callable[[RequestId], Checkpoint | None] | None = None,
    failed: Callable[[NodeId], bool] = lambda node: False,
    unserved: Callable[[], str | None] = lambda: None,
) -> PipelineEngine:
    """The gateway's pipeline engine, checking results as `byzantine.verification` says;
    `on_checkpoint` and `resume` keep generations across a gateway's death
    (`wiring.standby`); `failed`: the failure detector's word on a node (an audit stops
    waiting for an auditor it declares failed: `routes.AuditAsk`); `unserved`: why no
    plan is in force (`Recovery.unserved`), which every request then fails with."""
    me, byz = NodeId(cfg.node.id), cfg.byzantine
    verify = verifying(cfg)  # both checkers built: the mode may change at run time
    tolerance = tolerance_for(byz.rtol, byz.atol, verification_floor(cfg.model.dtype))
    family, args = model_args(model_dir)
    asks = AuditAsk(
        node=me,
        local=server.audit,
        local_inputs=server.inputs_held,
        transport=transport,
        timeouts=timeouts,
        timeout_s=partial(step_timeout_s, config),
        failed=failed,
    )
    auditor = (
        Auditor(
            ask=asks,
            inputs=asks.inputs,
            keys=keys,
            referee=Referee(
                model_dir,
                torch_thread,
                precision_of(cfg),
                room=partial(room_to_load, cfg.resources.memory_limit_bytes),
            ),
            tolerance=tolerance,
            max_tensor_bytes=cfg.network.max_message_bytes,
            gateway=me,
            own_outputs=server.outputs_of,
            lone_ranges=byz.audit_lone_ranges,
        )
        if verify
        else None
    )
    replicator = (
        Replicator(
            plan=server.current_plan,
            f=byz.f,
            keys=keys,
            referee=Referee(model_dir, torch_thread, precision_of(cfg)),
            tolerance=tolerance,
            on_liars=on_liars,
            timeouts=timeouts,
            emit=emit,
            gateway=me,
        )
        if verify
        else None
    )
    return PipelineEngine(
        node=me,
        deliver=deliver,
        ask=ask,
        plan=server.current_plan,
        health=health,
        unserved=unserved,
        max_context=max_context(model_dir),
        input_kind=family.input_kind,
        generates=family.generates,
        vocab=int(getattr(args, "vocab_size", 0)) if family.generates else 0,
        eos_ids=codec.eos_ids if codec else declared_eos_ids(model_dir),
        tokenizer=codec.tokenizer if codec else None,
        step_timeout_s=step_timeout_s(config),
        max_tensor_bytes=cfg.network.max_message_bytes,
        auditor=auditor,
        audit_fraction=byz.audit_fraction,
        on_liars=on_liars,
        timeouts=timeouts,
        replicator=replicator,
        verification=byz.verification,
        emit=emit,
        keys=keys,
        f=byz.f,
        checkpoint_every=cfg.coordination.checkpoint_frequency,
        on_checkpoint=on_checkpoint,
        resume=resume,
        tracing=tracing,
        speculation=speculation(cfg),
        prefill_chunk=cfg.generation.prefill_chunk,
        records=RecordSize(byz.fingerprint_top_k, byz.fingerprint_chunk) if verify else None,
        drafter=drafter(cfg, model_dir, torch_thread),
        # the stages run only steps the gateway signed, where they check records
        dispatcher=Dispatcher(me, server.prover.key, Path(cfg.node.data_dir) / DISPATCH_MARK)
        if server.prover is not None
        else None,
    )


def drafter(
    cfg: ButterflyConfig, model_dir: Path, torch_thread: TorchThread
) -> ModelDrafter | None:
    """The small model that drafts in generation.speculative mode "draft", checked against
    the served model now and loaded when the engine serves; None when none is configured."""
    path = cfg.generation.speculative.draft_model
    if not path:
        return None
    check_draft_model(Path(path), model_dir)
    return ModelDrafter(Path(path), torch_thread, precision_of(cfg))


__all__ = [
    "checked_model_hash",
    "drafter",
    "engine",
    "max_context",
    "membership",
    "placing",
    "stage_server",
    "step_timeout_s",
    "step_timeouts",
    "verifying",
]
