"""Replicate verification's decisions, as pure functions of what the lanes answered.

Which node-disjoint lanes a plan offers, which lanes' outputs agree and whether f+1 of
them do, which of a lane's signed records are its own, where a lane's records first
contradict the gateway's re-execution (and whom that proves a liar), and the lane that
probes the stages behind a liar. `replicate.Replicator` runs the lanes and feeds these;
they are tested in one process without a pipeline (`tests/test_replicate.py`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from butterfly.protocol.proof import Tolerance, matches_tensor, tensors_close
from butterfly.protocol.sign import verify_message
from butterfly.types.ids import NodeId, RequestId
from butterfly.types.plan import StagePlan
from butterfly.types.wire.agreement import Proof

Lane = tuple[NodeId, ...]  # one node per stage, in chain order


def lanes_of(plan: StagePlan, exclude: Iterable[NodeId] = ()) -> list[Lane]:
    """Every node-disjoint lane the plan offers, lane 0 first (the chain).

    >>> from butterfly.types.model import LayerRange as R
    >>> plan = StagePlan(1, ((0, R(0, 2)), (1, R(2, 4))), ((2, R(0, 2)), (3, R(2, 4))))
    >>> lanes_of(plan)
    [(0, 1), (2, 3)]
    >>> lanes_of(plan, exclude=[1])
    [(0, 3)]
    """
    skip = set(exclude)
    holders = [[n for n in plan.holders(r) if n not in skip] for _, r in plan.stages]
    lanes: list[Lane] = []
    used: set[NodeId] = set()
    for k in range(min(len(h) for h in holders)):
        lane = tuple(h[k] for h in holders)
        if len(set(lane)) == len(lane) and not used & set(lane):
            lanes.append(lane)
            used.update(lane)
    return lanes


def agree(a: torch.Tensor, b: torch.Tensor, tol: Tolerance) -> bool:
    """Two lanes' outputs of one step: same shape, close values, the same greedy token.

    The token too, although honest outputs within the tolerance may name different ones
    on a near-tie: lanes that agree are answered from lane 0's output without the
    gateway's re-execution, and that answer must not depend on which lane was lane 0.
    Lanes that differ only on a near-tie go to the dispute, whose re-execution picks the
    token; `first_contradiction` blames nobody for it (`could_deliver`)."""
    if not tensors_close(a, b, tol):
        return False
    return a.numel() == 0 or bool(torch.equal(a.argmax(dim=-1), b.argmax(dim=-1)))


def could_deliver(out: torch.Tensor, final: torch.Tensor, tol: Tolerance) -> bool:
    """Whether an honest last stage could have delivered `out` where the gateway's
    re-execution computed `final`: every logit within the tolerance of it, whatever
    greedy token that names. Each such logit lies within one honest margin
    (`chosen.honest_margin`: the tolerance's bound at the row's largest magnitude) of the
    re-executed one, so the token trails the re-executed best by at most two margins:
    the allowance audit gives a greedy token (`chosen.Chosen.wrong`), and a token further
    behind fails the tolerance itself. Demanding the re-execution's very token convicted
    honest bfloat16 last stages: two honest computations of a step (a decode step on one
    kernel, the re-execution's prefill on another, each node's kernel chosen by its own
    load-time timing) flipped the argmax of the tiny model at ~1% of positions, the two
    best logits bfloat16-equal or one step apart (a review)."""
    return out.shape == final.shape and tensors_close(out, final, tol)


def agreeing_groups(outputs: Sequence[torch.Tensor], tol: Tolerance) -> list[list[int]]:
    """Lanes grouped by agreement with each group's first member, largest group first."""
    groups: list[list[int]] = []
    for i, out in enumerate(outputs):
        home = next((g for g in groups if agree(outputs[g[0]], out, tol)), None)
        if home is None:
            groups.append([i])
        else:
            home.append(i)
    return sorted(groups, key=len, reverse=True)


