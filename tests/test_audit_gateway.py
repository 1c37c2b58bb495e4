"""The audit re-runs every stage on another holder except the gateway's own, whose kept
outputs it takes as computed (the client trusts the gateway)."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import torch

from butterfly.dataplane.audit import Ask, Auditor, Claim, Inputs
from butterfly.dataplane.proving import Prover
from butterfly.dataplane.referee import Referee
from butterfly.protocol.proof import (
    Tolerance,
    fingerprint,
    matches_tensor,
    rows_close,
    tolerance_for,
)
from butterfly.protocol.sign import SigningKey
from butterfly.runtime.llama import LlamaStage
from butterfly.runtime.loader import load_stage
from butterfly.runtime.native import BlockedWeight
from butterfly.runtime.precision import verification_floor
from butterfly.runtime.stage import Stage, prefill_outputs
from butterfly.runtime.torch_thread import TorchThread
from butterfly.runtime.wire import decode_tensor, encode_tensor
from butterfly.testing.liars import pinned_only
from butterfly.types.ids import NodeId
from butterfly.types.model import LayerRange
from butterfly.types.plan import StagePlan
from butterfly.types.wire.agreement import Proof, decode
from butterfly.types.wire.data import AuditReply, AuditRequest, InputsHeld, InputsQuery

FIRST, SECOND = LayerRange(0, 2), LayerRange(2, 4)
EXACT = Tolerance()
KEYS = {NodeId(n): SigningKey.generate() for n in range(4)}
PLAN = StagePlan(
    1, ((NodeId(0), FIRST), (NodeId(1), SECOND)), ((NodeId(2), FIRST), (NodeId(3), SECOND))
)


def signed(
    keys: dict[NodeId, SigningKey],
    epoch: int,
    step: int,
    index: int,
    node: NodeId,
    layers: LayerRange,
    x: torch.Tensor,
    out: torch.Tensor,
    chunk: int = 1,
) -> Proof:
    """`node`'s signed record of stage `index` of request "r"'s `step`, as a node signs it
    (fingerprinting `chunk` positions together)."""
    record = Prover(node, keys[node], chunk=chunk).prove(
        epoch=epoch,
        request_id="r",
        step=step,
        stage=index,
        layers=layers,
        x_in=x,
        out=out,
        layer_outputs=[out] * len(layers),
    )
    proof = decode(record)
    assert isinstance(proof, Proof)
    return proof


def re_running(stages: dict[LayerRange, Stage], asked: list[int]) -> Ask:
    """An auditor's answer: the asked range re-run honestly; who was asked, in `asked`."""

    async def ask(node: NodeId, req: AuditRequest, payload: bytes) -> tuple[AuditReply, bytes]:
        asked.append(int(node))
        layers = LayerRange(req.layer_start, req.layer_end)
        x = decode_tensor(payload, 1 << 30)
        with torch.inference_mode():
            out = prefill_outputs(
                stages[layers], x, stages[layers].new_cache(), outputs_from=req.outputs_from
            )
        return AuditReply("r", int(node), ""), encode_tensor(out)

    return ask


def holding(
    received: dict[tuple[int, int], torch.Tensor],
    sent: dict[tuple[int, int], torch.Tensor] | None = None,
) -> Inputs:
    """A node's answer to what crossed: `received[(node, step)]`, the rows it computed on
    at that step, or `sent[(node, step)]`, those it sent on (empty: nobody kept any)."""

    async def inputs(node: NodeId, query: InputsQuery) -> tuple[InputsHeld, bytes]:
        kept = (sent or {}) if query.sent else received
        held = [(s, kept[int(node), s]) for s in query.steps if (int(node), s) in kept]
        steps, lengths = tuple(s for s, _ in held), tuple(r.shape[1] for _, r in held)
        payload = encode_tensor(torch.cat([r for _, r in held], dim=1)) if held else b""
        return InputsHeld(query.request_id, node, steps, lengths), payload

    return inputs


