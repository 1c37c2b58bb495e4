"""Stage plans and evictions as the cluster agreed on them, through PBFT.

The gateway decides a plan (it holds every node's measured facts) but no node acts on it
until the agreement has ordered it: the gateway proposes a `NewPlan` command, every node
executes the committed command in agreement order (`execute`), and only then does the
gateway hand out the plan; a node refuses a `PlanAssign` that does not match what it
executed itself (`refusal`). Evictions of proven liars are agreed the same way, so every
node holds the same record of who was evicted and why; an eviction is recorded once,
and a plan that gives layers to an evicted node is skipped by every node, so no plan
re-admits it.

An epoch is decided once: of two plans proposed for one epoch, the first ordered wins on
every node and the gateway retries the loser at a later epoch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from butterfly.metrics.events import Emit, MessageDropped
from butterfly.net.framing import Envelope
from butterfly.types.errors import ButterflyError, InvalidMessage, ServiceUnavailable
from butterfly.types.ids import GATEWAY, Epoch, NodeId
from butterfly.types.plan import StagePlan
from butterfly.types.wire.commands import (
    EvictNode,
    NewPlan,
    ResumeNode,
    SuspendNode,
    encode_command,
)
from butterfly.types.wire.control import PlanAck, PlanAssign

log = logging.getLogger(__name__)
Propose = Callable[[bytes, float], Awaitable[int]]
AGREED_PLAN_WAIT_S = 10.0
"""How long a node waits for its own execution of the plan the gateway hands it."""


def plan_command(plan: StagePlan) -> NewPlan:
    msg = plan.to_message("")
    return NewPlan(plan.epoch, msg.stages, msg.replicas)


def command_plan(command: NewPlan) -> StagePlan:
    """The plan a committed command names; raises InvalidMessage if it is not a chain."""
    return StagePlan.from_message(PlanAssign(command.epoch, command.stages, "", command.replicas))


class AgreedPlans:
    """What this node executed of the agreed plans and evictions. It proposes nothing
    (the gateway's `control.recovery` does), so it exists before the agreement driver
    that feeds it its commits."""

    def __init__(self) -> None:
        self.latest: StagePlan | None = None
        self.evicted: dict[NodeId, str] = {}  # node -> the agreed reason (the first one)
        # node -> suspensions in a row: agreed, and not ended since by an agreed plan
        # that gave it layers or an agreed `ResumeNode`
        self.suspended: dict[NodeId, int] = {}
        self._changed = asyncio.Event()
        self._on_evicted: list[Callable[[NodeId, str], None]] = []

    def on_evicted(self, listener: Callable[[NodeId, str], None]) -> None:
        """Call `listener(node, reason)` once per node, when its eviction is first
        executed here (also when a restarted node replays the agreed log)."""
        self._on_evicted.append(listener)

    # --- every node, in agreement order ------------------------------------------------

    def execute(self, command: NewPlan | EvictNode | SuspendNode | ResumeNode) -> None:
        """Every node runs this in agreement order; each decision is a function of the
        agreed log alone, so every honest node decides alike."""
        if isinstance(command, EvictNode):
            self._evict(command)
            return
        if isinstance(command, SuspendNode):  # for a gateway that takes over (`Recovery`)
            self.suspended[command.node] = command.strikes
            log.warning("agreed: node %s suspended (%s)", command.node, command.reason)
            return
        if isinstance(command, ResumeNode):  # taken back by a plan that did not change
            if self.suspended.pop(command.node, None) is not None:
                log.warning("agreed: node %s taken back; its suspension is over", command.node)
            return
        try:
            plan = command_plan(command)
        except InvalidMessage as e:
            log.warning("agreed plan of epoch %d is malformed; skipped: %s", command.epoch, e)
            return
        if self.latest is not None and plan.epoch <= self.latest.epoch:
            return  # that epoch was decided already
        names = self.names_evicted(plan)
        if names:  # an evicted node never comes back through a plan
            log.error("agreed plan of epoch %d names evicted nodes %s; skipped", plan.epoch, names)
            return
        self.latest = plan
        for node in (*plan.nodes, *(n for n, _ in plan.replicas)):
            self.suspended.pop(node, None)  # taken back: its suspension is over
        self._changed.set()
        self._changed = asyncio.Event()

    def _evict(self, command: EvictNode) -> None:
        if command.node in self.evicted:
            return  # idempotent: a second eviction of one node is no new record
        self.evicted[command.node] = command.reason
        log.warning("agreed: node %s evicted (%s)", command.node, command.reason)
        self._changed.set()
        self._changed = asyncio.Event()
        for listener in self._on_evicted:
            try:
                listener(command.node, command.reason)
            except Exception:  # the record above stands; the next command still runs
                log.exception("acting on the eviction of node %s failed", command.node)

    def names_evicted(self, plan: StagePlan) -> list[NodeId]:
        """The agreed-evicted nodes `plan` would give layers to (none for a valid plan)."""
        held = (*plan.nodes, *(n for n, _ in plan.replicas))
        return sorted({n for n in held if n in self.evicted})

    def restore(
        self,
        latest: StagePlan | None,
        evicted: dict[NodeId, str],
        suspended: dict[NodeId, int] | None = None,
    ) -> None:
        """What a state snapshot says the agreed log decided (`agreed_state`), for a node
        that could not replay it: the latest plan, every eviction (each new one told to
        the listeners, as if executed here) and the suspensions in force. The snapshot's
        suspensions replace this node's: they are those of a later point of the same
        log, which may have ended some this node still held."""
        fresh = {n: r for n, r in evicted.items() if n not in self.evicted}
        if latest is not None and (self.latest is None or latest.epoch > self.latest.epoch):
            self.latest = latest
        self.evicted.update(fresh)
        if suspended is not None:
            self.suspended = dict(suspended)
        self._changed.set()
        self._changed = asyncio.Event()
        for node, reason in fresh.items():
            log.warning("agreed (state snapshot): node %s evicted (%s)", node, reason)
            for listener in self._on_evicted:
                try:
                    listener(node, reason)
                except Exception:
                    log.exception("acting on the eviction of node %s failed", node)

    # --- every node, before acting on a plan handed to it -------------------------------

    async def refusal(self, plan: StagePlan, wait_s: float) -> str | None:
        """Why this node must not apply `plan` (None: it is the plan agreed for its
        epoch). Waits up to `wait_s` for this node's own execution of the commit, which
        may trail the gateway's by a round trip."""
        deadline = time.monotonic() + wait_s
        while self.latest is None or self.latest.epoch < plan.epoch:
            changed = self._changed
            left = deadline - time.monotonic()
            if left <= 0:
                return f"no plan of epoch {plan.epoch} was agreed (latest agreed: {self._at()})"
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await changed.wait()
        if self.latest.epoch != plan.epoch or self.latest != plan:
            return f"the plan of epoch {plan.epoch} differs from the one agreed ({self._at()})"
        return None

    async def admit(
        self, msg: PlanAssign, node: NodeId, apply: Callable[[PlanAssign], Awaitable[PlanAck]]
    ) -> PlanAck:
        """Apply a plan handed out by the gateway only if it is the one agreed for its
        epoch: the gateway decides, but no node acts on a plan PBFT did not order."""
        try:
            plan = StagePlan.from_message(msg)
        except ButterflyError as e:
            return PlanAck(msg.epoch, node, False, str(e))
        refusal = await self.refusal(plan, wait_s=AGREED_PLAN_WAIT_S)
        if refusal is not None:
            log.error("node %s refuses a plan: %s", node, refusal)
            return PlanAck(msg.epoch, node, False, refusal)
        return await apply(msg)

    def _at(self) -> str:
        return "none" if self.latest is None else f"epoch {self.latest.epoch}"


class PlanIntake:
    """The handler of `PlanAssign`: only the gateway hands out plans (judged by the peer
    the connection authenticated), and only an agreed plan is applied."""

    def __init__(
        self,
        *,
        node: NodeId,
        plans: AgreedPlans,
        apply: Callable[[PlanAssign], Awaitable[PlanAck]],
        emit: Emit,
        gateway: Callable[[], NodeId] = lambda: GATEWAY,
    ) -> None:
        """`gateway`: the acting gateway as agreed (`control.gateway_role`)."""
        self.node, self._plans, self._apply, self._emit = node, plans, apply, emit
        self._gateway = gateway

    async def __call__(self, peer: NodeId, env: Envelope) -> tuple[PlanAck, bytes] | None:
        msg = env.msg
        if not isinstance(msg, PlanAssign):
            return None
        if peer != self._gateway():
            self._emit(MessageDropped(reason="plan_from_non_gateway"))
            return None
        return await self._plans.admit(msg, self.node, self._apply), b""


async def agree(
    plans: AgreedPlans, propose: Propose, plan: StagePlan, *, timeout_s: float, attempts: int = 4
) -> StagePlan:
    """Order `plan` through the agreement (the gateway); returns it as agreed (its epoch
    may have moved past one another proposal took)."""
    for _ in range(attempts):
        names = plans.names_evicted(plan)
        if names:  # every node would skip it: decide again without them
            raise PlanNamesEvicted(names)
        if plans.latest is not None and plan.epoch <= plans.latest.epoch:
            plan = StagePlan(Epoch(plans.latest.epoch + 1), plan.stages, plan.replicas)
        await propose(encode_command(plan_command(plan)), timeout_s)
        if plans.latest == plan:
            return plan
    raise ServiceUnavailable(
        f"the plan was not agreed in {attempts} attempts (others took its epochs)"
    )


class PlanNamesEvicted(ServiceUnavailable):
    """The plan gives layers to nodes whose eviction was agreed (after it was decided)."""

    def __init__(self, nodes: list[NodeId]) -> None:
        super().__init__(f"the plan names evicted nodes {nodes}; it must be decided again")
        self.nodes = nodes


async def evict(
    plans: AgreedPlans, propose: Propose, node: NodeId, reason: str, *, timeout_s: float
) -> None:
    """Order the eviction of `node` (the gateway), unless it was agreed already."""
    if node not in plans.evicted:
        await propose(encode_command(EvictNode(node, reason[:1000])), timeout_s)


__all__ = [
    "AGREED_PLAN_WAIT_S",
    "AgreedPlans",
    "PlanIntake",
    "PlanNamesEvicted",
    "Propose",
    "agree",
    "command_plan",
    "evict",
    "plan_command",
]
