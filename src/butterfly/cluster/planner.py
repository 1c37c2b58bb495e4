"""Deciding and distributing the stage plan of an epoch.

One node (the gateway, node 0) decides the plan from facts every node reported about
itself (compute rate, memory) and sends the same plan to all; nodes never derive a plan
from their own view. The coordination layer later puts this decision through agreement.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from butterfly.cluster.stage_server import StagePlan
from butterfly.net.transport import Transport
from butterfly.partition.strategies import uniform_ranges
from butterfly.types.errors import ButterflyError, ServiceUnavailable
from butterfly.types.ids import NodeId
from butterfly.types.messages import PlanAck, PlanAssign, StatusQuery, StatusReply

log = logging.getLogger(__name__)


async def gather_status(
    transport: Transport,
    peers: list[NodeId],
    timeout_s: float,
) -> dict[NodeId, StatusReply]:
    """Ask every peer for its status until all answer or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    replies: dict[NodeId, StatusReply] = {}
    while len(replies) < len(peers):
        for peer in peers:
            if peer in replies:
                continue
            try:
                env = await transport.request(peer, StatusQuery(), timeout=2.0, channel="control")
            except ButterflyError as e:
                log.debug("node %s not ready yet: %s", peer, e)
                continue
            if isinstance(env.msg, StatusReply):
                replies[peer] = env.msg
        if len(replies) < len(peers):
            if time.monotonic() > deadline:
                missing = sorted(set(peers) - set(replies))
                raise ServiceUnavailable(f"nodes {missing} did not answer within {timeout_s:.0f} s")
            await asyncio.sleep(0.2)
    return replies


def decide_plan(epoch: int, nodes: list[NodeId], num_layers: int) -> StagePlan:
    """Contiguous ranges over the nodes in id order, one stage per node."""
    order = sorted(nodes)[:num_layers]
    ranges = uniform_ranges(num_layers, len(order))
    return StagePlan(epoch, tuple(zip(order, ranges, strict=True)))


async def distribute_plan(
    *,
    plan: StagePlan,
    model_hash: str,
    node: NodeId,
    members: list[NodeId],
    transport: Transport,
    apply_local: Callable[[PlanAssign], Awaitable[PlanAck]],
    timeout_s: float,
) -> None:
    """Send the plan to every node (loading takes a while) and require every ack."""
    msg = plan.to_message(model_hash)

    async def one(peer: NodeId) -> PlanAck:
        if peer == node:
            return await apply_local(msg)
        env = await transport.request(peer, msg, timeout=timeout_s, channel="control")
        if not isinstance(env.msg, PlanAck):
            raise ServiceUnavailable(f"node {peer} answered the plan with {env.msg.kind}")
        return env.msg

    acks = await asyncio.gather(*(one(p) for p in members))
    failed = [a for a in acks if not a.ok]
    if failed:
        raise ServiceUnavailable(
            "plan refused: " + "; ".join(f"node {a.node}: {a.error}" for a in failed)
        )
    log.info(
        "epoch %s plan active: %s", plan.epoch, ", ".join(f"node {n} {r}" for n, r in plan.stages)
    )
