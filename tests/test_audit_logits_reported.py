"""What an answer takes from the last stage's logits besides its tokens, held to the
audit's re-execution: the logprobs reported and a sampled token's probability.

Also what the gateway must not take at all: logits wider or narrower than the model's
vocabulary, or not finite (a review failed accepted requests with both, and evicted
nobody).

A review's liar (the last stage) kept each row's fingerprinted values bit for bit and
the greedy token, raised every other logit to just below the smallest fingerprinted
magnitude, and signed exactly what it sent. The audit verified its answers: logprobs
1.7 off the model's, seeded samples other than the model's, and the liar never evicted.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest
import torch

from butterfly.dataplane.chosen import Chosen, honest_margin, kept_set_stable
from butterfly.dataplane.stage_server import StageServer
from butterfly.protocol.proof import Tolerance, tolerance_for
from butterfly.runtime.generate import generate
from butterfly.runtime.loader import load_stage
from butterfly.runtime.precision import verification_floor
from butterfly.runtime.sampling import choose, distribution, draw, log_softmax
from butterfly.runtime.tokenizer import TextCodec
from butterfly.testing.inprocess import InProcessCluster
from butterfly.types.ids import RequestId
from butterfly.types.tasks import InferenceResult, InferenceTask, Sampled, SamplingParams

pytestmark = pytest.mark.timeout(180)
TOL = Tolerance(rtol=1e-3, atol=1e-4)
FP32 = tolerance_for(1e-3, 1e-4, verification_floor("float32"))
BF16 = tolerance_for(1e-3, 1e-4, verification_floor("bfloat16"))
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
    params = SamplingParams(temperature=0.7, top_p=0.8)  # token 2 is the first cut
    honest = float(distribution(ROW[0, 0], params)[1])
    assert Chosen(params, 1, (1,), drawn={0: honest}).wrong(ROW, 0, TOL) == []
    assert Chosen(params, 1, (1,), drawn={0: honest * 1.0005}).wrong(ROW, 0, TOL) == []
    assert Chosen(params, 1, (1,), drawn={0: honest * 1.3}).wrong(ROW, 0, TOL) == [0]
    assert Chosen(params, 1, (1,), drawn={0: honest * 0.7}).wrong(ROW, 0, TOL) == [0]
    assert Chosen(params, 1, (1,)).wrong(ROW, 0, TOL) == []  # not kept: a checkpoint's


# rows of the audit's re-execution and of an honest chain near a cut: the kept set of
# top-k / top-p is not the same on both sides, so the drawn probability has no bounds
# there (a review evicted an honest bfloat16 last stage at its 63rd sampled request)
NEAR_CUTS = [
    (  # bfloat16, within 0.6% of the row's scale: a tie at the k-th value
        SamplingParams(temperature=0.7, top_k=2, top_p=0.5),
        1,
        [
            1.3203125,
            1.421875,
            1.3203125,
            -0.265625,
            -0.423828125,
            0.3515625,
            -0.9375,
            -0.185546875,
        ],
        [
            1.328125,
            1.4140625,
            1.3125,
            -0.259765625,
            -0.41796875,
            0.34765625,
            -0.9453125,
            -0.1904296875,
        ],
        BF16,
    ),
    (  # bfloat16, within 1.2%
        SamplingParams(temperature=1.5, top_k=5),
        3,
        [
            -0.6640625,
            -0.6640625,
            -0.84765625,
            0.267578125,
            -0.453125,
            -1.3671875,
            0.87109375,
            -0.373046875,
        ],
        [
            -0.65234375,
            -0.66796875,
            -0.85546875,
            0.25390625,
            -0.447265625,
            -1.3515625,
            0.87109375,
            -0.384765625,
        ],
        BF16,
    ),
    (  # float32, every logit moved by 0.3 of the margin: a token at the nucleus's edge
        SamplingParams(temperature=1.0, top_p=0.9),
        3,
        [-0.74, -1.82, -0.32, -1.36],
        [-0.7407093, -1.8192907, -0.3207093, -1.3592907],
        FP32,
    ),
]


@pytest.mark.parametrize(
    ("params", "token", "reexec", "honest", "tol"),
    NEAR_CUTS,
    ids=["bf16-top_k-tie", "bf16-top_k", "fp32-top_p-edge"],
)
def test_an_honest_draw_near_a_cut_is_not_convicted(
    params: SamplingParams, token: int, reexec: list[float], honest: list[float], tol: Tolerance
) -> None:
    drawn = float(distribution(torch.tensor(honest), params)[token])
    assert drawn > 0.1  # drawn one time in ten or more
    chosen = Chosen(params, 1, (token,), drawn={0: drawn})
    assert chosen.wrong(torch.tensor([[reexec]]), 0, tol) == []
    assert not kept_set_stable(
        torch.tensor(reexec), params, [], honest_margin(torch.tensor(reexec), tol)
    )


def test_away_from_the_cuts_the_drawn_probability_is_still_held() -> None:
    params = SamplingParams(temperature=0.7, top_k=3, top_p=0.9)
    row = torch.tensor([3.0, 2.0, 1.0, -2.0, -4.0])
    assert kept_set_stable(row, params, [], honest_margin(row, FP32))
    honest = float(distribution(row, params)[1])
    assert Chosen(params, 1, (1,), drawn={0: honest * 1.2}).wrong(row[None, None], 0, FP32) == [0]


def test_logprobs_are_of_the_last_tokens_when_a_request_resumed() -> None:
    """A request resumed from a dead gateway's checkpoint reports the logprobs of the
    tokens made after it only: they are held to those tokens' rows (paired from the
    first, an honest answer came back unverified: a review)."""
    rows = torch.cat([ROW, ROW.flip(-1), ROW], dim=1)  # positions 0, 1, 2
    flipped = torch.log_softmax(rows[0, 1], dim=-1)
    last_two = (Sampled(4, float(flipped[4])), Sampled(0, lp(0)))
    chosen = Chosen(SamplingParams(logprobs=0), 1, (0, 4, 0), logprobs=last_two)
    assert chosen.wrong(rows, 0, TOL) == []
    other = Chosen(SamplingParams(logprobs=0), 1, (0, 4, 0), logprobs=(Sampled(3, -1.0),) * 2)
    assert other.wrong(rows, 0, TOL) == []  # not these tokens': the gateway's, no one's


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
    model: Path,
    data: Path,
    sampling: SamplingParams,
    liars: dict[int, type[StageServer]],
    *,
    new: int = 6,
    n: int = 4,
    mode: str = "audit",
) -> tuple[InferenceResult, set[int]]:
    """One request on `n` nodes (f = 1) with `liars`, its result and who was evicted
    (the conviction given a moment to be agreed)."""
    ids = tuple(TextCodec.load(model).encode(PROMPT))
    settings = {**SETTINGS, "byzantine.verification": mode}
    async with InProcessCluster(model, n, data, f=1, settings=settings, stage_servers=liars) as c:
        plan = await c.first_plan()
        assert plan is not None and 1 in plan.nodes
        task = InferenceTask(RequestId("r"), ids, max_new_tokens=new, sampling=sampling)
        run = asyncio.create_task(c.gateway.engine.run(task, lambda t: None))
        await c.until(run.done, "the request to finish", beats=3000)
        for _ in range(50):
            c.hub.tick(0.1)
            await asyncio.sleep(0.005)
        evicted = {int(n) for n in c.gateway.plans.evicted}
        shown = {int(h.node) for h in c.gateway.engine.health().nodes if h.evicted}
        assert shown == evicted  # what /health says of each node
        return run.result(), evicted


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
    liars = {1: ReshapingStageServer} if liar else {}
    result, evicted = await answer(tiny_model, tmp_path, asked, liars)
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
    result, evicted = await answer(tiny_model, tmp_path, sampled, {1: ReshapingStageServer}, new=12)
    assert result.verified == "audit" and evicted == {1}
    assert list(result.output_ids) == expected


# --- logits of another width, or not finite -------------------------------------------


class WiderStageServer(StageServer):
    """As last stage: four columns more than the vocabulary, the first far above every
    real logit (the gateway picked a token id no stage has)."""

    def tamper(self, out: torch.Tensor) -> torch.Tensor:
        if self.stage is None or not self.stage.is_last:
            return out
        extra = torch.zeros(*out.shape[:-1], 4, dtype=out.dtype)
        extra[..., 0] = out.abs().max() + 100.0
        return torch.cat([out, extra], dim=-1)


class NarrowerStageServer(StageServer):
    """As last stage: the vocabulary's last column left out."""

    def tamper(self, out: torch.Tensor) -> torch.Tensor:
        if self.stage is None or not self.stage.is_last:
            return out
        return out[..., :-1].contiguous()


