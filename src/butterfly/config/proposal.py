"""Pure functions the cluster-wide update protocol is built on (PROPOSE/PREPARE/COMMIT).

The agreement layer (PBFT, elsewhere) orders `Proposal`s; this module only says what a
proposal is, whether a node should vote for it, and what config it yields. No clocks, no
I/O: each node runs `check_proposal` on its own current config when it PREPAREs, and
`ConfigManager.apply_committed` once 2f+1 nodes agreed, at the agreed sequence number.

A proposal carries only dynamic-consensus keys, as new JSON values, plus the cluster hash
it starts from and the one it must produce. A node whose cluster hash differs from the
base refuses (it missed an update or was tampered with: `butterfly config sync`); a
proposer whose promised hash does not match what the changes produce is lying or buggy.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from butterfly.config.fields import config_leaves, field_specs
from butterfly.config.issues import UpdateRefused
from butterfly.config.loader import apply_patch
from butterfly.config.roster import roster_version
from butterfly.config.schema import ButterflyConfig, Mutability, Scope
from butterfly.config.versions import (
    Change,
    ConfigHistory,
    canonical_json,
    cluster_hash,
    diff_configs,
)

Kind = Literal["update", "rollback"]


@dataclass(frozen=True)
class Classified:
    """Changes split by what it takes to apply them."""

    static: tuple[Change, ...]
    consensus: tuple[Change, ...]
    local: tuple[Change, ...]


def classify(changes: Iterable[Change]) -> Classified:
    static, consensus, local = [], [], []
    for c in changes:
        m = field_specs()[c.key].mutability
        if m.requires_restart:
            static.append(c)
        elif m is Mutability.DYNAMIC_CONSENSUS:
            consensus.append(c)
        else:
            local.append(c)
    return Classified(tuple(static), tuple(consensus), tuple(local))


def restart_required(static: Iterable[Change]) -> UpdateRefused:
    keys = [c.key for c in static]
    return UpdateRefused(f"restart required: {', '.join(keys)}", keys)


@dataclass(frozen=True)
class Proposal:
    """A cluster-wide config change, as agreed on: plain data, safe to send."""

    kind: Kind
    base_cluster_hash: str
    changes: tuple[tuple[str, Any], ...]
    new_cluster_hash: str
    reason: str = ""

    @property
    def digest(self) -> str:
        """What the agreement layer signs and votes on."""
        return hashlib.sha256(canonical_json(self.to_wire())).hexdigest()

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.changes)

    def to_wire(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "base_cluster_hash": self.base_cluster_hash,
            "changes": [[k, v] for k, v in self.changes],
            "new_cluster_hash": self.new_cluster_hash,
            "reason": self.reason,
        }

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> Proposal:
        """Parse a peer's proposal; shape errors are refusals, never crashes."""
        try:
            kind = data["kind"]
            base, new, reason = data["base_cluster_hash"], data["new_cluster_hash"], data["reason"]
            changes = tuple((str(k), v) for k, v in data["changes"])
        except (KeyError, TypeError, ValueError) as e:
            raise UpdateRefused(f"malformed config proposal: {e!r}") from None
        if kind not in ("update", "rollback") or not all(
            isinstance(x, str) for x in (base, new, reason)
        ):
            raise UpdateRefused("malformed config proposal: bad kind or hash fields")
        return cls(kind, base, changes, new, reason)


def propose_change(
    current: ButterflyConfig, candidate: ButterflyConfig, *, kind: Kind = "update", reason: str = ""
) -> Proposal:
    """The proposal turning `current` into `candidate`; every change must need consensus."""
    parts = classify(diff_configs(current, candidate))
    if parts.static:
        raise restart_required(parts.static)
    if parts.local:
        keys = [c.key for c in parts.local]
        raise UpdateRefused(
            f"node-local options are not agreed cluster-wide, apply them on each node: "
            f"{', '.join(keys)}",
            keys,
        )
    if not parts.consensus:
        raise UpdateRefused("the proposal changes nothing")
    return Proposal(
        kind=kind,
        base_cluster_hash=cluster_hash(current),
        changes=tuple(sorted((c.key, c.new) for c in parts.consensus)),
        new_cluster_hash=cluster_hash(candidate),
        reason=reason,
    )


def propose_update(
    current: ButterflyConfig, patch: Mapping[str, Any], *, reason: str = ""
) -> Proposal:
    """PROPOSE: validate `patch` against `current` and package it for agreement."""
    return propose_change(current, apply_patch(current, patch, "proposal"), reason=reason)


def resume_committed(cfg: ButterflyConfig, history: ConfigHistory) -> ButterflyConfig:
    """`cfg` (as loaded from files) with the dynamic-consensus values the cluster last agreed
    on here, so a restarted node resumes where it stopped instead of where its file was.

    Only agreed values come back: node-local and static options stay as the files say
    (a static difference then shows as a cluster hash mismatch, which needs a restart).
    """
    latest = history.latest_committed()
    if latest is None:
        return cfg
    specs = field_specs()
    agreed = config_leaves(history.config_at(latest.version))
    values = {
        k: v
        for k, v in agreed.items()
        if specs[k].mutability is Mutability.DYNAMIC_CONSENSUS and specs[k].scope is Scope.CLUSTER
    }
    if roster_version(cfg.cluster.members) > roster_version(values["cluster.members"]):
        # the files list a later roster than was agreed here (members added or removed
        # offline, with every node stopped: `init --add-host`): the files decide it
        del values["cluster.members"], values["cluster.public_keys"]
    return apply_patch(cfg, values, f"history version {latest.version}")


def check_proposal(
    current: ButterflyConfig, proposal: Proposal, *, here: str | None = None
) -> ButterflyConfig:
    """PREPARE (validation half): the config `proposal` yields here, or why not.

    `here` is `cluster_hash(current)` when the caller already has it (a manager keeps it
    in its record), which spares hashing the whole config on every vote.
    """
    bad = [k for k in proposal.keys if k not in field_specs()]
    bad += [
        k
        for k in proposal.keys
        if k in field_specs() and field_specs()[k].mutability is not Mutability.DYNAMIC_CONSENSUS
    ]
    if bad:
        raise UpdateRefused(f"proposal touches keys outside dynamic-consensus: {bad}", bad)
    here = cluster_hash(current) if here is None else here
    if here != proposal.base_cluster_hash:
        raise UpdateRefused(
            f"stale proposal: it starts from cluster config {proposal.base_cluster_hash[:12]}, "
            f"this node has {here[:12]} (a change committed first: retry on top of it; "
            "or this node is behind: `butterfly config sync`)"
        )
    candidate = apply_patch(current, dict(proposal.changes), f"proposal {proposal.digest[:12]}")
    if cluster_hash(candidate) != proposal.new_cluster_hash:
        raise UpdateRefused(
            "proposal hash mismatch: its changes do not produce the cluster hash it claims"
        )
    return candidate
