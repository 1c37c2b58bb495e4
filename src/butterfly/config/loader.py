"""Build one frozen config from defaults < files < environment < CLI overrides.

Sources are flattened to dotted keys, checked against the schema (unknown keys are
errors, with a "did you mean"), merged once and validated once, so a node never runs on a
half-merged config. Every value remembers where it came from (`Origin`), so an error can
name the file and line, or the environment variable, that set it. The environment is an
argument, never read at import time: tests and the CLI each pass their own.
"""

from __future__ import annotations

import os
import re
import tomllib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from butterfly.config.aliases import translate
from butterfly.config.fields import config_leaves, field_specs, flatten, suggest, unflatten
from butterfly.config.issues import ConfigInvalid, ConfigIssue, DeprecatedOption
from butterfly.config.redaction import SECRETS
from butterfly.config.schema import ButterflyConfig
from butterfly.config.validate import cross_check

ENV_PREFIX = "BUTTERFLY_"
# The names the coordination quick start documents, kept working as aliases.
QUICK_START_ENV = {
    "BUTTERFLY_HEARTBEAT_INTERVAL_MS": "coordination.heartbeat_interval_ms",
    "BUTTERFLY_PHI_SUSPECT": "coordination.phi_suspect",
    "BUTTERFLY_PHI_FAILED": "coordination.phi_failed",
    "BUTTERFLY_CHECKPOINT_FREQUENCY": "coordination.checkpoint_frequency",
    "BUTTERFLY_MAX_CHECKPOINTS": "coordination.max_checkpoints",
}
_TOML_POS = re.compile(r"\(at line (\d+), column (\d+)\)")
_HEADER = re.compile(r"^\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_ASSIGN = re.compile(
    r"^((?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*'))*)\s*="
)


def env_name(key: str) -> str:
    return ENV_PREFIX + key.upper().replace(".", "__")


def _dotted(raw: str) -> str:
    parts = re.findall(r"\"[^\"]*\"|'[^']*'|[^.\s]+", raw)
    return ".".join(p.strip("\"'") for p in parts)


def find_line(text: str, key: str) -> int | None:
    """Line of `key` in TOML text, else of its nearest enclosing table, else None.

    A scan rather than a parser, because tomllib keeps no positions; it is run only when
    an error needs a line, never on the load path.
    """
    table, best = "", None
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if header := _HEADER.match(line):
            table = _dotted(header.group(1))
            if key == table or key.startswith(table + "."):
                best = lineno
        elif assign := _ASSIGN.match(line):
            full = f"{table}.{_dotted(assign.group(1))}".lstrip(".")
            if full == key:
                return lineno
            if key.startswith(full + "."):
                best = lineno
    return best


@dataclass(frozen=True)
class Origin:
    """Where a value was set: a file (with its text, for line lookup), a variable, a flag."""

    source: str
    text: str | None = None
    aliases: tuple[tuple[str, str], ...] = ()  # (key, the old name the file gave it under)

    def line(self, key: str) -> int | None:
        if self.text is None:
            return None
        return find_line(self.text, dict(self.aliases).get(key, key))


@dataclass
class _Acc:
    values: dict[str, Any] = field(default_factory=dict)
    origins: dict[str, Origin] = field(default_factory=dict)
    issues: list[ConfigIssue] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    def issue(self, origin: Origin, key: str, rule: str, message: str) -> None:
        self.issues.append(ConfigIssue(key, rule, message, origin.source, origin.line(key)))

    def known(self, key: str, origin: Origin, *, env: bool = False) -> bool:
        if key in field_specs():
            return True
        if any(k.startswith(key + ".") for k in field_specs()):
            self.issue(origin, key, "unknown-key", f"{key} is a table; set its keys instead")
            return False
        guess = suggest(key)
        tip = ""
        if guess:
            named = f" ({env_name(guess)})" if env and guess in field_specs() else ""
            tip = f"; did you mean {guess}{named}?"
        self.issue(origin, key, "unknown-key", f"unknown option {key}{tip}")
        return False

    def put(self, key: str, value: Any, origin: Origin) -> None:
        self.values[key] = value
        self.origins[key] = origin


