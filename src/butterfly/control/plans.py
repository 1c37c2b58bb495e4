"""Stage plans and evictions as the cluster agreed on them, through PBFT.

The gateway decides a plan (it holds every node's measured facts) but no node acts on it
until the agreement has ordered it: the gateway proposes a `NewPlan` command, every node
executes the committed command in agreement order (`execute`), and only then does the
gateway hand out the plan; a node refuses a `PlanAssign` that does not match what it
executed itself (`refusal`). Evictions of proven liars are agreed the same way, so every
node holds the same record of who was evicted and why.

An epoch is decided once: of two plans proposed for one epoch, the first ordered wins on
every node and the gateway retries the loser at a later epoch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from butterfly.types.errors import InvalidMessage, ServiceUnavailable
from butterfly.types.ids import Epoch, NodeId
from butterfly.types.plan import StagePlan
from butterfly.types.wire.commands import EvictNode, NewPlan, encode_command
from butterfly.types.wire.control import PlanAssign

log = logging.getLogger(__name__)
Propose = Callable[[bytes, float], Awaitable[int]]


def plan_command(plan: StagePlan) -> NewPlan:
    msg = plan.to_message("")
    return NewPlan(plan.epoch, msg.stages, msg.replicas)


def command_plan(command: NewPlan) -> StagePlan:
    """The plan a committed command names; raises InvalidMessage if it is not a chain."""
    return StagePlan.from_message(PlanAssign(command.epoch, command.stages, "", command.replicas))


class AgreedPlans:
    def __init__(self, *, propose: Propose, timeout_s: float, attempts: int = 4) -> None:
        self._propose, self._timeout, self._attempts = propose, timeout_s, attempts
        self.latest: StagePlan | None = None
        self.evicted: dict[NodeId, str] = {}  # node -> the agreed reason
        self._changed = asyncio.Event()

    def retune(self, timeout_s: float) -> None:
        """Changed agreement timers: the next plan or eviction waits this long per try."""
        self._timeout = timeout_s

    # --- every node, in agreement order ------------------------------------------------

    def execute(self, command: NewPlan | EvictNode) -> None:
        if isinstance(command, EvictNode):
            self.evicted.setdefault(command.node, command.reason)
            log.warning("agreed: node %s evicted (%s)", command.node, command.reason)
        else:
            try:
                plan = command_plan(command)
            except InvalidMessage as e:
                log.warning("agreed plan of epoch %d is malformed; skipped: %s", command.epoch, e)
                return
            if self.latest is not None and plan.epoch <= self.latest.epoch:
                return  # that epoch was decided already
            self.latest = plan
        self._changed.set()
        self._changed = asyncio.Event()

    # --- the gateway -------------------------------------------------------------------

    async def agree(self, plan: StagePlan) -> StagePlan:
        """Order `plan` through the agreement; returns it as agreed (its epoch may have
        moved past one another proposal took)."""
        for _ in range(self._attempts):
            if self.latest is not None and plan.epoch <= self.latest.epoch:
                plan = StagePlan(Epoch(self.latest.epoch + 1), plan.stages, plan.replicas)
            await self._propose(encode_command(plan_command(plan)), self._timeout)
            if self.latest == plan:
                return plan
        raise ServiceUnavailable(
            f"the plan was not agreed in {self._attempts} attempts (others took its epochs)"
        )

    async def evict(self, node: NodeId, reason: str) -> None:
        if node not in self.evicted:
            await self._propose(encode_command(EvictNode(node, reason[:1000])), self._timeout)

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

    def _at(self) -> str:
        return "none" if self.latest is None else f"epoch {self.latest.epoch}"


__all__ = ["AgreedPlans", "command_plan", "plan_command"]
