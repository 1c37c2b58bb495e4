"""The gateway's reaction to a failed node: a new plan over the live nodes.

When the failure detector declares a node of the current plan failed, the gateway
decides a plan for the next epoch over the nodes still alive, distributes it, and tells
the pipeline engine, whose requests then replay their token history on the new chain.
Nothing is recomputed from a node's own view: every node receives the same plan.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from butterfly.metrics.events import Emit, NodeFailure, RecoveryCompleted
from butterfly.types.errors import ButterflyError
from butterfly.types.ids import Epoch, NodeId
from butterfly.types.plan import StagePlan

log = logging.getLogger(__name__)


class Recovery:
    def __init__(
        self,
        *,
        members: list[NodeId],
        status: Callable[[NodeId], str],
        current_plan: Callable[[], StagePlan | None],
        replan: Callable[[Epoch, list[NodeId], bool], Awaitable[None]],
        on_replanned: Callable[[], None],
        emit: Emit,
    ) -> None:
        self._members, self._status, self._current = members, status, current_plan
        self._replan, self._on_replanned, self._emit = replan, on_replanned, emit
        self._wake = asyncio.Event()
        self._asked: str | None = None  # a re-plan asked for although nobody failed
        self.failed: set[NodeId] = set()
        self.evicted: set[NodeId] = set()
        self.recoveries: list[float] = []  # seconds from noticing to the new plan in force

    def _gone(self, node: NodeId) -> bool:
        return node in self.evicted or self._status(node) == "failed"

    async def evict(self, nodes: tuple[NodeId, ...]) -> None:
        """Proven liars leave the plan for good, as if they had failed."""
        self.evicted.update(nodes)
        self._wake.set()

    def replan(self, reason: str) -> None:
        """Re-plan over the live nodes although none failed (partition.strategy changed);
        done by `run`, so it never races a recovery."""
        self._asked = reason
        self._wake.set()

    def notify(self, node: NodeId, status: str) -> None:
        """Membership calls this on every status change."""
        if status == "failed":
            self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            plan = self._current()
            if plan is None:
                continue
            holders = (*plan.nodes, *(n for n, _ in plan.replicas))
            newly = [n for n in holders if self._gone(n)]
            asked, self._asked = self._asked, None
            if not newly and asked is None:
                continue
            for n in newly:
                if n not in self.failed:
                    self.failed.add(n)
                    self._emit(NodeFailure(node=n))
            alive = [n for n in self._members if not self._gone(n)]
            started = time.perf_counter()
            why = f"nodes {newly} failed" if newly else asked
            log.warning("%s; re-planning epoch %d over %s", why, plan.epoch + 1, alive)
            try:
                # a crash hands stages to their standbys; a liar's range is re-planned
                crashed_only = bool(newly) and not any(n in self.evicted for n in newly)
                await self._replan(Epoch(plan.epoch + 1), alive, crashed_only)
            except ButterflyError as e:
                log.error("re-planning (%s) failed: %s; retrying", why, e)
                self._asked = self._asked or asked
                await asyncio.sleep(0.5)
                self._wake.set()
                continue
            if newly:
                self.recoveries.append(time.perf_counter() - started)
                self._emit(RecoveryCompleted(seconds=self.recoveries[-1]))
            self._on_replanned()
