"""A gateway-capable node's service: the API, the task store, the plan, the scheduler.

Every gateway-capable node (`cluster.gateways`) runs `Gateway.serve`. One of them acts
(`control.gateway_role`); it serves the tasks: the scheduler over the pipeline engine,
the HTTP API, and the loops that keep the cluster whole (recovery, config-change
monitoring, the copies to the standbys: `wiring.standby`). The others stand by: their
API redirects to the acting one, their store takes the copies, and the successor of a
failed gateway proposes its takeover. Once the agreement executed it, the new gateway
gathers the live nodes' facts, re-plans without the dead (recovery promotes the
standbys of its stages), re-queues the unfinished tasks its store holds and serves them,
each resuming from its checkpoint. A gateway that learns from the agreed log that
another one acts stops serving and stands by.

At start the first gateway asks the nodes that are up (any n - f, after a short wait for
the rest) for their measured facts and decides and distributes the first plan over them
without the nodes its store remembers as evicted (`control.recovery`; the others join
once they are up).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Collection, Coroutine
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from butterfly.agreement.config_coordinator import ConfigCoordinator
from butterfly.api.app import create_app
from butterfly.api.guards import SameOrigin
from butterfly.api.live import follow_config as follow_api_config
from butterfly.api.settings import ApiSettings
from butterfly.api.standby import standby_app
from butterfly.api.switch import RoleSwitch
from butterfly.config import ConfigManager
from butterfly.config.gateways import api_port, gateway_urls
from butterfly.control.gateway_role import GatewayRole
from butterfly.control.live_config import agreement_wait_s
from butterfly.control.plans import Propose
from butterfly.control.recovery import Recovery
from butterfly.control.rollout import START_GRACE_BEATS, gather_status
from butterfly.control.status import NodeReport
from butterfly.dataplane.engine import PipelineEngine
from butterfly.metrics.prometheus import Metrics
from butterfly.net.transport import Transport
from butterfly.runtime.tokenizer import TextCodec
from butterfly.schedule.queue import QueuePolicy
from butterfly.schedule.scheduler import Scheduler, expire_finished
from butterfly.schedule.store import TaskStore
from butterfly.types.errors import ButterflyError
from butterfly.types.ids import NodeId
from butterfly.types.wire.commands import TakeOver, encode_command
from butterfly.wiring.api_server import ApiServer
from butterfly.wiring.isolation import IsolationWatch
from butterfly.wiring.standby import TaskReplicas
from butterfly.wiring.supervise import supervised

log = logging.getLogger(__name__)
FACTS_TIMEOUT_S = 120.0
"""How long the gateway waits for n - f nodes to come up and report their facts."""
TAKEOVER_FACTS_TIMEOUT_S = 30.0
"""How long a gateway taking over waits for the live nodes' facts."""
SHUTDOWN_GRACE_S = 3.0
"""Running requests get this long to finish when the node stops."""
RETRY_S = 0.5
"""Wait before trying a takeover, or the plan after it, again."""
STALL_CHECK_S = 0.05
"""How often a stopping gateway looks whether its running tasks all wait for a plan."""
WATCH_S = 0.05
"""How often a standby looks at its failure detector for the acting gateway's death."""


def port_app(front: RoleSwitch, host: str, allowed_hosts: Collection[str]) -> SameOrigin:
    """The API port's app: the role's app behind the web-page guard (`api.guards`), so a
    standby's redirects and the 503 between roles answer only the `Host` names the acting
    gateway does: a page rebound to 127.0.0.1 read a standby's `/health` (which gateway
    acts, every gateway's URL) as a same-origin answer (a review). `api.host` and
    `api.allowed_hosts` need a restart, so they are read once."""
    return SameOrigin(front, bind_host=host, allowed_hosts=allowed_hosts)


