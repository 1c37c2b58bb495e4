"""Building one node's agreement parts: its config manager, PBFT driver and config roles.

Kept out of `node.py` so the composition root stays a list of parts: the node calls
`open_config` before building anything (every part then sees the config the cluster last
agreed on, not only what the files say) and `build_agreement` once its transport exists.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from butterfly.agreement.config_coordinator import ConfigCoordinator
from butterfly.agreement.config_replica import ConfigReplica
from butterfly.agreement.driver import AgreementDriver, OnCommit, OnEvidence
from butterfly.config import ButterflyConfig, ConfigHistory, ConfigManager
from butterfly.config.proposal import resume_committed
from butterfly.config.validate import cluster_size
from butterfly.metrics.events import Emit
from butterfly.net.transport import Transport
from butterfly.protocol.keys import key_path, load_or_create_key, pbft_config, public_keys
from butterfly.types.errors import ConfigError
from butterfly.types.ids import NodeId

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


@dataclass(frozen=True)
class NodeAgreement:
    driver: AgreementDriver
    replica: ConfigReplica
    coordinator: ConfigCoordinator


def build_agreement(
    *,
    manager: ConfigManager,
    transport: Transport,
    on_commit: OnCommit,
    on_evidence: OnEvidence,
    emit: Emit,
    live: Callable[[NodeId], bool],
    driver_type: type[AgreementDriver] = AgreementDriver,
) -> NodeAgreement:
    """The PBFT driver (signing with the node key, created on first start) and the config
    replica and coordinator over it. `driver_type` lets `butterfly.testing` compose a node
    whose votes lie (`butterfly.testing.liar_votes`)."""
    cfg = manager.current
    key = load_or_create_key(key_path(cfg, Path(cfg.node.data_dir)))
    keys = public_keys(cfg, key)
    driver = driver_type(
        config=pbft_config(cfg, keys),
        key=key,
        transport=transport,
        on_commit=on_commit,
        on_evidence=on_evidence,
        emit=emit,
    )
    node = NodeId(cfg.node.id)
    f = cfg.byzantine.f
    replica = ConfigReplica(
        node=node, manager=manager, key=key, keys=keys, f=f, transport=transport
    )

    async def propose(command: bytes, timeout: float) -> int:
        return await driver.propose(command, timeout=timeout)

    coordinator = ConfigCoordinator(
        replica=replica,
        transport=transport,
        propose=propose,
        members=tuple(NodeId(i) for i in range(cluster_size(cfg))),
        f=f,
        live=live,
        timeout_s=cfg.coordination.config_update_timeout_ms / 1000,
    )
    return NodeAgreement(driver, replica, coordinator)


__all__ = ["NodeAgreement", "build_agreement", "open_config"]
