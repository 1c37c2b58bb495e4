"""The running config of one node: updates, subscribers, history, and the file watcher.

`ConfigManager` is the only holder of the current frozen config. A change is classified
by the schema's mutability: static keys are refused ("restart required: ..."), so a node
never half-applies something only a restart can change; dynamic-local keys apply at once;
dynamic-consensus keys come back as a `Proposal` for the agreement layer, which calls
`prepare` on every node and `apply_committed` once 2f+1 agreed. Subscribers see
(old, new) and may raise to reject; everyone already told is then told (new, old), and
the old config stays current. Every config that becomes current is a new history version,
rollbacks included, so history only grows and "what ran when" is never rewritten.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import watchfiles

from butterfly.config.fields import config_leaves, field_specs
from butterfly.config.issues import UpdateRefused, UpdateRejected
from butterfly.config.loader import Loaded, apply_patch, load
from butterfly.config.proposal import (
    Kind,
    Proposal,
    check_proposal,
    classify,
    propose_change,
    restart_required,
)
from butterfly.config.roster import ROSTER_KEYS
from butterfly.config.schema import ButterflyConfig, Scope
from butterfly.config.versions import (
    Change,
    ConfigHistory,
    VersionRecord,
    cluster_hash,
    config_hash,
    diff_configs,
)
from butterfly.types.errors import ConfigError

log = logging.getLogger(__name__)

Subscriber = Callable[[ButterflyConfig, ButterflyConfig], None]


@dataclass(frozen=True)
class _Sub:
    name: str
    on_change: Subscriber
    check: Subscriber | None


@dataclass(frozen=True)
class UpdateResult:
    """What an update did here (`applied`) and what awaits the cluster (`pending`)."""

    version: int
    config_hash: str
    applied: tuple[Change, ...]
    pending: Proposal | None


@dataclass(frozen=True)
class Vote:
    """A node's PREPARE answer to a proposal."""

    ok: bool
    digest: str
    reason: str = ""