def test_only_stages_not_run_by_the_gateway_are_re_run(tiny_model: Path) -> None:
    stages = {r: load_stage(tiny_model, r) for r in (FIRST, SECOND)}
    ids = torch.tensor([[5, 9, 2, 7, 1, 8]])
    with torch.inference_mode():
        hidden = prefill_outputs(stages[FIRST], ids, stages[FIRST].new_cache())
        logits = prefill_outputs(stages[SECOND], hidden, stages[SECOND].new_cache())

    def claim(
        node: int, index: int, layers: LayerRange, x: torch.Tensor, out: torch.Tensor, start: int
    ) -> Claim:
        proof = signed(KEYS, 1, 0, index, NodeId(node), layers, x, out)
        return Claim(proof, start, out.shape[1], (0, x.shape[1]))

    last = logits.shape[1] - 1
    claims = {
        0: [claim(0, 0, FIRST, ids, hidden, 0)],
        1: [claim(1, 1, SECOND, hidden, logits[:, last:], last)],
    }
    asked: list[int] = []
    ask = re_running(stages, asked)

    def auditor(kept: torch.Tensor | None) -> Auditor:
        return Auditor(
            ask=ask,
            inputs=holding({}),
            keys={n: k.public for n, k in KEYS.items()},
            referee=Referee(tiny_model, TorchThread()),
            tolerance=Tolerance(),
            max_tensor_bytes=1 << 30,
            gateway=NodeId(0),
            own_outputs=lambda rid, layers, length: kept if layers == FIRST else None,
        )

    sequence = ids[0].tolist()
    verdict = asyncio.run(auditor(hidden).audit(PLAN, "r", sequence, claims))
    assert verdict.verified and verdict.checked == 2
    assert asked == [3]  # node 2, the gateway's replica, was not asked
    asked.clear()
    verdict = asyncio.run(auditor(None).audit(PLAN, "r", sequence, claims))
    assert verdict.verified and asked == [2, 3]  # nothing kept: both stages re-run


def test_a_greedy_requests_tokens_are_held_to_the_re_executed_logits() -> None:
    from butterfly.dataplane.chosen import Chosen
    from butterfly.types.tasks import SamplingParams

    tol = Tolerance(rtol=1e-3, atol=1e-4)
    logits = torch.tensor([[[0.0, 2.0, 1.0], [3.0, 0.0, 2.9995], [0.0, 0.0, 5.0]]])
    greedy = SamplingParams(temperature=0.0)
    # prompt of 2: positions 1, 2, 3 choose tokens 0, 1, 2; rows from position 1 on
    assert Chosen(greedy, 2, (1, 0, 2)).wrong(logits, 1, tol) == []
    assert Chosen(greedy, 2, (1, 2, 2)).wrong(logits, 1, tol) == []  # a near tie
    assert Chosen(greedy, 2, (2, 0, 1)).wrong(logits, 1, tol) == [1, 3]
    assert Chosen(greedy, 2, (1, 0, 7)).wrong(logits, 1, tol) == [3]  # not a token
    sampled = SamplingParams(temperature=0.8, seed=1)
    assert Chosen(sampled, 2, (2, 0, 1)).wrong(logits, 1, tol) == []  # all drawable
    peaked = torch.tensor([[[0.0, 40.0, 0.0], [0.0, 0.0, 1.0]]])
    assert Chosen(sampled, 1, (0, 1)).wrong(peaked, 0, tol) == [0]  # e^-50: never drawn
    # temperature 1 and top_k 1 decode as greedy does: the best, or nothing
    one = SamplingParams(temperature=1.0, top_k=1, seed=1)
    assert Chosen(one, 1, (1, 1)).wrong(peaked, 0, tol) == [1]
    assert Chosen(one, 1, (1, 2)).wrong(peaked, 0, tol) == []


def _gateways_auditor(
    tiny_model: Path,
    stages: dict[LayerRange, Stage],
    keys: dict[NodeId, SigningKey],
    hidden: torch.Tensor,
    asked: list[int],
) -> tuple[Auditor, list[tuple[NodeId, ...]], Any]:
    """The auditor of gateway node 0, which ran `FIRST` itself (its outputs `hidden`),
    the nodes it blames (appended by the returned `on_liars`)."""
    auditor = Auditor(
        ask=re_running(stages, asked),
        inputs=holding({}),
        keys={n: k.public for n, k in keys.items()},
        referee=Referee(tiny_model, TorchThread()),
        tolerance=EXACT,
        max_tensor_bytes=1 << 30,
        gateway=NodeId(0),
        own_outputs=lambda rid, layers, length: hidden if layers == FIRST else None,
    )
    blamed: list[tuple[NodeId, ...]] = []

    async def on_liars(liars: tuple[NodeId, ...], reason: str) -> None:
        blamed.append(liars)

    return auditor, blamed, on_liars


