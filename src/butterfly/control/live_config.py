"""The running node follows its config: each dynamic option takes effect here, or is refused.

A setting that is agreed, recorded and reported "applied" while the component that uses it
keeps the value it was built with is a quiet lie. So every option the schema marks dynamic
is either applied to the running component by a subscriber below, or vetoed (PREPARE
fails on every node with the reason), or read on every use from `ConfigManager.current`
(noted in the table). Options a running node cannot change are marked static in the
schema and refused with "restart required". The API's own options are applied where the
app is built (`butterfly.api.live`).

    option                                   applied by
    byzantine.verification                   engine.retune: the next request; vetoed when
                                             the mode's part (auditor/replicator) was not
                                             built, i.e. one holder per range at start
    byzantine.audit_fraction                 engine.retune: the next request
    byzantine.rtol, byzantine.atol           engine.retune: auditor and replicator, the
                                             next comparison
    byzantine.audit_lone_ranges              engine.retune: the auditor's next audit
    byzantine.fingerprint_top_k, _chunk      this node's prover: its next signed record;
                                             the gateway's steps: sized for the new and
                                             the previous records from the next step
    byzantine.max_step_timeouts              read on every use (dataplane.unresponsive)
    network.step_timeout_ms                  engine.retune (steps waiting now included);
                                             the node's requests read it on every use
    coordination.phi_suspect, phi_failed,    the failure detector, at once, and how long
      min_std_ms, acceptable_pause_ms        the PBFT replica declines a takeover before
                                             it vetoes it (`protocol.keys.veto_grace`)
    coordination.checkpoint_frequency        the stage server's next KV copy (none while
                                             verification is replicate: lanes keep copies),
                                             and the gateway's next generation checkpoint
    partition.strategy                       the gateway re-plans at once (a new epoch)
    coordination.view_change_timeout_ms,     the PBFT replica's timers at once (running
      coordination.phase_timeout_ms          ones brought forward), and how long plans
                                             and evictions wait to be agreed
    coordination.config_update_timeout_ms    the next config update's deadline
    observability.tracing,                   the tracer: the gateway's next request, a
      observability.trace_sample_rate        stage node's next traced step
    generation.speculative.mode, .k,         engine.retune_generation: the next request
      generation.prefill_chunk               (mode "draft" refused by config.validate
                                             where no draft_model was set at start)
    cluster.members, cluster.public_keys     the node's roster (`config.roster.Roster`), at
                                             the agreed command: the handshake and record
                                             key checks, the transport's address book (a
                                             removed member's connections closed), the
                                             heartbeats and failure detector, the next
                                             plan's candidates (recovery), /health, the
                                             config votes and PREPARE's recipients, and
                                             PBFT's replica set (`protocol.pbft_members`);
                                             vetoed unless `config.roster.roster_change`
                                             allows the move
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from butterfly.agreement.config_coordinator import ConfigCoordinator
from butterfly.agreement.driver import AgreementDriver
from butterfly.config import ButterflyConfig
from butterfly.config.gateways import gateway_nodes
from butterfly.config.reload import ConfigManager
from butterfly.config.roster import Roster, roster_change
from butterfly.control.gateway_role import GatewayRole
from butterfly.control.membership import Membership
from butterfly.control.recovery import Recovery
from butterfly.dataplane.engine import PipelineEngine
from butterfly.dataplane.sending import RecordSize
from butterfly.dataplane.stage_server import StageServer
from butterfly.metrics.tracing import Tracing
from butterfly.net.transport import Transport
from butterfly.protocol.keys import veto_grace
from butterfly.protocol.proof import tolerance_for
from butterfly.runtime.precision import verification_floor
from butterfly.schedule.drafts import Speculation

log = logging.getLogger(__name__)


def snapshot_every(cfg: ButterflyConfig) -> int:
    """Tokens between KV copies to the standbys; replicate's lanes already keep every
    range's caches on two nodes, so they copy nothing."""
    if cfg.byzantine.verification == "replicate":
        return 0
    return cfg.coordination.checkpoint_frequency


def speculation(cfg: ButterflyConfig) -> Speculation:
    """generation.speculative as the engine takes it."""
    spec = cfg.generation.speculative
    return Speculation(spec.mode, spec.k)


def agreement_wait_s(cfg: ButterflyConfig) -> float:
    """How long a plan or an eviction may take to be agreed: a view change and a phase,
    twice over (a primary that fails while ordering it costs one of each)."""
    c = cfg.coordination
    return 2 * (c.view_change_timeout_ms + c.phase_timeout_ms) / 1000


def _retune_agreement(
    driver: AgreementDriver,
    coordinator: ConfigCoordinator,
    recovery: Recovery,
    cfg: ButterflyConfig,
) -> None:
    c = cfg.coordination
    driver.retune(  # the same mapping as protocol.keys.pbft_config
        request_timeout=c.view_change_timeout_ms / 1000,
        view_change_timeout=c.phase_timeout_ms / 1000,
        veto_grace=veto_grace(cfg),
    )
    coordinator.retune(c.config_update_timeout_ms / 1000)
    recovery.retune(agree_timeout_s=agreement_wait_s(cfg))


def _retune_engine(engine: PipelineEngine, cfg: ButterflyConfig) -> None:
    b = cfg.byzantine
    engine.retune(  # a mode not built runs as none, as from the start (see the check)
        step_timeout_s=cfg.network.step_timeout_ms / 1000,
        verification=b.verification,
        audit_fraction=b.audit_fraction,
        lone_ranges=b.audit_lone_ranges,
        tolerance=tolerance_for(b.rtol, b.atol, verification_floor(cfg.model.dtype)),
        records=RecordSize(b.fingerprint_top_k, b.fingerprint_chunk),
    )
    engine.checkpoint_every = cfg.coordination.checkpoint_frequency  # generation copies
    engine.retune_generation(
        speculation=speculation(cfg), prefill_chunk=cfg.generation.prefill_chunk
    )


