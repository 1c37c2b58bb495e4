"""The gateway's HTTP side follows the config: tokens, limits and the queue at once.

    option                                   applied by
    api.tokens                               the bearer check: the next request (a
                                             removed token gets 401)
    api.rate_limit, api.rate_limit_burst     the rate limiter: the next request
    api.metrics_public                       the token check: the next request
    api.max_prompt_bytes                     the prompt size check: the next request
    api.stream_verified_only                 streams started from then on
    scheduling.max_new_tokens_limit,         the gateway's request limits: the next
      scheduling.default_max_new_tokens      request
    scheduling.policy, max_queue,            the scheduler: waiting tasks are re-ordered
      dispatch_batch_size                    and the next dispatch uses the new limits

The scheduler belongs to the event loop, and a config change may come from another
thread (the file watcher), so its retune is handed to the loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

from fastapi import FastAPI

from butterfly.api.gateway import Gateway
from butterfly.api.guards import BearerAuth, RateLimiter
from butterfly.config import ButterflyConfig
from butterfly.config.reload import ConfigManager
from butterfly.schedule.queue import QueuePolicy
from butterfly.schedule.scheduler import Scheduler


def retune_app(app: FastAPI, cfg: ButterflyConfig) -> None:
    """Apply `cfg`'s API options to the routes of `app` (built by `create_app`)."""
    a, s = cfg.api, cfg.scheduling
    bearer: BearerAuth = app.state.bearer_auth
    limiter: RateLimiter = app.state.rate_limiter
    gw: Gateway = app.state.gateway
    bearer.retune(frozenset(a.tokens))
    limiter.retune(a.rate_limit, a.rate_limit_burst)
    gw.settings = dataclasses.replace(
        gw.settings,
        max_new_tokens_limit=s.max_new_tokens_limit,
        default_max_new_tokens=s.default_max_new_tokens,
        metrics_public=a.metrics_public,
        max_prompt_bytes=a.max_prompt_bytes,
        stream_verified_only=a.stream_verified_only,
    )


def retune_scheduler(scheduler: Scheduler, cfg: ButterflyConfig) -> None:
    s = cfg.scheduling
    scheduler.retune(
        max_concurrent=max(1, s.dispatch_batch_size),
        queue_capacity=s.max_queue,
        policy=QueuePolicy(s.policy),
    )


def follow_config(
    manager: ConfigManager, *, app: FastAPI, scheduler: Scheduler
) -> Callable[[], None]:
    """Subscribe the gateway's app and scheduler, on the event loop, until the returned
    function is called (when the node hands the role on: each time it took the role
    again, another app and scheduler were subscribed, and the old ones kept being
    retuned). They take the current config first: a change agreed while the gateway was
    still gathering facts, after they were configured from the start-up values, is not
    lost."""
    loop = asyncio.get_running_loop()
    retune_app(app, manager.current)
    retune_scheduler(scheduler, manager.current)

    def scheduler_follows(old: ButterflyConfig, new: ButterflyConfig) -> None:
        loop.call_soon_threadsafe(retune_scheduler, scheduler, new)

    subscribed = (
        manager.subscribe("api", lambda old, new: retune_app(app, new)),
        manager.subscribe("scheduler", scheduler_follows),
    )

    def unfollow() -> None:
        for unsubscribe in subscribed:
            unsubscribe()

    return unfollow


__all__ = ["follow_config", "retune_app", "retune_scheduler"]
