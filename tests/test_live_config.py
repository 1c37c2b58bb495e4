"""Every dynamic option changes what the running node does, or is refused at run time.

Each test changes one option through a `ConfigManager` whose subscribers are wired as the
node wires them (`control.live_config.follow_config`), on real parts (the pipeline
engine, a stage server with the tiny model, the failure detector, the recovery loop), and
observes the changed behaviour, never the reported value. The guard at the end checks
that every option the schema calls dynamic has such a test (here, in
`test_live_config_api.py` or in `test_live_config_agreement.py`) or is refused at run
time with its reason; every static one is refused with "restart required".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from butterfly.config import ButterflyConfig
from butterfly.config.fields import field_specs
from butterfly.config.issues import ConfigInvalid, UpdateRefused, UpdateRejected
from butterfly.config.reload import ConfigManager
from butterfly.config.validate import UNSUPPORTED
from butterfly.control.live_config import follow_config
from butterfly.control.membership import Membership
from butterfly.control.plans import AgreedPlans
from butterfly.control.policy import Placing
from butterfly.control.recovery import Recovery
from butterfly.dataplane.audit import Auditor, Claim
from butterfly.dataplane.engine import PipelineEngine
from butterfly.dataplane.proving import Prover
from butterfly.dataplane.referee import Referee
from butterfly.dataplane.replicate import Replicator
from butterfly.dataplane.stage_server import StageServer
from butterfly.dataplane.unresponsive import StepTimeouts
from butterfly.metrics.events import MetricsEvent, Verification, discard
from butterfly.metrics.tracing import Tracing
from butterfly.net.framing import Envelope
from butterfly.net.memory import MemoryNetwork
from butterfly.protocol.failure_detector import PhiAccrualFailureDetector
from butterfly.protocol.proof import Tolerance
from butterfly.protocol.sign import SigningKey
from butterfly.runtime.loader import load_stage
from butterfly.runtime.stage import prefill_outputs
from butterfly.runtime.torch_thread import TorchThread
from butterfly.runtime.wire import decode_tensor, encode_tensor
from butterfly.types.ids import Epoch, NodeId
from butterfly.types.model import LayerRange
from butterfly.types.plan import StagePlan
from butterfly.types.wire.agreement import Proof, decode
from butterfly.types.wire.control import Heartbeat
from butterfly.types.wire.data import AuditReply, AuditRequest, KvAppend, StageStep, StepResult
from tests.engine_util import STAGE, chain, run
from tests.test_audit_gateway import holding, signed

KEYS = {NodeId(n): SigningKey.from_seed(bytes([n + 40]) * 32) for n in range(4)}
PUBLIC = {n: k.public for n, k in KEYS.items()}
FIRST, SECOND, ALL = LayerRange(0, 2), LayerRange(2, 4), LayerRange(0, 4)


def change(manager: ConfigManager, patch: dict[str, Any]) -> None:
    """Apply `patch` as the cluster would: local keys at once, consensus keys once agreed
    (here: committed at the next sequence number, as every node does on COMMIT)."""
    result = manager.update(patch)
    if result.pending is not None:
        manager.apply_committed(result.pending, manager.history.last_cluster_seq() + 1)


@dataclass
class Clock:
    now: float = 100.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Parts:
    manager: ConfigManager
    engine: PipelineEngine
    sent: list[StageStep]
    events: list[MetricsEvent]
    auditor: Auditor
    server: StageServer
    membership: Membership
    clock: Clock
    replans: list[tuple[list[NodeId], str]] = field(default_factory=list)
    # what each node shows the audit it received: (node, step) -> rows
    shown: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)


class RecordingRecovery(Recovery):
    """The real recovery loop, whose re-plan only records what it was asked to decide
    with (the decision itself is control.policy's, tested in tests/test_policy.py)."""

    def __init__(self, replans: list[tuple[list[NodeId], str]], **parts: Any) -> None:
        super().__init__(**parts)
        self.replans = replans

    async def replan(self, live: list[NodeId], *, only_if_changed: bool = False) -> StagePlan:
        self.replans.append((live, self._placing.strategy))
        return StagePlan(Epoch(2), ())


def recovery_parts(
    members: list[NodeId], holder: StageServer | None, events: list[MetricsEvent]
) -> dict[str, Any]:
    async def propose(command: bytes, timeout: float) -> int:
        raise AssertionError("nothing is agreed here")

    return {
        "node": NodeId(0),
        "members": members,
        "status": lambda n: "healthy",
        "holder": holder,
        "plans": AgreedPlans(),
        "propose": propose,
        "agree_timeout_s": 1.0,
        "transport": MemoryNetwork().transport(NodeId(0), discard),
        "model_hash": "h",
        "placing": Placing((), "load_balanced", 2),
        "suspect_primary": lambda n: None,
        "emit": events.append,
    }


@pytest.fixture
def torch_thread() -> Iterator[TorchThread]:
    thread = TorchThread()
    yield thread
    thread.close()


def audit_of(
    tiny_model: Path,
    torch_thread: TorchThread,
    plan: StagePlan,
    shown: dict[tuple[int, int], torch.Tensor] | None = None,
) -> Auditor:
    """An auditor whose replica (node 3) answers with the true outputs of its stage, and
    whose nodes show what they received as `shown` holds it when asked."""
    stages = {r: load_stage(tiny_model, r) for r in (FIRST, SECOND)}

    async def ask(node: NodeId, req: AuditRequest, payload: bytes) -> tuple[AuditReply, bytes]:
        layers = LayerRange(req.layer_start, req.layer_end)
        x = decode_tensor(payload, 1 << 30)
        with torch.inference_mode():
            out = prefill_outputs(
                stages[layers], x, stages[layers].new_cache(), outputs_from=req.outputs_from
            )
        return AuditReply(req.request_id, int(node), ""), encode_tensor(out)

    return Auditor(
        ask=ask,
        inputs=holding({} if shown is None else shown),
        keys=PUBLIC,
        referee=Referee(tiny_model, torch_thread),
        tolerance=Tolerance(),
        max_tensor_bytes=1 << 30,
        gateway=NodeId(0),
    )


@pytest.fixture
async def parts(tiny_model: Path, torch_thread: TorchThread) -> AsyncIterator[Parts]:
    manager = ConfigManager(ButterflyConfig())
    events: list[MetricsEvent] = []
    two_stages = StagePlan(
        1, ((NodeId(0), FIRST), (NodeId(1), SECOND)), ((NodeId(2), FIRST), (NodeId(3), SECOND))
    )
    shown: dict[tuple[int, int], torch.Tensor] = {}
    auditor = audit_of(tiny_model, torch_thread, two_stages, shown)

    async def no_liars(liars: tuple[NodeId, ...], reason: str) -> None:
        raise AssertionError(f"nobody lies here: {liars} {reason}")

    replicator = Replicator(
        plan=lambda: StagePlan(1, ((STAGE, FIRST),), ()),
        f=1,
        keys=PUBLIC,
        referee=Referee(tiny_model, torch_thread),
        tolerance=Tolerance(),
        on_liars=no_liars,
    )
    engine, sent = chain(
        ["silent"],
        events,
        step_timeout_s=600.0,
        auditor=auditor,
        replicator=replicator,
        verification="audit",
        audit_draw=lambda: 0.5,
    )
    server = StageServer(
        node=NodeId(1),
        model_dir=tiny_model,
        max_tensor_bytes=1 << 30,
        torch_thread=torch_thread,
        prover=Prover(NodeId(1), KEYS[NodeId(1)]),
        snapshot_every=manager.current.coordination.checkpoint_frequency,
    )
    plan = StagePlan(1, ((NodeId(1), ALL),), ((NodeId(2), ALL),))
    assert (await server.apply_plan(plan.to_message("h"))).ok
    clock = Clock()
    c = manager.current.coordination
    members = {NodeId(n): f"127.0.0.1:{9000 + n}" for n in range(4)}
    membership = Membership(
        node=NodeId(0),
        members=members,
        detector=PhiAccrualFailureDetector(
            c.heartbeat_interval_ms,
            c.phi_suspect,
            c.phi_failed,
            min_std_ms=c.min_std_ms,
            acceptable_pause_ms=c.acceptable_pause_ms,
        ),
        interval_s=c.heartbeat_interval_ms / 1000,
        local_state=lambda: ((), 0),
        clock=clock,
    )
    found = Parts(manager, engine, sent, events, auditor, server, membership, clock, shown=shown)

    recovery = RecordingRecovery(
        found.replans,
        **recovery_parts(sorted(members), server, events),
    )
    follow_config(
        manager,
        engine=engine,
        stage_server=server,
        membership=membership,
        recovery=recovery,
        tracing=Tracing(node=1, exporter=None),  # no otlp_endpoint at start
    )
    replanning = asyncio.create_task(recovery.run(on_replanned=engine.plan_changed))
    try:
        yield found
    finally:
        replanning.cancel()
        server.close()
        manager.history.close()


def audits(events: list[MetricsEvent]) -> int:
    return sum(isinstance(e, Verification) and e.check == "audit" for e in events)


# --- the data path ---------------------------------------------------------------------


async def test_network_step_timeout_ms_applies_to_the_step_waiting_now(parts: Parts) -> None:
    """The engine was built with 600 s; the chain never answers its first step."""
    change(parts.manager, {"byzantine.verification": "none", "network.step_timeout_ms": 200})
    result = await run(parts.engine, tokens=1)  # bounded at 30 s by `run`
    assert result.output_ids == (3,) and len(parts.sent) == 2  # timed out, replayed


async def test_byzantine_verification_moves_between_audit_replicate_and_none(
    parts: Parts,
) -> None:
    change(parts.manager, {"network.step_timeout_ms": 200})  # the first step is silent
    await run(parts.engine, tokens=1, task_id="a")
    assert audits(parts.events) == 1  # audit mode: the result went to the auditor
    change(parts.manager, {"byzantine.verification": "none"})
    result = await run(parts.engine, tokens=1, task_id="b")
    assert audits(parts.events) == 1 and result.verified == "none"
    change(parts.manager, {"byzantine.verification": "replicate"})
    parts.sent.clear()
    await run(parts.engine, tokens=1, task_id="c")
    assert parts.sent and all(s.request_ids != ("c",) for s in parts.sent)  # lanes' own ids


async def test_byzantine_audit_fraction_zero_skips_the_audit(parts: Parts) -> None:
    change(parts.manager, {"network.step_timeout_ms": 200})
    await run(parts.engine, tokens=1, task_id="a")
    assert audits(parts.events) == 1
    change(parts.manager, {"byzantine.audit_fraction": 0.0})
    result = await run(parts.engine, tokens=1, task_id="b")
    assert audits(parts.events) == 1 and result.verified == "none"


async def test_a_verification_mode_whose_part_was_not_built_is_refused(
    tmp_path: Path, torch_thread: TorchThread
) -> None:
    manager = ConfigManager(ButterflyConfig())
    engine, _ = chain([], [], verification="audit")  # one holder per range: no auditor
    assert engine.verification == "none"
    follow_config(
        manager,
        engine=engine,
        stage_server=StageServer(
            node=NodeId(1),
            model_dir=tmp_path,
            max_tensor_bytes=1,
            torch_thread=torch_thread,
        ),
        membership=Membership(
            node=NodeId(0),
            members={NodeId(0): "127.0.0.1:1"},
            detector=PhiAccrualFailureDetector(),
            interval_s=0.1,
            local_state=lambda: ((), 0),
        ),
        recovery=Recovery(
            **recovery_parts([NodeId(0)], None, []),
        ),
    )
    # the audit's own options, where no audit runs, are refused too: they were accepted
    # and reported applied, and changed nothing (a review)
    for key, value in (
        ("byzantine.audit_fraction", 0.5),
        ("byzantine.rtol", 1e-6),
        ("byzantine.atol", 1e-7),
        ("byzantine.fingerprint_top_k", 4),
        ("byzantine.fingerprint_chunk", 2),
    ):
        with pytest.raises(UpdateRejected, match=f"restart required: {key} acts only"):
            change(manager, {key: value})
    change(manager, {"byzantine.verification": "none"})
    with pytest.raises(UpdateRejected, match=r"restart required.*f\+1 nodes"):
        change(manager, {"byzantine.verification": "replicate"})
    assert manager.current.byzantine.verification == "none"
    manager.history.close()


@pytest.mark.parametrize(
    ("key", "loose", "tight", "deviate"),
    [
        ("byzantine.rtol", 0.05, 1e-3, lambda t: t * 1.005),
        ("byzantine.atol", 0.05, 1e-4, lambda t: t + 0.01),
    ],
)
async def test_a_tighter_tolerance_flags_what_the_old_one_let_through(
    parts: Parts, tiny_model: Path, key: str, loose: float, tight: float, deviate: Any
) -> None:
    """Node 1 claims outputs a little off the true ones; the auditor (node 3) answers the
    truth. Within the old tolerance that passes; the new one catches node 1."""
    other = "byzantine.atol" if key == "byzantine.rtol" else "byzantine.rtol"
    change(parts.manager, {key: loose, other: 0.0})
    stages = {r: load_stage(tiny_model, r) for r in (FIRST, SECOND)}
    ids = torch.tensor([[5, 9, 2, 7]])
    with torch.inference_mode():
        hidden = prefill_outputs(stages[FIRST], ids, stages[FIRST].new_cache())
        logits = prefill_outputs(stages[SECOND], hidden, stages[SECOND].new_cache())

    def claim(
        node: int, index: int, layers: LayerRange, x: torch.Tensor, out: torch.Tensor
    ) -> Claim:
        proof = signed(KEYS, 1, 0, index, NodeId(node), layers, x, out)
        return Claim(proof, 0, out.shape[1], (0, x.shape[1]))

    plan = StagePlan(
        1, ((NodeId(2), FIRST), (NodeId(1), SECOND)), ((NodeId(0), FIRST), (NodeId(3), SECOND))
    )
    claims = {
        0: [claim(2, 0, FIRST, ids, hidden)],
        1: [claim(1, 1, SECOND, hidden, deviate(logits))],
    }
    sequence = ids[0].tolist()
    parts.shown[1, 0] = hidden  # node 1 computed on the honest rows node 2 sent
    verdict = await parts.auditor.audit(plan, "r", sequence, claims)
    assert verdict.verified and verdict.liars == ()
    change(parts.manager, {key: tight})
    verdict = await parts.auditor.audit(plan, "r", sequence, claims)
    assert not verdict.verified and verdict.liars == (NodeId(1),)


async def _step(server: StageServer, step: int, start: int, tokens: list[int]) -> StepResult:
    msg = StageStep(("r",), (step,), (start,), (len(tokens),), (), 0, True)
    payload = encode_tensor(torch.tensor([tokens], dtype=torch.int64))
    out = await server.on_step(Envelope(msg, 0, 1, "c", 0, False, payload))
    assert isinstance(out.msg, StepResult), out.msg
    return out.msg


@pytest.mark.parametrize(
    ("key", "value"), [("byzantine.fingerprint_top_k", 3), ("byzantine.fingerprint_chunk", 2)]
)
async def test_the_next_signed_record_uses_the_new_fingerprint(
    parts: Parts, key: str, value: int
) -> None:
    def fingerprint(result: StepResult) -> tuple[int, int]:
        proof = decode(result.proofs[0])
        assert isinstance(proof, Proof)
        return proof.fingerprint.k, proof.fingerprint.chunk

    before = fingerprint(await _step(parts.server, 1, 0, [5, 9, 2, 7]))
    change(parts.manager, {key: value})
    after = fingerprint(await _step(parts.server, 2, 4, [3]))
    assert before == (8, 1)
    assert after == ((value, 1) if key.endswith("top_k") else (8, value))


def test_tracing_turned_on_where_spans_go_nowhere_is_refused(parts: Parts) -> None:
    """Reported "applied", it recorded nothing: the endpoint is read at start only."""
    with pytest.raises(UpdateRejected, match="otlp_endpoint"):
        change(parts.manager, {"observability.tracing": True})
    assert not parts.manager.current.observability.tracing


async def test_a_kv_copy_never_writes_into_a_cache_a_step_made(parts: Parts) -> None:
    """A standby that ran steps of a request (a replay routed through it, or its own
    replicate lane) refuses a copy for the same request: the chain node wrote its rows
    into the cache the standby computed with (a review: the lanes agreed on the poison,
    or the standby was convicted for it). Should it take the stage over, it resumes
    where its own cache ends. A copy of a request it never computed is taken."""
    await _step(parts.server, 1, 0, [5, 9, 2, 7])
    mine = parts.server.caches["r"].rows(0, 4)
    poison = encode_tensor(mine * -3.0)
    for start in (0, 4):
        why = parts.server.on_kv_append(KvAppend("r", ALL.start, ALL.end, start), poison)
        assert "computes request r itself" in why
        assert parts.server.caches["r"].length == 4
        assert torch.equal(parts.server.caches["r"].rows(0, 4), mine)
    assert parts.server.on_kv_append(KvAppend("s", ALL.start, ALL.end, 0), poison) == ""
    assert parts.server.caches["s"].length == 4
    assert parts.server.table.own("r") and not parts.server.table.own("s")


async def test_coordination_checkpoint_frequency_sets_when_the_next_copy_goes(
    parts: Parts,
) -> None:
    await _step(parts.server, 1, 0, list(range(1, 13)))  # 12 positions: past 10, a copy
    assert [int(c.peer) for c in parts.server.kv_deltas(("r",))] == [2]
    await _step(parts.server, 2, 12, [3])
    assert parts.server.kv_deltas(("r",)) == []  # 1 new position, 10 needed
    change(parts.manager, {"coordination.checkpoint_frequency": 1})
    await _step(parts.server, 3, 13, [4])
    assert [int(c.peer) for c in parts.server.kv_deltas(("r",))] == [2]


# --- the control path ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "now"),
    [
        ("coordination.phi_suspect", 11.0, "healthy"),
        ("coordination.phi_failed", 9.0, "failed"),
        ("coordination.min_std_ms", 200.0, "healthy"),
        ("coordination.acceptable_pause_ms", 400.0, "healthy"),
    ],
)
def test_the_failure_detector_judges_with_the_new_setting(
    parts: Parts, key: str, value: float, now: str
) -> None:
    """Beats every 100 ms, then 500 ms of silence: phi is about 9.8, so by the defaults
    (suspect at 8, failed at 12) the peer is suspected."""
    for i in range(20):
        parts.clock.now = 100.0 + i * 0.1
        parts.membership.on_heartbeat(NodeId(1), Heartbeat(i, 0.0, (), 0))
    parts.clock.now += 0.5
    assert parts.membership.status(NodeId(1)) == "suspected"
    change(parts.manager, {key: value})
    assert parts.membership.status(NodeId(1)) == now


