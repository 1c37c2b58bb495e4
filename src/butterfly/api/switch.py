"""The one app behind a gateway-capable node's API port, whatever role the node plays.

The port used to be served by one uvicorn server per role: the acting gateway's closed
when the node lost the role, the standby's opened after, and while the node planned its
first plan or a takeover nothing listened at all. A client (or a load balancer's health
check) then got "connection refused" from a node that was running and would act a moment
later, indistinguishable from a dead one. Now the socket stays open for the node's life
and `RoleSwitch` hands each request to the app of the role the node plays at that
moment: the acting gateway's, a standby's (a redirect to the acting one), or, between
roles, `503` with `Retry-After` naming why (`GET /health` then also says `healthy:
false` with the node's view of the gateways, as a standby's does, so a poller reads
one shape whatever the role). Keep-alive connections survive a role change: their next
request goes to the new role's app.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from butterfly.api.errors import error_response


class RoleSwitch:
    """An ASGI app forwarding to `current`; None answers 503 (`between`)."""

    def __init__(self, node: int, health: Callable[[], dict[str, Any]] = dict) -> None:
        """`health`: what `/health` adds between roles (the acting gateway, `gateways`)."""
        self.node, self._health = node, health
        self.current: ASGIApp | None = None
        self.between = "is starting"

    def use(self, app: ASGIApp | None, between: str = "is changing its gateway role") -> None:
        """Serve `app` from the next request on; None: answer 503 saying the node `between`."""
        self.current = app
        if app is None:
            self.between = between

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = self.current
        if app is not None:
            await app(scope, receive, send)
            return
        if scope["type"] != "http":
            return  # lifespan is off; websockets are not served
        message = (
            f"node {self.node} {self.between} and serves no requests yet; "
            "try again, or another gateway in GET /health's `gateways`"
        )
        extra = {"healthy": False, **self._health()} if scope["path"] == "/health" else None
        await error_response(503, "service_unavailable", message, extra=extra)(scope, receive, send)


__all__ = ["RoleSwitch"]
