"""The HTTP API of a gateway-capable node that is not acting: it points clients on.

Every request but `/health` (`/openapi.json` and `/docs` too) is answered `307 Temporary
Redirect` to the same path on the acting gateway (307 keeps the method and the body, so a
POST is re-sent as a POST);
`/health` says which node acts and lists every gateway-capable node with its API URL, and
answers 503 (this node serves no tasks). When the acting gateway's URL is not known
(`api.port = 0`), requests get 503 naming the acting node. HEAD is answered as GET is
(a load balancer's probe of `/health` read 405 here, a review), and a method no route
takes gets the contract's error shape, as on the acting gateway.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from butterfly.api import errors
from butterfly.api.errors import error_response

METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"]


def standby_app(
    *,
    acting: Callable[[], int],
    acting_url: Callable[[], str | None],
    health: Callable[[], dict[str, Any]],
) -> FastAPI:
    """`acting`: the acting gateway's id; `acting_url`: its API URL (None: unknown);
    `health`: the body of `/health` (the `gateways` list and this node's view)."""
    # no schema or docs of its own: /openapi.json and /docs redirect like every route, so
    # a client generated from a standby's URL gets the acting gateway's API (the
    # standby's own described only this catch-all)
    app = FastAPI(
        title="Butterfly standby gateway", version="1", openapi_url=None, docs_url=None,
        redoc_url=None,
    )  # fmt: skip
    # `error_response`'s own Retry-After, as the catch-all's 503 below sends it
    errors.install(app, retry_after_s=1)

    # HEAD here too: the catch-all takes HEAD, and would send a probe of /health on.
    # Out of the schema, as every route here (there is none to serve, but a 405's
    # `Allow` is read from it, where a route of several methods is a duplicate id)
    @app.api_route("/health", methods=["GET", "HEAD"], include_in_schema=False)
    async def standby_health() -> JSONResponse:
        return JSONResponse({"healthy": False, **health()}, status_code=503)

    @app.api_route("/{path:path}", methods=METHODS, include_in_schema=False)
    async def redirect(request: Request, path: str) -> Response:
        url = acting_url()
        if url is None:
            message = (
                f"this node is a standby gateway; node {acting()} acts as the gateway "
                "(its API URL is not known here: api.port is 0)"
            )
            return error_response(503, "service_unavailable", message)
        query = f"?{request.url.query}" if request.url.query else ""
        return RedirectResponse(f"{url}{request.url.path}{query}", status_code=307)

    return app


__all__ = ["standby_app"]
