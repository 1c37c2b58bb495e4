"""`butterfly config ...`: check, show, document and change this node's configuration.

Without `--url` everything here works on local files and the node's history database,
without a running cluster; changes that need cluster agreement are then applied only when
the cluster is this one node (a quorum of one), otherwise refused before anything changes.
Node-local options are refused there too: the node's files decide them when it starts.
`update` and `rollback` without `--url` are refused while a node runs on the data
directory (`config.data_lock`): it would not see the change until its next start.
With `--url` (`show`, `update`, `rollback`, `sync`) they go to a running cluster's gateway
(see `config_remote`).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer

from butterfly.cli import config_remote as remote
from butterfly.cli.paths import data_dir as default_data_dir
from butterfly.cli.report import err, fail, say
from butterfly.config import (
    ButterflyConfig,
    Change,
    ConfigHistory,
    ConfigManager,
    UpdateRefused,
    UpdateResult,
    VersionRecord,
    aliases,
    cluster_hash,
    cluster_size,
    config_hash,
    diff_configs,
    dump_toml,
    load_config,
    rollback_target,
)
from butterfly.config.data_lock import lock_data_dir
from butterfly.config.proposal import classify, restart_required
from butterfly.config.redaction import public_change, public_config
from butterfly.config.template import template as render_template
from butterfly.protocol.keys import missing_keys
from butterfly.types.errors import ButterflyError, ConfigError

app = typer.Typer(no_args_is_help=True)

ConfigOpt = Annotated[
    list[Path] | None,
    typer.Option("--config", "-c", help="Config file; repeat to layer files, last wins."),
]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override one option: KEY=VALUE, dotted key.")
]
DataDirOpt = Annotated[
    Path | None,
    typer.Option("--data-dir", help="Where the history lives (default: node.data_dir)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
UrlOpt = Annotated[
    str | None,
    typer.Option("--url", help="Gateway URL: act on the running cluster, not local files."),
]
TokenOpt = Annotated[
    str | None,
    typer.Option("--token", envvar="BUTTERFLY_API_TOKEN", help="Bearer token for --url."),
]
DEFAULT_URL = "http://127.0.0.1:8080"
MAX_LIMIT = 1_000_000
"""`history --limit` at most: beyond SQLite's 64-bit range it ended in a traceback."""


