"""The gateway's rule for nodes that heartbeat but do not answer their work.

A silent node (alive, never answering a step or an audit) or a slow one (answering after
`network.step_timeout_ms`) is a Byzantine fault the failure detector cannot see: its
heartbeats keep arriving. The gateway is trusted (DESIGN.md section 3), so it may judge
what it observed itself: when `byzantine.max_step_timeouts` of the last `WINDOW` steps
or audits addressed to one node time out while that node's heartbeats say it is healthy,
the gateway declares it faulty, and it leaves the plans for a while (`declare`: the
recovery's suspension, `control.policy.SUSPENSION_S`, doubling while it recurs): not
evicted, for nothing proves it lied, and an honest node behind a TCP cut whose
heartbeats still arrive looks the same (one was evicted for good: a review). Once taken
back, its timeouts count afresh. Not "in a row": a node that withheld every third step
was answered on the replay of each, which ended its streak, and it was never charged
while every request through it failed (a review, twenty-first session).

A node whose heartbeats stopped (suspected or failed) is never counted here: a crash is
the failure detector's to declare, and it must not also count as an eviction.

A timed-out chain step is only attributable when the chain has exactly one node besides
the gateway (each step then reaches only that node); a longer chain cannot tell which of
its nodes held the step back, so the sender re-runs such a step one node at a time
(`sending.StepSender.isolate`), and the hop that times out is counted against its node.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable

from butterfly.types.ids import NodeId

log = logging.getLogger(__name__)

Declare = Callable[[tuple[NodeId, ...], str], Awaitable[None]]
WINDOW = 32
"""The steps and audits a node's timeouts are counted over: its most recent ones. An
honest node answers within `network.step_timeout_ms` (a minute by default) unless it is
down, which the failure detector sees; a few late answers in 32 are not an honest
node's."""


class StepTimeouts:
    """Unanswered steps and audits among each node's last `WINDOW`; kept only for nodes
    with a timeout among them."""

    def __init__(
        self,
        *,
        gateway: NodeId,
        limit: Callable[[], int],
        status: Callable[[NodeId], str],
        declare: Declare,
        apart: Callable[[], float] = lambda: 0.0,
        clock: Callable[[], float] = time.monotonic,
        out: Callable[[NodeId], bool] = lambda node: True,
    ) -> None:
        """`apart`: timeouts of one node closer together than this (the step timeout)
        count once: one stall of a node fails every request's step at once, and counted
        per request, a 2.5 s stall with six requests running evicted an honest node (a
        review). `out`: whether a node declared is still out of the plans (by default,
        for good); one taken back is counted afresh."""
        self._gateway, self._limit, self._status, self._declare = gateway, limit, status, declare
        self._apart, self._clock, self._out = apart, clock, out
        self.recent: dict[NodeId, deque[bool]] = {}  # True: timed out
        self.declared: set[NodeId] = set()
        self._last: dict[NodeId, float] = {}  # when a timeout of the node last counted

    def answered(self, nodes: Iterable[NodeId]) -> None:
        """These nodes answered in time."""
        for node in nodes:
            recent = self.recent.get(node)
            if recent is not None:
                recent.append(False)
                if not any(recent):
                    del self.recent[node]

    async def chain_timed_out(self, chain: Iterable[NodeId], what: str) -> None:
        """A step through `chain` got no answer within the step timeout (a chain of one
        node besides the gateway: counted against it)."""
        suspects = [n for n in chain if n != self._gateway]
        if not suspects:  # the plan changed meanwhile, or the gateway runs it all
            return
        if len(suspects) != 1:
            log.warning(
                "%s timed out on chain %s: cannot tell which node held it back; not counted",
                what,
                suspects,
            )
            return
        await self.timed_out(suspects[0], what)

    async def timed_out(self, node: NodeId, what: str) -> bool:
        """`node` did not answer `what` (a step or an audit) within the step timeout.
        True when it stays in the plan (heartbeating, not declared now): no new plan comes
        of this, and whoever lost the step need not wait for one."""
        if node == self._gateway:
            return False
        if node in self.declared:
            if self._out(node):
                return False
            self.declared.discard(node)  # taken back after its suspension
        status = self._status(node)
        if status != "healthy":  # no heartbeats: a crash, for the failure detector
            log.info("%s timed out on node %s, which is %s: not counted", what, node, status)
            return False
        now = self._clock()
        if now - self._last.get(node, -float("inf")) < self._apart():
            log.info("%s timed out on node %s with another just before: counted once", what, node)
            return True
        self._last[node] = now
        recent = self.recent.setdefault(node, deque(maxlen=WINDOW))
        recent.append(True)
        count, limit = sum(recent), max(1, self._limit())
        log.warning(
            "%s timed out on node %s (%d of its last %d, limit %d) while its heartbeats continue",
            what,
            node,
            count,
            len(recent),
            limit,
        )
        if count < limit:
            return True
        self.declared.add(node)
        del self.recent[node]
        reason = (
            f"node {node} heartbeats but left {count} of its last {WINDOW} steps or audits "
            f"unanswered within network.step_timeout_ms (byzantine.max_step_timeouts = "
            f"{limit}): silent, withholding or too slow"
        )
        log.error("declaring node %s faulty: %s", node, reason)
        await self._declare((node,), reason)
        return False


__all__ = ["StepTimeouts"]
