"""Which request a log line is about, without passing the id to every `log` call.

The gateway's run of a request and a stage node's handling of a step set `REQUEST_ID`
(a contextvar: each asyncio task has its own value, so concurrent requests never mix);
`RequestIdFilter` on the process's log handlers copies it onto every record, so a log
line says which request it belongs to wherever in the code it was written. Lines outside
any request carry an empty id.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar

REQUEST_ID: ContextVar[str] = ContextVar("butterfly_request_id", default="")
"""The request (or the comma-separated requests of a step batch) being worked on."""


class RequestIdFilter(logging.Filter):
    """Sets `record.request_id` (the id, or "") and `record.request` (" [request ID]" or
    "", for text formats) on every record; never drops one."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = REQUEST_ID.get()
        record.request_id = rid
        record.request = f" [request {rid}]" if rid else ""
        return True


__all__ = ["REQUEST_ID", "RequestIdFilter"]