async def test_partition_strategy_re_plans_at_once(parts: Parts) -> None:
    change(parts.manager, {"partition.strategy": "uniform"})
    async with asyncio.timeout(10):
        while not parts.replans:
            await asyncio.sleep(0.01)
    assert parts.replans == [([NodeId(n) for n in range(4)], "uniform")]
    change(parts.manager, {"partition.cache_size": 100})  # same value: nothing to re-plan
    await asyncio.sleep(0.05)
    assert len(parts.replans) == 1


async def test_byzantine_max_step_timeouts_is_read_on_every_timeout() -> None:
    manager = ConfigManager(ButterflyConfig())
    declared: list[tuple[NodeId, ...]] = []

    async def declare(nodes: tuple[NodeId, ...], reason: str) -> None:
        declared.append(nodes)

    rule = StepTimeouts(  # as the node builds it
        gateway=NodeId(0),
        limit=lambda: manager.current.byzantine.max_step_timeouts,
        status=lambda n: "healthy",
        declare=declare,
    )
    await rule.timed_out(NodeId(1), "step")
    assert declared == []  # 1 of 3
    change(manager, {"byzantine.max_step_timeouts": 2})
    await rule.timed_out(NodeId(1), "step")
    assert declared == [(NodeId(1),)]
    manager.history.close()