def test_a_request_that_ran_under_two_plans_is_audited_under_each(tiny_model: Path) -> None:
    """Steps 1-2 under epoch 1 (chain 0 -> 1), step 3 under epoch 2 (node 1 failed; chain
    0 -> 3, node 4 a new holder of the second range). Each plan's records are held to a
    re-run by that plan's other holder still in the plan now: the request came back
    unverified when only the last plan's records were read. A lie in the first plan's
    steps is found and its signer blamed, also where no member still holds its range
    (the gateway re-executes it); a plan whose records are missing, or whose range no
    member holds with audit_lone_ranges off, leaves the request unverified and blames
    nobody, as does a contradiction by a node that went on from a cache another node
    built."""
    from butterfly.dataplane.request_audit import Steps, audit_request
    from butterfly.runtime.generate import generate
    from butterfly.types.ids import RequestId
    from butterfly.types.tasks import InferenceResult, InferenceTask

    stages = {r: load_stage(tiny_model, r) for r in (FIRST, SECOND)}
    prompt = [5, 9, 2, 7]
    output = list(generate([load_stage(tiny_model)], prompt, 3))
    ids = torch.tensor([prompt + output[:-1]])
    with torch.inference_mode():
        hidden = prefill_outputs(stages[FIRST], ids, stages[FIRST].new_cache())
        logits = prefill_outputs(stages[SECOND], hidden, stages[SECOND].new_cache())
    keys = {**KEYS, NodeId(4): SigningKey.generate()}
    one = PLAN
    two = StagePlan(
        2, ((NodeId(0), FIRST), (NodeId(3), SECOND)), ((NodeId(2), FIRST), (NodeId(4), SECOND))
    )
    positions = {1: (0, 4), 2: (4, 1), 3: (5, 1)}
    ran_under = {1: one, 2: one, 3: two}

    def records(lie_at: int | None = None) -> list[Proof]:
        out = []
        for step, (start, length) in positions.items():
            plan = ran_under[step]
            end = start + length
            last = logits[:, end - 1 : end].clone()
            if step == lie_at:
                last[0, 0, output[end - 4]] += 5.0  # another token's logit raised
            for index, (x, y) in enumerate(
                ((ids[:, start:end], hidden[:, start:end]), (hidden[:, start:end], last))
            ):
                node, layers = plan.stages[index]
                out.append(signed(keys, plan.epoch, step, index, node, layers, x, y))
        return out

    asked: list[int] = []
    auditor, blamed, on_liars = _gateways_auditor(tiny_model, stages, keys, hidden, asked)
    task = InferenceTask(RequestId("r"), input_ids=tuple(prompt), max_new_tokens=3)
    result = InferenceResult(RequestId("r"), output_ids=tuple(output))

    def audit(proofs: list[Proof], members: set[int], plans: dict[int, StagePlan]) -> Any:
        return asyncio.run(
            audit_request(
                auditor,
                Steps(dict(positions), plans),
                proofs,
                task,
                result,
                emit=lambda event: None,
                on_liars=on_liars,
                members={NodeId(n) for n in members},
            )
        )

    now = {0, 2, 3, 4}  # node 1 failed
    verdict = audit(records(), now, ran_under)
    assert verdict.verified and verdict.checked == 6 and not blamed
    assert asked == [3, 4]  # epoch 1's second range by node 3, epoch 2's by node 4
    verdict = audit(records(lie_at=2), now, ran_under)
    assert not verdict.verified and verdict.liars == (NodeId(1),) and blamed == [(NodeId(1),)]
    assert "epoch 1" in verdict.reason
    blamed.clear()
    verdict = audit([p for p in records() if p.epoch == 1], now, ran_under)
    assert not verdict.verified and "epoch 2" in verdict.reason and not blamed
    # nobody left to re-run epoch 1's second range: the gateway re-executes it, and
    # convicts its signer's lie (byzantine.audit_lone_ranges)
    verdict = audit(records(), {0, 2, 4}, ran_under)
    assert verdict.verified and verdict.checked == 6 and not blamed, verdict.reason
    verdict = audit(records(lie_at=2), {0, 2, 4}, ran_under)
    assert verdict.liars == (NodeId(1),) and blamed == [(NodeId(1),)]
    blamed.clear()
    auditor.retune(EXACT, lone_ranges=False)
    verdict = audit(records(), {0, 2, 4}, ran_under)
    assert not verdict.verified and "no replica" in verdict.reason and not blamed
    assert "byzantine.audit_lone_ranges is off" in verdict.reason
    auditor.retune(EXACT)
    # and a lie in epoch 2's, whose node 3 went on from node 1's KV copy: what its cache
    # held is not known, so it is not convicted (a poisoned copy had an honest standby
    # evicted: a review); node 0, the gateway, kept its range, and is judged in full
    verdict = audit(records(lie_at=3), {0, 2, 4}, ran_under)
    assert not verdict.verified and not blamed, verdict.reason
    assert "its caches held positions before 5 from before this plan" in verdict.reason
    assert verdict.recompute  # the engine computes it again, from fresh caches
    verdict = audit(records(), now, {1: one, 2: one})  # a step of no known plan
    assert not verdict.verified and "step 3" in verdict.reason and not blamed


