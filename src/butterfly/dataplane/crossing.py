"""The rows that crossed from one stage to the next, for an audit's dispute.

A signed record pins only each row's largest values (`protocol.proof.fingerprint`), so
a stage that changed the rest of what it sent, and signed exactly that, passes its own
audit, and the next stage, computing honestly on it, contradicts the re-execution on
the honest input. Before the audit convicts a stage, it fetches what crossed into it
(`fetch`: from the receiver, else from the sender, each of which keeps them:
`dataplane.received`), rows bound by their hash to the sender's signed output, and
judges both on them: a sender whose rows are not the honest computation lied
(`contradicted_senders`); a receiver is judged on what it received (`rebuilt`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import torch

from butterfly.dataplane.proving import digest
from butterfly.protocol.proof import Tolerance, rows_close
from butterfly.runtime.wire import decode_tensor
from butterfly.types.errors import ButterflyError
from butterfly.types.ids import Epoch, NodeId, RequestId
from butterfly.types.wire.agreement import Proof
from butterfly.types.wire.data import InputsHeld, InputsQuery

log = logging.getLogger(__name__)
Inputs = Callable[[NodeId, InputsQuery], Awaitable[tuple[InputsHeld, bytes]]]


@dataclass(frozen=True)
class Hop:
    """One step's rows crossing into a stage: the sender's record (its output hash binds
    them), the receiver's (of computing on them), and the positions the request kept
    (`start`, `kept` rows: a speculative step's before the first rejected draft)."""

    step: int
    sender: Proof
    receiver: Proof
    start: int
    kept: int


async def fetch(
    inputs: Inputs,
    max_bytes: int,
    request_id: RequestId,
    epoch: int,
    hops: Sequence[Hop],
) -> dict[int, torch.Tensor]:
    """Per hop's step, the rows that crossed into its stage, as bytes hashing to the
    sender's signed output: asked of each receiver, and of the senders for the steps a
    receiver could not show (with at most f liars, one of the two is honest). A step
    neither shows is missing."""
    crossed: dict[int, torch.Tensor] = {}
    for side in ("receiver", "sender"):
        wanted: dict[NodeId, list[Hop]] = {}
        for hop in hops:
            if hop.step not in crossed:
                signer = hop.receiver.sender if side == "receiver" else hop.sender.sender
                wanted.setdefault(signer, []).append(hop)
        for node, theirs in sorted(wanted.items()):
            steps = tuple(h.step for h in theirs)
            query = InputsQuery(request_id, Epoch(epoch), steps, sent=side == "sender")
            crossed.update(await _shown(inputs, max_bytes, node, query, theirs))
    return crossed


async def _shown(
    inputs: Inputs, max_bytes: int, node: NodeId, query: InputsQuery, hops: Sequence[Hop]
) -> dict[int, torch.Tensor]:
    """The rows `node` shows for `hops` that hash to their senders' signed outputs."""
    try:
        reply, payload = await inputs(node, query)
        rows = decode_tensor(payload, max_bytes) if reply.steps else None
    except ButterflyError as e:
        log.warning("inputs of %s: node %s showed none: %s", query.request_id, node, e)
        return {}
    if (
        rows is None
        or rows.dim() != 3
        or len(reply.lengths) != len(reply.steps)
        or min(reply.lengths) < 1
        or sum(reply.lengths) != rows.shape[1]
    ):
        return {}
    by_step = {h.step: h for h in hops}
    shown, at = {}, 0
    for step, length in zip(reply.steps, reply.lengths, strict=True):
        got, at = rows[:, at : at + length], at + length
        hop = by_step.get(step)
        if hop is not None and digest(got) == hop.sender.output_hash:
            shown[step] = got
    return shown


def contradicted_senders(
    hops: Sequence[Hop], crossed: dict[int, torch.Tensor], honest: torch.Tensor, tol: Tolerance
) -> list[Hop]:
    """The hops whose crossed rows (those the request kept) are not the honest
    computation `honest` (the receiving stage's right input, every position), position
    by position within tolerance: their senders signed a lie."""
    wrong = []
    for hop in hops:
        got = crossed.get(hop.step)
        if got is None:
            continue
        right, kept = honest[:, hop.start : hop.start + hop.kept], got[:, : hop.kept]
        if right.shape == kept.shape and not rows_close(kept, right, tol):
            wrong.append(hop)
    return wrong


def rebuilt(
    honest: torch.Tensor, hops: Sequence[Hop], crossed: dict[int, torch.Tensor]
) -> torch.Tensor | None:
    """The receiving stage's input as it received it: `honest` with every hop's kept
    rows replaced by what crossed (positions no hop covers, computed under an earlier
    plan, as `honest` has them), or None when a hop's rows are missing."""
    out = honest.clone()
    for hop in hops:
        got = crossed.get(hop.step)
        if (
            got is None
            or got.shape[1] < hop.kept
            or got.shape[2:] != out.shape[2:]
            or hop.start + hop.kept > out.shape[1]
        ):
            return None
        out[:, hop.start : hop.start + hop.kept] = got[:, : hop.kept].to(out.dtype)
    return out
