"""The rule for a node's claim that a request cannot be served (dataplane.claims), pure."""

from __future__ import annotations

from butterfly.dataplane.claims import (
    Claim,
    Claims,
    believed,
    disjoint_count,
    prefix,
    route_avoiding,
)
from butterfly.types.ids import Epoch, NodeId, RequestId
from butterfly.types.model import LayerRange as R
from butterfly.types.plan import StagePlan

N = NodeId
# n = 6, f = 1: chain 0 (the gateway) -> 1 -> 2, standbys 3, 4, 5
PLAN = StagePlan(
    Epoch(1),
    ((N(0), R(0, 2)), (N(1), R(2, 4)), (N(2), R(4, 6))),
    ((N(3), R(0, 2)), (N(4), R(2, 4)), (N(5), R(4, 6))),
)


def claim(node: int, *before: int) -> Claim:
    return Claim(N(node), frozenset(N(n) for n in (*before, node)), "")


def test_a_claim_suspects_its_claimant_and_every_node_that_fed_it_but_the_gateway() -> None:
    assert prefix((N(0), N(1), N(2)), N(2), gateway=N(0)) == {1, 2}
    assert prefix((N(0), N(1), N(2)), N(0), gateway=N(0)) == frozenset()
    assert prefix((N(0), N(1)), N(7), gateway=N(0)) == {7}  # not on the route: itself


def test_claims_hold_from_the_gateway_or_from_f_plus_one_disjoint_prefixes() -> None:
    assert believed([Claim(N(0), frozenset(), "")], f=1)  # the gateway's own stage
    assert not believed([claim(2, 1)], f=1)
    assert believed([claim(2, 1), claim(5, 4)], f=1)
    # sharing node 1, the two may both be that one liar's doing
    assert disjoint_count([claim(2, 1), claim(1)]) == 1
    assert not believed([claim(2, 1), claim(1)], f=1)
    assert believed([claim(2, 1)], f=0)  # no liar tolerated: taken at its word


def test_a_route_avoiding_suspects_takes_their_ranges_other_holders() -> None:
    assert route_avoiding(PLAN, {N(1), N(2)}) == (0, 4, 5)
    assert route_avoiding(PLAN, {N(2)}) == (0, 1, 5)
    assert route_avoiding(PLAN, {N(2), N(5)}) is None


def test_the_ledger_moves_a_request_around_a_claim_and_later_ones_start_there() -> None:
    claims = Claims(N(0), f=1)
    first, second = RequestId("a"), RequestId("b")
    assert claims.route(first, PLAN) == ()  # the chain
    assert claims.claim(first, PLAN, N(2), "node 2: invalid input") is None
    assert claims.route(first, PLAN) == (0, 4, 5) and claims.avoided == {1, 2}
    assert claims.route(second, PLAN) == (0, 4, 5)
    failure = claims.claim(first, PLAN, N(5), "node 5: invalid input")
    assert failure is not None and failure.blame == 5 and not failure.retriable
    assert "node(s) 2, 5" in str(failure) and "node 5: invalid input" in str(failure)
    assert claims.avoided == frozenset()  # both told the truth, as far as anyone knows
    later = StagePlan(Epoch(2), PLAN.stages, PLAN.replicas)
    claims.finished(second)
    assert claims.route(second, later) == ()


def test_a_request_stays_on_its_route_while_it_runs() -> None:
    """Another request's claim must not move a running one to nodes without its caches."""
    claims = Claims(N(0), f=1)
    running, other = RequestId("a"), RequestId("b")
    assert claims.route(running, PLAN) == ()
    assert claims.claim(other, PLAN, N(1), "no") is None
    assert claims.route(running, PLAN) == ()
    assert claims.route(other, PLAN) == (0, 4, 2)


def test_a_claim_with_no_route_around_it_is_believed() -> None:
    lone = StagePlan(Epoch(1), PLAN.stages, ((N(3), R(0, 2)),))
    failure = Claims(N(0), f=1).claim(RequestId("a"), lone, N(1), "too long")
    assert failure is not None and "no route avoids" in str(failure)