class ConfigManager:
    """Holds the current config and moves it forward; safe to call from several threads."""

    def __init__(
        self,
        config: ButterflyConfig,
        history: ConfigHistory | None = None,
        *,
        source: str = "startup",
    ) -> None:
        self._lock = threading.RLock()
        self._history = history if history is not None else ConfigHistory(":memory:")
        self._subs: list[_Sub] = []
        self._config = config
        latest = self._history.latest()
        if latest is not None and latest.config_hash == config_hash(config):
            self._record = latest
        else:
            self._record = self._history.record(config, source=source, reason="start")

    @property
    def current(self) -> ButterflyConfig:
        return self._config

    @property
    def record(self) -> VersionRecord:
        """History entry of the current config (version number, hashes)."""
        return self._record

    @property
    def history(self) -> ConfigHistory:
        return self._history

    def subscribe(
        self, name: str, on_change: Subscriber, *, check: Subscriber | None = None
    ) -> Callable[[], None]:
        """Call `on_change(old, new)` on every change; returns the unsubscribe function.

        `check(old, new)` runs first for every subscriber (and alone during PREPARE), so a
        component can veto before anyone applied anything; `on_change` may still raise.
        """
        sub = _Sub(name, on_change, check)
        with self._lock:
            self._subs.append(sub)

        def unsubscribe() -> None:
            with self._lock:
                if sub in self._subs:
                    self._subs.remove(sub)

        return unsubscribe

    def update(self, patch: Mapping[str, Any], *, source: str = "runtime") -> UpdateResult:
        """Apply dotted or nested `patch`: local keys now, consensus keys as a proposal."""
        with self._lock:
            candidate = apply_patch(self._config, patch, source)
            return self._move_to(candidate, source, "update", "update")

    def replace(
        self, candidate: ButterflyConfig, *, source: str, reason: str = "reload"
    ) -> UpdateResult:
        """Move to a whole new config (a reloaded file, `config update --file`)."""
        with self._lock:
            return self._move_to(candidate, source, reason, "update")

    def rollback(self, version: int, *, source: str = "rollback") -> UpdateResult:
        """Go back to `version`'s settings, recorded as a new version; the roster stays
        (`rollback_target`), and a static option that differs is refused."""
        with self._lock:
            target = rollback_target(
                self._config, self._history.config_at(version), keep_static=False
            )
            return self._move_to(target, source, f"rollback to version {version}", "rollback")

    def prepare(self, proposal: Proposal) -> Vote:
        """PREPARE: would this node accept `proposal`? Validates and asks every `check`."""
        with self._lock:
            try:
                here = self._record.cluster_hash
                candidate = check_proposal(self._config, proposal, here=here)
                self._check(self._config, candidate)
            except ConfigError as e:
                return Vote(False, proposal.digest, str(e))
            return Vote(True, proposal.digest)

    def apply_committed(self, proposal: Proposal, seq: int) -> UpdateResult:
        """COMMIT: apply an agreed proposal at agreed sequence number `seq`.

        Idempotent for a redelivered `seq`; refuses one that arrives out of order or that
        this node already applied differently (it has diverged and needs `sync`). If a
        subscriber rejects here, after the cluster committed, this node keeps its old config
        and its cluster hash no longer matches: the caller reports it and the node syncs or
        restarts, since the rest of the cluster has moved on.
        """
        with self._lock:
            last = self._history.last_cluster_seq()
            if seq <= last:
                done = self._history.by_cluster_seq(seq)
                if done is None:
                    raise UpdateRefused(f"sequence {seq} arrived after {last}; apply in order")
                if done.cluster_hash == proposal.new_cluster_hash:
                    return UpdateResult(self._record.version, self._record.config_hash, (), None)
                raise UpdateRefused(f"sequence {seq} was applied here with another config; sync")
            candidate = check_proposal(self._config, proposal, here=self._record.cluster_hash)
            changes = diff_configs(self._config, candidate)
            reason = f"{proposal.kind} {proposal.digest[:12]} {proposal.reason}".strip()
            self._activate(candidate, f"cluster seq {seq}", reason, seq)
            return UpdateResult(self._record.version, self._record.config_hash, changes, None)

    def sync_to(self, values: Mapping[str, Any], *, seq: int, expected_hash: str) -> UpdateResult:
        """Adopt the cluster-scoped settings peers agree on (`sync`, catch-up after a gap)."""
        with self._lock:
            specs = field_specs()
            foreign = [k for k in values if k not in specs or specs[k].scope is not Scope.CLUSTER]
            if foreign:
                raise UpdateRefused(f"sync carries node-local keys: {foreign}", foreign)
            candidate = apply_patch(self._config, values, f"sync to seq {seq}")
            if cluster_hash(candidate) != expected_hash:
                raise UpdateRefused("sync values do not produce the expected cluster hash")
            parts = classify(diff_configs(self._config, candidate))
            if parts.static:
                raise restart_required(parts.static)
            self._activate(candidate, f"sync seq {seq}", "sync", seq)
            return UpdateResult(
                self._record.version, self._record.config_hash, parts.consensus + parts.local, None
            )

    def _move_to(
        self, candidate: ButterflyConfig, source: str, reason: str, kind: Kind
    ) -> UpdateResult:
        parts = classify(diff_configs(self._config, candidate))
        if parts.static:
            raise restart_required(parts.static)
        local_cfg = self._config
        if parts.local:
            local_cfg = apply_patch(self._config, {c.key: c.new for c in parts.local}, source)
        pending = None
        if parts.consensus:
            pending = propose_change(local_cfg, candidate, kind=kind, reason=reason)
        if parts.local:
            self._activate(local_cfg, source, reason, None)
        return UpdateResult(self._record.version, self._record.config_hash, parts.local, pending)

    def check(self, candidate: ButterflyConfig) -> None:
        """Would every subscriber's `check` let this node move to `candidate` now? Raises
        `UpdateRejected` if not; applies nothing either way. For a caller that must know
        before it commits something else: the gateway, before it orders the cluster-wide
        half of a change whose node-local half would then be refused here."""
        with self._lock:
            self._check(self._config, candidate)

    def _check(self, old: ButterflyConfig, new: ButterflyConfig) -> None:
        for sub in list(self._subs):
            if sub.check is not None:
                try:
                    sub.check(old, new)
                except Exception as e:
                    raise _rejected(sub, e, old, new) from e

    def _activate(self, new: ButterflyConfig, source: str, reason: str, seq: int | None) -> None:
        old = self._config
        self._check(old, new)
        told: list[_Sub] = []
        for sub in list(self._subs):
            try:
                sub.on_change(old, new)
            except Exception as e:
                for done in reversed(told):
                    try:
                        done.on_change(new, old)
                    except Exception:
                        log.exception("subscriber %s failed to revert a config change", done.name)
                raise _rejected(sub, e, old, new) from e
            told.append(sub)
        self._config = new
        self._record = self._history.record(new, source=source, reason=reason, cluster_seq=seq)


def _rejected(
    sub: _Sub, reason: Exception, old: ButterflyConfig, new: ButterflyConfig
) -> UpdateRejected:
    """`sub`'s refusal of the move from `old` to `new`, naming the options it touched."""
    return UpdateRejected(sub.name, reason, [c.key for c in diff_configs(old, new)])