def test_a_chosen_token_no_record_covers_is_still_held_to_honest_logits(
    tiny_model: Path,
) -> None:
    """Every chosen token is held to the re-executed logits, also where none of the
    records audited covers the step it was chosen at (a replay's step signs its last row
    only): a wrong one leaves the request unverified, blaming nobody, where it passed
    unchecked before (a review)."""
    from butterfly.dataplane.request_audit import Steps, audit_request
    from butterfly.runtime.generate import generate
    from butterfly.types.ids import RequestId
    from butterfly.types.tasks import InferenceResult, InferenceTask

    stages = {r: load_stage(tiny_model, r) for r in (FIRST, SECOND)}
    whole = load_stage(tiny_model)
    prompt = [5, 9, 2, 7]
    (honest,) = generate([whole], prompt, 1)
    wrong = (honest + 1) % 256  # not the greedy token at position 3
    output = [wrong, *generate([whole], [*prompt, wrong], 2)]
    ids = torch.tensor([prompt + output[:-1]])
    with torch.inference_mode():
        hidden = prefill_outputs(stages[FIRST], ids, stages[FIRST].new_cache())
        logits = prefill_outputs(stages[SECOND], hidden, stages[SECOND].new_cache())
    positions = {2: (4, 1), 3: (5, 1)}  # the step that chose `wrong` is not among them
    records = []
    for step, (start, _) in positions.items():
        rows = slice(start, start + 1)
        records.append(signed(KEYS, 1, step, 0, NodeId(0), FIRST, ids[:, rows], hidden[:, rows]))
        records.append(
            signed(KEYS, 1, step, 1, NodeId(1), SECOND, hidden[:, rows], logits[:, rows])
        )
    auditor, blamed, on_liars = _gateways_auditor(tiny_model, stages, KEYS, hidden, [])
    verdict = asyncio.run(
        audit_request(
            auditor,
            Steps(positions, {step: PLAN for step in positions}),
            records,
            InferenceTask(RequestId("r"), input_ids=tuple(prompt), max_new_tokens=3),
            InferenceResult(RequestId("r"), output_ids=tuple(output)),
            emit=lambda event: None,
            on_liars=on_liars,
        )
    )
    assert not verdict.verified and not blamed and "positions [3]" in verdict.reason
    assert verdict.recompute  # a wrong token nobody answers for: computed again


