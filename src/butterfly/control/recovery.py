"""The gateway's recovery and eviction: carries out what `control.policy` decides.

When the failure detector declares a node of the current plan failed, or the data path
proves one a liar, the gateway decides the plan of the next epoch over the nodes still
alive (`policy.next_plan`), orders it through the agreement, hands it to every node of it,
and tells the pipeline engine, whose requests then resume on the new chain. Nothing is
computed from a node's own view: every node receives the same, agreed plan.

A failure, from the heartbeat to the resumed request: `Membership` sees the peer's phi
cross the threshold and calls `on_status_change`; that wakes `run`, which decides, agrees
and distributes the plan, then calls `on_replanned` (the engine's `plan_changed`), which
fails the steps sent on the old plan; each request then replays on the new one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from typing import Protocol

from butterfly.control.planner import Placement, distribute_plan
from butterfly.control.plans import AgreedPlans, PlanNamesEvicted, Propose, agree, evict
from butterfly.control.policy import (
    Placing,
    alive,
    equivocation,
    evicts,
    gone,
    next_plan,
    to_evict,
)
from butterfly.metrics.events import Emit, Eviction, NodeFailure, NodeStatus, RecoveryCompleted
from butterfly.net.transport import Transport
from butterfly.types.errors import ButterflyError, ServiceUnavailable
from butterfly.types.ids import NodeId
from butterfly.types.plan import StagePlan
from butterfly.types.wire.agreement import Evidence
from butterfly.types.wire.control import PlanAck, PlanAssign, StatusReply

log = logging.getLogger(__name__)
RETRY_S = 0.5
"""Wait before re-planning again after a plan could not be agreed or put in force."""
DISTRIBUTE_TIMEOUT_S = 300.0
"""How long nodes may take to load their new stages and acknowledge a plan."""


class PlanHolder(Protocol):
    """This node's stage server: the plan in force here, and how to put one in force."""

    @property
    def plan(self) -> StagePlan | None: ...

    async def apply_plan(self, msg: PlanAssign) -> PlanAck: ...


class EvictionStore(Protocol):
    """Where the gateway keeps whom it evicted across restarts (`schedule.store.TaskStore`)."""

    def record_eviction(self, node: NodeId, reason: str) -> bool: ...

    def evictions(self) -> Mapping[NodeId, str]: ...


