"""`GET /metrics` on a node that serves no HTTP API (`metrics.listen`).

Only the acting gateway runs the HTTP API, but the figures an operator sizes a cluster by
live on every node: each stage's step latency, its hops to the next node, its KV-cache
bytes. Prometheus scrapes every node, so every node can serve its own registry here.

A few lines of asyncio rather than prometheus-client's threaded server: the node keeps
one concurrency model (its event loop), the server stops with the node's task group, and
a scrape reads the collectors on the loop thread, where the stage server's tables change.
Anything but `GET /metrics` gets a 404; a request line or header over the limits, or a
client that sends nothing within the timeout, is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from butterfly.metrics.prometheus import CONTENT_TYPE

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 8192
"""A scrape's request line and headers fit in far less; a larger head is refused."""
READ_TIMEOUT_S = 5.0


def _response(status: str, body: bytes, content_type: str) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class MetricsServer:
    """Serves `render()` at `GET /metrics` on `host:port` until `close`."""

    def __init__(self, listen: str, render: Callable[[], bytes]) -> None:
        host, _, port = listen.rpartition(":")
        self._host, self._port = host.strip("[]"), int(port)
        self._render = render
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The bound port (the one asked for, or the kernel's choice for 0)."""
        if self._server is None or not self._server.sockets:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(
                self._serve, self._host, self._port, limit=MAX_HEAD_BYTES
            )
        except OSError as e:  # a bare "address already in use" named no setting
            raise OSError(
                e.errno, f"metrics.listen {self._host}:{self._port} cannot be served: {e}"
            ) from e
        log.info("metrics at http://%s:%d/metrics", self._host, self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
            method, path, *_ = [*head.split(b"\r\n", 1)[0].decode("latin-1").split(" "), "", ""]
            if method == "GET" and path.split("?", 1)[0] == "/metrics":
                writer.write(_response("200 OK", self._render(), CONTENT_TYPE))
            else:
                writer.write(_response("404 Not Found", b"GET /metrics only\n", "text/plain"))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a client that sends nothing, too much or half a request gets nothing
        except (ConnectionError, OSError) as e:
            log.debug("metrics client went away: %s", e)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None


__all__ = ["MetricsServer"]
