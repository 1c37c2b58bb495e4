"""The cluster's roster: who the members are, at which address, with which key.

`cluster.members` and `cluster.public_keys` list node 0..n-1 and change together, through
the agreement (dynamic-consensus): a new member is appended, a removed member's slot
becomes a tombstone, the empty string in both lists. Ids are never reindexed or reused:
every signature, plan, eviction and vote names a node by its id, so a removed node's old
votes must never count for a newcomer, and the agreement's epoch is a function of the
slots and tombstones (`protocol.pbft_members.epoch_of`).

    members     = ["10.0.0.1:9000", "", "10.0.0.3:9000", "10.0.0.4:9000", "10.0.0.5:9000"]
    public_keys = ["ab..",          "", "cd..",          "ef..",          "01.."]
    -> live members 0, 2, 3, 4 (n = 4 for n >= 3f+1); node 1 was removed, node 4 added

`roster_change` is the rule for one agreed change (old -> new), run on every node at
PREPARE: append-only, tombstones permanent, a new key a valid Ed25519 key unlike every
other, the acting gateway never removed (a standby gateway may be: the gateway set
shrinks, `config.gateways.gateway_nodes`). `add_member` and `remove_member` build the patch
`butterfly cluster add-member/remove-member` sends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from butterfly.config.issues import ConfigIssue
from butterfly.config.schema import ButterflyConfig
from butterfly.types.ids import NodeId

TOMBSTONE = ""
"""A removed member's address and key: its id stays taken."""

ROSTER_KEYS = ("cluster.members", "cluster.public_keys")
"""The roster's options: moved only by an addition or a removal, never by a rollback
(an earlier version's roster would bring a removed id back or drop an added one)."""


def live_ids(cfg: ButterflyConfig) -> tuple[NodeId, ...]:
    """The members not removed, by id; a node running alone is node `node.id`."""
    members = cfg.cluster.members
    if not members:
        return (NodeId(cfg.node.id),)
    return tuple(NodeId(i) for i, a in enumerate(members) if a != TOMBSTONE)


def live_count(cfg: ButterflyConfig) -> int:
    """n for n >= 3f+1 and for placement: the members not removed."""
    return len(live_ids(cfg))


def addresses(cfg: ButterflyConfig) -> dict[NodeId, str]:
    """id -> host:port of every live member (this node alone: its listen address)."""
    members = cfg.cluster.members
    if not members:
        return {NodeId(cfg.node.id): cfg.node.listen}
    return {NodeId(i): a for i, a in enumerate(members) if a != TOMBSTONE}


def roster_version(members: Sequence[str]) -> int:
    """Slots plus tombstones: grows with every change (an append adds a slot, a removal
    a tombstone), so of two rosters of one cluster the larger is the later. The agreement
    numbers its epochs alike (`protocol.pbft_members.epoch_of`)."""
    return len(members) + sum(1 for m in members if m == TOMBSTONE)


_P = 2**255 - 19
_D = -121665 * pow(121666, -1, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)


def valid_key(hex_key: str) -> bool:
    """64 hex characters that decode to a point on Ed25519's curve (RFC 8032 5.1.3).

    Checked here, not left to the first signature: a key that is no point would make
    every vote of the new member look forged, silently, while it counts towards n.
    """
    try:
        raw = bytes.fromhex(hex_key)
    except ValueError:
        return False
    if len(raw) != 32:
        return False
    y = int.from_bytes(raw, "little") & ((1 << 255) - 1)
    if y >= _P:
        return False
    x2 = (y * y - 1) * pow(_D * y * y + 1, -1, _P) % _P
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P:
        x = x * _SQRT_M1 % _P
    if (x * x - x2) % _P:
        return False
    return not (x == 0 and raw[31] >> 7)


def check_roster(cfg: ButterflyConfig) -> Iterator[ConfigIssue]:
    """A tombstone is one in both lists at the same id, and never this node's own slot
    at start (checked by the node: a removed node refuses to start)."""
    members, keys = cfg.cluster.members, cfg.cluster.public_keys
    if not keys or len(keys) != len(members):
        return  # one-key-per-member reports a length mismatch
    half = [i for i, (a, k) in enumerate(zip(members, keys, strict=True)) if (a == "") != (k == "")]
    if half:
        yield ConfigIssue(
            "cluster.public_keys",
            "tombstones in both lists",
            f"node(s) {half} are removed in one of cluster.members and cluster.public_keys "
            "but not in the other; a removed member is an empty string in both",
            related=("cluster.members",),
        )


