"""What a node says about itself (heartbeats, status replies) and what the gateway says
about the cluster (`/health`), read from the parts that hold the facts."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from butterfly.control.facts import Probe
from butterfly.control.membership import Membership
from butterfly.control.planner import Placement
from butterfly.control.recovery import Recovery
from butterfly.dataplane.stage_server import StageServer
from butterfly.net.conn import Reply
from butterfly.net.framing import Envelope
from butterfly.schedule.engine import ClusterHealth, NodeHealth
from butterfly.types.ids import NodeId
from butterfly.types.plan import StagePlan
from butterfly.types.wire.control import StatusReply
from butterfly.types.wire.data import Ping, Pong


class NodeReport:
    """This node's own state: its layers and open requests (heartbeats) and its measured
    facts (the status the gateway plans from)."""

    def __init__(self, *, node: NodeId, server: StageServer, probe: Probe) -> None:
        self.node, self._server, self._probe = node, server, probe

    def local_state(self) -> tuple[tuple[int, ...], int]:
        plan = self._server.plan
        layers = plan.layers_of(self.node) if plan else None
        return ((layers.start, layers.end) if layers else ()), len(self._server.caches)

    async def status(self) -> StatusReply:
        """This node's status with its measured facts (measuring them on first call)."""
        facts = await self._probe.facts()
        peers, latency, bandwidth = facts.link_fields()
        layers, requests = self.local_state()
        return StatusReply(
            self.node,
            self._server.epoch,
            layers,
            requests,
            self._server.kv_bytes,
            facts.flops_per_s,
            facts.memory_bytes,
            peers,
            latency,
            bandwidth,
            facts.layer_overhead_ms,
        )

    async def on_status_query(self, peer: NodeId, env: Envelope) -> Reply | None:
        return await self.status(), b""

    async def on_ping(self, peer: NodeId, env: Envelope) -> Reply | None:
        msg = env.msg
        return (Pong(msg.seq, len(env.payload)), b"") if isinstance(msg, Ping) else None


class ClusterReport:
    """The gateway's view of every member, for `/health` and the scheduler."""

    def __init__(
        self,
        *,
        members: Mapping[NodeId, str],
        membership: Membership,
        server: StageServer,
        recovery: Recovery,
        failed: Callable[[NodeId], bool],
    ) -> None:
        """`failed`: the gateway role's rule (`GatewayRole.failed`), which also fails a
        member never heard from in `coordination.never_heard_s`: the detector alone
        reports such a member "starting" however long it stays silent, while the
        gateway role has already taken over from it."""
        self._members, self._membership = members, membership
        self._server, self._recovery, self._failed = server, recovery, failed

    def status(self, node: NodeId) -> str:
        """`node`'s status as `/health` shows it."""
        return "failed" if self._failed(node) else self._membership.status(node)

    def _node(self, n: NodeId, address: str, plan: StagePlan | None) -> NodeHealth:
        """A failed node holds no request for the cluster (its requests went on without
        it): `requests` is 0, not what its last heartbeat said before it failed."""
        status = self.status(n)
        return NodeHealth(
            node=n,
            status=status,
            address=address,
            layers=plan.layers_of(n) if plan else None,
            last_seen_s=self._membership.seconds_since(n),
            requests=0 if status == "failed" else self._membership.requests_of(n),
            evicted=n in self._recovery.evicted,
            suspended_s=self._recovery.suspended_for(n),
        )

    def statuses(self) -> dict[int, str]:
        """Every member's `status`, for the `node_status` metric."""
        return {int(n): self.status(n) for n in sorted(self._members)}

    def __call__(self) -> ClusterHealth:
        plan, placement = self._server.plan, self._recovery.placement
        unserved = self._recovery.unserved  # the plan held here is not in force everywhere
        nodes = tuple(self._node(n, address, plan) for n, address in sorted(self._members.items()))
        planned = (
            plan is not None
            and unserved is None
            and all(h.status == "healthy" for h in nodes if h.layers is not None)
        )
        me = self._server.node
        peers = [h for h in nodes if h.node != me]
        return ClusterHealth(
            healthy=planned,
            epoch=plan.epoch if plan else 0,
            nodes=nodes,
            services={
                # any peer heard (or none to hear): this node is not cut off
                "network": not peers or any(h.status == "healthy" for h in peers),
                "plan": plan is not None and unserved is None,
                # every member healthy: `healthy` stays true once the plan serves without
                # a failed node, which may leave ranges without the holders `f` asks for
                "members": all(h.status == "healthy" for h in nodes),
            },
            plan=None if plan is None else plan_report(plan, placement),
            unserved=unserved,
        )


def plan_report(plan: StagePlan, placement: Placement | None) -> dict[str, object]:
    """`/health`'s `plan`: the last placement with its estimates and facts while it is the
    plan in force; once recovery changed the plan without placing anew (a standby
    promoted, a member taken back, layers moved), the plan in force without estimates,
    beside the facts the last placement measured. Before, the key vanished then, though
    operators read it for the stages in force."""
    if placement is not None and (placement.stages.epoch, placement.stages.stages) == (
        plan.epoch,
        plan.stages,
    ):
        return placement.to_dict()
    last = placement.to_dict() if placement is not None else {}
    placed = f"epoch {placement.stages.epoch}" if placement is not None else "none yet"
    return {
        "epoch": plan.epoch,
        "strategy": last.get("strategy"),
        "estimated_per_token_ms": None,
        "bottleneck_ms": None,
        "stages": [
            {"node": n, "start": r.start, "end": r.end, "est_ms": None} for n, r in plan.stages
        ],
        "notes": [f"changed by recovery since the last placement ({placed}); not estimated"],
        "facts": last.get("facts", {}),
    }


__all__ = ["ClusterReport", "NodeReport"]
