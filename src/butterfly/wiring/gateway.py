"""The acting gateway's start-up: facts, the first plan, then the scheduler and the API.

Node 0 opens its store (tasks, and the nodes it evicted before a restart), asks the
nodes that are up (any n - f, after a short wait for the rest) for their measured facts,
decides and distributes the first plan over them without the evicted nodes
(`control.recovery`; the others join once they are up), then serves: the scheduler over
the pipeline engine, the HTTP API, and the loops that keep the cluster whole (recovery,
config-change monitoring).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import uvicorn

from butterfly.agreement.config_coordinator import ConfigCoordinator
from butterfly.api.app import create_app
from butterfly.api.live import follow_config as follow_api_config
from butterfly.api.settings import ApiSettings
from butterfly.config import ConfigManager
from butterfly.control.recovery import Recovery
from butterfly.control.rollout import START_GRACE_BEATS, gather_status
from butterfly.control.status import NodeReport
from butterfly.dataplane.engine import PipelineEngine
from butterfly.metrics.prometheus import Metrics
from butterfly.net.transport import Transport
from butterfly.runtime.tokenizer import TextCodec
from butterfly.schedule.queue import QueuePolicy
from butterfly.schedule.scheduler import Scheduler
from butterfly.schedule.store import TaskStore
from butterfly.types.ids import NodeId
from butterfly.wiring.supervise import supervised

FACTS_TIMEOUT_S = 120.0
"""How long the gateway waits for n - f nodes to come up and report their facts."""
SHUTDOWN_GRACE_S = 3.0
"""Running requests get this long to finish when the node stops."""


@dataclass(frozen=True)
class Gateway:
    """The gateway's parts beyond those every node has (built by `node.build_node`)."""

    node: NodeId
    members: tuple[NodeId, ...]
    config: ConfigManager
    transport: Transport
    report: NodeReport
    recovery: Recovery
    engine: PipelineEngine
    coordinator: ConfigCoordinator
    metrics: Metrics
    codec: TextCodec | None
    model_name: str

    async def serve(self, stop: asyncio.Event) -> None:
        """Plan, then serve until `stop` is set (which may come during start-up)."""
        cfg = self.config.current
        data_dir = Path(cfg.node.data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        # opened before the first plan: the evictions it remembers stay out of it
        store = TaskStore(data_dir / "tasks.sqlite")
        try:
            if await _unless_stopped(self._first_plan(store), stop):
                await self._serve(store, stop)
        finally:
            store.close()

    async def _serve(self, store: TaskStore, stop: asyncio.Event) -> None:
        cfg = self.config.current
        s = cfg.scheduling
        scheduler = Scheduler(
            engine=self.engine,
            store=store,
            emit=self.metrics.emit,
            max_concurrent=max(1, s.dispatch_batch_size),
            queue_capacity=s.max_queue,
            policy=QueuePolicy(s.policy),
            detokenize=self.codec.decode if self.codec else None,
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
        )
        app = create_app(
            scheduler=scheduler,
            engine=self.engine,
            codec=self.codec,
            metrics=self.metrics,
            model_name=self.model_name,
            settings=settings,
            config=self.coordinator,
        )
        follow_api_config(self.config, app=app, scheduler=scheduler)  # the API's live options
        server = uvicorn.Server(
            uvicorn.Config(app, host=a.host, port=a.port, log_level="warning", lifespan="off")
        )
        try:
            emit = self.metrics.emit
            loops: dict[str, Callable[[], Awaitable[None]]] = {
                "result_expiry": partial(scheduler.expire_results, s.result_ttl_s),
                "step_batcher": self.engine.serve_batches,
                "recovery": partial(self.recovery.run, on_replanned=self.engine.plan_changed),
                "config_monitor": self.coordinator.monitor,
            }
            async with asyncio.TaskGroup() as tg:
                # not supervised: its tasks live in its own task group, and a restart
                # could not give them back (its own errors end tasks, never the loop)
                dispatch = tg.create_task(scheduler.run())
                for name, loop in loops.items():
                    tg.create_task(supervised(name, loop, emit))
                api = tg.create_task(server.serve())
                await stop.wait()
                server.should_exit = True
                scheduler.shutdown(grace_s=SHUTDOWN_GRACE_S)
                # running tasks get the grace period with every loop still serving them
                # (the batcher, recovery); the API closes its listening socket meanwhile
                await asyncio.wait({api, dispatch}, timeout=SHUTDOWN_GRACE_S + 1.0)
                raise _Stopped
        except* _Stopped:
            pass

    async def _first_plan(self, store: TaskStore) -> None:
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


async def _unless_stopped(work: Coroutine[Any, Any, None], stop: asyncio.Event) -> bool:
    """Run `work` to its end (True; its error is raised) unless `stop` is set first (False;
    `work` is cancelled): the node's stop waits for the gateway, never for its start-up."""
    task, stopped = asyncio.ensure_future(work), asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, stopped):
            t.cancel()
        await asyncio.gather(task, stopped, return_exceptions=True)
    if task.cancelled():
        return False
    task.result()
    return True


class _Stopped(Exception):
    """Unwinds the gateway's task group once its API has closed."""


__all__ = ["Gateway"]