CHECK_OPTIONS = (
    "audit_fraction",
    "audit_lone_ranges",
    "rtol",
    "atol",
    "fingerprint_top_k",
    "fingerprint_chunk",
)
"""The options of `byzantine.verification`'s checks (the rest of the section is f)."""


def _check_verification(
    engine: PipelineEngine,
) -> Callable[[ButterflyConfig, ButterflyConfig], None]:
    def check(old: ButterflyConfig, new: ButterflyConfig) -> None:
        mode = new.byzantine.verification
        if engine.supports(mode):
            return
        # the check's own options, accepted and reported applied where no check runs,
        # changed nothing (a review)
        changed = [
            f"byzantine.{key}"
            for key in ("verification", *CHECK_OPTIONS)
            if getattr(old.byzantine, key) != getattr(new.byzantine, key)
        ]
        if changed:
            raise ValueError(
                f"restart required: {', '.join(changed)} acts only where "
                f"byzantine.verification={mode!r} runs, which needs every layer range on "
                "f+1 nodes, and this node started with one holder per range "
                "(byzantine.f = 0 or partition.replication = 1 at start); set them and "
                "restart the cluster"
            )

    return check


def _retune_stage_server(server: StageServer, cfg: ButterflyConfig) -> None:
    server.retune(snapshot_every=snapshot_every(cfg))
    if server.prover is not None:
        b = cfg.byzantine
        server.prover = dataclasses.replace(
            server.prover, k=b.fingerprint_top_k, chunk=b.fingerprint_chunk
        )


def _check_tracing(tracing: Tracing) -> Callable[[ButterflyConfig, ButterflyConfig], None]:
    def check(old: ButterflyConfig, new: ButterflyConfig) -> None:
        turned_on = new.observability.tracing and not old.observability.tracing
        if turned_on and not tracing.exports:  # "applied", it would have recorded nothing
            raise ValueError(
                "observability.tracing needs observability.otlp_endpoint, which is read at "
                "start: set it and restart the node, then turn tracing on"
            )

    return check


def _retune_detector(membership: Membership, cfg: ButterflyConfig) -> None:
    c = cfg.coordination
    membership.retune_detector(
        suspect=c.phi_suspect,
        failed=c.phi_failed,
        min_std_ms=c.min_std_ms,
        acceptable_pause_ms=c.acceptable_pause_ms,
    )


def follow_config(
    manager: ConfigManager,
    *,
    engine: PipelineEngine,
    stage_server: StageServer,
    membership: Membership,
    recovery: Recovery,
    tracing: Tracing | None = None,
) -> None:
    """Subscribe the node's components to `manager`; called once by the composition root."""
    manager.subscribe(
        "engine",
        lambda old, new: _retune_engine(engine, new),
        check=_check_verification(engine),
    )
    manager.subscribe("stage server", lambda old, new: _retune_stage_server(stage_server, new))
    manager.subscribe("failure detector", lambda old, new: _retune_detector(membership, new))
    if tracing is not None:
        manager.subscribe(
            "tracing",
            lambda old, new: tracing.retune(
                enabled=new.observability.tracing, sample_rate=new.observability.trace_sample_rate
            ),
            check=_check_tracing(tracing),
        )

    def strategy(old: ButterflyConfig, new: ButterflyConfig) -> None:
        if old.partition.strategy != new.partition.strategy:
            log.info(
                "partition.strategy %s -> %s: re-planning",
                old.partition.strategy,
                new.partition.strategy,
            )
            recovery.request_replan(
                f"partition.strategy is now {new.partition.strategy}",
                strategy=new.partition.strategy,
            )

    manager.subscribe("planner", strategy)


def follow_agreement_config(
    manager: ConfigManager,
    *,
    driver: AgreementDriver,
    coordinator: ConfigCoordinator,
    recovery: Recovery,
) -> None:
    """Subscribe the agreement layer's timers; called once by the composition root."""
    manager.subscribe(
        "agreement timers",
        lambda old, new: _retune_agreement(driver, coordinator, recovery, new),
    )


def follow_roster(
    manager: ConfigManager,
    *,
    roster: Roster,
    transport: Transport,
    membership: Membership,
    recovery: Recovery,
    role: GatewayRole,
) -> None:
    """Membership changes (`cluster.members` with `cluster.public_keys`): checked at
    PREPARE on every node, applied to the roster when agreed, and from it to every part
    that keeps its own view of the members. `role`: whose acting gateway is never
    removed, and whose gateway set loses a removed standby gateway."""

    def moved(r: Roster) -> None:
        log.warning("members now %s", {int(n): a for n, a in sorted(r.addresses.items())})
        transport.set_peers(r.addresses)
        membership.follow(r.ids)
        recovery.follow(r.ids)

    roster.listen(moved)

    def check(old: ButterflyConfig, new: ButterflyConfig) -> None:
        problem = roster_change(old, new, role.acting)
        if problem is not None:
            raise ValueError(problem)

    def apply(old: ButterflyConfig, new: ButterflyConfig) -> None:
        gateways = gateway_nodes(new)
        if gateways != role.gateways:
            role.follow(gateways)
            log.warning(
                "gateway-capable nodes now %s%s",
                [int(g) for g in gateways],
                "" if len(gateways) > 1 else ": no standby gateway, the API has no successor",
            )
        roster.update(new)

    manager.subscribe("roster", apply, check=check)


__all__ = [
    "agreement_wait_s",
    "follow_agreement_config",
    "follow_config",
    "follow_roster",
    "snapshot_every",
    "speculation",
]