def test_a_token_from_a_dead_gateways_checkpoint_convicts_no_record_that_covers_it(
    tiny_model: Path,
) -> None:
    """A request resumed from a dead gateway's checkpoint holding one token, chosen from
    a liar's logits (or from logits a poisoned KV copy moved): the resuming prefill's
    record of every row (the request asked for logprobs) covers that token's row, and
    convicted the honest last stage that signed it (a review). Nobody answers for a
    token this gateway did not choose: nobody is blamed, and it is computed again. The
    logprob this gateway reported of it, scored from those rows, the record answers for."""
    from butterfly.dataplane.request_audit import Steps, audit_request
    from butterfly.runtime.generate import generate
    from butterfly.types.ids import RequestId
    from butterfly.types.tasks import InferenceResult, InferenceTask, Sampled

    stages = {r: load_stage(tiny_model, r) for r in (FIRST, SECOND)}
    whole = load_stage(tiny_model)
    prompt = [5, 9, 2, 7]
    (honest,) = generate([whole], prompt, 1)
    wrong = (honest + 1) % 256  # the checkpoint's token: not the greedy one at position 3
    output = [wrong, *generate([whole], [*prompt, wrong], 2)]
    ids = torch.tensor([prompt + output[:-1]])
    with torch.inference_mode():
        hidden = prefill_outputs(stages[FIRST], ids, stages[FIRST].new_cache())
        logits = prefill_outputs(stages[SECOND], hidden, stages[SECOND].new_cache())
    positions = {1: (0, 5), 2: (5, 1)}  # the resuming prefill, every row; one decode step
    logprobs: list[Sampled] = []  # reported of the tokens
    records = []
    for step, (start, length) in positions.items():
        rows = slice(start, start + length)
        records.append(signed(KEYS, 1, step, 0, NodeId(0), FIRST, ids[:, rows], hidden[:, rows]))
        records.append(
            signed(KEYS, 1, step, 1, NodeId(1), SECOND, hidden[:, rows], logits[:, rows])
        )
    auditor, blamed, on_liars = _gateways_auditor(tiny_model, stages, KEYS, hidden, [])

    def audit(inherited: int) -> Any:
        steps = Steps(dict(positions), {step: PLAN for step in positions}, every_row={1})
        steps.inherited = inherited
        return asyncio.run(
            audit_request(
                auditor,
                steps,
                records,
                InferenceTask(RequestId("r"), input_ids=tuple(prompt), max_new_tokens=3),
                InferenceResult(RequestId("r"), output_ids=tuple(output), logprobs=tuple(logprobs)),
                emit=lambda event: None,
                on_liars=on_liars,
            )
        )

    verdict = audit(inherited=1)
    assert not verdict.verified and not blamed, (blamed, verdict.reason)
    assert verdict.recompute and "positions [3]" in verdict.reason
    # chosen here, from the logits node 1 signed: its record answers for it
    verdict = audit(inherited=0)
    assert verdict.liars == (NodeId(1),) and blamed == [(NodeId(1),)], verdict.reason
    # the honest token, but a logprob of it no honest logits give: this gateway scored
    # it from the rows node 1 sent for the resuming prefill, which answer for it
    honest_output = [honest, *generate([whole], [*prompt, honest], 2)]
    ids = torch.tensor([prompt + honest_output[:-1]])
    with torch.inference_mode():
        hidden = prefill_outputs(stages[FIRST], ids, stages[FIRST].new_cache())
        logits = prefill_outputs(stages[SECOND], hidden, stages[SECOND].new_cache())
    scores = torch.log_softmax(logits[0].float(), dim=-1)
    reported = [Sampled(t, float(scores[3 + j, t])) for j, t in enumerate(honest_output)]
    reported[0] = Sampled(honest, float(scores[3, honest]) - 3.0)
    records.clear()
    for step, (start, length) in positions.items():
        rows = slice(start, start + length)
        records.append(signed(KEYS, 1, step, 0, NodeId(0), FIRST, ids[:, rows], hidden[:, rows]))
        records.append(
            signed(KEYS, 1, step, 1, NodeId(1), SECOND, hidden[:, rows], logits[:, rows])
        )
    output[:] = honest_output
    logprobs[:] = reported
    auditor, blamed, on_liars = _gateways_auditor(tiny_model, stages, KEYS, hidden, [])
    verdict = audit(inherited=1)
    assert verdict.liars == (NodeId(1),) and blamed == [(NodeId(1),)], verdict.reason


CHAIN_1_2 = StagePlan(
    1, ((NodeId(1), FIRST), (NodeId(2), SECOND)), ((NodeId(3), FIRST), (NodeId(0), SECOND))
)
IDS = torch.tensor([[5, 9, 2, 7, 1, 8]])


def _honest(tiny_model: Path) -> tuple[dict[LayerRange, Stage], torch.Tensor, torch.Tensor]:
    """The two stages, and their honest outputs on `IDS`."""
    stages = {r: load_stage(tiny_model, r) for r in (FIRST, SECOND)}
    with torch.inference_mode():
        hidden = prefill_outputs(stages[FIRST], IDS, stages[FIRST].new_cache())
        logits = prefill_outputs(stages[SECOND], hidden, stages[SECOND].new_cache())
    return stages, hidden, logits


