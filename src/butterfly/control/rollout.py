"""Talking to the members about a plan: their facts at start-up, and handing a plan out.

The gateway decides (`planner`, `policy`); this module is where members that are down,
slow or withholding meet the decision. Start-up goes ahead with any n - f members that
answer (after a short wait for the rest), and a plan's distribution names the members
that did not take it up instead of failing, so that neither ever waits on a dead or
withholding member for long (`recovery` decides again without them).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field

from butterfly.net.transport import Transport
from butterfly.types.errors import ButterflyError, InvalidMessage, ServiceUnavailable
from butterfly.types.ids import NodeId
from butterfly.types.plan import StagePlan
from butterfly.types.wire.control import PlanAck, PlanAssign, StatusQuery, StatusReply
from butterfly.types.wire.data import Ping

log = logging.getLogger(__name__)


PROBE_TIMEOUT_S = 60.0
"""How long one node may take to measure itself (compute, then every link) and answer."""


START_GRACE_BEATS = 100
"""Heartbeat intervals the first plan waits for the last members once n - f are up
(10 s at the default 100 ms): enough for a node that starts a little later than the
others, while a node that never comes costs no more than that (it joins when it does)."""


async def gather_status(
    transport: Transport,
    peers: list[NodeId],
    timeout_s: float,
    *,
    local: tuple[NodeId, Callable[[], Awaitable[StatusReply]]] | None = None,
    need: int | None = None,
    grace_s: float = 0.0,
) -> dict[NodeId, StatusReply]:
    """The status (with its measured facts) of every peer that is up, asked one node at
    a time.

    First waits until the peers answer a ping (their processes are up): all of them, or,
    when `need` is given, `need` nodes (this one included) and then up to `grace_s` more
    for the rest. Then asks for the status of `local` (this node: its id and how to build
    its reply) and of each peer that answered, in turn. A node measures itself when
    first asked, so asking in turn means no two nodes measure at once (see `facts`). A
    peer that stops answering is left out while `need` nodes remain. Raises
    ServiceUnavailable naming the nodes missing when fewer than `need` (or all) answered
    within `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    need = len(peers) + (local is not None) if need is None else need
    mine = 1 if local is not None else 0
    pending, up = set(peers), list[NodeId]()
    quorate: float | None = None  # when `need` nodes were up
    while pending:
        for peer in sorted(pending):
            try:
                await transport.ask(peer, Ping(0), timeout=2.0, channel="control")
            except ButterflyError as e:
                log.debug("node %s not ready yet: %s", peer, e)
                continue
            pending.discard(peer)
            up.append(peer)
        now = time.monotonic()
        if quorate is None and len(up) + mine >= need:
            quorate = now
        if not pending or (quorate is not None and now - quorate >= grace_s):
            break
        if now > deadline and quorate is None:
            raise ServiceUnavailable(
                f"nodes {sorted(pending)} did not answer within {timeout_s:.0f} s "
                f"({len(up) + mine} of the {need} needed are up)"
            )
        await asyncio.sleep(0.2)
    if pending:
        log.warning(
            "nodes %s are not up after %.0f s more; the first plan goes without them "
            "(each joins once it is up)",
            sorted(pending),
            grace_s,
        )
    replies: dict[NodeId, StatusReply] = {}
    if local is not None:
        replies[local[0]] = await local[1]()
    spare = len(up) + mine - need  # peers that may be left out if they stop answering
    for peer in sorted(up):
        while peer not in replies:
            left = deadline - time.monotonic()
            try:
                status, _ = await transport.ask(
                    peer, StatusQuery(), timeout=max(PROBE_TIMEOUT_S, left), channel="control"
                )
            except InvalidMessage as e:  # it answered, with something else: do not ask again
                raise ServiceUnavailable(str(e)) from e
            except ButterflyError as e:
                if spare > 0:
                    log.warning("node %s did not report its status (%s); left out", peer, e)
                    spare -= 1
                    break
                if time.monotonic() > deadline:
                    raise ServiceUnavailable(
                        f"node {peer} did not report its status within {timeout_s:.0f} s: {e}"
                    ) from e
                await asyncio.sleep(0.2)
                continue
            replies[peer] = status
    return replies


@dataclass(frozen=True)
class Distribution:
    """How the members took a plan up. A member in neither list was still loading when
    another member failed and the wait was abandoned (it goes on loading on its side)."""

    acked: tuple[NodeId, ...]
    down: tuple[NodeId, ...]  # refused, unreachable, failed, or withheld an ack owed at once
    # why each down member is: its own refusal (the load error) or what this node saw
    why: Mapping[NodeId, str] = field(default_factory=dict)


async def distribute_plan(
    *,
    plan: StagePlan,
    model_hash: str,
    node: NodeId,
    members: list[NodeId],
    transport: Transport,
    apply_local: Callable[[PlanAssign], Awaitable[PlanAck]],
    timeout_s: float,
    status: Callable[[NodeId], str] = lambda n: "healthy",
    prompt: Collection[NodeId] = (),
    prompt_s: float = 0.0,
    poll_s: float = 0.05,
    on_ack: Callable[[NodeId], None] = lambda n: None,
) -> Distribution:
    """Send the plan to every member (loading takes a while) and see who takes it up.

    Down are those that refused it, could not be reached, did not ack within
    `timeout_s`, were declared failed (`status`) meanwhile, or, for the `prompt` members
    (whose layers are those they last acknowledged, so nothing to load), did not ack
    within `prompt_s`: a member withholding its ack. Once a member is declared failed
    the wait ends for every other remote member too: the plan already names a dead node
    and the caller must decide the next one at once, not after the others' loading.
    The caller treats the down members as down for this plan, this node (`node`) too
    when it cannot apply it (its own apply is always waited for): the caller decides
    whether a plan without its layers is worth trying, and says why none is in force.
    `on_ack(member)`: as each member's acknowledgement arrives (a heartbeat it sent
    before it applied the plan may arrive later: `policy.restarted`)."""
    msg = plan.to_message(model_hash)
    started = time.monotonic()

    async def one(peer: NodeId) -> PlanAck:
        if peer == node:
            ack = await apply_local(msg)
        else:
            try:
                ack, _ = await transport.ask(peer, msg, timeout=timeout_s, channel="control")
            except ButterflyError as e:
                return PlanAck(msg.epoch, peer, False, str(e))
        if ack.ok:
            on_ack(peer)
        return ack

    tasks = {asyncio.ensure_future(one(p)): p for p in members}
    down: list[NodeId] = []
    why: dict[NodeId, str] = {}
    try:
        pending = set(tasks)
        abandoned = False
        while pending and not abandoned:
            _done, pending = await asyncio.wait(pending, timeout=poll_s)
            late = time.monotonic() - started > prompt_s
            for task in [t for t in pending if tasks[t] != node]:
                peer = tasks[task]
                failed = status(peer) == "failed"
                if failed or (late and peer in prompt):  # died, or withholds an owed ack
                    pending.discard(task)
                    down.append(peer)
                    why[peer] = "failed" if failed else "withheld the acknowledgement it owed"
                    abandoned = abandoned or failed
                    log.warning("node %s did not take up epoch %s in time", peer, plan.epoch)
        mine = [t for t in pending if tasks[t] == node]
        if mine:  # abandoned: this node's own apply still completes
            await asyncio.wait(mine)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    acked = []
    for task, peer in tasks.items():
        if peer in down or task.cancelled():
            continue
        ack = task.result()
        if ack.ok:
            acked.append(peer)
            continue
        log.warning("node %s did not take up epoch %s: %s", peer, plan.epoch, ack.error)
        down.append(peer)
        why[peer] = ack.error
    log.info(
        "epoch %s plan active: %s%s",
        plan.epoch,
        ", ".join(f"node {n} {r}" for n, r in plan.stages),
        f" (nodes {sorted(down)} did not take it up)" if down else "",
    )
    return Distribution(tuple(sorted(acked)), tuple(sorted(down)), why)


__all__ = [
    "PROBE_TIMEOUT_S",
    "START_GRACE_BEATS",
    "Distribution",
    "distribute_plan",
    "gather_status",
]
