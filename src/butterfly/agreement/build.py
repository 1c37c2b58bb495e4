"""Building one node's agreement parts: its config manager, PBFT driver and config roles.

Kept out of `node.py` so the composition root stays a list of parts: the node calls
`open_config` before building anything (every part then sees the config the cluster last
agreed on, not only what the files say) and `build_agreement` once its transport exists.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from butterfly.agreement.authority import TakeoverRule, admission
from butterfly.agreement.config_coordinator import ConfigCoordinator
from butterfly.agreement.config_replica import ConfigReplica
from butterfly.agreement.driver import AgreementDriver, OnCommit, OnEvidence
from butterfly.agreement.signed_mark import MARK_FILE
from butterfly.config import ButterflyConfig, ConfigHistory, ConfigManager
from butterfly.config.proposal import resume_committed
from butterfly.config.roster import Roster, live_ids
from butterfly.metrics.events import Emit, MessageDropped
from butterfly.net.transport import Transport
from butterfly.protocol.keys import key_path, load_or_create_key, pbft_config, public_keys
from butterfly.protocol.pbft_state import Authorize
from butterfly.types.errors import ConfigError
from butterfly.types.ids import GATEWAY, NodeId
from butterfly.types.wire.agreement import Request
from butterfly.types.wire.commands import (
    ConfigAbort,
    ConfigUpdate,
    EvictNode,
    InvalidCommand,
    NewPlan,
    ResumeNode,
    SuspendNode,
    TakeOver,
    decode_command,
)

OnCommand = Callable[[EvictNode | SuspendNode | ResumeNode | NewPlan | TakeOver], None]

log = logging.getLogger(__name__)


def open_config(cfg: ButterflyConfig) -> ConfigManager:
    """The node's config manager over its history in the data directory, resumed at the
    dynamic-consensus values this node last applied from the cluster."""
    history = ConfigHistory.in_data_dir(Path(cfg.node.data_dir))
    try:
        resumed = resume_committed(cfg, history)
    except ConfigError as e:  # the history predates a schema change: the files decide
        log.warning("not resuming agreed config values from history: %s", e)
        resumed = cfg
    return ConfigManager(resumed, history, source="start")


def commit_router(replica: ConfigReplica, on_command: OnCommand, emit: Emit) -> OnCommit:
    """Every command the cluster agreed on, in agreement order, on every node, to the part
    that executes its kind."""

    async def on_commit(seq: int, data: bytes) -> None:
        try:
            command = decode_command(data)
        except InvalidCommand as e:
            emit(MessageDropped(reason="invalid_command"))
            log.warning("agreed operation %d is not a command; every node skips it: %s", seq, e)
            return
        match command:
            case ConfigUpdate() | ConfigAbort():
                replica.execute(command)
            case EvictNode() | SuspendNode() | ResumeNode() | NewPlan() | TakeOver():
                on_command(command)

    return on_commit


@dataclass(frozen=True)
class NodeAgreement:
    driver: AgreementDriver
    replica: ConfigReplica
    coordinator: ConfigCoordinator
    propose: Callable[[bytes, float], Awaitable[int]]  # the driver's, (command, timeout)


def build_agreement(
    *,
    manager: ConfigManager,
    transport: Transport,
    on_command: OnCommand,
    on_evidence: OnEvidence,
    emit: Emit,
    live: Callable[[NodeId], bool],
    gateway: Callable[[], NodeId] = lambda: GATEWAY,
    takeover: TakeoverRule | None = None,
    veto: Authorize | None = None,
    driver_type: type[AgreementDriver] = AgreementDriver,
    roster: Roster | None = None,
) -> NodeAgreement:
    """The PBFT driver (signing with the node key, created on first start) and the config
    replica and coordinator over it. Agreed config changes go to the replica; plans,
    evictions and takeovers to `on_command`. `gateway`: the acting gateway as agreed
    (`control.gateway_role`); `takeover`: its rule for a takeover (the agreed state
    alone); `veto`: this node's own reasons not to take a request up (a takeover its
    failure detector does not support).
    `driver_type` lets `butterfly.testing` compose a node whose votes lie
    (`butterfly.testing.liar_votes`). `roster`: the members as last agreed; the replica
    set, the config votes and PREPARE's recipients follow its changes (none: fixed)."""
    cfg = manager.current
    key = load_or_create_key(key_path(cfg, Path(cfg.node.data_dir)))
    keys = public_keys(cfg, key) if roster is None else roster.slots
    node = NodeId(cfg.node.id)
    f = cfg.byzantine.f
    replica = ConfigReplica(
        node=node, manager=manager, key=key, keys=keys, f=f, transport=transport, gateway=gateway
    )
    driver = driver_type(
        # each command kind only from its authorized proposer (agreement.authority)
        config=dataclasses.replace(
            pbft_config(cfg, keys),
            authorize=admission(gateway, takeover),
            veto=veto,
            barrier=None if roster is None else may_change_members,
        ),
        key=key,
        transport=transport,
        on_commit=commit_router(replica, on_command, emit),
        on_evidence=on_evidence,
        emit=emit,
        replica_keys=None if roster is None else lambda: roster.slots,
        signed_path=Path(cfg.node.data_dir) / MARK_FILE,
    )

    async def propose(command: bytes, timeout: float) -> int:
        return await driver.propose(command, timeout=timeout)

    coordinator = ConfigCoordinator(
        replica=replica,
        transport=transport,
        propose=propose,
        members=live_ids(cfg),
        f=f,
        live=live,
        timeout_s=cfg.coordination.config_update_timeout_ms / 1000,
    )
    if roster is not None:  # before the driver resumes: it reads roster.slots then
        roster.listen(lambda r: replica.follow(r.slots))
        roster.listen(lambda r: coordinator.follow(r.ids))
    return NodeAgreement(driver, replica, coordinator, propose)


def may_change_members(request: Request) -> bool:
    """Every config update may (`cluster.members` is dynamic): PBFT holds after one until
    the node applied it (`protocol.pbft_members`), a pure function of the request."""
    try:
        return isinstance(decode_command(request.operation), ConfigUpdate)
    except InvalidCommand:
        return False


__all__ = ["NodeAgreement", "build_agreement", "commit_router", "open_config"]