def majority(outputs: Sequence[torch.Tensor], f: int, tol: Tolerance) -> int | None:
    """A lane of a group of at least f+1 agreeing disjoint lanes (one of them is honest,
    so with at most f liars no other group can be that large), else None."""
    groups = agreeing_groups(outputs, tol)
    return groups[0][0] if groups and len(groups[0]) >= f + 1 else None


@dataclass(frozen=True)
class LaneRun:
    """One lane's answer to a step: its input rows [start, start + length) and output."""

    nodes: Lane
    start: int
    length: int
    out: torch.Tensor
    records: Mapping[int, Proof] = field(default_factory=dict)  # stage index -> record


def records_by_stage(
    proofs: Sequence[Proof],
    *,
    lane: Lane,
    plan: StagePlan,
    wire_id: RequestId,
    step: int,
    keys: Mapping[NodeId, bytes],
) -> dict[int, Proof]:
    """The lane's signed records of this step, by stage; a record that is not the lane's
    node's own, for its own range, this epoch and step, proves nothing and is dropped."""
    found: dict[int, Proof] = {}
    for proof in proofs:
        for index, (_, layers) in enumerate(plan.stages):
            if (
                proof.sender == lane[index]
                and (proof.layer_start, proof.layer_end) == (layers.start, layers.end)
                and proof.request_id == wire_id
                and proof.step == step
                and proof.epoch == plan.epoch
                and index not in found
            ):
                key = keys.get(proof.sender)
                if key is not None and verify_message(proof, key):
                    found[index] = proof
    return found


def first_contradiction(
    run: LaneRun, reference: Sequence[torch.Tensor], tol: Tolerance
) -> tuple[bool, NodeId | None, str]:
    """(is the lane wrong, the node proven to have lied or None, why).

    `reference[i]` is stage i's output for every position of the history, as the gateway
    computed it. The first record contradicting it names its signer, but only when that
    node's signed input is what the previous node signed as its output: otherwise one of
    the two passed on something other than it signed, and the records do not say who (the
    lane is wrong, nobody is blamed). A lane whose records all match but whose delivered
    output does not is blamed on its last node, who answered the gateway directly. An
    output an honest last stage could have delivered (`could_deliver`) is not wrong, even
    where its greedy token is not the re-execution's: the dispute answers with the
    re-execution's token, and the lane's nodes are right.
    """
    last = len(reference) - 1
    final = reference[last][:, -1:]
    wrong = not could_deliver(run.out, final, tol)
    previous: Proof | None = None
    for index, ref in enumerate(reference):
        proof = run.records.get(index)
        if proof is None:
            return wrong, None, f"stage {index} node {run.nodes[index]} signed no record"
        start, width = (run.start + run.length - 1, 1) if index == last else (run.start, run.length)
        rows = ref[:, start : start + width]
        if rows.shape[1] != width or not matches_tensor(proof.fingerprint, rows, tol):
            if previous is not None and previous.output_hash != proof.input_hash:
                return (
                    True,
                    None,
                    (
                        f"stage {index} node {run.nodes[index]} computed on other bytes than "
                        f"node {run.nodes[index - 1]} signed as its output"
                    ),
                )
            return (
                True,
                run.nodes[index],
                (f"node {run.nodes[index]} (stage {index}) contradicts the re-execution"),
            )
        previous = proof
    if wrong:
        return (
            True,
            run.nodes[last],
            (f"node {run.nodes[last]} delivered another output than it signed"),
        )
    return False, None, ""


def probe_lane(suspect: Lane, liar_at: int, right: Lane) -> Lane:
    """The lane that checks the stages of `suspect` after its stage `liar_at`, whose node
    lied: the right lane's nodes up to and including that stage, the suspect's after it.
    Lanes are node-disjoint, so the probe's nodes are distinct.

    >>> probe_lane((6, 7, 8), 1, (0, 1, 2))
    (0, 1, 8)
    """
    return (*right[: liar_at + 1], *suspect[liar_at + 1 :])