class InfiniteBestStageServer(StageServer):
    """As last stage: each row's best logit sent as +inf (the draw raised on it)."""

    def tamper(self, out: torch.Tensor) -> torch.Tensor:
        if self.stage is None or not self.stage.is_last:
            return out
        rows = out.reshape(-1, out.shape[-1]).clone()
        rows[torch.arange(rows.shape[0]), rows.argmax(dim=-1)] = float("inf")
        return rows.reshape(out.shape)


class InfiniteMiddleStageServer(StageServer):
    """As a middle stage: one activation per row sent as +inf; the honest last stage
    computes NaN logits on it, and signs them."""

    def tamper(self, out: torch.Tensor) -> torch.Tensor:
        if self.stage is None or self.stage.is_last:
            return out
        rows = out.reshape(-1, out.shape[-1]).clone()
        rows[:, 0] = float("inf")
        return rows.reshape(out.shape)


def reference(model: Path, sampling: SamplingParams, new: int = 6) -> list[int]:
    codec = TextCodec.load(model)
    return list(generate([load_stage(model)], codec.encode(PROMPT), new, sampling, codec.eos_ids))


GREEDY = SamplingParams()
SAMPLED = SamplingParams(temperature=0.8, seed=7)
BANNED_LAST = SamplingParams(logit_bias=((258, -5.0),))  # the tiny model's last token id


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("liar", "sampling", "mode", "n"),
    [
        (WiderStageServer, GREEDY, "audit", 4),
        (WiderStageServer, GREEDY, "replicate", 4),
        (NarrowerStageServer, BANNED_LAST, "audit", 4),
        (InfiniteBestStageServer, SAMPLED, "audit", 4),
        (InfiniteBestStageServer, SAMPLED, "replicate", 4),
        (InfiniteMiddleStageServer, SAMPLED, "audit", 6),
        (InfiniteMiddleStageServer, GREEDY, "audit", 6),
    ],
    ids=[
        "wider-audit",
        "wider-replicate",
        "narrower-logit-bias",
        "inf-sampled-audit",
        "inf-sampled-replicate",
        "inf-middle-sampled",
        "inf-middle-greedy",
    ],
)
async def test_logits_of_another_width_or_not_finite_convict_their_sender(
    tiny_model: Path,
    tmp_path: Path,
    liar: type[StageServer],
    sampling: SamplingParams,
    mode: str,
    n: int,
) -> None:
    """The request is answered right and verified, and node 1 (the liar) alone is
    evicted. Before: wider logits failed the request as the client's invalid input
    (the gateway's own first stage refused the token id), narrower ones failed a valid
    logit bias as the client's, and an infinite logit failed a sampled request in the
    draw, before its audit; nobody was evicted."""
    result, evicted = await answer(tiny_model, tmp_path, sampling, {1: liar}, n=n, mode=mode)
    assert evicted == {1}
    assert result.verified == mode
    assert list(result.output_ids) == reference(tiny_model, sampling)