def test_observability_log_level_follows_without_a_restart() -> None:
    from butterfly.wiring.logs import set_log_level as _set_log_level

    manager = ConfigManager(ButterflyConfig())
    manager.subscribe("logging", _set_log_level)  # as `node.run` does
    root = logging.getLogger()
    level = root.level
    try:
        change(manager, {"observability.log_level": "error"})
        assert not root.isEnabledFor(logging.WARNING)
        change(manager, {"observability.log_level": "debug"})
        assert root.isEnabledFor(logging.DEBUG)
    finally:
        root.setLevel(level)
        manager.history.close()


@pytest.mark.parametrize("key", ["metadata.description", "node.name"])
def test_labels_for_operators_show_at_once(key: str) -> None:
    """Not interpreted by any component: what `config show` prints is all they do."""
    from butterfly.config.template import dump_toml

    manager = ConfigManager(ButterflyConfig())
    change(manager, {key: "rack 3, left"})
    assert "rack 3, left" in dump_toml(manager.current.model_dump(mode="json"))
    manager.history.close()


# --- the guard -------------------------------------------------------------------------

BEHAVIOUR: dict[str, str] = {
    "network.step_timeout_ms": "test_network_step_timeout_ms_applies_to_the_step_waiting_now",
    "byzantine.verification": "test_byzantine_verification_moves_between_audit_replicate_and_none",
    "byzantine.audit_fraction": "test_byzantine_audit_fraction_zero_skips_the_audit",
    "byzantine.audit_lone_ranges": "test_audit_lone_range.py::"
    "test_a_range_left_one_holder_is_audited_by_the_gateway_and_the_setting_turns_it_off",
    "byzantine.rtol": "test_a_tighter_tolerance_flags_what_the_old_one_let_through",
    "byzantine.atol": "test_a_tighter_tolerance_flags_what_the_old_one_let_through",
    "byzantine.fingerprint_top_k": "test_the_next_signed_record_uses_the_new_fingerprint",
    "byzantine.fingerprint_chunk": "test_the_next_signed_record_uses_the_new_fingerprint",
    "byzantine.max_step_timeouts": "test_byzantine_max_step_timeouts_is_read_on_every_timeout",
    "coordination.checkpoint_frequency": (
        "test_coordination_checkpoint_frequency_sets_when_the_next_copy_goes"
    ),
    "coordination.phi_suspect": "test_the_failure_detector_judges_with_the_new_setting",
    "coordination.phi_failed": "test_the_failure_detector_judges_with_the_new_setting",
    "coordination.min_std_ms": "test_the_failure_detector_judges_with_the_new_setting",
    "coordination.acceptable_pause_ms": "test_the_failure_detector_judges_with_the_new_setting",
    "partition.strategy": "test_partition_strategy_re_plans_at_once",
    "cluster.members": (
        "test_inprocess_members.py::test_a_member_is_added_and_one_removed_while_the_cluster_serves"
    ),
    "cluster.public_keys": (
        "test_inprocess_members.py::test_a_member_is_added_and_one_removed_while_the_cluster_serves"
    ),
    "observability.log_level": "test_observability_log_level_follows_without_a_restart",
    "observability.tracing": (
        "test_tracing.py::test_tracing_off_or_undrawn_puts_nothing_on_the_wire_then_follows_the_config"
    ),
    "observability.trace_sample_rate": (
        "test_tracing.py::test_tracing_off_or_undrawn_puts_nothing_on_the_wire_then_follows_the_config"
    ),
    "metadata.description": "test_labels_for_operators_show_at_once",
    "node.name": "test_labels_for_operators_show_at_once",
    "coordination.view_change_timeout_ms": (
        "test_live_config_agreement.py::test_shorter_pbft_timers_replace_a_silent_primary_now"
    ),
    "coordination.phase_timeout_ms": (
        "test_live_config_agreement.py::test_shorter_pbft_timers_replace_a_silent_primary_now"
    ),
    "coordination.config_update_timeout_ms": (
        "test_live_config_agreement.py::"
        "test_a_shorter_config_update_timeout_applies_to_the_next_update"
    ),
    "api.tokens": "test_live_config_api.py::test_api_tokens_a_removed_token_is_refused",
    "api.rate_limit": "test_live_config_api.py::test_api_rate_limit_applies_to_the_next_request",
    "api.rate_limit_burst": "test_live_config_api.py::test_api_rate_limit_burst_applies",
    "api.metrics_public": "test_live_config_api.py::test_api_metrics_public_opens_metrics_only",
    "api.max_prompt_bytes": (
        "test_live_config_api.py::test_api_max_prompt_bytes_applies_to_the_next_request"
    ),
    "api.stream_verified_only": (
        "test_live_config_api.py::test_api_stream_verified_only_applies_to_the_next_stream"
    ),
    "scheduling.max_new_tokens_limit": (
        "test_live_config_api.py::test_scheduling_max_new_tokens_limit_applies"
    ),
    "scheduling.default_max_new_tokens": (
        "test_live_config_api.py::test_scheduling_default_max_new_tokens_applies"
    ),
    "scheduling.policy": "test_live_config_api.py::test_scheduling_policy_reorders_waiting_tasks",
    "scheduling.max_queue": "test_live_config_api.py::test_scheduling_max_queue_applies",
    "scheduling.dispatch_batch_size": (
        "test_live_config_api.py::test_scheduling_dispatch_batch_size_applies"
    ),
    "generation.speculative.mode": (
        "test_speculative_live.py::test_switching_speculation_and_chunking_on_changes_the_traversals"
    ),
    "generation.speculative.k": (
        "test_speculative_live.py::test_switching_speculation_and_chunking_on_changes_the_traversals"
    ),
    "generation.prefill_chunk": (
        "test_speculative_live.py::test_switching_speculation_and_chunking_on_changes_the_traversals"
    ),
}