def _echo(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")


def _load(
    config: list[Path] | None, sets: list[str] | None, *, on_this_machine: bool = True
) -> ButterflyConfig:
    return load_config(
        config or [], env=os.environ, overrides=sets or [], on_this_machine=on_this_machine
    )


def _data_dir(config: list[Path] | None, data_dir: Path | None) -> Path:
    if data_dir is not None:
        return data_dir
    cfg = _load(config, None) if config else None
    return Path(cfg.node.data_dir) if cfg and cfg.node.data_dir else default_data_dir()


def _history(config: list[Path] | None, data_dir: Path | None) -> ConfigHistory:
    return ConfigHistory.in_data_dir(_data_dir(config, data_dir))


@contextlib.contextmanager
def _changing(config: list[Path] | None, data_dir: Path | None) -> Iterator[ConfigHistory]:
    """The history, for a change, while no node runs on it: a running node reads its
    history only when it starts, so a version recorded under it was reported applied,
    never ran, and was taken up unannounced at its next restart."""
    where = _data_dir(config, data_dir)
    then = "change a running cluster with --url (or stop the node first); nothing was changed"
    with lock_data_dir(where, then=then), ConfigHistory.in_data_dir(where) as history:
        yield history


def _public(cfg: ButterflyConfig, secrets: bool) -> dict[str, Any]:
    return cfg.model_dump(mode="json") if secrets else public_config(cfg)


@app.command()
def validate(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Load and check a config (files, environment, --set) without starting anything."""
    try:
        cfg = _load(config, set_)
    except ButterflyError as e:
        raise fail(e) from None
    if (missing := missing_keys(cfg)) is not None:  # what `start` would refuse
        raise fail(ConfigError(missing))
    _echo(f"ok: config hash {config_hash(cfg)[:16]}, cluster hash {cluster_hash(cfg)[:16]}")


def backup_name(file: Path) -> Path:
    """The first of FILE.bak, FILE.bak.1, FILE.bak.2, ... not taken."""
    kept = file.with_name(file.name + ".bak")
    n = 0
    while kept.exists():
        n += 1
        kept = file.with_name(f"{file.name}.bak.{n}")
    return kept


@app.command()
def migrate(
    file: Annotated[Path, typer.Argument(help="Config file using the specification's names.")],
    out: Annotated[
        Path | None, typer.Option(help="Write here instead (default: FILE, old one kept as .bak).")
    ] = None,
) -> None:
    """Rewrite the specification's option names (seeds 001/004) to the current ones."""
    try:
        moved = aliases.migrate(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise fail(ConfigError(f"{file} is not UTF-8 text: {e}")) from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise fail(e) from None
    for problem in moved.problems:
        say(problem.key, problem.message)
    if moved.problems:
        err.print("nothing written: fix these by hand (the new names are above)")
        raise typer.Exit(code=2)
    target = out or file
    try:
        if out is None:  # an earlier backup is never overwritten: FILE.bak, then .bak.1, ...
            kept = backup_name(file)
            file.replace(kept)
            err.print(f"kept the old file as {kept}")
        target.write_text(moved.text, encoding="utf-8")
    except OSError as e:
        raise fail(e) from None
    for new, old in moved.renamed.items():
        err.print(f"  {old} -> {new}")
    for old, why in moved.dropped.items():
        err.print(f"  {old} dropped: {why}")
    err.print(f"wrote {target} ({len(moved.renamed)} options renamed; comments are not kept)")


@app.command()
def show(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    hash_: Annotated[bool, typer.Option("--hash", help="Print only the hashes.")] = False,
    json_out: JsonOpt = False,
    secrets: Annotated[bool, typer.Option("--secrets", help="Show api.tokens.")] = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Print the effective config (TOML by default); --hash compares nodes."""
    if url is not None:
        remote.show(url, hash_only=hash_, json_out=json_out, token=token)
        return
    try:
        cfg = _load(config, set_)
    except ButterflyError as e:
        raise fail(e) from None
    if hash_:
        hashes = {"config_hash": config_hash(cfg), "cluster_hash": cluster_hash(cfg)}
        _echo(json.dumps(hashes) if json_out else "\n".join(f"{k} {v}" for k, v in hashes.items()))
    elif json_out:
        _echo(json.dumps(_public(cfg, secrets), indent=2))
    else:
        _echo(dump_toml(_public(cfg, secrets)))


@app.command()
def template() -> None:
    """Print the annotated template of every option, generated from the schema."""
    _echo(render_template())


@app.command()
def history(
    limit: Annotated[int, typer.Option(min=1, max=MAX_LIMIT, help="Newest N versions.")] = 20,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    json_out: JsonOpt = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """List recorded config versions, newest first (with --url: the gateway's)."""
    try:
        if url is not None:
            path = "/api/v1/config/history"
            rows = remote.call("GET", url, path, token=token, limit=str(limit))
            records = [VersionRecord(**row) for row in rows]
        else:
            with _history(config, data_dir) as h:
                records = h.versions(limit)
    except (ButterflyError, TypeError) as e:
        raise fail(e) from None
    if json_out:
        _echo(json.dumps([asdict(r) for r in records], indent=2))
        return
    _echo(f"{'version':>7}  {'created':19}  {'hash':12}  {'seq':>5}  source / reason")
    for r in records:
        when = datetime.datetime.fromtimestamp(r.created_at).isoformat(timespec="seconds")
        seq = "" if r.cluster_seq is None else str(r.cluster_seq)
        line = f"{r.version:>7}  {when:19}  {r.config_hash[:12]}  {seq:>5}  {r.source}: {r.reason}"
        _echo(line)


def _changes_text(changes: tuple[Change, ...]) -> str:
    if not changes:
        return "no differences"
    shown = map(public_change, changes)  # secrets redacted, as `show` prints them
    return "\n".join(f"{c.key}: {json.dumps(c.old)} -> {json.dumps(c.new)}" for c in shown)


@app.command()
def diff(
    a: Annotated[str, typer.Argument(help="Version number or config file.")],
    b: Annotated[str, typer.Argument(help="Version number or config file.")],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Options that differ between two versions (or files)."""
    try:
        if a.isdigit() or b.isdigit():
            with _history(config, data_dir) as h:
                old = h.config_at(int(a)) if a.isdigit() else _load([Path(a)], None)
                new = h.config_at(int(b)) if b.isdigit() else _load([Path(b)], None)
        else:
            old, new = _load([Path(a)], None), _load([Path(b)], None)
    except ButterflyError as e:
        raise fail(e) from None
    changes = diff_configs(old, new)
    if json_out:
        _echo(json.dumps([asdict(public_change(c)) for c in changes], indent=2))
    else:
        _echo(_changes_text(changes))


def _node_options_offline(local: tuple[Change, ...]) -> UpdateRefused:
    """The refusal of node-local changes offline. A node's files decide those when it
    starts (only agreed cluster-wide values resume from the history), so a version
    recording them here was reported applied and ran with the file's values."""
    keys = [c.key for c in local]
    wanted = ", ".join(f"{c.key} = {json.dumps(c.new)} (now {json.dumps(c.old)})" for c in local)
    return UpdateRefused(
        f"node-local options change only in the node's config file, which decides them when "
        f"the node starts (a running node takes an edit at once): {wanted}; set them there; "
        "nothing was changed",
        keys,
    )


def _move(manager: ConfigManager, target: ButterflyConfig, version: int | None) -> UpdateResult:
    """Refuse up front what cannot happen offline, so nothing is half-applied."""
    parts = classify(diff_configs(manager.current, target))
    if parts.static:
        raise restart_required(parts.static)
    if parts.local:
        raise _node_options_offline(parts.local)
    if parts.consensus and cluster_size(target) > 1:
        keys = [c.key for c in parts.consensus]
        raise UpdateRefused(
            f"cluster-wide options need the agreement of the running cluster: "
            f"{', '.join(keys)}; nothing was changed",
            keys,
        )
    if version is None:
        result = manager.replace(target, source="cli update", reason="config update --file")
    else:
        result = manager.rollback(version, source="cli rollback")
    if result.pending is not None:  # a one-node cluster is its own quorum
        seq = manager.history.last_cluster_seq() + 1
        committed = manager.apply_committed(result.pending, seq)
        result = UpdateResult(
            committed.version, committed.config_hash, result.applied + committed.applied, None
        )
    return result


def _report(result: UpdateResult) -> None:
    if not result.applied:
        _echo(f"no changes; current version {result.version}")
        return
    _echo(f"version {result.version} (hash {result.config_hash[:12]}):")
    _echo(_changes_text(result.applied))


@app.command()
def update(
    file: Annotated[Path, typer.Option("--file", "-f", help="The new config file.")],
    set_: SetOpt = None,
    data_dir: DataDirOpt = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Move this node (or with --url the cluster) to the config in FILE; static options
    are refused."""
    try:
        target = _load([file], set_, on_this_machine=url is None)
        if url is not None:
            remote.update(url, target, token=token, reason=f"config update --file {file.name}")
            return
        with _changing([file], data_dir) as h:
            latest = h.latest()
            if latest is None:
                record = h.record(target, source="cli update", reason="first version")
                _echo(f"no history yet: recorded {file} as version {record.version}")
                return
            manager = ConfigManager(h.config_at(latest.version), h)
            _report(_move(manager, target, None))
    except (ButterflyError, OSError) as e:  # OSError: a data directory it cannot create
        raise fail(e) from None


@app.command()
def rollback(
    version: Annotated[int, typer.Option("--version", "-v", help="Version to go back to.")],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
) -> None:
    """Return to an earlier version's settings, recorded as a new version (with --url: the
    gateway's version, agreed by the whole cluster)."""
    if url is not None:
        remote.rollback(url, version, token=token)
        return
    try:
        with _changing(config, data_dir) as h:
            latest = h.latest()
            if latest is None:
                raise UpdateRefused(f"no config history in {h.path}")
            manager = ConfigManager(h.config_at(latest.version), h)
            target = rollback_target(manager.current, h.config_at(version), keep_static=False)
            _report(_move(manager, target, version))
    except (ButterflyError, OSError) as e:
        raise fail(e) from None


@app.command()
def sync(
    url: Annotated[str, typer.Option("--url", help="Gateway URL.")] = DEFAULT_URL,
    token: TokenOpt = None,
) -> None:
    """Repair nodes whose cluster config differs: each adopts what f+1 peers agree on."""
    remote.sync(url, token=token)