@dataclass
class Gateway:
    """A gateway-capable node's parts beyond those every node has (built by
    `node.build_node`); `scheduler` is the one serving while this node acts."""

    node: NodeId
    members: Collection[NodeId]  # the roster's, live: a takeover plans over today's members
    config: ConfigManager
    transport: Transport
    report: NodeReport
    recovery: Recovery
    engine: PipelineEngine
    coordinator: ConfigCoordinator
    metrics: Metrics
    codec: TextCodec | None
    model_name: str
    role: GatewayRole
    replicas: TaskReplicas
    propose: Propose
    status: Callable[[NodeId], str]
    silence: Callable[[bool], None]  # this node's heartbeats (`wiring.isolation`)
    scheduler: Scheduler | None = field(default=None, init=False)

    async def serve(self, stop: asyncio.Event) -> None:
        """Act or stand by, as the agreed role says, until `stop` is set.

        One API server listens for the whole of it (`api.switch`): the role decides which
        app answers, so the port never refuses a client while the node runs.
        """
        store = self.replicas.store  # opened before the first plan: its evictions stay out
        first = True
        cfg = self.config.current
        front = RoleSwitch(
            int(self.node),
            health=lambda: {"acting_gateway": self.role.acting, "gateways": self.gateways()},
        )
        server = ApiServer(
            port_app(front, cfg.api.host, cfg.api.allowed_hosts),
            cfg.api.host,
            api_port(cfg, self.node),
            node=self.node,
            emit=self.metrics.emit,
        )
        api = asyncio.create_task(server.serve())
        try:
            while not stop.is_set():
                if self.role.acting != self.node:
                    if not await self._stand_by(front, stop):
                        return
                    front.use(None, "is taking over as the gateway")
                    start: Coroutine[Any, Any, bool] = self._take_over(store)
                elif first:
                    front.use(None, "is making the cluster's first plan")
                    start = self._first_plan(store)
                else:
                    front.use(None, "is taking over as the gateway")
                    start = self._take_over(store)
                first = False
                planned = await _unless_stopped(self._while_acting(start), stop)
                if planned is None:
                    return
                if planned:
                    await self._serve(store, front, server, api, stop)
                elif self.role.acting == self.node:
                    await asyncio.sleep(RETRY_S)  # its plan failed: try again
                # else replaced while planning (a restarted gateway learning the log):
                # stand by at once, its API redirecting rather than answering 503
        finally:
            server.close()
            # in-flight requests end with the node's stop; a stuck one does not hold it
            await asyncio.wait({api}, timeout=SHUTDOWN_GRACE_S + 1.0)
            api.cancel()
            await asyncio.gather(api, return_exceptions=True)
            self.replicas.close()

    # --- standing by --------------------------------------------------------------------

    async def _stand_by(self, front: RoleSwitch, stop: asyncio.Event) -> bool:
        """Redirect API clients and watch the acting gateway until this node acts (True)
        or `stop` is set (False); meanwhile delete the copies of tasks finished longer
        than `scheduling.result_ttl_s` ago, as the acting gateway does."""
        log.info("node %s stands by as a gateway; node %s acts", self.node, self.role.acting)
        front.use(
            standby_app(
                acting=self.role.gateway,
                acting_url=lambda: gateway_urls(self.config.current).get(self.role.acting),
                health=lambda: {"acting_gateway": self.role.acting, "gateways": self.gateways()},
            )
        )
        ttl_s = self.config.current.scheduling.result_ttl_s
        expire = partial(expire_finished, self.replicas.store, ttl_s)
        expiry = asyncio.ensure_future(supervised("result_expiry", expire, self.metrics.emit))
        watch = asyncio.ensure_future(self._watch())
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({watch, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (watch, stopped, expiry):
                t.cancel()
            await asyncio.gather(watch, stopped, expiry, return_exceptions=True)
        return not stop.is_set()

    async def _watch(self) -> None:
        """Until this node acts: when the detector sees the acting gateway failed and this
        node is its successor, propose the takeover (the other replicas check the same
        with their own detectors before they agree)."""
        while self.role.acting != self.node:
            if self.role.successor() != self.node:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(WATCH_S):
                        await self.role.changed()
                continue
            term = self.role.term + 1
            log.warning(
                "node %s: the acting gateway (node %s) failed; taking over for term %d",
                self.node,
                self.role.acting,
                term,
            )
            try:
                command = encode_command(TakeOver(self.node, term))
                await self.propose(command, agreement_wait_s(self.config.current))
            except ButterflyError as e:
                log.warning("takeover for term %d not agreed (yet): %s", term, e)
                await asyncio.sleep(RETRY_S)

    def gateways(self) -> list[dict[str, Any]]:
        """Every gateway-capable node, its API URL, and which one acts (for `/health`);
        on the acting gateway, whether each standby holds every task it holds: until
        then a standby that came back would lose the tasks accepted while it was away,
        were this gateway to die."""
        urls = gateway_urls(self.config.current)
        acting = self.role.acting == self.node
        return [
            {
                "node": int(g),
                "url": urls.get(g),
                "acting": g == self.role.acting,
                "status": self.status(g),
                **(
                    {"holds_every_task": self.replicas.holds_every_task(g)}
                    if acting and g != self.node
                    else {}
                ),
            }
            for g in self.role.gateways
        ]

    # --- acting -------------------------------------------------------------------------

    async def _first_plan(self, store: TaskStore) -> bool:
        """From the facts of the members up: any n - f of them, after a short wait for
        the rest (`rollout.START_GRACE_BEATS`); the others join once they are up."""
        cfg = self.config.current
        peers = [n for n in self.members if n != self.node]
        facts = await gather_status(
            self.transport,
            peers,
            timeout_s=FACTS_TIMEOUT_S,
            local=(self.node, self.report.status),
            need=len(self.members) - cfg.byzantine.f,
            grace_s=START_GRACE_BEATS * cfg.coordination.heartbeat_interval_ms / 1000,
        )
        await self.recovery.start(facts, store)
        if await self.replicas.pull():  # tasks a gateway accepted while this one was down
            store.requeue_unfinished()
        return True

    async def _take_over(self, store: TaskStore) -> bool:
        """The plan after a takeover, over the live nodes; False if it must be tried again.
        An unexpected error is tried again too, not raised: raised, it ended the node
        (`serve` is in the node's task group), and the cluster lost the gateway that
        was to replace the dead one over what one standby's records held (a review)."""
        evicted = self.recovery.evicted
        # failed as the role judges it: a member never heard from for long is not waited on
        live = [n for n in self.members if not self.role.failed(n) and n not in evicted]
        log.warning("node %s acts as the gateway (term %d)", self.node, self.role.term)
        try:
            facts = await gather_status(
                self.transport,
                [n for n in live if n != self.node],
                timeout_s=TAKEOVER_FACTS_TIMEOUT_S,
                local=(self.node, self.report.status),
            )
            await self.replicas.pull()  # a standby may hold tasks this one missed
            requeued = store.requeue_unfinished()
            log.info("taking over %d unfinished task(s)", len(requeued))
            await self.recovery.start(facts, store, live=live)
        except ButterflyError as e:
            log.error("taking over as the gateway: %s; trying again", e)
            return False
        except Exception:
            log.exception("taking over as the gateway failed unexpectedly; trying again")
            return False
        return True

    async def _serve(
        self,
        store: TaskStore,
        front: RoleSwitch,
        server: ApiServer,
        api: asyncio.Task[None],
        stop: asyncio.Event,
    ) -> None:
        """Serve tasks until `stop` is set or the agreed log names another gateway.

        Stopping closes the API's socket (nothing new is accepted while running tasks get
        the grace period); losing the role keeps it open and answers 503 until the node
        stands by and redirects."""
        cfg = self.config.current
        s = cfg.scheduling
        replicas = self.replicas
        isolation = IsolationWatch(
            node=self.node,
            members=self.members,
            role=self.role,
            f=lambda: self.config.current.byzantine.f,
            transport=self.transport,
            emit=self.metrics.emit,
            silence=self.silence,
        )
        scheduler = Scheduler(
            engine=self.engine,
            store=store,
            emit=self.metrics.emit,
            max_concurrent=max(1, s.dispatch_batch_size),
            queue_capacity=s.max_queue,
            policy=QueuePolicy(s.policy),
            detokenize=self.codec.continuation if self.codec else None,
            on_accepted=replicas.accepted,
            on_finished=replicas.finished,
            on_cancelled=replicas.cancelled,
            refusal=lambda: isolation.reason,
        )
        a = cfg.api
        settings = ApiSettings(
            max_request_bytes=a.max_request_bytes,
            max_new_tokens_limit=s.max_new_tokens_limit,
            default_max_new_tokens=s.default_max_new_tokens,
            api_tokens=frozenset(a.tokens),
            rate_limit_per_s=a.rate_limit,
            rate_limit_burst=a.rate_limit_burst,
            serve_metrics=cfg.metrics.enabled,
            host=a.host,
            allowed_hosts=frozenset(a.allowed_hosts),
        )
        app = create_app(
            scheduler=scheduler,
            engine=self.engine,
            codec=self.codec,
            metrics=self.metrics,
            model_name=self.model_name,
            settings=settings,
            config=self.coordinator,
            gateways=self.gateways,
        )
        # the API's live options, while this node holds the role
        unfollow = follow_api_config(self.config, app=app, scheduler=scheduler)
        emit = self.metrics.emit
        try:
            loops: dict[str, Callable[[], Awaitable[None]]] = {
                "result_expiry": partial(scheduler.expire_results, s.result_ttl_s),
                "step_batcher": self.engine.serve_batches,
                "recovery": partial(self.recovery.run, on_replanned=self.engine.plan_changed),
                "config_monitor": self.coordinator.monitor,
                "standby_copies": replicas.send_copies,
                "standby_resync": partial(replicas.keep_standbys, scheduler.adopt),
                "isolation": isolation.run,
            }
            async with asyncio.TaskGroup() as tg:
                # not supervised: its tasks live in its own task group, and a restart
                # could not give them back (its own errors end tasks, never the loop)
                dispatch = tg.create_task(scheduler.run())
                for name, loop in loops.items():
                    tg.create_task(supervised(name, loop, emit))
                front.use(app)
                self.scheduler = scheduler
                lost = tg.create_task(self._until_replaced())
                stopped = tg.create_task(stop.wait())
                await asyncio.wait({lost, stopped}, return_when=asyncio.FIRST_COMPLETED)
                self.scheduler = None
                if stop.is_set():
                    server.close()
                else:
                    front.use(None, f"hands the gateway role to node {self.role.acting}")
                # a replaced gateway's steps are refused everywhere: no grace for them
                # (they stay unfinished here; the acting gateway has its own copies)
                scheduler.shutdown(grace_s=SHUTDOWN_GRACE_S if stop.is_set() else 0.0)
                stalled = tg.create_task(self._end_grace_when_stalled(scheduler))
                # running tasks get the grace period with every loop still serving them
                # (the batcher, recovery); a stopping node's API closes its socket meanwhile
                ending = {api, dispatch} if stop.is_set() else {dispatch}
                await asyncio.wait(ending, timeout=SHUTDOWN_GRACE_S + 1.0)
                stalled.cancel()
                raise _Stopped
        except* _Stopped:
            pass
        finally:
            unfollow()

    async def _end_grace_when_stalled(self, scheduler: Scheduler) -> None:
        """End a stopping scheduler's grace once no running task can finish in it: every
        one lost a step and waits for a new plan. When the whole cluster stops, the
        stage nodes go first and each running task waits for a re-plan that never comes;
        the grace then only delayed the exit (3 s of a 3.5 s shutdown, measured)."""
        while True:
            running = scheduler.active
            if running and self.engine.waiting_for_plan >= running:
                log.info("%d running task(s) wait for a new plan: ending the grace", running)
                scheduler.end_grace()
                return
            await asyncio.sleep(STALL_CHECK_S)

    async def _while_acting(self, work: Coroutine[Any, Any, bool]) -> bool:
        """`work`'s answer, unless the agreed log names another gateway first (False,
        `work` cancelled): a restarted gateway that was replaced while it was down learns
        so as its peers replay the log to it, and must not go on planning."""
        task, replaced = asyncio.ensure_future(work), asyncio.ensure_future(self._until_replaced())
        try:
            await asyncio.wait({task, replaced}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (task, replaced):
                t.cancel()
            await asyncio.gather(task, replaced, return_exceptions=True)
        return False if task.cancelled() else task.result()

    async def _until_replaced(self) -> None:
        while self.role.acting == self.node:
            await self.role.changed()
        log.warning(
            "node %s no longer acts as the gateway: node %s does", self.node, self.role.acting
        )


async def _unless_stopped(work: Coroutine[Any, Any, bool], stop: asyncio.Event) -> bool | None:
    """Run `work` to its end (its answer; its error is raised) unless `stop` is set first
    (None; `work` is cancelled): the node's stop waits for the gateway, never for its
    start-up."""
    task, stopped = asyncio.ensure_future(work), asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, stopped):
            t.cancel()
        await asyncio.gather(task, stopped, return_exceptions=True)
    if task.cancelled():
        return None
    return task.result()


class _Stopped(Exception):
    """Unwinds the gateway's task group once its API has closed."""


__all__ = ["Gateway"]
