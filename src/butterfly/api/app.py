"""The gateway's FastAPI app: the contract of DESIGN.md section 2.

Thin by design: each endpoint validates its input, sends one command to the scheduler
(submit, cancel) or reads from it (snapshot, wait, stream), and shapes the answer. It
owns no task state, so the app can be rebuilt or served by several workers' worth of
routes without any of them disagreeing about a task.

`create_app` is a factory with keyword-only injection; there is no module-level app.
The scheduler's `run()` is driven by whoever composes the node, next to uvicorn.

Access (butterfly.api.guards): with `api.tokens` set every request needs a bearer token
but `/health` (and `/metrics` with `api.metrics_public`); `/inference` and
`/v1/completions` are rate limited per verified principal, else per address; what a web
page sends through a visitor's browser is refused, tokens or not (`SameOrigin`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from butterfly.agreement.config_coordinator import ConfigCoordinator
from butterfly.api import config_routes, errors, openai, openapi_docs
from butterfly.api.gateway import Gateway, accepted_body, status_body
from butterfly.api.guards import BearerAuth, RateLimiter, RequireToken, SameOrigin, client_key
from butterfly.api.openai_schema import ChatCompletionRequest, CompletionRequest
from butterfly.api.requests import InferenceRequest, parse
from butterfly.api.settings import ApiSettings
from butterfly.metrics.prometheus import CONTENT_TYPE, Metrics
from butterfly.runtime.tokenizer import TextCodec
from butterfly.schedule.engine import ClusterHealth, Engine
from butterfly.schedule.scheduler import Scheduler
from butterfly.types.tasks import SamplingParams

OPEN = frozenset({"/health"})
"""Paths served without a token when `api.tokens` is set: a load balancer's probe."""
OPEN_WITH_METRICS = OPEN | {"/metrics"}  # with api.metrics_public

WaitSeconds = Annotated[float, Query(description="Seconds to wait for the result.")]


