"""A stage's error answer, charged where it points (`butterfly_peer_errors_total` reads
`blame`): a killed node was never counted, the healthy stage before it always was."""

from __future__ import annotations

from butterfly.dataplane.inflight import DISPATCH_REFUSED, NEXT_UNREACHABLE, StepFailed
from butterfly.types.errors import ConnectionFailed, InvalidInput, StageLost
from butterfly.types.ids import NodeId
from butterfly.types.wire.data import StepError

ROUTE = (NodeId(0), NodeId(1), NodeId(2))


def failed(kind: str, sender: int, retriable: bool = True) -> StepFailed:
    error = StepError(("r",), (4,), NodeId(sender), kind, "why", retriable)
    return StepFailed(error, NodeId(sender))


def test_an_unreachable_next_node_is_charged_not_the_stage_that_says_so() -> None:
    e = failed(NEXT_UNREACHABLE, 1).failure(4, ROUTE)
    assert isinstance(e, StageLost) and e.blame == NodeId(2) and e.retriable
    assert "node 1 failed step 4: why" in str(e)
    last = failed(NEXT_UNREACHABLE, 2).failure(4, ROUTE)  # nothing after it to charge
    assert isinstance(last, ConnectionFailed) and last.blame == NodeId(2)


def test_a_refused_dispatch_charges_nobody_and_other_errors_their_sender() -> None:
    refused = failed(DISPATCH_REFUSED, 1).failure(4, ROUTE)
    assert isinstance(refused, StageLost) and refused.blame is None
    other = failed("out_of_memory", 1).failure(4, ROUTE)
    assert isinstance(other, ConnectionFailed) and other.blame == NodeId(1)
    claim = failed("invalid_input", 1, retriable=False).failure(4, ROUTE)
    assert isinstance(claim, InvalidInput) and claim.blame == NodeId(1) and not claim.retriable
