"""Config errors that carry where the bad value came from.

An operator facing a refused config needs the file, the line, the key and the rule it
broke, for every problem at once rather than one per attempt; `ConfigInvalid` keeps them
as structured `ConfigIssue`s (for the API's error body) and renders one line per issue.
The runtime-update errors are not fatal: a refused update leaves the node running.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from butterfly.types.errors import ConfigError


@dataclass(frozen=True)
class ConfigIssue:
    """One broken rule. `related` are other keys the rule involves, for locating it."""

    key: str
    rule: str
    message: str
    source: str = ""
    line: int | None = None
    related: tuple[str, ...] = ()

    def at(self, source: str, line: int | None, key: str | None = None) -> ConfigIssue:
        return replace(self, source=source, line=line, key=key or self.key)

    def __str__(self) -> str:
        where = self.source or "configuration"
        if self.line is not None:
            where = f"{where}:{self.line}"
        key = f" {self.key}:" if self.key else ""
        return f"{where}:{key} {self.message} [rule: {self.rule}]"


class DeprecatedOption(FutureWarning):
    """A file used an old name (the specification's) for an option; the message names
    the new one. A FutureWarning, so Python shows it to the operator by default."""


class ConfigInvalid(ConfigError):
    """The configuration cannot be used; `issues` lists every reason."""

    def __init__(self, issues: Iterable[ConfigIssue]) -> None:
        self.issues = tuple(issues)
        n = len(self.issues)
        head = "invalid configuration" + (f" ({n} problems)" if n > 1 else "")
        super().__init__(head + ":\n  " + "\n  ".join(str(i) for i in self.issues))


class UpdateRefused(ConfigError):
    """A runtime update that cannot apply as asked (static keys, stale or bad proposal)."""

    fatal = False

    def __init__(self, message: str, keys: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.keys = tuple(keys)


class UpdateRejected(ConfigError):
    """A subscriber refused the new config; the old one stays in force everywhere.
    `keys` are the options the refused change touched, so the operator reading the
    answer knows which to leave out even when the subscriber's reason does not say."""

    fatal = False

    def __init__(self, subscriber: str, reason: BaseException, keys: Iterable[str] = ()) -> None:
        self.keys = tuple(keys)
        of = f" of {', '.join(self.keys)}" if self.keys else ""
        super().__init__(f"update{of} rejected by {subscriber}: {reason}")
        self.subscriber = subscriber
        self.reason = reason
