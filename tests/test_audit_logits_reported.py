"""What an answer takes from the last stage's logits besides its tokens, held to the
audit's re-execution: the logprobs reported and a sampled token's probability.

A review's liar (the last stage) kept each row's fingerprinted values bit for bit and
the greedy token, raised every other logit to just below the smallest fingerprinted
magnitude, and signed exactly what it sent. The audit verified its answers: logprobs
1.7 off the model's, seeded samples other than the model's, and the liar never evicted.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from butterfly.dataplane.chosen import Chosen
from butterfly.dataplane.stage_server import StageServer
from butterfly.protocol.proof import Tolerance
from butterfly.runtime.generate import generate
from butterfly.runtime.loader import load_stage
from butterfly.runtime.sampling import distribution
from butterfly.runtime.tokenizer import TextCodec
from butterfly.testing.inprocess import InProcessCluster
from butterfly.types.ids import RequestId
from butterfly.types.tasks import InferenceResult, InferenceTask, Sampled, SamplingParams

pytestmark = pytest.mark.timeout(180)
TOL = Tolerance(rtol=1e-3, atol=1e-4)
PROMPT = "Once upon a time"
SETTINGS = {"coordination.heartbeat_interval_ms": 10, "byzantine.verification": "audit"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --- one row, in one process ----------------------------------------------------------

ROW = torch.tensor([[[2.0, 1.0, 0.5, -1.0, -3.0]]])  # one position's re-executed logits


def lp(token: int) -> float:
    return float(torch.log_softmax(ROW[0, 0], dim=-1)[token])


def scored(token: int, k: int = 2, shift: float = 0.0) -> Sampled:
    top = torch.topk(torch.log_softmax(ROW[0, 0], dim=-1), k)
    pairs = zip(top.indices.tolist(), top.values.tolist(), strict=True)
    alternatives = tuple((t, v + shift) for t, v in pairs)
    return Sampled(token, lp(token) + shift, alternatives)


def test_logprobs_are_held_to_the_re_executed_logits() -> None:
    greedy = SamplingParams(logprobs=2)
    assert Chosen(greedy, 1, (0,), logprobs=(scored(0),)).wrong(ROW, 0, TOL) == []
    noise = Sampled(0, lp(0) + 2e-4, ((0, lp(0) - 2e-4), (1, lp(1))))  # within tolerance
    assert Chosen(greedy, 1, (0,), logprobs=(noise,)).wrong(ROW, 0, TOL) == []
    off = Sampled(0, lp(0) - 0.5, scored(0).top)
    assert Chosen(greedy, 1, (0,), logprobs=(off,)).wrong(ROW, 0, TOL) == [0]
    assert Chosen(greedy, 1, (0,), logprobs=(scored(0, shift=0.3),)).wrong(ROW, 0, TOL) == [0]
    skipped = Sampled(0, lp(0), ((0, lp(0)), (2, lp(2))))  # token 1 is likelier than 2
    assert Chosen(greedy, 1, (0,), logprobs=(skipped,)).wrong(ROW, 0, TOL) == [0]
    outside = Sampled(0, lp(0), ((0, lp(0)), (9, -1.0)))
    assert Chosen(greedy, 1, (0,), logprobs=(outside,)).wrong(ROW, 0, TOL) == [0]


def test_prompt_logprobs_are_held_to_the_rows_before_their_tokens() -> None:
    rows = torch.cat([ROW, ROW.flip(-1)], dim=1)  # positions 0 and 1
    params = SamplingParams(prompt_logprobs=1)
    flipped = torch.log_softmax(rows[0, 1], dim=-1)
    right = (scored(1, 1), Sampled(3, float(flipped[3]), ((4, float(flipped[4])),)))
    chosen = Chosen(params, 3, (), prompt_logprobs=right)
    assert chosen.first_row == 0
    assert chosen.wrong(rows, 0, TOL) == []
    swapped = (right[1], right[0])
    assert Chosen(params, 3, (), prompt_logprobs=swapped).wrong(rows, 0, TOL) == [0, 1]


def test_a_sampled_tokens_probability_is_held_to_the_re_executed_distribution() -> None:
    params = SamplingParams(temperature=0.7, top_p=0.9)
    honest = float(distribution(ROW[0, 0], params)[1])
    assert Chosen(params, 1, (1,), drawn={0: honest}).wrong(ROW, 0, TOL) == []
    assert Chosen(params, 1, (1,), drawn={0: honest * 1.0005}).wrong(ROW, 0, TOL) == []
    assert Chosen(params, 1, (1,), drawn={0: honest * 1.3}).wrong(ROW, 0, TOL) == [0]
    assert Chosen(params, 1, (1,), drawn={0: honest * 0.7}).wrong(ROW, 0, TOL) == [0]
    assert Chosen(params, 1, (1,)).wrong(ROW, 0, TOL) == []  # not kept: a checkpoint's


# --- a liar in a cluster --------------------------------------------------------------


def reshaped_below_pins(out: torch.Tensor, k: int) -> torch.Tensor:
    """Each row: its k largest-magnitude values (all a record pins) kept bit for bit, and
    where the best value is one of them and positive, every other raised to 0.999 of the
    smallest pinned magnitude, so the fingerprint and the greedy token stand."""
    rows = out.reshape(-1, out.shape[-1]).clone()
    for r in range(rows.shape[0]):
        row = rows[r]
        top = row.abs().topk(min(k, row.numel())).indices
        if int(row.argmax()) not in set(top.tolist()) or float(row.max()) <= 0:
            continue
        floor = float(row[top].abs().min()) * 0.999
        new = torch.maximum(torch.full_like(row, floor), row).clamp(max=floor)
        new[top] = row[top]
        rows[r] = new
    return rows.reshape(out.shape)


class ReshapingStageServer(StageServer):
    """As last stage, its logits reshaped below what its fingerprint pins; it signs
    exactly what it sends, as a real liar would."""

    def tamper(self, out: torch.Tensor) -> torch.Tensor:
        if self.stage is None or not self.stage.is_last or self.prover is None:
            return out
        return reshaped_below_pins(out, self.prover.k)


async def answer(
    model: Path, data: Path, sampling: SamplingParams, liar: bool, new: int = 6
) -> tuple[InferenceResult, set[int]]:
    ids = tuple(TextCodec.load(model).encode(PROMPT))
    liars = {1: ReshapingStageServer} if liar else {}
    async with InProcessCluster(model, 4, data, f=1, settings=SETTINGS, stage_servers=liars) as c:
        plan = await c.first_plan()
        assert plan is not None and plan.stages[-1][0] == 1  # the liar is the last stage
        task = InferenceTask(RequestId("r"), ids, max_new_tokens=new, sampling=sampling)
        run = asyncio.create_task(c.gateway.engine.run(task, lambda t: None))
        await c.until(run.done, "the request to finish", beats=2000)
        return run.result(), {int(n) for n in c.gateway.plans.evicted}


def honest_logprobs(model: Path, ids: list[int]) -> list[float]:
    """Each position's logprob of the token after it, from the unsplit model."""
    stage = load_stage(model)
    with torch.no_grad():
        logits = stage.forward(torch.tensor([ids]), stage.new_cache(), 0)
    logprobs = torch.log_softmax(logits[0].float(), dim=-1)
    return [float(logprobs[p - 1, ids[p]]) for p in range(1, len(ids))]