def create_app(
    *,
    scheduler: Scheduler,
    engine: Engine,
    codec: TextCodec | None,
    metrics: Metrics,
    model_name: str,
    settings: ApiSettings,
    config: ConfigCoordinator | None = None,
    gateways: Callable[[], list[dict[str, Any]]] | None = None,
) -> FastAPI:
    """`gateways`: every gateway-capable node with its API URL, for `/health`."""
    gw = Gateway(scheduler, engine, codec, settings, model_name)
    bearer = BearerAuth(settings.api_tokens)
    auth = Depends(bearer)
    limiter = RateLimiter(
        settings.rate_limit_per_s, settings.rate_limit_burst, partial(client_key, bearer)
    )
    limited = Depends(limiter)
    app = FastAPI(title="Butterfly gateway", version="1")
    # retuned at run time by config changes (butterfly.api.live)
    app.state.rate_limiter, app.state.bearer_auth, app.state.gateway = limiter, bearer, gw
    errors.install(app, retry_after_s=settings.retry_after_s)

    def open_paths() -> frozenset[str]:
        """What needs no token even when tokens are set (read per request: live)."""
        return OPEN_WITH_METRICS if gw.settings.metrics_public else OPEN

    app.add_middleware(RequireToken, bearer=bearer, open_paths=open_paths)
    # outermost (added last): a web page's request is refused before anything else
    app.add_middleware(SameOrigin, bind_host=settings.host, allowed_hosts=settings.allowed_hosts)

    @app.post(
        "/inference",
        dependencies=[limited],
        status_code=202,
        openapi_extra=openapi_docs.body_of(InferenceRequest),
        responses=openapi_docs.errors(400, 401, 409, 413, 429, 500, 503),
    )
    async def inference(request: Request) -> Response:
        """Accept a task: 202 with its id, or with `wait: true` its result."""
        body = await parse(request, InferenceRequest, settings.max_request_bytes)
        if body.input is not None:
            task = gw.vector_task(body.input, body.priority)
        else:
            given = body.input_ids or []
            ids = await gw.encode(body.prompt) if body.prompt is not None else list(given)
            sampling = SamplingParams(body.temperature, body.top_k, body.top_p, body.seed)
            field = "prompt" if body.prompt is not None else "input_ids"  # as errors name it
            task = gw.token_task(
                ids, body.max_new_tokens, sampling, body.priority, prompt_field=field
            )
        snap = await scheduler.submit(task)
        if body.wait:
            return await gw.waited(task.task_id, request.is_disconnected)
        headers = {"Location": f"/result/{task.task_id}"}
        return JSONResponse(accepted_body(snap), status_code=202, headers=headers)

    @app.get("/status/{task_id}", responses=openapi_docs.errors(401, 404, 500))
    async def status(task_id: str) -> dict[str, Any]:
        return status_body(await scheduler.snapshot(task_id))

    @app.get(
        "/result/{task_id}",
        responses={
            202: {"description": "Not finished yet."},
            **openapi_docs.errors(400, 401, 404, 409, 429, 500, 503),
        },
    )
    async def result(task_id: str, wait: WaitSeconds = 0.0, proofs: bool = False) -> Response:
        """The finished result (200), 202 while it is still running, or the task's error;
        `proofs=true` adds the signed record of every stage step behind it."""
        return gw.outcome(await scheduler.wait(task_id, gw.wait_limit(wait)), proofs=proofs)

    @app.delete(
        "/tasks/{task_id}",
        dependencies=[auth],
        responses=openapi_docs.errors(401, 404, 409, 500, 503),
    )
    async def cancel(task_id: str) -> dict[str, Any]:
        return accepted_body(await scheduler.cancel(task_id))

    @app.get("/health", responses={503: {"description": "Not healthy (the same body)."}})
    async def health() -> JSONResponse:
        body = health_body(engine.health(), scheduler)
        if config is not None:  # flagged, not unhealthy: a diverged node still computes
            body["config"] = config.health()
            body["services"]["config"] = "ok" if body["config"]["in_sync"] else "diverged"
        if gateways is not None:
            body["gateways"] = gateways()
        return JSONResponse(body, status_code=200 if body["healthy"] else 503)

    # HEAD too, as GET without the body: load balancers probe with it (405 before: a
    # review); out of the schema, where a second method of one route is a duplicate id
    app.add_api_route("/health", health, methods=["HEAD"], include_in_schema=False)

    if settings.serve_metrics:

        @app.get("/metrics", response_class=PlainTextResponse, responses=openapi_docs.ERRORS)
        async def prometheus() -> Response:
            return Response(metrics.render(), media_type=CONTENT_TYPE)

    app.include_router(openai.router(gw, limited))
    bodies = (InferenceRequest, CompletionRequest, ChatCompletionRequest)
    openapi_docs.install(app, bodies, model_name)
    if config is not None:
        app.include_router(
            config_routes.router(config, auth=auth, max_request_bytes=settings.max_request_bytes)
        )
    return app


def health_body(cluster: ClusterHealth, scheduler: Scheduler) -> dict[str, Any]:
    """Seed 001's health shape (`healthy`, `services`, `nodes`), plus the epoch and load."""
    services = {name: "ok" if up else "down" for name, up in cluster.services.items()}
    refusing = scheduler.refusing()  # a gateway that lost a quorum: send clients elsewhere
    services["scheduling"] = "ok" if scheduler.serving and refusing is None else "down"
    nodes = [
        {
            "id": n.node,
            "status": n.status,
            "address": n.address,
            "layers": [n.layers.start, n.layers.end] if n.layers is not None else None,
            "last_seen_s": n.last_seen_s,
            "requests": n.requests,  # KV caches held, as its last heartbeat said (0: failed)
            "evicted": n.evicted,
            "suspended_s": n.suspended_s,
        }
        for n in cluster.nodes
    ]
    return {
        "healthy": cluster.healthy and scheduler.serving and refusing is None,
        **({"refusing_tasks": refusing} if refusing is not None else {}),
        **({"unserved": cluster.unserved} if cluster.unserved is not None else {}),
        "services": services,
        "nodes": nodes,
        "epoch": cluster.epoch,
        "queue_depth": scheduler.queue_depth,
        "active_tasks": scheduler.active,
        **({"plan": dict(cluster.plan)} if cluster.plan is not None else {}),
    }


__all__ = ["OPEN", "OPEN_WITH_METRICS", "create_app", "health_body"]