@dataclass(frozen=True)
class Loaded:
    """A loaded config plus what the watcher and error reporting need to know."""

    config: ButterflyConfig
    files: tuple[Path, ...]
    origins: Mapping[str, Origin]


def _warn_renamed(origin: Origin, renamed: Mapping[str, str], dropped: Mapping[str, str]) -> None:
    """One warning per old key the file used, naming the key(s) it now sets."""
    by_old: dict[str, list[str]] = {}
    for new, old in renamed.items():
        by_old.setdefault(old, []).append(new)
    hints = {old: f"use {' and '.join(news)}" for old, news in by_old.items()}
    hints.update({old: f"drop it: {why}" for old, why in dropped.items()})
    for old, hint in hints.items():
        # attributed to the file and line, so Python's warning shows the old line itself
        warnings.warn_explicit(
            f"{old} is an old name; {hint} "
            f"(`butterfly config migrate {origin.source}` rewrites the file)",
            DeprecatedOption,
            filename=origin.source,
            lineno=origin.line(old) or 0,
        )


def _read_file(path: Path, acc: _Acc, stack: tuple[Path, ...], via: Origin | None) -> None:
    path = path.expanduser().resolve()
    where = via or Origin(str(path))
    if path in stack:
        chain = " -> ".join(str(p) for p in (*stack, path))
        acc.issue(where, "include", "include", f"include cycle: {chain}")
        return
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        acc.issue(where, "include" if via else "", "read", f"cannot read {path}: {e}")
        return
    acc.files.append(path)
    origin = Origin(str(path), text)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = _TOML_POS.search(str(e))
        line = int(m.group(1)) if m else None
        acc.issues.append(ConfigIssue("", "toml-syntax", f"not valid TOML: {e}", str(path), line))
        return
    includes = data.pop("include", [])
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        acc.issue(origin, "include", "include", "include must be a path or a list of paths")
        includes = []
    for inc in includes:
        _read_file(path.parent / inc, acc, (*stack, path), origin)
    moved = translate(flatten(data))
    for problem in moved.problems:
        acc.issue(origin, problem.key, problem.rule, problem.message)
    _warn_renamed(origin, moved.renamed, moved.dropped)
    origin = Origin(str(path), text, tuple(moved.renamed.items()))
    for key, value in moved.values.items():
        if not acc.known(key, origin):
            continue
        if field_specs()[key].is_path and isinstance(value, str) and value:
            value = os.path.normpath(path.parent / os.path.expanduser(value))
        acc.put(key, value, origin)


def parse_text(key: str, text: str) -> Any:
    """A string from the environment or a flag, as the option's type expects it.

    Scalars stay strings (pydantic converts "100" to 100 and says so when it cannot);
    lists accept a TOML array or comma-separated items.
    """
    spec = field_specs()[key]
    if spec.kind == "str":
        return text
    text = text.strip()
    if spec.kind != "list":
        return text
    if text.startswith("["):
        try:
            return tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"not a TOML array: {e}") from None
    return [item.strip() for item in text.split(",") if item.strip()]


def _text_value(key: str, text: str, origin: Origin, acc: _Acc) -> None:
    try:
        value = parse_text(key, text)
    except ValueError as e:
        acc.issue(origin, key, "type", str(e))
        return
    if field_specs()[key].is_path and isinstance(value, str) and value:
        value = os.path.abspath(os.path.expanduser(value))
    acc.put(key, value, origin)


def _env_layer(env: Mapping[str, str], acc: _Acc) -> None:
    seen: dict[str, tuple[str, str]] = {}
    for name in sorted(env):
        if name in QUICK_START_ENV:
            key = QUICK_START_ENV[name]
        elif name.startswith(ENV_PREFIX) and "__" in name:
            key = name.removeprefix(ENV_PREFIX).lower().replace("__", ".")
        else:
            continue
        origin = Origin(f"environment {name}")
        if not acc.known(key, origin, env=True):
            continue
        if key in seen and seen[key][1].strip() != env[name].strip():
            other = seen[key][0]
            acc.issue(origin, key, "env-conflict", f"{other} and {name} disagree; set one")
            continue
        seen[key] = (name, env[name])
        _text_value(key, env[name], origin, acc)