def rollback_target(
    current: ButterflyConfig, earlier: ButterflyConfig, *, keep_static: bool
) -> ButterflyConfig:
    """What a rollback from `current` to `earlier` moves to: `earlier`'s settings, except
    the roster (`config.roster.ROSTER_KEYS`), which stays `current`'s.

    The roster moves only through the agreement (add-member / remove-member): an earlier
    one would bring a removed id back or drop an added member, so no rollback, offline
    (`butterfly config rollback` without --url) or agreed (`ConfigCoordinator.rollback`),
    may change it. `keep_static`: static options stay `current`'s too (the agreed path:
    they changed by a restart and only a restart changes them back); without it they are
    taken from `earlier`, and the manager refuses them as needing a restart.
    """
    specs = field_specs()
    values = {
        k: v
        for k, v in config_leaves(earlier).items()
        if k not in ROSTER_KEYS and not (keep_static and specs[k].mutability.requires_restart)
    }
    return apply_patch(current, values, "rollback")


def reload_files(
    manager: ConfigManager,
    files: Sequence[Path | str],
    *,
    since: Loaded | None,
    env: Mapping[str, str] | None = None,
) -> tuple[UpdateResult | None, Loaded]:
    """Load `files` again and apply what their edit changed: only the options whose value
    in the files moved since `since` (their last load), as an update would (None: nothing
    moved). A file saved unchanged, or touched, moved none: taking the files whole undid
    every change made at run time (a token required through the API was gone at the next
    touch of the file). Without `since`, this node's own options where the files differ
    from the running config (an edit before the files were followed)."""
    loaded = load(files, env=env)
    if since is None:  # the node's own options as the files have them now
        specs, running = field_specs(), config_leaves(manager.current)
        mine = {k for k, spec in specs.items() if spec.scope is Scope.NODE}
        before = {k: v for k, v in running.items() if k in mine}
        after = {k: v for k, v in config_leaves(loaded.config).items() if k in mine}
    else:
        before, after = config_leaves(since.config), config_leaves(loaded.config)
    moved = {k: v for k, v in after.items() if before.get(k) != v}
    if not moved:
        return None, loaded
    return manager.update(moved, source=f"file {files[0]}"), loaded


async def follow_files(
    manager: ConfigManager,
    files: Sequence[Path | str],
    *,
    stop: asyncio.Event,
    env: Mapping[str, str] | None = None,
    on_result: Callable[[UpdateResult], None] | None = None,
    on_error: Callable[[ConfigError], None] | None = None,
    debounce_ms: int = 100,
    force_polling: bool | None = None,
) -> None:
    """Reload whenever a config file (or an include) changes, until `stop`: what a running
    node does with the files it started from (`butterfly start --config`).

    On the event loop, so the components' subscribers run where the components live, as
    for an update through the API, and only what the edit changed (`reload_files`). A
    file that fails to parse or validate, or that changes static keys, leaves the running
    config as it is; the error goes to `on_error` and the log, and the next edit is
    weighed against the files as they were last applied. The files' directories are
    watched (not their subdirectories), so editors that save by rename are seen too; an
    include added in another directory is watched from then on. A result with `pending`
    set carries cluster-wide changes, which one node's file does not make: `on_result`
    decides (the node logs them, to be agreed with `butterfly config update --url`).
    """
    last: Loaded | None = None
    try:  # an edit between the node's start and now is applied first
        result, last = reload_files(manager, files, since=None, env=env)
        if result is not None and on_result is not None:
            on_result(result)
    except ConfigError as e:
        log.warning("config watcher starting on a file it cannot apply: %s", e)
    watched = {Path(f).expanduser().resolve() for f in files}
    watched |= set(last.files if last is not None else ())
    # its own debug lines about a node's log, written beside the file, would wake it again
    logging.getLogger("watchfiles").setLevel(logging.INFO)

    def relevant(_change: watchfiles.Change, path: str) -> bool:
        return Path(path).resolve() in watched

    while not stop.is_set():
        dirs = sorted({p.parent for p in watched})
        log.info("watching config files %s", sorted(map(str, watched)))
        async for _ in watchfiles.awatch(
            *dirs,
            watch_filter=relevant,
            stop_event=stop,
            debounce=debounce_ms,
            force_polling=force_polling,
            recursive=False,  # a data directory beside the file: its every write woke it
        ):
            try:
                result, last = reload_files(manager, files, since=last, env=env)
            except ConfigError as e:
                version = manager.record.version
                log.error("config reload refused, keeping version %d: %s", version, e)
                if on_error is not None:
                    on_error(e)
                continue
            if result is not None:
                applied = ", ".join(c.key for c in result.applied) or "none here"
                log.info("config file %s changed: applied %s", files[0], applied)
                if on_result is not None:
                    on_result(result)
            if not set(last.files) <= watched:  # an include added: watch its directory too
                watched |= set(last.files)
                break
