"""The arithmetic of Byzantine quorums, and the refusal of unsafe cluster sizes.

PBFT needs `n >= 3f + 1`: two quorums of `2f + 1` out of `n` then share at least `f + 1`
nodes, so at least one honest node, which never votes for two different values. With 5
nodes and f = 2 (the specification's example) no quorum size works: one that still forms
while 2 nodes stay silent (3 of 5) can meet another such quorum in a single node, which may
be the liar; one that always shares an honest node (5 of 5) stops at the first crash.
Butterfly therefore refuses that configuration and names the largest safe f.
"""

from __future__ import annotations

from butterfly.types.errors import InsufficientNodes
from butterfly.types.ids import NodeId


def max_faulty(n: int) -> int:
    """Largest f that `n` nodes tolerate under PBFT."""
    return max(0, (n - 1) // 3)


def check_fault_tolerance(n: int, f: int) -> None:
    """Raise `InsufficientNodes` naming the rule and the largest safe f when `n < 3f + 1`."""
    if f < 0:
        raise InsufficientNodes(f"f={f} is negative; f counts Byzantine nodes tolerated")
    if n < 1:
        raise InsufficientNodes(f"a cluster needs at least one node, got n={n}")
    if n < 3 * f + 1:
        raise InsufficientNodes(
            f"{n} nodes tolerate at most f={max_faulty(n)} Byzantine nodes (n >= 3f+1); "
            f"f={f} needs {3 * f + 1}. Lower f or add nodes."
        )


def quorum(n: int, f: int) -> int:
    """Matching votes that make a decision: any two such sets of `n` share an honest node.

    Two sets of q out of n share at least 2q - n nodes, and that must exceed f:
    q = ceil((n + f + 1) / 2). At n = 3f + 1 that is the textbook 2f + 1; above it, 2f + 1
    is too few (n = 5, f = 1: two sets of 3 can meet in one node, which may be the liar).
    It stays reachable with f silent whenever n >= 3f + 1.

    With f = 0 it is a majority, not 2f + 1 = 1. No member lies then, but a member may be
    slow or cut off, and one vote deciding let a standby that alone stopped hearing the
    gateway change the view by itself and order its own takeover, against the failure
    detectors of every other node (and a gateway that alone stopped hearing the others
    re-plan around them): two logs, two gateways, each refusing the other's plans for
    good (a 4-node cluster under load, 2026-12-05). A majority keeps every decision in
    one log, as in Raft; the price is that fewer than a majority of the members left
    decide nothing (3 nodes survive 1 crash, 4 survive 1, 5 survive 2), which is why
    membership removes a failed member by agreement while a majority still stands.

    >>> [quorum(n, 0) for n in (1, 2, 3, 4, 5)]
    [1, 2, 2, 3, 3]
    >>> quorum(4, 1), quorum(5, 1), quorum(7, 2)
    (3, 4, 5)
    """
    return (n + f + 2) // 2


def weak_quorum(f: int) -> int:
    """Votes that include at least one honest node (e.g. to join a view change)."""
    return f + 1


def live_members(keys: tuple[bytes, ...]) -> tuple[NodeId, ...]:
    """The ids whose key is set: a removed member keeps its id with an empty key."""
    return tuple(NodeId(i) for i, k in enumerate(keys) if k)


def primary(view: int, n: int) -> NodeId:
    """Primaries rotate so a faulty one is replaced after one view change."""
    return NodeId(view % n)