def _audit_1_2(
    tiny_model: Path,
    sent: torch.Tensor,
    logits: torch.Tensor,
    inputs: Inputs,
    tol: Tolerance = EXACT,
    *,
    start: int = 0,
    own_history: dict[int, NodeId] | None = None,
) -> tuple[Any, dict[int, list[Claim]]]:
    """Chain 1 -> 2 of `CHAIN_1_2` (the gateway, 4, runs neither; 3 and 0 re-run them)
    audited: node 1 signed `sent` as its output on `IDS`, node 2 `logits` on `sent`, in
    one step of the positions from `start` (after 0: the plan went on from caches built
    before it, by the nodes `own_history` names)."""
    keys = {NodeId(n): SigningKey.generate() for n in range(5)}
    w = IDS.shape[1] - start
    x, sent, logits = IDS[:, start:], sent[:, start:], logits[:, start:]
    records = {
        0: [Claim(signed(keys, 1, 0, 0, NodeId(1), FIRST, x, sent), start, w, (start, w))],
        1: [Claim(signed(keys, 1, 0, 1, NodeId(2), SECOND, sent, logits), start, w, (start, w))],
    }
    auditor = Auditor(
        ask=re_running(_honest(tiny_model)[0], []),
        inputs=inputs,
        keys={n: k.public for n, k in keys.items()},
        referee=Referee(tiny_model, TorchThread()),
        tolerance=tol,
        max_tensor_bytes=1 << 30,
        gateway=NodeId(4),
    )
    sequence = IDS[0].tolist()
    audit = auditor.audit(CHAIN_1_2, "r", sequence, records, own_history=own_history)
    verdict = asyncio.run(audit)
    return verdict, records


def _below_fingerprint_chain(
    tiny_model: Path, receiver_holds: str, receiver_lies: bool = False, sender_shows: bool = False
) -> tuple[Any, dict[int, list[Claim]]]:
    """Node 1 sends its output with all but each row's 8 largest values halved
    (`pinned_only`, invisible to its records) unless `receiver_lies`, when node 2 skews
    its own output instead. Node 2 answers for what it received with `receiver_holds`:
    "sent" (the bytes node 1 signed), "other" (bytes nobody signed) or "nothing"; node 1
    shows what it sent only with `sender_shows`."""
    stages, hidden, _ = _honest(tiny_model)
    with torch.inference_mode():
        sent = hidden if receiver_lies else pinned_only(hidden, 8)
        logits = prefill_outputs(stages[SECOND], sent, stages[SECOND].new_cache())
    if receiver_lies:
        logits = logits * 1.5
    held = {"sent": {(2, 0): sent}, "other": {(2, 0): sent + 1.0}, "nothing": {}}
    shown = {(1, 0): sent} if sender_shows else {}
    return _audit_1_2(tiny_model, sent, logits, holding(held[receiver_holds], shown))


def test_a_next_stage_cleared_by_what_it_received_leaves_its_sender_convicted(
    tiny_model: Path,
) -> None:
    """Node 1's records match every honest re-run; node 2 computed honestly on what node
    1 sent and contradicts the re-execution on the honest input. Node 2 still holds
    those bytes, which hash to node 1's signed output and are not the honest
    computation: node 1 is the liar, on the evidence of its own record."""
    verdict, records = _below_fingerprint_chain(tiny_model, "sent")
    assert not verdict.verified and verdict.liars == (NodeId(1),), verdict.reason
    assert verdict.evidence == (records[0][0].proof.signature,)
    assert "node(s) 1 sent stage 1 inputs at step(s) [0]" in verdict.reason


def test_a_sender_that_went_on_from_a_copy_is_not_convicted_for_what_it_sent(
    tiny_model: Path,
) -> None:
    """As above, but node 1 went on at position 2 from caches built before the plan (a
    standby on a chain node's KV copy, which moved its output where its records do not
    pin it), while node 2 kept its stage and built its caches itself. Node 1's rows
    convicted it, an honest standby (a review); now nobody is, and the request is
    computed again from fresh caches."""
    stages, hidden, _ = _honest(tiny_model)
    with torch.inference_mode():
        sent = pinned_only(hidden, 8)
        logits = prefill_outputs(stages[SECOND], sent, stages[SECOND].new_cache())
    rows = holding({(2, 0): sent[:, 2:]})
    verdict, _ = _audit_1_2(tiny_model, sent, logits, rows, start=2, own_history={1: NodeId(2)})
    assert not verdict.verified and verdict.liars == (), verdict.reason
    assert verdict.recompute and "caches from before this plan" in verdict.reason
    # node 1 the builder of its own caches: its rows are its own doing, and convict it
    verdict, _ = _audit_1_2(
        tiny_model, sent, logits, rows, start=2, own_history={0: NodeId(1), 1: NodeId(2)}
    )
    assert verdict.liars == (NodeId(1),) and not verdict.recompute, verdict.reason


def test_rows_neither_side_shows_leave_the_request_unverified_blaming_nobody(
    tiny_model: Path,
) -> None:
    """Bytes that hash to nothing node 1 signed prove nothing, and node 1 shows nothing
    either: nobody can be judged on what crossed, so nobody is (a receiver that had lost
    them was convicted in its sender's place: a review)."""
    for holds in ("other", "nothing"):
        verdict, _ = _below_fingerprint_chain(tiny_model, holds)
        assert not verdict.verified and verdict.liars == (), (holds, verdict.reason)
        assert "what they received cannot be shown" in verdict.reason


