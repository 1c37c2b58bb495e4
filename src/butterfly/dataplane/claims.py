"""A stage's claim that a step cannot be computed, believed only when it holds up.

A node answers a step it cannot compute with a StepError; a non-retriable one says "this
request cannot be served" (its input is invalid, too long, malformed). Were that taken on
the word of any member, one liar could fail every task it touches. So a claim (a
non-retriable error from another node) is believed only when

- the gateway makes it itself: its own stage, fed its own input, failed (the gateway is
  trusted, DESIGN.md section 3); or
- claims came down f+1 routes whose *prefixes* are pairwise disjoint, where a claim's
  prefix is every node of its route up to and including the claimant, the gateway left
  out. With at most f liars one of those prefixes is all honest, and an honest prefix
  fed the gateway's own input fails only when that input cannot be served.

Otherwise the request replays on a route that avoids every node of every prefix that
claimed (the claimant, and the nodes that fed it: an honest node given corrupt bytes by
its sender fails honestly), and those nodes are routed around for the rest of the plan's
epoch. A claim is unsigned: it never evicts anybody, so an honest node that failed for a
reason of its own costs the cluster a detour, never a member. When no route avoids them
all (too few holders left), the claim is believed: the request cannot be checked, and
failing it is no wrong answer.

    >>> from butterfly.types.model import LayerRange as R
    >>> plan = StagePlan(1, ((0, R(0, 2)), (1, R(2, 4))), ((2, R(0, 2)), (3, R(2, 4))))
    >>> prefix((0, 1), 1, gateway=0)
    frozenset({1})
    >>> route_avoiding(plan, {1})
    (0, 3)
    >>> believed([Claim(1, frozenset({1}), "")], f=1), believed(
    ...     [Claim(1, frozenset({1}), ""), Claim(3, frozenset({3}), "")], f=1)
    (False, True)
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from butterfly.dataplane.lanes import Lane, lanes_of
from butterfly.types.errors import InvalidInput
from butterfly.types.ids import NodeId, RequestId
from butterfly.types.plan import StagePlan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Claim:
    """One node's non-retriable error for a request, and the nodes that may have caused it."""

    node: NodeId
    prefix: frozenset[NodeId]
    message: str


# --- pure rules -------------------------------------------------------------------------


def prefix(route: Sequence[NodeId], claimant: NodeId, *, gateway: NodeId) -> frozenset[NodeId]:
    """The nodes whose work reached `claimant` on `route` (itself included), the gateway
    left out; just the claimant when it is not on the route (it could not have answered,
    `protocol.entitled`, but the rule must not trust that)."""
    if claimant not in route:
        return frozenset({claimant} - {gateway})
    return frozenset(route[: route.index(claimant) + 1]) - {gateway}


def disjoint_count(claims: Iterable[Claim]) -> int:
    """How many of the claims have pairwise disjoint prefixes (greedily, in order: a lower
    bound, so it never believes more than the rule allows)."""
    seen: set[NodeId] = set()
    count = 0
    for claim in claims:
        if not claim.prefix & seen:
            seen |= claim.prefix
            count += 1
    return count


def believed(claims: Sequence[Claim], f: int) -> bool:
    """Whether the request's claims hold: one of them came from the gateway's own work
    (an empty prefix), or f+1 of them from disjoint prefixes, one of which is honest."""
    return any(not c.prefix for c in claims) or disjoint_count(claims) >= f + 1


def route_avoiding(plan: StagePlan, avoid: Iterable[NodeId]) -> Lane | None:
    """A route through every stage on holders not in `avoid` (the plan's chain when it
    avoids none of them), or None when there is none."""
    lanes = lanes_of(plan, exclude=avoid)
    return lanes[0] if lanes else None


# --- the gateway's ledger ---------------------------------------------------------------


@dataclass
class Claims:
    """The claims made about the gateway's requests, the nodes they route around, and
    each request's route (fixed while it runs: a request moved to nodes without its KV
    caches would make them fail its next step honestly)."""

    gateway: NodeId
    f: int
    _epoch: int = -1
    _avoid: set[NodeId] = field(default_factory=set)  # this epoch's suspects
    _claims: dict[RequestId, list[Claim]] = field(default_factory=dict)
    _routes: dict[RequestId, tuple[int, Lane]] = field(default_factory=dict)

    def route(self, request_id: RequestId, plan: StagePlan) -> Lane:
        """The route of the request's next step; () is the plan's chain."""
        self._roll(plan)
        held = self._routes.get(request_id)
        if held is not None and held[0] == plan.epoch:
            return held[1]
        route = self._around(plan) or ()
        self._routes[request_id] = (plan.epoch, route)
        return route

    def claim(
        self, request_id: RequestId, plan: StagePlan, claimant: NodeId, message: str
    ) -> InvalidInput | None:
        """Record a non-retriable error `claimant` (the authenticated sender) answered the
        request with: the error to fail it with when the claims hold, else None after
        moving the request to a route that avoids every node that may have caused it
        (the request then replays its history from position 0 there)."""
        self._roll(plan)
        route = self._routes.get(request_id, (plan.epoch, ()))[1] or plan.nodes
        claim = Claim(claimant, prefix(route, claimant, gateway=self.gateway), message)
        claims = self._claims.setdefault(request_id, [])
        claims.append(claim)
        if believed(claims, self.f):
            self._avoid -= {n for c in claims for n in c.prefix}  # they told the truth
            return self._failure(self._claims.pop(request_id), "")
        self._avoid |= claim.prefix
        around = self._around(plan)
        if around is None:
            self._claims.pop(request_id)
            return self._failure(claims, "; no route avoids the nodes that made it")
        log.warning(
            "request %s: node %s claims it cannot be served (%s); replaying around nodes %s",
            request_id,
            claim.node,
            claim.message,
            sorted(self._avoid),
        )
        self._routes[request_id] = (plan.epoch, around)
        return None

    def finished(self, request_id: RequestId) -> None:
        """The request is over: its claims, if any, were refuted by the route it ended on."""
        claims = self._claims.pop(request_id, [])
        self._routes.pop(request_id, None)
        if claims:
            log.warning(
                "request %s: refuted claims of nodes %s (another route served it); "
                "they are routed around this epoch",
                request_id,
                sorted({c.node for c in claims}),
            )

    @property
    def avoided(self) -> frozenset[NodeId]:
        """The nodes requests are routed around in the current epoch."""
        return frozenset(self._avoid)

    def _roll(self, plan: StagePlan) -> None:
        if plan.epoch != self._epoch:  # a new plan: a fresh start for every node in it
            self._epoch, self._avoid = plan.epoch, set()

    def _around(self, plan: StagePlan) -> Lane | None:
        """A route avoiding this epoch's suspects: () for the chain itself, None for none."""
        if not self._avoid & set(plan.nodes):
            return ()
        return route_avoiding(plan, self._avoid)

    @staticmethod
    def _failure(claims: Sequence[Claim], why: str) -> InvalidInput:
        nodes = ", ".join(str(c.node) for c in claims)
        return InvalidInput(
            f"the request cannot be served (claimed by node(s) {nodes}{why}): {claims[-1].message}",
            blame=claims[-1].node,
        )
