"""A node process's logging: level and format from the config, the level hot-reloaded."""

from __future__ import annotations

import json
import logging

from butterfly.config import ButterflyConfig
from butterfly.metrics.logcontext import RequestIdFilter

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s:%(request)s %(message)s"
"""`%(request)s` is " [request ID]" on a line written while serving a request, else ""."""


def configure_logging(cfg: ButterflyConfig) -> None:
    o = cfg.observability
    logging.basicConfig(  # the plan, its estimate and the measured facts are logged at info
        level=o.log_level.upper(),
        format=TEXT_FORMAT,
        filename=o.log_file or None,
    )
    for handler in logging.getLogger().handlers:  # on the handler: every logger's records
        handler.addFilter(RequestIdFilter())
        if o.log_format == "json":
            handler.setFormatter(JsonLines(cfg.metadata.environment, cfg.node.id))


def set_log_level(old: ButterflyConfig, new: ButterflyConfig) -> None:
    """A config subscriber: a new log level needs no restart."""
    if old.observability.log_level != new.observability.log_level:
        logging.getLogger().setLevel(new.observability.log_level.upper())


class JsonLines(logging.Formatter):
    """observability.log_format = "json": one JSON object per line, for log shippers."""

    def __init__(self, environment: str, node: int) -> None:
        super().__init__()
        self._fixed = {"environment": environment, "node": node}

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **self._fixed,
        }
        request_id = getattr(record, "request_id", "")
        if request_id:
            line["request_id"] = request_id
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


__all__ = ["TEXT_FORMAT", "JsonLines", "configure_logging", "set_log_level"]
