"""Where every node's cluster config stands, as the gateway sees it.

FINALIZE asks each node for its position (config version, cluster hash, config seq, and
the error if an agreed change failed there). A monitor keeps the latest positions for
`/health`, which flags nodes whose cluster hash differs from the majority's; `sync` asks
those nodes to adopt what f+1 of their peers report alike (`ConfigReplica.sync`), so a
gateway that is itself off the majority cannot push its own view onto the others.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from dataclasses import dataclass
from typing import Any

from butterfly.agreement.config_replica import ConfigReplica
from butterfly.net.transport import Transport
from butterfly.types.errors import ButterflyError
from butterfly.types.ids import NodeId
from butterfly.types.wire.control import ConfigStatusQuery, ConfigSync

QUERY_TIMEOUT_S = 1.0
MONITOR_INTERVAL_S = 1.0


@dataclass(frozen=True)
class NodeConfig:
    """One node's config position as the gateway last saw it (`reachable=False`: no answer)."""

    node: NodeId
    reachable: bool
    version: int = 0
    config_hash: str = ""
    cluster_hash: str = ""
    seq: int = 0
    error: str = ""
    failed_seq: int = 0


def majority_hash(statuses: list[NodeConfig], fallback: str) -> str:
    """The cluster hash most reachable nodes report; the gateway's own breaks a tie."""
    counts = Counter(s.cluster_hash for s in statuses if s.reachable)
    if not counts:
        return fallback
    best = max(counts.values())
    leaders = [h for h, c in counts.items() if c == best]
    return fallback if fallback in leaders else min(leaders)


class ClusterConfigStatus:
    def __init__(
        self, *, replica: ConfigReplica, transport: Transport, members: tuple[NodeId, ...]
    ) -> None:
        self.replica, self._transport, self.members = replica, transport, members
        self.me = replica.node
        self.statuses: list[NodeConfig] = []  # the latest poll

    async def node(self, peer: NodeId, values: bool = False) -> NodeConfig:
        if peer == self.me:
            s = self.replica.status()[0]
        else:
            try:
                s, _ = await self._transport.ask(
                    peer, ConfigStatusQuery(values), timeout=QUERY_TIMEOUT_S, channel="control"
                )
            except ButterflyError:
                return NodeConfig(peer, False)
        return NodeConfig(  # labelled by whom we asked, not by what the answer claims
            peer,
            True,
            s.config_version,
            s.config_hash,
            s.cluster_hash,
            s.seq,
            s.error,
            s.failed_seq,
        )

    async def poll(self) -> list[NodeConfig]:
        self.statuses = list(await asyncio.gather(*(self.node(n) for n in self.members)))
        return self.statuses

    def reference_hash(self, statuses: list[NodeConfig]) -> str:
        return majority_hash(statuses, self.replica.manager.record.cluster_hash)

    def health(self) -> dict[str, Any]:
        """For `/health`: whether every reachable node runs the majority's cluster config."""
        ref = self.reference_hash(self.statuses)
        diverged = [s.node for s in self.statuses if s.reachable and s.cluster_hash != ref]
        errors = {s.node: s.error for s in self.statuses if s.error}
        return {
            "in_sync": not diverged,
            "cluster_hash": ref,
            "diverged": diverged,
            "errors": errors,
        }

    async def monitor(self) -> None:
        """Keep `statuses` fresh for `/health`, until cancelled."""
        while True:
            with contextlib.suppress(ButterflyError):
                await self.poll()
            await asyncio.sleep(MONITOR_INTERVAL_S)

    async def sync(self) -> dict[int, str]:
        """Ask every node off the majority's cluster hash to adopt what f+1 peers agree on."""
        statuses = await self.poll()
        ref = self.reference_hash(statuses)
        report: dict[int, str] = {}
        for s in statuses:
            if not s.reachable:
                report[s.node] = "unreachable"
            elif s.cluster_hash == ref and not s.error:
                report[s.node] = "in sync"
            else:
                report[s.node] = await self._sync_one(s.node, ref)
        await self.poll()
        return report

    async def _sync_one(self, node: NodeId, ref: str) -> str:
        if node == self.me:
            after = await self.replica.sync()
        else:
            try:
                after, _ = await self._transport.ask(
                    node, ConfigSync(), timeout=3 * QUERY_TIMEOUT_S, channel="control"
                )
            except ButterflyError as e:  # InvalidMessage names a reply of the wrong kind
                return f"failed: {e}"
        if after.error:
            return f"failed: {after.error}"
        return "synced" if after.cluster_hash == ref else "synced to its peers' config"


__all__ = ["ClusterConfigStatus", "NodeConfig", "majority_hash"]