def roster_change(old: ButterflyConfig, new: ButterflyConfig, acting: NodeId) -> str | None:
    """Why the agreed roster may not move from `old` to `new` (None: it may).

    `acting`: the acting gateway, which must stay. A standby gateway may go: the
    takeover order skips removed members, and the others keep their API ports.
    """
    om, ok = old.cluster.members, old.cluster.public_keys
    nm, nk = new.cluster.members, new.cluster.public_keys
    if (om, ok) == (nm, nk):
        return None
    if not om or len(ok) != len(om):
        return "a node started without cluster.members and cluster.public_keys cannot change them"
    if len(nm) < len(om) or len(nk) != len(nm):
        return (
            "members are never dropped or reindexed: a removed member becomes an empty "
            "string in both cluster.members and cluster.public_keys, a new one is appended"
        )
    for i in range(len(om)):
        if (nm[i], nk[i]) == (om[i], ok[i]):
            continue
        if om[i] == TOMBSTONE:
            return f"node {i} was removed; its id is never reused (append a new member)"
        if (nm[i], nk[i]) != (TOMBSTONE, TOMBSTONE):
            return f"node {i}'s address or key changes: remove it and add it again as a new member"
        if i == acting:
            return f"node {i} is the acting gateway and cannot remove itself"
    others = {k for k in ok if k}
    for i in range(len(om), len(nm)):
        if nm[i] == TOMBSTONE or not valid_key(nk[i]):
            return f"new member {i} needs an address and a valid Ed25519 public key (64 hex)"
        if nk[i] in others:
            return f"new member {i}'s key is another member's: one vote would count twice"
        others.add(nk[i])
    return None


Listener = Callable[["Roster"], None]


class Roster:
    """The members as last agreed, one copy for every part of a node.

    `addresses` and `keys` are updated in place, so a part handed them (the transport's
    handshake key check, the signed-record and heartbeat checks, the health report) sees
    every agreed change at once; parts that keep their own view of who the members are
    (membership, recovery, the transport's address book, the config roles) are told
    through `listen`, in the order they subscribed, on the node's event loop when the
    agreed change applies (`control.live_config`).
    """

    def __init__(self, cfg: ButterflyConfig, keys: tuple[bytes, ...]) -> None:
        """`keys`: every slot's key as the node checked them at start
        (`protocol.keys.public_keys`: a node alone has its own)."""
        self.addresses: dict[NodeId, str] = addresses(cfg)
        self.slots = keys  # by id, b"" for a removed member (PBFT's keys)
        self.keys: dict[NodeId, bytes] = {NodeId(i): k for i, k in enumerate(keys) if k}
        self._listeners: list[Listener] = []

    @property
    def ids(self) -> tuple[NodeId, ...]:
        return tuple(sorted(self.addresses))

    def listen(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def update(self, cfg: ButterflyConfig) -> bool:
        """Follow an applied config; True (and every listener told) when the roster moved."""
        before = (dict(self.addresses), self.slots)
        self._set(cfg)
        if (self.addresses, self.slots) == before:
            return False
        for listener in self._listeners:
            listener(self)
        return True

    def _set(self, cfg: ButterflyConfig) -> None:
        _replace(self.addresses, addresses(cfg))
        if cfg.cluster.public_keys:  # else a node alone, with its own key
            self.slots = tuple(bytes.fromhex(k) for k in cfg.cluster.public_keys)
            _replace(self.keys, {NodeId(i): k for i, k in enumerate(self.slots) if k})


def _replace(held: dict[NodeId, Any], fresh: dict[NodeId, Any]) -> None:
    """Entry by entry, never emptied on the way: the heartbeat threads read these."""
    for gone in [n for n in held if n not in fresh]:
        del held[gone]
    held.update(fresh)


def add_member(cfg: ButterflyConfig, address: str, public_key: str) -> dict[str, Any]:
    """The patch that appends a member (its id: the current number of slots)."""
    return {
        "cluster.members": [*cfg.cluster.members, address],
        "cluster.public_keys": [*cfg.cluster.public_keys, public_key.lower()],
    }


def remove_member(cfg: ButterflyConfig, node: NodeId) -> dict[str, Any]:
    """The patch that turns `node`'s slot into a tombstone."""
    members, keys = list(cfg.cluster.members), list(cfg.cluster.public_keys)
    if not 0 <= node < len(members) or members[node] == TOMBSTONE:
        raise ValueError(f"node {node} is not a member (members {list(live_ids(cfg))})")
    members[node] = keys[node] = TOMBSTONE
    return {"cluster.members": members, "cluster.public_keys": keys}


__all__ = [
    "ROSTER_KEYS",
    "TOMBSTONE",
    "Roster",
    "add_member",
    "addresses",
    "check_roster",
    "live_count",
    "live_ids",
    "remove_member",
    "roster_change",
    "roster_version",
    "valid_key",
]