def _override_layer(overrides: Sequence[str] | Mapping[str, Any], acc: _Acc) -> None:
    if isinstance(overrides, Mapping):
        for key, value in flatten(overrides).items():
            origin = Origin(f"override {key}")
            if acc.known(key, origin):
                acc.put(key, value, origin)
        return
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        origin = Origin(f"--set {item}")
        if not sep:
            acc.issue(origin, key, "override", "expected KEY=VALUE, e.g. api.port=8081")
        elif acc.known(key, origin):
            _text_value(key, text, origin, acc)


def _loc_key(loc: tuple[int | str, ...]) -> tuple[str, str]:
    shown = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    return shown, ".".join(str(p) for p in loc if isinstance(p, str))


_RULES = {
    "greater_than_equal": "range",
    "less_than_equal": "range",
    "greater_than": "range",
    "less_than": "range",
    "literal_error": "choice",
    "value_error": "format",
}


def _locate(issue: ConfigIssue, origins: Mapping[str, Origin]) -> ConfigIssue:
    for key in (issue.key, *issue.related):
        if key in origins:
            return issue.at(origins[key].source, origins[key].line(key), key)
    return issue.at("defaults", None)


def build(
    values: Mapping[str, Any], origins: Mapping[str, Origin], *, on_this_machine: bool = True
) -> ButterflyConfig:
    """Validate merged dotted values into the frozen config, or raise every problem."""
    try:
        cfg = ButterflyConfig.model_validate(unflatten(values))
    except ValidationError as e:
        issues = []
        for err in e.errors(include_url=False):
            shown, base = _loc_key(err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            secret = base in SECRETS  # a bearer token is not echoed into logs
            if "input" in err and f"got {err['input']!r}" not in msg and not secret:
                msg += f", got {err['input']!r}"  # ours name it
            issue = ConfigIssue(shown, _RULES.get(err["type"], "type"), msg)
            located = _locate(ConfigIssue(base, "", ""), origins)
            issues.append(issue.at(located.source, located.line))
        raise ConfigInvalid(issues) from None
    issues = cross_check(cfg, on_this_machine=on_this_machine)
    if issues:
        raise ConfigInvalid(_locate(i, origins) for i in issues)
    return cfg


def load(
    files: Sequence[Path | str] = (),
    *,
    env: Mapping[str, str] | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    on_this_machine: bool = True,
) -> Loaded:
    """Load and validate; `files` in order, later ones overriding earlier ones. Without
    `on_this_machine`, the paths it names are not looked for here (a config for a remote
    cluster)."""
    acc = _Acc()
    for f in files:
        _read_file(Path(f), acc, (), None)
    _env_layer(env or {}, acc)
    _override_layer(overrides, acc)
    return Loaded(_build_all(acc, on_this_machine), tuple(acc.files), dict(acc.origins))


def _build_all(acc: _Acc, on_this_machine: bool = True) -> ButterflyConfig:
    """Build from what was read, raising the reading's problems with the values' own.

    An unknown key is left out of `acc.values`, so the rest still validates: a file with
    a misspelt key and an out-of-range value is refused once, naming both, rather than
    the second only after the first is fixed.
    """
    try:
        cfg = build(acc.values, acc.origins, on_this_machine=on_this_machine)
    except ConfigInvalid as e:
        raise ConfigInvalid([*acc.issues, *e.issues]) from None
    if acc.issues:
        raise ConfigInvalid(acc.issues)
    return cfg


def load_config(
    files: Sequence[Path | str] = (),
    *,
    env: Mapping[str, str] | None = None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    on_this_machine: bool = True,
) -> ButterflyConfig:
    """The frozen config from defaults < files < env < overrides; see `load`."""
    return load(files, env=env, overrides=overrides, on_this_machine=on_this_machine).config


def apply_patch(
    base: ButterflyConfig, patch: Mapping[str, Any], source: str = "update"
) -> ButterflyConfig:
    """`base` with dotted or nested `patch` values on top, validated as a whole."""
    acc = _Acc()
    origin = Origin(source)
    for key, value in flatten(patch).items():
        if acc.known(key, origin):
            acc.put(key, value, origin)
    acc.values = {**config_leaves(base), **acc.values}
    return _build_all(acc)