class Recovery:
    def __init__(
        self,
        *,
        node: NodeId,
        members: list[NodeId],
        status: Callable[[NodeId], str],
        holder: PlanHolder,
        plans: AgreedPlans,
        propose: Propose,
        agree_timeout_s: float,
        transport: Transport,
        model_hash: str,
        placing: Placing,
        suspect_primary: Callable[[NodeId], None],
        emit: Emit,
        acting: Callable[[], bool] | None = None,
    ) -> None:
        """`propose`: the agreement's; `suspect_primary`: the agreement is told at once
        when a node fails, in case it is the primary (no wait for the request timeout);
        `acting`: whether this node acts as the gateway now (`control.gateway_role`;
        default: `policy.evicts`, node 0)."""
        self._acting = acting or (lambda: evicts(node))
        self.node, self._members, self._status, self._holder = node, members, status, holder
        self._plans, self._propose, self._agree_timeout = plans, propose, agree_timeout_s
        self._transport, self._model_hash, self._placing = transport, model_hash, placing
        self._suspect_primary, self._emit = suspect_primary, emit
        self._wake = asyncio.Event()
        self.failed: set[NodeId] = set()
        self._evicting: dict[NodeId, str] = {}  # decided here, agreed or not (yet)
        self._store: EvictionStore | None = None  # the gateway's, from `start`
        self.recoveries: list[float] = []  # seconds from noticing to the new plan in force
        self.facts: Mapping[NodeId, StatusReply] = {}  # every node's, gathered at start-up
        self.placement: Placement | None = None  # the last plan placed from scratch
        self._asked: str | None = None  # why a re-plan was asked for although none failed
        plans.on_evicted(self._on_agreed_eviction)

    @property
    def evicted(self) -> frozenset[NodeId]:
        """The nodes no plan of this gateway gives layers to: those it evicted (agreed or
        not yet, or remembered from before a restart) and those the agreed log evicted."""
        return frozenset(self._evicting) | frozenset(self._plans.evicted)

    # --- inputs -----------------------------------------------------------------------

    def on_status_change(self, peer: NodeId, status: str) -> None:
        """Membership calls this on every change of a peer's status."""
        if status in ("starting", "healthy", "suspected", "failed"):
            self._emit(NodeStatus(node=peer, status=status))  # type: ignore[arg-type]
        if status == "failed":
            self._wake.set()
            self._suspect_primary(peer)

    async def evict_liars(self, liars: tuple[NodeId, ...], reason: str) -> None:
        """The data path proved these nodes wrong: each leaves this gateway's plans at once
        (and its store), its eviction is agreed through PBFT (every node records it), then
        the gateway re-plans without them. An eviction the agreed log holds already (the
        liar's own, or one replayed) is not ordered again, but its node still leaves the
        plan: the re-plan is woken whatever was agreed before."""
        fresh = to_evict(liars, self._evicting, self.node)  # the gateway: never itself
        if not fresh:
            log.info("none of %s to evict (evicted already, or the gateway): %s", liars, reason)
            return
        log.error("evicting %s: %s", fresh, reason)
        for liar in fresh:
            self._remember(liar, reason)
        self._wake.set()  # the re-plan needs no agreement on the eviction to start
        for liar in fresh:
            try:
                await evict(self._plans, self._propose, liar, reason, timeout_s=self._agree_timeout)
            except ButterflyError as e:  # not agreed (yet): it still leaves this gateway's plan
                log.error("eviction of node %s not agreed: %s", liar, e)
            self._emit(Eviction(node=liar))

    def _remember(self, node: NodeId, reason: str) -> None:
        """Out of this gateway's plans from now on, and after a restart (its store)."""
        self._evicting.setdefault(node, reason)
        if self._store is not None:
            self._store.record_eviction(node, reason)

    def _on_agreed_eviction(self, node: NodeId, reason: str) -> None:
        """The agreed log evicted `node` (first time on this node, or replayed after a
        restart): the gateway stores it and re-plans if it holds layers."""
        if self._acting():
            self._remember(node, reason)
            self._wake.set()

    async def watch_evidence(self, evidence: asyncio.Queue[Evidence]) -> None:
        """Every node reads the equivocation evidence its agreement driver found; the
        gateway evicts the signer, the others only log it."""
        while True:
            accused, reason = equivocation(await evidence.get())
            if self._acting():
                await self.evict_liars((accused,), reason)
            else:
                log.error("equivocation: %s; the gateway evicts it", reason)

    def request_replan(self, reason: str, *, strategy: str) -> None:
        """Re-plan over the live nodes with `strategy` although none failed
        (partition.strategy changed); done by `run`, so it never races a recovery."""
        self._placing = dataclasses.replace(self._placing, strategy=strategy)
        self._asked = reason
        self._wake.set()

    def retune(self, *, agree_timeout_s: float) -> None:
        """Changed agreement timeouts: how long the next plan or eviction may take."""
        self._agree_timeout = agree_timeout_s

    # --- the gateway ------------------------------------------------------------------

    async def start(
        self,
        facts: Mapping[NodeId, StatusReply],
        store: EvictionStore | None = None,
        live: list[NodeId] | None = None,
    ) -> None:
        """The first plan, over every member not evicted (or the `live` ones: a gateway
        taking over from a dead one), from the facts gathered at start-up. `store`: the
        gateway's; the evictions it remembers stay out of every plan, and those the
        agreed log lacks (not agreed before a restart) are ordered again; agreed ones
        replayed before now are written to it."""
        self.facts, self._store = facts, store
        if store is not None:
            for node, reason in store.evictions().items():
                self._evicting.setdefault(node, reason)
            for node, reason in self._plans.evicted.items():
                self._remember(node, reason)
            for node, reason in list(self._evicting.items()):
                try:
                    await evict(
                        self._plans, self._propose, node, reason, timeout_s=self._agree_timeout
                    )
                except ButterflyError as e:  # it stays out of this gateway's plans anyway
                    log.error("eviction of node %s not agreed: %s", node, e)
        members = live if live is not None else self._members
        await self.replan([n for n in sorted(members) if n not in self.evicted])

    async def replan(self, live: list[NodeId]) -> StagePlan:
        """Decide the next plan over the `live` nodes, agree on it, put it in force. A plan
        overtaken by an agreed eviction (every node would skip it) is decided again."""
        for _ in range(len(self._members)):
            old, evicted = self._holder.plan, self.evicted
            live = [n for n in live if n not in evicted]
            decided = next_plan(old, live, evicted, self.facts, self._placing, emit=self._emit)
            if decided.placement is not None:
                self.placement = decided.placement
            try:
                plan = await agree(
                    self._plans, self._propose, decided.plan, timeout_s=self._agree_timeout
                )
            except PlanNamesEvicted as e:
                log.warning("%s", e)
                continue
            break
        else:
            raise ServiceUnavailable("every plan decided named a node evicted meanwhile")
        await distribute_plan(
            plan=plan,
            model_hash=self._model_hash,
            node=self.node,
            members=sorted(set(n for n, _ in (*plan.stages, *plan.replicas))),
            transport=self._transport,
            apply_local=self._holder.apply_plan,
            timeout_s=DISTRIBUTE_TIMEOUT_S,
        )
        return plan

    async def run(self, on_replanned: Callable[[], None]) -> None:
        """Re-plan whenever a node of the plan is gone, or a re-plan was asked for;
        `on_replanned` (the engine's) is
        given here rather than at construction: the engine is built after this object,
        whose `evict_liars` it calls."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            plan = self._holder.plan
            if plan is None:
                continue
            newly = gone(plan, self._status, self.evicted)
            asked, self._asked = self._asked, None
            if not newly and asked is None:
                continue
            for n in newly:
                if n not in self.failed:
                    self.failed.add(n)
                    self._emit(NodeFailure(node=n))
            live = alive(self._members, self._status, self.evicted)
            started = time.perf_counter()
            why = f"nodes {newly} failed" if newly else asked
            log.warning("%s; re-planning epoch %d over %s", why, plan.epoch + 1, live)
            try:
                await self.replan(live)
            except ButterflyError as e:
                log.error("re-planning (%s) failed: %s; retrying", why, e)
                self._asked = self._asked or asked
                await asyncio.sleep(RETRY_S)
                self._wake.set()
                continue
            if newly:
                self.recoveries.append(time.perf_counter() - started)
                self._emit(RecoveryCompleted(seconds=self.recoveries[-1]))
            on_replanned()


__all__ = ["EvictionStore", "PlanHolder", "Recovery"]