def test_a_draw_and_the_logprobs_reported_survive_non_finite_logits() -> None:
    """+inf shares the draw, NaN is never drawn, all NaN draws something; every logprob
    reported is a JSON number (a NaN or -inf one failed the response's serialization)."""
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.7, logprobs=2)
    nan, inf = float("nan"), float("inf")
    for _ in range(20):
        assert draw(torch.tensor([nan, inf, 1.0, inf]), params, g)[0] in (1, 3)
    assert 0 <= draw(torch.tensor([nan, nan, nan]), params, g)[0] < 3
    picked, _ = choose(torch.tensor([nan, 2.0, -inf]), params, g)
    values = [picked.logprob, *(v for _, v in picked.top)]
    assert picked.token == 1 and all(math.isfinite(v) for v in values)
    assert log_softmax(torch.tensor([[nan, 0.0, -inf]])).isfinite().all()


@pytest.mark.anyio
async def test_an_honest_bfloat16_cluster_sampling_near_its_cuts_evicts_nobody(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Small top-k and top-p in bfloat16, where honest logits tie and untie at the cuts:
    every answer verified, nobody evicted (a review's run evicted the honest last stage
    at request 63 of these)."""
    text = PROMPT + " there was a little girl who lived in a village near the forest"
    ids = tuple(TextCodec.load(tiny_model).encode(text))
    settings = {**SETTINGS, "model.dtype": "bfloat16"}
    unverified = []
    async with InProcessCluster(tiny_model, 4, tmp_path, f=1, settings=settings) as c:
        await c.first_plan()
        for i in range(150):
            top = {"top_k": 2 if i % 2 else 3, "top_p": 0.5 if i % 3 else 0.8}
            params = SamplingParams(temperature=0.7, seed=1000 + i, **top)
            task = InferenceTask(RequestId(f"r{i}"), ids, max_new_tokens=24, sampling=params)
            run = asyncio.create_task(c.gateway.engine.run(task, lambda t: None))
            await c.until(run.done, "the request to finish", beats=6000)
            if run.result().verified != "audit":
                unverified.append(i)
            if c.gateway.plans.evicted:
                break
        assert not c.gateway.plans.evicted, f"evicted at request {i}"
    assert not unverified