@pytest.mark.anyio
@pytest.mark.parametrize("liar", [False, True], ids=["honest", "liar"])
async def test_verified_logprobs_are_the_models(
    tiny_model: Path, tmp_path: Path, liar: bool
) -> None:
    """Without the check: verified "audit", nobody evicted, every token's logprob about
    1.7 off the model's, and the prompt's too."""
    ids = list(TextCodec.load(tiny_model).encode(PROMPT))
    asked = SamplingParams(logprobs=3, prompt_logprobs=3)
    result, evicted = await answer(tiny_model, tmp_path, asked, liar)
    assert result.verified == "audit"
    assert evicted == ({1} if liar else set())
    want = honest_logprobs(tiny_model, ids + list(result.output_ids))
    got = [s.logprob for s in (*result.prompt_logprobs, *result.logprobs)]
    assert got == pytest.approx(want, abs=1e-3)


@pytest.mark.anyio
async def test_a_verified_seeded_sample_is_the_models(tiny_model: Path, tmp_path: Path) -> None:
    """Without the check, the liar's answer (other tokens than the unsplit model's at the
    same seed, drawn from its reshaped tail) came back verified, nobody evicted."""
    sampled = SamplingParams(temperature=0.7, seed=1234)
    codec = TextCodec.load(tiny_model)
    ids = codec.encode(PROMPT)
    expected = list(generate([load_stage(tiny_model)], ids, 12, sampled, codec.eos_ids))
    result, evicted = await answer(tiny_model, tmp_path, sampled, True, new=12)
    assert result.verified == "audit" and evicted == {1}
    assert list(result.output_ids) == expected