def _has_test(reference: str) -> bool:
    import importlib

    module, _, name = reference.rpartition("::")
    mod = importlib.import_module(
        f"tests.{module.removesuffix('.py')}" if module else "tests.test_live_config"
    )
    return callable(getattr(mod, name, None))


def _other_value(key: str) -> Any:
    spec = field_specs()[key]
    if spec.choices:
        return next(c for c in spec.choices if c != spec.default)
    match spec.kind:
        case "bool":
            return not spec.default
        case "list":
            return ["x"]
        case "str":
            return "x"
        case "int":
            return int(spec.default) + 1 if spec.le is None or spec.default < spec.le else 0
        case _:
            return float(spec.default) / 2


DYNAMIC = [k for k, s in field_specs().items() if not s.mutability.requires_restart]
STATIC = [k for k, s in field_specs().items() if s.mutability.requires_restart]


@pytest.mark.parametrize("key", DYNAMIC)
def test_every_dynamic_option_has_a_behaviour_test_or_is_refused(key: str) -> None:
    if key in BEHAVIOUR:
        assert _has_test(BEHAVIOUR[key]), BEHAVIOUR[key]
        return
    assert key in UNSUPPORTED, f"{key} is dynamic but nothing shows it taking effect"
    manager = ConfigManager(ButterflyConfig())
    with pytest.raises(ConfigInvalid, match="not supported"):
        change(manager, {key: _other_value(key)})
    manager.history.close()


@pytest.mark.parametrize("key", STATIC)
def test_every_static_option_is_refused_at_run_time(key: str) -> None:
    manager = ConfigManager(ButterflyConfig())
    with pytest.raises((UpdateRefused, ConfigInvalid)) as e:
        change(manager, {key: _other_value(key)})
    if isinstance(e.value, UpdateRefused):
        assert f"restart required: {key}" in str(e.value)
    manager.history.close()


def test_the_behaviour_list_names_only_dynamic_options() -> None:
    """An option made static keeps no stale entry claiming it follows a change."""
    assert set(BEHAVIOUR) <= set(DYNAMIC), set(BEHAVIOUR) - set(DYNAMIC)
