"""The schema flattened to dotted keys, and the small dict helpers built on it.

Everything that reasons about single options (unknown-key checks, environment parsing,
hot-reload classification, diff, template) works on dotted keys such as
`coordination.phi_suspect`; this module derives them once from the pydantic models so
those consumers never walk the models themselves.
"""

from __future__ import annotations

import difflib
import functools
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from butterfly.config.schema import ButterflyConfig, Mutability, Scope

Kind = Literal["bool", "int", "float", "str", "list"]

# Names used by the specification's seeds, mapped to where the option lives here, so an
# operator copying a seed example gets told the new name instead of only "unknown".
RENAMED: dict[str, str] = {
    "node.node_id": "node.id",
    "coordination.node_id": "node.id",
    "coordination.max_byzantine": "byzantine.f",
    "byzantine.f_value": "byzantine.f",
    "byzantine.max_faulty": "byzantine.f",
    "coordination.cluster_size": "cluster.members (n is its length)",
    "network.peer_addresses": "cluster.members",
    "network.peers": "cluster.members",
    "network.coordinator_addr": "cluster.members",
    "network.listen_address": "node.listen",
    "network.backend_type": "network.backend",
    "api.bind_address": "api.host and api.port",
    "api.max_request_size_mb": "api.max_request_bytes",
    "api.request_timeout_secs": "api.request_timeout_s",
    "scheduling.scheduler_type": "scheduling.policy",
    "scheduling.max_queue_size": "scheduling.max_queue",
    "partition.default_strategy": "partition.strategy",
    "coordination.checkpoint_interval": "coordination.checkpoint_frequency",
    "metrics.collector_type": "metrics.collector",
    "metrics.export_interval_secs": "metrics.export_interval_s",
    "metrics.retention_duration_secs": "metrics.retention_s",
    "observability.logging.level": "observability.log_level",
}


@dataclass(frozen=True)
class FieldSpec:
    """One leaf option with what loader, template and hot reload need to know about it."""

    key: str
    kind: Kind
    item_kind: Kind | None
    default: Any
    description: str
    mutability: Mutability
    scope: Scope
    ge: float | None
    le: float | None
    choices: tuple[str, ...]
    is_path: bool


def _kind(annotation: Any) -> tuple[Kind, Kind | None, tuple[str, ...]]:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "str", None, tuple(str(a) for a in typing.get_args(annotation))
    if origin is typing.Annotated:
        return _kind(typing.get_args(annotation)[0])
    if origin is tuple:
        item, _, _ = _kind(typing.get_args(annotation)[0])
        return "list", item, ()
    for py, kind in ((bool, "bool"), (int, "int"), (float, "float"), (str, "str")):
        if annotation is py:
            return typing.cast(Kind, kind), None, ()
    raise TypeError(f"config schema: unsupported annotation {annotation!r}")


def _bounds(info: FieldInfo) -> tuple[float | None, float | None]:
    ge = le = None
    for m in info.metadata:
        if isinstance(m, annotated_types.Ge):
            ge = float(typing.cast(float, m.ge))
        elif isinstance(m, annotated_types.Le):
            le = float(typing.cast(float, m.le))
    return ge, le


def _walk(model: type[BaseModel], prefix: str) -> Iterator[FieldSpec]:
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _walk(ann, key + ".")
            continue
        extra = info.json_schema_extra
        if not isinstance(extra, dict):
            raise TypeError(f"config schema: {key} lacks mutability/scope metadata")
        kind, item_kind, choices = _kind(ann)
        ge, le = _bounds(info)
        default = list(info.default) if isinstance(info.default, tuple) else info.default
        yield FieldSpec(
            key=key,
            kind=kind,
            item_kind=item_kind,
            default=default,
            description=info.description or "",
            mutability=Mutability(str(extra["mutability"])),
            scope=Scope(str(extra["scope"])),
            ge=ge,
            le=le,
            choices=choices,
            is_path=bool(extra.get("path", False)),
        )


@functools.cache
def field_specs() -> Mapping[str, FieldSpec]:
    """Every leaf option by dotted key, in schema order."""
    return {spec.key: spec for spec in _walk(ButterflyConfig, "")}


@functools.cache
def table_keys() -> frozenset[str]:
    """Dotted names of every table (`security`, `security.tls`, ...)."""
    tables: set[str] = set()
    for key in field_specs():
        parts = key.split(".")
        tables.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return frozenset(tables)


def suggest(key: str) -> str | None:
    """The option an unknown key most likely meant, or None when nothing is close."""
    if key in RENAMED:
        return RENAMED[key]
    specs = field_specs()
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in specs if k.rsplit(".", 1)[-1] == leaf]
    if len(same_leaf) == 1:
        return same_leaf[0]
    close = difflib.get_close_matches(key, [*specs, *table_keys()], n=1, cutoff=0.6)
    return close[0] if close else None


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables to dotted leaves; lists are leaves, since they replace, not merge."""
    out: dict[str, Any] = {}
    specs = field_specs()
    for k, v in data.items():
        key = prefix + k
        # known leaves first, then dict: the Mapping ABC check is slow on the hot path
        if key not in specs and (type(v) is dict or isinstance(v, Mapping)):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def config_leaves(cfg: ButterflyConfig) -> dict[str, Any]:
    """The config as dotted keys with JSON values (tuples as lists)."""
    return flatten(cfg.model_dump(mode="json"))
