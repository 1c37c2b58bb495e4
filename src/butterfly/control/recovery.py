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

A node leaves the plans when it fails, when it does not take a plan up (refuses it, or
cannot be reached), when its heartbeats say it no longer holds the layers it took up (it
restarted too fast for the failure detector: `policy.restarted`), or when it was not up
for the first plan; it is then `out`. Once its heartbeats have been steady for its hold
(`policy.returning`, `policy.rejoin_hold_s`) `run` re-plans with it, fetching its
facts first if it never reported them; a proven liar is never taken back. A node that
does not take up a plan is out for that plan and the next one is decided at once
without it (`replan`), so a dead or withholding member never blocks a re-plan. One that
refuses it (it cannot load its layers: a damaged copy) is out the same way, and is
blamed for nothing; when no node is left that can load them (a checkpoint none can
load), `unserved` says why, in their words, and every request fails with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Collection, Mapping
from functools import partial
from typing import Protocol

from butterfly.control.planner import Placement
from butterfly.control.plans import AgreedPlans, PlanNamesEvicted, Propose, agree, evict
from butterfly.control.policy import (
    RESTART_BEATS,
    RESTARTS_FORGOTTEN_S,
    SUSPENSION_MAX_S,
    Placing,
    back_for,
    equivocation,
    evicts,
    gone,
    next_plan,
    not_served,
    rejoin_hold_s,
    restarted,
    returning,
    says_other_layers,
    strike,
    suspension_s,
    to_evict,
)
from butterfly.control.rollout import PROBE_TIMEOUT_S, distribute_plan
from butterfly.metrics.events import (
    Emit,
    Eviction,
    NodeFailure,
    NodeStatus,
    RecoveryCompleted,
    Suspension,
)
from butterfly.net.transport import Transport
from butterfly.types.errors import ButterflyError, ServiceUnavailable
from butterfly.types.ids import NodeId
from butterfly.types.model import LayerRange
from butterfly.types.plan import StagePlan
from butterfly.types.wire.agreement import Evidence
from butterfly.types.wire.commands import ResumeNode, SuspendNode, encode_command
from butterfly.types.wire.control import PlanAck, PlanAssign, StatusQuery, StatusReply

