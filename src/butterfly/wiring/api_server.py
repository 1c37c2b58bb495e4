"""A gateway-capable node's HTTP API, bound again with backoff while its port is taken.

uvicorn ends a server whose port it cannot bind with `sys.exit`: a `SystemExit` that an
asyncio task hands straight to the event loop, so the acting gateway that took over on a
port another process held died with every other role it had (its stages, its votes). The
API is one of the node's supervised loops instead: the failure is logged with the
address, counted (`butterfly_loop_restarts_total{loop="api"}`) and the bind tried again
after a backoff (`supervise.restart_delay`), while the node serves everything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import uvicorn
from starlette.types import ASGIApp

from butterfly.metrics.events import Emit, LoopRestarted
from butterfly.types.ids import NodeId
from butterfly.wiring.supervise import restart_delay

log = logging.getLogger(__name__)


class ApiServer:
    """One uvicorn server at a time on `host:port`, until `close()`."""

    def __init__(
        self,
        app: ASGIApp,
        host: str,
        port: int,
        *,
        node: NodeId,
        emit: Emit,
        delay: Callable[[int], float] = restart_delay,
    ) -> None:
        """`delay(failures)` is the wait before bind attempt `failures + 1`."""
        self._app, self._host, self._port = app, host, port
        self._node, self._emit, self._delay = node, emit, delay
        self._server: uvicorn.Server | None = None
        self._closed = asyncio.Event()
        self.bind_failures = 0

    @property
    def serving(self) -> bool:
        """Whether the current server has bound its port and serves."""
        return self._server is not None and self._server.started

    def close(self) -> None:
        """Stop serving (the current server closes its socket) and stop retrying."""
        self._closed.set()
        if self._server is not None:
            self._server.should_exit = True

    async def serve(self) -> None:
        """Serve until `close()`; a bind failure waits and tries again."""
        while not self._closed.is_set():
            self._server = uvicorn.Server(
                uvicorn.Config(
                    self._app, host=self._host, port=self._port, log_level="warning", lifespan="off"
                )
            )
            try:
                await self._server.serve()
                return  # closed (or a signal uvicorn caught: the node is stopping)
            except SystemExit:  # uvicorn's answer to a port it cannot bind
                self.bind_failures += 1
                wait = self._delay(self.bind_failures)
                log.error(
                    "node %s: the gateway API cannot listen on %s:%d (the port is taken "
                    "by another process, or the address is not this host's); the node keeps "
                    "its other roles and tries again in %.1f s",
                    self._node,
                    self._host,
                    self._port,
                    wait,
                )
                self._emit(LoopRestarted("api"))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._closed.wait()


__all__ = ["ApiServer"]
