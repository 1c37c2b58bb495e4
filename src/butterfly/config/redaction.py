"""What a reader of a config (an API answer, a terminal, a log) sees of its secrets.

One place for every view: the config read routes and `config show` redacted `api.tokens`
while the answers of the write routes listed each changed option's old and new values in
clear, so a rollback across a token change returned every token of both versions to the
caller and `config rollback --url` printed them into scroll-back and CI logs (a review).
The key and the number of tokens still show: an operator sees that tokens changed and how
many there are, never what they are.
"""

from __future__ import annotations

from typing import Any

from butterfly.config.schema import ButterflyConfig
from butterfly.config.versions import Change

SECRETS = frozenset({"api.tokens"})
"""Dotted options whose values no view, refusal or log line repeats."""
REDACTED = "<redacted>"


def redact_value(value: Any) -> Any:
    """A secret's value as shown: each item of a list replaced, so its length shows."""
    if isinstance(value, list):
        return [REDACTED for _ in value]
    return REDACTED if value else value


def public_config(cfg: ButterflyConfig) -> dict[str, Any]:
    """`cfg` as JSON data with every secret redacted."""
    data = cfg.model_dump(mode="json")
    for key in SECRETS:
        section, name = key.split(".")
        data[section][name] = redact_value(data[section][name])
    return data


def public_change(change: Change) -> Change:
    """`change` with its values redacted if its option is a secret."""
    if change.key not in SECRETS:
        return change
    return Change(change.key, redact_value(change.old), redact_value(change.new))