log = logging.getLogger(__name__)
RETRY_S = 0.5
"""Wait before re-planning again after a plan could not be agreed or put in force."""
DISTRIBUTE_TIMEOUT_S = 300.0
"""How long nodes may take to load their new stages and acknowledge a plan."""
PROMPT_ACK_BEATS = 100
"""Heartbeat intervals (10 s at the default 100 ms, as long as a node waits to execute
the agreed plan itself: `plans.AGREED_PLAN_WAIT_S`) a node that keeps its layers may take
to acknowledge a plan: it loads nothing, so one that takes longer withholds its ack (or
cannot execute the agreed log) and is out for that plan."""


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
        healthy_for: Callable[[NodeId], float | None] = lambda n: None,
        loaded: Callable[[NodeId], LayerRange | None] = lambda n: None,
        heard_at: Callable[[NodeId], float | None] = lambda n: None,
        interval_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`propose`: the agreement's; `suspect_primary`: the agreement is told at once
        when a node fails, in case it is the primary (no wait for the request timeout);
        `acting`: whether this node acts as the gateway now (`control.gateway_role`;
        default: `policy.evicts`, node 0). `healthy_for`, `interval_s`, `clock`:
        membership's view of how long each node has been healthy, the heartbeat interval
        and the clock it is timed by, which say when a node that left the plan is taken
        back. `loaded`: the layers each node's last heartbeat says it holds (a restarted
        node none, a thawed one its old ones): one given those again has nothing to load
        and owes its ack at once. `heard_at`: when that heartbeat arrived (by `clock`):
        one older than a node's acknowledgement, or than its leaving, says nothing of it
        now."""
        self._acting = acting or (lambda: evicts(node))
        self.node, self._members, self._status, self._holder = node, members, status, holder
        self._healthy_for, self._interval, self._clock = healthy_for, interval_s, clock
        self._loaded, self._heard_at = loaded, heard_at
        self.out: set[NodeId] = set()  # left the plans; taken back once steadily healthy
        self._strikes: dict[NodeId, tuple[int, float]] = {}  # departures in a row, last
        # nodes out for unanswered work (`suspend`), and per node its suspensions in a
        # row and when the last began (kept after it ends: the next one doubles)
        self._suspended: set[NodeId] = set()
        self._suspensions: dict[NodeId, tuple[int, float]] = {}
        self._ordering: set[asyncio.Task[None]] = set()  # suspensions being agreed
        # the epoch of the plan all of whose holders acknowledged it (this gateway's last)
        self._acked = -1
        self._acked_at: dict[NodeId, float] = {}  # when each holder's ack of it arrived
        # per holder that acked it, since when its heartbeats say other layers (if they do)
        self._differs: dict[NodeId, float] = {}
        # per node, restarts the failure detector did not see in a row, and the last
        self._restarts: dict[NodeId, tuple[int, float]] = {}
        self._applied: Callable[[], None] = lambda: None  # the engine's, from `run`
        self._plans, self._propose, self._agree_timeout = plans, propose, agree_timeout_s
        self._transport, self._model_hash, self._placing = transport, model_hash, placing
        self._suspect_primary, self._emit = suspect_primary, emit
        self._wake = asyncio.Event()
        self.failed: set[NodeId] = set()
        self._evicting: dict[NodeId, str] = {}  # decided here, agreed or not (yet)
        self._store: EvictionStore | None = None  # the gateway's, from `start`
        self.recoveries: list[float] = []  # seconds from noticing to the new plan in force
        self.facts: dict[NodeId, StatusReply] = {}  # every node's: at start-up, or on return
        self.placement: Placement | None = None  # the last plan placed from scratch
        self._asked: str | None = None  # why a re-plan was asked for although none failed
        self.unserved: str | None = None
        """Why no plan is in force (`policy.not_served`), until a re-plan puts one in force."""
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

    def suspended(self, node: NodeId) -> bool:
        """Whether `node` is out of the plans for work it left unanswered (`suspend`)."""
        return node in self._suspended

    def suspended_for(self, node: NodeId) -> float | None:
        """Seconds left of `node`'s suspension (0 once over, until it is taken back), or
        None if it is not suspended."""
        end = self._suspension_end(node)
        return None if end is None else max(0.0, end - self._clock())

    def _suspension_end(self, node: NodeId) -> float | None:
        """When `node`'s suspension ends (None: not suspended)."""
        if node not in self._suspended:
            return None
        strikes, since = self._suspensions[node]
        return since + suspension_s(strikes)

    async def suspend(self, nodes: tuple[NodeId, ...], reason: str) -> None:
        """These nodes heartbeat but left their work unanswered (`dataplane.unresponsive`):
        each leaves the plans for `policy.suspension_s` (doubling while it happens again),
        then is taken back once healthy, as a failed node is. Not evicted: a node behind
        a TCP cut whose heartbeats still arrive is honest, and one was evicted for good
        (a review; "only a proven liar stays out"). A withholding liar is found again
        each time it is taken back, ever more rarely."""
        now = self._clock()
        for node in nodes:
            if node == self.node or node in self.evicted or node in self._suspended:
                continue
            strikes = strike(self._suspensions.get(node), now, forgotten_s=2 * SUSPENSION_MAX_S)
            self._suspensions[node] = strikes
            self._suspended.add(node)
            self._depart(node)
            log.error("suspending node %s for %.0f s: %s", node, suspension_s(strikes[0]), reason)
            self._emit(Suspension(node=node))
            self._order(SuspendNode(node, strikes[0], reason[:1000]))
        self._wake.set()

    def _order(self, command: SuspendNode | ResumeNode) -> None:
        """Order `command` in the background (the request that found the node silent, or
        the loop that took it back, goes on meanwhile); not agreed, it holds on this
        gateway alone."""
        ordering = asyncio.create_task(self._agree(command))
        self._ordering.add(ordering)
        ordering.add_done_callback(self._ordering.discard)

    async def _agree(self, command: SuspendNode | ResumeNode) -> None:
        try:
            await self._propose(encode_command(command), self._agree_timeout)
        except ButterflyError as e:
            log.error("%s of node %s not agreed: %s", command.kind, command.node, e)

    def _end_agreed_suspensions(self, nodes: list[NodeId]) -> None:
        """`nodes` were taken back: end the suspension the agreed log still holds for any
        of them. An agreed plan that gives a node layers ends it on every node, but a
        re-plan that changed nothing (every range had its holders) is not agreed, and the
        log kept the node suspended: a gateway that took over later suspended the honest
        node again for a whole period (a review)."""
        for node in nodes:
            if node in self._plans.suspended:
                self._order(ResumeNode(node))

    def _resume_suspensions(self) -> None:
        """The suspensions the agreed log holds, as this gateway starts acting: a node a
        gateway before it suspended, and no agreed plan since took back, stays out for a
        whole suspension from now, and its next one doubles (a takeover took a
        withholding node straight back: a review). Not by wall clock: one gateway's
        clock ahead kept a node it had taken back out again, one behind freed a
        withholding node at once (a review)."""
        now = self._clock()
        for node, strikes in self._plans.suspended.items():
            if node == self.node or node in self._suspended:
                continue
            self._suspensions[node] = (strikes, now)
            self._suspended.add(node)
            self._depart(node)

    def _back_for(self, node: NodeId) -> float | None:
        """How long `node` has been healthy, as far as taking it back goes: a suspended
        node counts from the end of its suspension, a restarted one from when its restart
        was seen (their heartbeats never stopped)."""
        restart = self._restarts.get(node)
        ends = [self._suspension_end(node), restart[1] if restart is not None else None]
        return back_for(self._healthy_for(node), ends, self._heard_at(node), self._clock())

    def _restarted(self, plan: StagePlan) -> tuple[list[NodeId], list[NodeId]]:
        """The plan's holders that restarted since they acknowledged it
        (`policy.restarted`): those to let go as failed nodes, with no suspension (the
        first restart), and those to suspend (another within `RESTARTS_FORGOTTEN_S`: a
        withholder could otherwise claim a restart whenever it was about to be charged,
        and never be)."""
        if plan.epoch != self._acked:
            return [], []  # a plan this gateway did not see every holder take up
        now, away = self._clock(), self.evicted | self._suspended | self.out
        watched = [n for n in plan.members if n != self.node and n in self._members]
        for node in watched:
            says = says_other_layers(plan, node, self._loaded, self._heard_at, self._acked_at)
            if node in away or says is False:
                self._differs.pop(node, None)
            elif says:  # None: no heartbeat since its ack says what it holds now
                self._differs.setdefault(node, now)
        grace = RESTART_BEATS * self._interval
        found = restarted(
            plan,
            self._loaded,
            self._differs,
            now,
            grace,
            heard_at=self._heard_at,
            acked_at=self._acked_at,
        )
        for node in found:  # each leaves the plan (`out`), so is found once
            self._restarts[node] = strike(
                self._restarts.get(node), now, forgotten_s=RESTARTS_FORGOTTEN_S
            )
            log.warning(
                "node %s heartbeats without the layers %s it took up: it restarted (%d in a row)",
                node,
                plan.layers_of(node),
                self._restarts[node][0],
            )
        free = [n for n in found if self._restarts[n][0] == 1]
        return free, [n for n in found if n not in free]

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

    def follow(self, members: Collection[NodeId]) -> None:
        """An agreed membership change. A removed member leaves the next plan, which is
        asked for at once; a new one joins as a returning node does (`policy.returning`):
        once steadily healthy, with its facts asked for, a re-plan may give it work."""
        removed = [n for n in self._members if n not in members]
        for new in sorted(set(members) - set(self._members)):
            self._members.append(new)
            self._depart(new)
        for node in removed:
            self._members.remove(node)
            self.out.discard(node)
            self.facts.pop(node, None)
        if removed:
            self._asked = f"nodes {removed} were removed from the cluster"
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
        """The first plan, over every member not evicted that reported its facts at
        start-up (or the `live` ones: a gateway taking over from a dead one); the others
        join once they are up. `store`: the gateway's; the evictions it remembers stay out
        of every plan, and those the agreed log lacks (not agreed before a restart) are
        ordered again; agreed ones replayed before now are written to it."""
        self.facts, self._store = dict(facts), store
        self._resume_suspensions()
        for node in self._members:
            if node not in facts or (live is not None and node not in live):
                self._depart(node)
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
        try:
            await self.replan(self._live())
        except ServiceUnavailable as e:  # acting all the same: /health and requests say why
            log.error("%s; trying again as nodes come back", e)

    def _live(self) -> list[NodeId]:
        """The members a new plan may use: not evicted, not failed, not out."""
        evicted = self.evicted
        return [
            n
            for n in sorted(self._members)
            if n not in evicted and n not in self.out and self._status(n) != "failed"
        ]

    def _depart(self, node: NodeId) -> None:
        """`node` leaves the plans until it has been steadily healthy for its hold."""
        if node != self.node and node not in self.out:
            self.out.add(node)
            self._strikes[node] = strike(self._strikes.get(node), self._clock())

    def _hold_s(self, node: NodeId) -> float:
        return rejoin_hold_s(self._interval, self._strikes.get(node, (1, 0.0))[0])

    async def _fetch_facts(self, nodes: list[NodeId]) -> list[NodeId]:
        """The nodes of `nodes` whose facts are known, asking those that never reported
        them (down at start-up); one that does not answer is out again."""
        known = []
        for node in nodes:
            if node not in self.facts:
                try:
                    reply, _ = await self._transport.ask(
                        node, StatusQuery(), timeout=PROBE_TIMEOUT_S, channel="control"
                    )
                except ButterflyError as e:
                    log.warning("node %s is back but did not report its facts: %s", node, e)
                    self._depart(node)
                    continue
                self.facts[node] = reply
            known.append(node)
        return known

    async def replan(self, live: list[NodeId], *, only_if_changed: bool = False) -> StagePlan:
        """Decide the next plan over the `live` nodes, agree on it, put it in force. A plan
        overtaken by an agreed eviction (every node would skip it) is decided again, and so
        is one some of whose nodes did not take it up (they are out; this node gives up
        its layers for the rest of this re-plan instead). With `only_if_changed` (nodes
        returning, nothing else asked for), a plan that would change nothing (no range
        short of holders) is not agreed, unless the plan in force is one some holder never
        took up; any other re-plan (a failure, a changed strategy, start-up, a takeover)
        is a new epoch even when its ranges stay: every node then holds a plan this
        gateway decided, by its placing. When no plan can be put in force (no node left
        could load the layers given it: a checkpoint none can load), `unserved` says why,
        in the nodes' own words, until one is, and ServiceUnavailable is raised with it."""
        refused: dict[NodeId, str] = {}  # each down node's last reason, this re-plan
        for _ in range(2 * len(self._members)):
            old, evicted = self._holder.plan, self.evicted
            live = [n for n in live if n not in evicted and n not in self.out and n not in refused]
            if not live:
                break
            decided = next_plan(old, live, evicted, self.facts, self._placing, emit=self._emit)
            # a plan some holder never took up is no reason to change nothing
            if (
                only_if_changed
                and old is not None
                and old.epoch == self._acked
                and _same_ranges(decided.plan, old)
            ):
                return old
            if decided.placement is not None:
                self.placement = decided.placement
            try:
                plan = await agree(
                    self._plans, self._propose, decided.plan, timeout_s=self._agree_timeout
                )
            except PlanNamesEvicted as e:
                log.warning("%s", e)
                continue
            # the gateway holds the plan whether or not it runs a stage: it routes by it
            members = sorted({self.node, *plan.members})

            async def apply_here(msg: PlanAssign) -> PlanAck:
                """In force here: the steps sent on the old plan fail now, not once every
                member has loaded (a joining standby may take minutes, or withhold)."""
                ack = await self._holder.apply_plan(msg)
                if ack.ok:
                    self._applied()
                return ack

            acks: dict[NodeId, float] = {}
            took = await distribute_plan(
                plan=plan,
                model_hash=self._model_hash,
                node=self.node,
                members=members,
                transport=self._transport,
                apply_local=apply_here,
                timeout_s=DISTRIBUTE_TIMEOUT_S,
                status=self._status,
                # nothing to load: an ack owed at once, or the member withholds it
                prompt=[n for n in members if self._loaded(n) == plan.layers_of(n)],
                prompt_s=PROMPT_ACK_BEATS * self._interval,
                on_ack=partial(self._ack_arrived, acks),
            )
            if not took.down:  # every holder loaded its layers: from its ack on it says so
                self._acked, self._acked_at, self._differs = plan.epoch, acks, {}
                self.unserved = None
                return plan
            log.warning(
                "nodes %s did not take up epoch %d; deciding again without them",
                list(took.down),
                plan.epoch,
            )
            refused.update(took.why)
            for node in took.down:
                self._depart(node)  # out, with a strike: not blamed (`suspend`, `evict`)
        self.unserved = not_served(refused)
        raise ServiceUnavailable(self.unserved)

    def _ack_arrived(self, acks: dict[NodeId, float], node: NodeId) -> None:
        acks.setdefault(node, self._clock())

    async def run(self, on_replanned: Callable[[], None]) -> None:
        """Re-plan whenever a node of the plan is gone, or a re-plan was asked for;
        `on_replanned` (the engine's) is
        given here rather than at construction: the engine is built after this object,
        whose `evict_liars` it calls."""
        self._applied = on_replanned
        try:
            await self._watch()
        finally:  # no longer acting (or stopping): what it was agreeing ends with it
            for ordering in list(self._ordering):
                ordering.cancel()

    async def _watch(self) -> None:
        while True:
            # woken by a failure or an eviction; every interval too, to see nodes return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._wake.wait()
            self._wake.clear()
            plan = self._holder.plan
            if plan is None:
                continue
            restarts, again = self._restarted(plan)
            if again:
                await self.suspend(
                    tuple(again),
                    f"restarted again within {RESTARTS_FORGOTTEN_S:.0f} s of its last "
                    "restart, leaving the work it took up undone",
                )
            # a removed member reads as failed too, but left by an agreed change
            # (`follow` asked for the re-plan): no failure, no strike
            away = self.evicted | self._suspended  # what `gone` leaves out besides failures
            newly = [n for n in gone(plan, self._status, away) if n in self._members]
            newly += [n for n in restarts if n not in newly]  # failed, unseen by the detector
            for n in newly:
                self._depart(n)
            back = [
                n
                for n in returning(self.out, self.evicted, self._back_for, self._hold_s)
                if n not in newly
            ]
            asked, self._asked = self._asked, None
            if not newly and not back and asked is None:
                continue
            for n in newly:
                if n not in self.failed:
                    self.failed.add(n)
                    if n not in away:  # an eviction or a suspension, not a node failure
                        self._emit(NodeFailure(node=n))
            returned, back = back, await self._fetch_facts(back)
            self.out.difference_update(back)
            self.failed.difference_update(back)  # a later failure is a new one
            for n in back:
                self._suspended.discard(n)  # its timeouts count afresh (`unresponsive`)
            live = self._live()
            started = time.perf_counter()
            why = (
                f"nodes {newly} failed"
                if newly
                else f"nodes {back} are back"
                if back
                else asked or f"nodes {returned} are back but gave no facts"
            )
            log.warning("%s; re-planning epoch %d over %s", why, plan.epoch + 1, live)
            try:
                await self.replan(live, only_if_changed=not newly and asked is None)
            except ButterflyError as e:
                log.error("re-planning (%s) failed: %s; retrying", why, e)
                self._asked = self._asked or asked
                self.out.update(back)  # taken back by the next attempt, with no new strike
                await asyncio.sleep(RETRY_S)
                self._wake.set()
                continue
            self._end_agreed_suspensions(back)
            if newly:
                self.recoveries.append(time.perf_counter() - started)
                self._emit(RecoveryCompleted(seconds=self.recoveries[-1]))
            self._applied()


def _same_ranges(a: StagePlan, b: StagePlan) -> bool:
    return (a.stages, a.replicas) == (b.stages, b.replicas)


__all__ = ["EvictionStore", "PlanHolder", "Recovery"]