def test_what_the_sender_shows_judges_a_receiver_that_shows_nothing(tiny_model: Path) -> None:
    """Node 2 lied and shows nothing; node 1, honest, shows what it sent: node 2 is
    judged on it and convicted."""
    verdict, records = _below_fingerprint_chain(
        tiny_model, "nothing", receiver_lies=True, sender_shows=True
    )
    assert verdict.liars == (NodeId(2),), verdict.reason
    assert verdict.evidence == (records[1][0].proof.signature,)


def test_a_lying_receiver_showing_the_honest_bytes_it_received_is_convicted(
    tiny_model: Path,
) -> None:
    """Node 2 skews its output and shows the honest bytes it received: it is convicted,
    and node 1, whose bytes those were, is not."""
    verdict, records = _below_fingerprint_chain(tiny_model, "sent", receiver_lies=True)
    assert verdict.liars == (NodeId(2),), verdict.reason
    assert verdict.evidence == (records[1][0].proof.signature,)


def _lie_within_rows_close(
    stage: Stage, hidden: torch.Tensor, logits: torch.Tensor, tol: Tolerance
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows within `rows_close` of `hidden`, each row's 8 largest values untouched, moved
    the way that most moves one of `stage`'s largest outputs, on which `stage`'s output
    contradicts its output on `hidden`; and that output."""
    mag = hidden.abs()
    bound = tol.atol + tol.rtol * mag + tol.scaled * mag.amax(-1, keepdim=True)
    flat = hidden.reshape(-1, hidden.shape[-1])
    top = flat.abs().topk(8, dim=-1).indices
    # the direction from autograd, which passes no compiled product: the head on torch's
    # F.linear (a blocked one runs in the compiled call); the residuals carry the rest
    on_torch = copy.copy(stage)
    if isinstance(on_torch, LlamaStage) and isinstance(on_torch.head, BlockedWeight):
        on_torch.head = on_torch.head.dense()
    for t in logits.abs().reshape(-1).topk(8).indices.tolist():
        for sign in (1, -1):
            h = hidden.clone().requires_grad_(True)
            (sign * prefill_outputs(on_torch, h, on_torch.new_cache()).reshape(-1)[t]).backward()
            assert h.grad is not None
            moved = (hidden + 0.9 * bound * h.grad.sign()).reshape(flat.shape)
            sent = moved.scatter(-1, top, flat.gather(-1, top)).reshape(hidden.shape)
            with torch.inference_mode():
                out = prefill_outputs(stage, sent, stage.new_cache())
            if rows_close(sent, hidden, tol) and not matches_tensor(fingerprint(out), logits, tol):
                return sent, out
    raise AssertionError("no such rows: the test shows nothing")


def test_an_honest_receiver_of_a_lie_within_tolerance_is_not_convicted(tiny_model: Path) -> None:
    """Node 1 moves every value but each row's 8 largest by 0.9 of what `rows_close`
    allows (at bf16's tolerance), the way that moves node 2's output most, and signs it;
    node 2 computes honestly on it and contradicts the re-execution on the honest input.
    The rows pass as the honest computation, so node 1 cannot be convicted on them, and
    node 2 was (a review); judged on what it received, node 2 matches: nobody is blamed,
    and the request is not verified."""
    tol = tolerance_for(1e-3, 1e-4, verification_floor("bfloat16"))
    stages, hidden, logits = _honest(tiny_model)
    sent, on_sent = _lie_within_rows_close(stages[SECOND], hidden, logits, tol)
    verdict, _ = _audit_1_2(tiny_model, sent, on_sent, holding({(2, 0): sent}), tol)
    assert not verdict.verified and verdict.liars == (), verdict.reason
    assert "within tolerance of the honest input" in verdict.reason


def test_a_record_that_cannot_be_cut_to_the_kept_rows_is_never_verified(tiny_model: Path) -> None:
    """A verify step kept 5 of its 6 rows; a record fingerprinting chunks of 2 cannot be
    cut there, gives nothing to compare, and is judged as a weak one: unverified, and
    nobody blamed for the honest rows it signed (it was taken as matching: a review)."""
    stages, hidden, logits = _honest(tiny_model)
    keys = {NodeId(n): SigningKey.generate() for n in range(5)}
    x = IDS[:, :5]
    first = signed(keys, 1, 0, 0, NodeId(1), FIRST, IDS, hidden, chunk=2)
    second = signed(keys, 1, 0, 1, NodeId(2), SECOND, hidden, logits)
    records = {0: [Claim(first, 0, 5, (0, 5))], 1: [Claim(second, 0, 5, (0, 5))]}
    auditor = Auditor(
        ask=re_running(stages, []),
        inputs=holding({}),
        keys={n: k.public for n, k in keys.items()},
        referee=Referee(tiny_model, TorchThread()),
        tolerance=EXACT,
        max_tensor_bytes=1 << 30,
        gateway=NodeId(4),
    )
    verdict = asyncio.run(auditor.audit(CHAIN_1_2, "r", x[0].tolist(), records))
    assert not verdict.verified and verdict.liars == (), verdict.reason
    assert "weaker than the cluster's" in verdict.reason


def test_a_standby_resumed_on_a_copy_is_not_convicted_after_its_plan_replays_from_0(
    tiny_model: Path,
) -> None:
    """Node 3 went on at position 5 from node 1's KV copy (its logits there moved by
    the copy), then its plan replayed from 0: deciding by the plan's earliest row took
    the resumed step as computed on caches the plan built, and convicted node 3 (a
    review). A step before the plan's first from position 0 is on earlier caches."""
    from butterfly.dataplane.request_audit import Steps, audit_request
    from butterfly.runtime.generate import generate
    from butterfly.types.ids import RequestId
    from butterfly.types.tasks import InferenceResult, InferenceTask

    stages = {r: load_stage(tiny_model, r) for r in (FIRST, SECOND)}
    prompt = [5, 9, 2, 7]
    output = list(generate([load_stage(tiny_model)], prompt, 5))
    ids = torch.tensor([prompt + output[:-1]])  # 8 positions
    with torch.inference_mode():
        hidden = prefill_outputs(stages[FIRST], ids, stages[FIRST].new_cache())
        logits = prefill_outputs(stages[SECOND], hidden, stages[SECOND].new_cache())
    keys = {**KEYS, NodeId(4): SigningKey.generate()}
    one = PLAN  # chain 0 -> 1
    two = StagePlan(  # node 1 failed; standby 3 resumed on node 1's (poisoned) KV copy
        2, ((NodeId(0), FIRST), (NodeId(3), SECOND)), ((NodeId(2), FIRST), (NodeId(4), SECOND))
    )
    # steps 1-2 under epoch 1; step 3 resumed at 5 under epoch 2 (on the copy); then the
    # request replayed from 0 in epoch 2 (step 4) and went on (step 5)
    positions = {1: (0, 4), 2: (4, 1), 3: (5, 1), 4: (0, 7), 5: (7, 1)}
    ran_under = {1: one, 2: one, 3: two, 4: two, 5: two}
    records = []
    for step, (start, length) in positions.items():
        plan = ran_under[step]
        end = start + length
        last = logits[:, end - 1 : end].clone()
        if step == 3:  # node 3 computed on the poisoned copy: logits moved (argmax kept)
            last[0, 0] += torch.linspace(-3.0, 3.0, last.shape[-1])
            last[0, 0, output[end - 4]] = logits[0, end - 1].max() + 10.0
        for index, (x, y) in enumerate(
            ((ids[:, start:end], hidden[:, start:end]), (hidden[:, start:end], last))
        ):
            node, layers = plan.stages[index]
            records.append(signed(keys, plan.epoch, step, index, node, layers, x, y))
    auditor, blamed, on_liars = _gateways_auditor(tiny_model, stages, keys, hidden, [])
    task = InferenceTask(RequestId("r"), input_ids=tuple(prompt), max_new_tokens=5)
    result = InferenceResult(RequestId("r"), output_ids=tuple(output))

    steps = Steps(dict(positions), ran_under)
    steps.superseded.update({1, 2, 3})  # the replay from 0 (engine: steps.replayed_from(0))
    verdict = asyncio.run(
        audit_request(
            auditor,
            steps,
            records,
            task,
            result,
            emit=lambda event: None,
            on_liars=on_liars,
            members={NodeId(n) for n in (0, 2, 3, 4)},
        )
    )
    # Same situation as `test_a_request_that_ran_under_two_plans_is_audited_under_each`'s
    # lie_at=3 case (standby 3 on node 1's copy): nobody may be convicted
    assert not verdict.verified
    assert not blamed, (blamed, verdict.reason)
