"""The specification's option names, read from files as deprecated aliases.

Seeds 001 and 004 show config files with `[coordination] node_id, cluster_size,
max_byzantine`, `[network] listen_address, peer_addresses`, `[api] bind_address` and
more. A file using them loads: each old key is translated to the option it means here,
and the loader warns (`DeprecatedOption`) naming the new key; `butterfly config migrate
FILE` rewrites the file with the new names. Nothing is dropped on the way: an old key
whose meaning does not carry over is an issue that says what to write instead, and the
values are then validated like any other (so the seeds' 3-node f = 1 and 5-node f = 2
examples are still refused by the n >= 3f+1 rule, config.validate).

Translation is per file, because the seeds' `peer_addresses` lists the *other* nodes:
this node's own address (`listen_address`) goes in at its `node_id`, which the same file
must give. A wildcard listen address (0.0.0.0) names no address peers could dial, and the
member list must be the same on every node, so such a file is told to list
`cluster.members` itself rather than have one guessed.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from butterfly.config.fields import flatten, unflatten
from butterfly.config.template import dump_toml
from butterfly.config.validate import quorum_message

# old dotted key -> new dotted key, same value
RENAMES: dict[str, str] = {
    "coordination.node_id": "node.id",
    "coordination.max_byzantine": "byzantine.f",
    "coordination.checkpoint_interval": "coordination.checkpoint_frequency",
    "network.listen_address": "node.listen",
    "network.backend_type": "network.backend",
    "scheduling.scheduler_type": "scheduling.policy",
    "scheduling.max_queue_size": "scheduling.max_queue",
    "partition.default_strategy": "partition.strategy",
    "api.request_timeout_secs": "api.request_timeout_s",
    "metrics.collector_type": "metrics.collector",
    "metrics.export_interval_secs": "metrics.export_interval_s",
    "metrics.retention_duration_secs": "metrics.retention_s",
}
# old key in MiB -> new key in bytes
MIB: dict[str, str] = {"api.max_request_size_mb": "api.max_request_bytes"}
# old keys whose value becomes other options (see `translate`)
RESHAPED: dict[str, str] = {
    "api.bind_address": "api.host and api.port",
    "network.peer_addresses": "cluster.members",
    "coordination.cluster_size": "cluster.members (n is its length)",
}
ALIASES = frozenset(RENAMES) | frozenset(MIB) | frozenset(RESHAPED)
_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")
_WILDCARDS = frozenset({"0.0.0.0", "[::]", "::", ""})


@dataclass(frozen=True)
class Problem:
    key: str  # the old key, so the loader can point at its line
    rule: str
    message: str


@dataclass
class Translated:
    values: dict[str, Any]
    renamed: dict[str, str] = field(default_factory=dict)  # new key -> the old one it came from
    problems: list[Problem] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)  # old key -> why nothing replaces it


def _put(t: Translated, flat: Mapping[str, Any], old: str, new: str, value: Any) -> None:
    if new in flat and flat[new] != value:
        t.problems.append(
            Problem(old, "alias-conflict", f"{old} (old name) and {new} disagree; keep only {new}")
        )
        return
    t.values[new] = value
    t.renamed[new] = old


def _bind_address(t: Translated, flat: Mapping[str, Any], value: Any) -> None:
    old = "api.bind_address"
    m = _HOST_PORT.match(value) if isinstance(value, str) else None
    if m is None:
        t.problems.append(Problem(old, "format", f"expected host:port, got {value!r}"))
        return
    _put(t, flat, old, "api.host", m.group(1).strip("[]"))
    _put(t, flat, old, "api.port", int(m.group(2)))


def _peer_addresses(t: Translated, flat: Mapping[str, Any], value: Any) -> None:
    old = "network.peer_addresses"
    listen, me = t.values.get("node.listen"), t.values.get("node.id", 0)
    instead = (
        "list every node, this one included, in node id order (the same list on every "
        "node) in cluster.members"
    )
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        t.problems.append(Problem(old, "type", f"expected a list of host:port, got {value!r}"))
    elif not isinstance(listen, str):
        t.problems.append(
            Problem(
                old,
                "own-address",
                "lists the other nodes only, and this file gives no network.listen_address "
                f"for this node's own place among them; {instead}",
            )
        )
    elif listen.rsplit(":", 1)[0] in _WILDCARDS:
        t.problems.append(
            Problem(
                old,
                "own-address",
                f"lists the other nodes only, and this node listens on {listen}, which is "
                f"no address its peers can dial; {instead}",
            )
        )
    elif not isinstance(me, int) or not 0 <= me <= len(value):
        t.problems.append(
            Problem(old, "own-address", f"node id {me} has no place among {len(value)} peers")
        )
    else:
        _put(t, flat, old, "cluster.members", [*value[:me], listen, *value[me:]])


def _cluster_size(t: Translated, value: Any) -> None:
    old = "coordination.cluster_size"
    members = t.values.get("cluster.members")
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        t.problems.append(Problem(old, "type", f"expected a positive integer, got {value!r}"))
    elif isinstance(members, list):
        t.dropped[old] = f"n is the length of cluster.members ({len(members)})"
        if len(members) != value:
            t.problems.append(
                Problem(
                    old,
                    "cluster-size",
                    f"cluster_size = {value} but the members listed are {len(members)}; "
                    "drop cluster_size (n is the length of cluster.members)",
                )
            )
    elif value == 1:  # a one-node cluster lists no members
        t.dropped[old] = "a node alone lists no cluster.members"
    else:
        f = t.values.get("byzantine.f")
        unsafe = quorum_message(value, f) if isinstance(f, int) else None
        if unsafe is not None:
            t.problems.append(Problem(old, "n >= 3f+1", unsafe))
        t.problems.append(
            Problem(
                old,
                "cluster-size",
                f"cluster_size = {value} names a size, not the members: list the {value} "
                "nodes' host:port in cluster.members (n is its length)",
            )
        )


def translate(flat: Mapping[str, Any]) -> Translated:
    """One file's dotted values with every old name replaced by the new ones."""
    t = Translated({k: v for k, v in flat.items() if k not in ALIASES})
    for old, new in RENAMES.items():
        if old in flat:
            _put(t, flat, old, new, flat[old])
    for old, new in MIB.items():
        if old in flat:
            mib = flat[old]
            number = isinstance(mib, int | float) and not isinstance(mib, bool)
            finite = number and math.isfinite(mib)  # inf or nan: the new option refuses it
            _put(t, flat, old, new, int(mib * 2**20) if finite else mib)
    if "api.bind_address" in flat:
        _bind_address(t, flat, flat["api.bind_address"])
    if "network.peer_addresses" in flat:
        _peer_addresses(t, flat, flat["network.peer_addresses"])
    if "coordination.cluster_size" in flat:
        _cluster_size(t, flat["coordination.cluster_size"])
    return t


@dataclass(frozen=True)
class Migration:
    text: str  # the file with new names (comments are not kept)
    renamed: dict[str, str]  # new key -> old key
    problems: list[Problem]
    dropped: dict[str, str]  # old key -> why nothing replaces it


def migrate(text: str) -> Migration:
    """A config file's text with the old names rewritten (`butterfly config migrate`)."""
    data = tomllib.loads(text)
    include = data.pop("include", None)
    moved = translate(flatten(data))
    doc = unflatten(moved.values)
    if include is not None:
        doc = {"include": include, **doc}
    return Migration(dump_toml(doc), moved.renamed, moved.problems, moved.dropped)
