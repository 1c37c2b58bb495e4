"""What the agreed log has decided on this node, as bytes a state snapshot carries.

A node behind its peers' pruned log cannot replay it (`protocol.pbft_snapshot`); it takes
instead what executing it left every node with: the latest agreed plan, the agreed
evictions and suspensions, the acting gateway and its term, and the cluster
configuration's position (config sequence, cluster hash, the cluster-scoped values).
Without the suspensions, a standby gateway caught up this way took a withholding node
straight back when it took over (a review). Every part is a function of
the commands executed so far alone, so honest nodes at one checkpoint encode the same
bytes (canonical JSON), which is what lets f+1 of them vouch for one state.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from butterfly.agreement.config_replica import ConfigReplica, cluster_values
from butterfly.config.versions import canonical_json
from butterfly.control.gateway_role import GatewayRole
from butterfly.control.plans import AgreedPlans, command_plan, plan_command
from butterfly.types.errors import ButterflyError
from butterfly.types.ids import Epoch, NodeId
from butterfly.types.plan import StagePlan
from butterfly.types.wire.commands import NewPlan

log = logging.getLogger(__name__)


class AgreedState:
    """The node's executed agreement state: `snapshot` encodes it, `restore` adopts one."""

    def __init__(self, *, plans: AgreedPlans, role: GatewayRole, config: ConfigReplica) -> None:
        self._plans, self._role, self._config = plans, role, config

    def snapshot(self) -> bytes:
        latest = self._plans.latest
        plan = None
        if latest is not None:
            command = plan_command(latest)
            plan = [int(command.epoch), list(command.stages), list(command.replicas)]
        manager = self._config.manager
        state = {
            "plan": plan,
            "evicted": sorted([int(n), r] for n, r in self._plans.evicted.items()),
            "suspended": sorted([int(n), s] for n, s in self._plans.suspended.items()),
            "gateway": [int(self._role.acting), self._role.term],
            "config": {
                "seq": self._config.last_seq,
                "cluster_hash": manager.record.cluster_hash,
                "values": cluster_values(manager.current),
            },
        }
        return canonical_json(state)

    async def restore(self, data: bytes) -> None:
        """Adopt a snapshot f+1 replicas vouched for; a part that cannot be adopted here
        (a config change this node needs a restart for) is logged, the others stand."""
        state: dict[str, Any] = json.loads(data)
        plan = state["plan"]
        latest: StagePlan | None = None
        if plan is not None:
            epoch, stages, replicas = plan
            latest = command_plan(NewPlan(Epoch(epoch), tuple(stages), tuple(replicas)))
        suspended = state.get("suspended")  # absent from an older version's snapshot
        self._plans.restore(
            latest,
            {NodeId(n): r for n, r in state["evicted"]},
            None if suspended is None else {NodeId(n): s for n, s in suspended},
        )
        acting, term = state["gateway"]
        self._role.restore(NodeId(acting), term)
        config = state["config"]
        manager = self._config.manager
        if (manager.record.cluster_hash, self._config.last_seq) != (
            config["cluster_hash"],
            config["seq"],
        ):
            try:
                manager.sync_to(
                    config["values"], seq=config["seq"], expected_hash=config["cluster_hash"]
                )
            except ButterflyError as e:
                log.error("the agreed config (seq %d) is not adopted here: %s", config["seq"], e)
        log.info(
            "caught up from a state snapshot: plan epoch %s, gateway %s (term %s), config seq %s",
            None if latest is None else latest.epoch,
            acting,
            term,
            config["seq"],
        )


__all__ = ["AgreedState"]
