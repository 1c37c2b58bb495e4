"""Speculative decoding with a small draft model on the gateway (generation.speculative mode
"draft", dataplane.drafter): a greedy draft is its own greedy continuation whatever its
cache held before, a sampled one is drawn from its own distribution and mostly kept when
that is the served model's, the pipeline gives plain decoding's greedy tokens at every
split, and a draft model that cannot draft for the served one is refused by name."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from butterfly.config import ButterflyConfig
from butterfly.config.validate import cross_check, estimate_model_bytes
from butterfly.control.planner import place
from butterfly.control.status import NodeReport
from butterfly.dataplane.drafter import MIN_HITS, RECENT, ModelDrafter, check_draft_model
from butterfly.dataplane.stage_server import StageServer
from butterfly.net.memory import MemoryNetwork
from butterfly.partition.capability import layer_memory
from butterfly.partition.service import DEFAULT_CONTEXT_TOKENS
from butterfly.runtime.demo import create_demo
from butterfly.runtime.generate import generate as reference
from butterfly.runtime.loader import layer_infos, load_stage, num_layers
from butterfly.runtime.precision import FP32, Precision
from butterfly.runtime.sampling import distribution
from butterfly.runtime.tokenizer import TextCodec
from butterfly.runtime.torch_thread import TorchThread
from butterfly.schedule.drafts import ACCEPT_WINDOW, PROBE_EVERY, Acceptance, Speculation
from butterfly.testing.pipeline import LocalPipeline
from butterfly.types.errors import ConfigError, InsufficientResources
from butterfly.types.ids import Epoch, NodeId
from butterfly.types.model import LayerRange
from butterfly.types.tasks import SamplingParams
from butterfly.types.wire.control import StatusReply
from butterfly.wiring.edges import NetworkEdges, draft_model_bytes
from tests.test_speculative import generate, splits

pytestmark = pytest.mark.timeout(120)
TEXT = "The quick brown fox jumps over the lazy dog, and then it runs away."


@pytest.fixture(scope="module")
def other_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model of the same vocabulary and other weights: its drafts are often wrong."""
    return create_demo(tmp_path_factory.mktemp("draft") / "tiny-1", "tiny", seed=1)


def greedy_continuation(model: Path, tokens: list[int], k: int) -> tuple[int, ...]:
    return tuple(reference([load_stage(model)], tokens, k))


def own_text(model: Path) -> list[int]:
    """A prompt and the model's greedy continuation of it: text it guesses well."""
    prompt = TextCodec.load(model).encode(TEXT)[:8]
    return [*prompt, *greedy_continuation(model, prompt, 48)]


def test_a_draft_is_the_small_models_greedy_continuation_whatever_its_cache_held(
    tiny_model: Path,
) -> None:
    """Histories that share a prefix with what the cache holds, go past it, or leave it
    where an earlier draft was wrong: each draft is what the small model writes from
    scratch."""
    text = own_text(tiny_model)
    torch_thread = TorchThread(name="draft-test")
    try:
        drafter = ModelDrafter(tiny_model, torch_thread)
        histories = [text[:30], text[:34], text[:32], [*text[:32], 7, 8], text[:50], text[:20]]
        for history in histories:
            got = drafter.propose_now("r", history, 5)
            assert got.tokens == greedy_continuation(tiny_model, history, 5), len(history)
            assert got.q is None  # greedy: each draft token a point mass
        assert drafter.propose_now("r", text[:10], 0).tokens == ()
        assert drafter.propose_now("r", [], 4).tokens == ()
        # a request's logit bias drafts what its greedy choice will be: the draft's
        # first token banned, the draft is the biased continuation
        history = text[:30]
        plain = greedy_continuation(tiny_model, history, 5)
        biased = SamplingParams(logit_bias=((plain[0], -100.0),))
        got = drafter.propose_now("b", history, 5, biased).tokens
        assert got == tuple(reference([load_stage(tiny_model)], history, 5, biased))
        assert got[0] != plain[0]
    finally:
        torch_thread.close(wait=True)


def test_no_draft_while_the_small_model_has_not_been_guessing_the_text(
    tiny_model: Path, other_model: Path
) -> None:
    """Another model's guesses of the served model's text are counted over the last
    RECENT tokens, as a fresh run of it gives them: under MIN_HITS, no draft."""
    text = own_text(tiny_model)
    torch_thread = TorchThread(name="draft-test")
    try:
        for model in (tiny_model, other_model):
            drafter = ModelDrafter(model, torch_thread)
            stage = load_stage(model)
            for n in (12, 20, 30, 40, 56):
                history = text[:n]
                with torch.inference_mode():
                    logits = stage.forward(torch.tensor([history]), stage.new_cache(), 0)
                guesses = [-1, *logits[0].argmax(-1).tolist()]
                recent = range(max(1, n - RECENT), n)
                hits = sum(guesses[j] == history[j] for j in recent)
                got = drafter.propose_now("r", history, 4).tokens
                drafts = len(recent) < RECENT or hits >= MIN_HITS
                assert (got != ()) == drafts, (model, n, hits)
                if drafts:
                    assert got == greedy_continuation(model, history, 4)
        assert drafter.propose_now("fresh", text[:40], 4).tokens == ()  # other_model: no hits
    finally:
        torch_thread.close(wait=True)


def test_a_sampled_draft_is_drawn_from_the_small_models_distribution_by_its_seed(
    tiny_model: Path,
) -> None:
    """At a request's sampling settings, penalties counting the generated tokens: each
    draft token's distribution is the small model's after the history and the draft so
    far, the token is drawn from it, and a seed draws the same draft again."""
    text = own_text(tiny_model)[:30]
    params = SamplingParams(temperature=0.9, top_k=20, frequency_penalty=0.5)
    torch_thread = TorchThread(name="draft-test")
    try:
        drafter = ModelDrafter(tiny_model, torch_thread)
        draft = drafter.propose_now("r", text, 5, params, generated=10, seed=3)
        assert len(draft.tokens) == 5 and draft.q is not None and draft.q.shape[0] == 5
        stage = load_stage(tiny_model)
        for i, token in enumerate(draft.tokens):
            prefix = [*text, *draft.tokens[:i]]
            with torch.inference_mode():
                row = stage.forward(torch.tensor([prefix]), stage.new_cache(), 0)[0, -1]
            want = distribution(row, params, prefix[20:])  # the 10 generated, the draft's i
            torch.testing.assert_close(draft.q[i], want, rtol=1e-4, atol=1e-6)
            assert float(draft.q[i][token]) > 0
        again = drafter.propose_now("r", text, 5, params, generated=10, seed=3)
        assert again.tokens == draft.tokens
        others = {drafter.propose_now("r", text, 5, params, 10, seed).tokens for seed in range(8)}
        assert len(others) > 1  # drawn, not the greedy continuation
    finally:
        torch_thread.close(wait=True)


def test_a_sampled_request_whose_drafts_are_rejected_drafts_only_now_and_then() -> None:
    """Until half a window of verified draft tokens is known, every step drafts; with too
    few of them kept, one step in PROBE_EVERY + 1 does; once they are kept again, all."""
    gate = Acceptance()
    for _ in range(ACCEPT_WINDOW // 2 - 1):
        assert gate.drafts()
        gate = gate.verified(4, 0)  # one token judged, rejected
    assert gate.drafts()  # a short window: still drafting
    gate = gate.verified(4, 0)
    steps = []
    for _ in range(2 * (PROBE_EVERY + 1)):
        steps.append(gate.drafts())
        gate = gate.verified(4, 0) if steps[-1] else gate.undrafted_step()
    assert steps == ([False] * PROBE_EVERY + [True]) * 2  # probes only
    gate = gate.verified(4, 4).verified(4, 4).verified(4, 3)  # 11 of these 12 kept
    assert gate.drafts() and sum(gate.kept) == 11 and len(gate.kept) == ACCEPT_WINDOW
    assert gate.verified(3, 1).kept[-2:] == (True, False)  # the ones after a rejection: unjudged


def test_caches_are_kept_for_the_most_recent_requests_and_released(tiny_model: Path) -> None:
    text = own_text(tiny_model)
    torch_thread = TorchThread(name="draft-test")
    try:
        drafter = ModelDrafter(tiny_model, torch_thread, max_requests=2)
        for name in ("a", "b", "c"):
            drafter.propose_now(name, text[:12], 2)
        assert drafter.held() == 2
        drafter.drop("c")
        assert drafter.held() == 1
        # a request whose cache was dropped drafts the same tokens from its history
        assert drafter.propose_now("a", text[:12], 3).tokens == greedy_continuation(
            tiny_model, text[:12], 3
        )
    finally:
        torch_thread.close(wait=True)


async def test_greedy_tokens_are_plain_decodings_at_every_split_with_either_draft_model(
    tiny_model: Path, other_model: Path
) -> None:
    """The served model as its own draft model confirms every draft (one traversal per
    k + 1 tokens, after the prompt's); another model's drafts are mostly rejected. Either
    way the tokens are plain decoding's, at every split and at budgets shorter than a
    draft."""
    prompt = tuple(TextCodec.load(tiny_model).encode(TEXT))
    for ranges in splits(num_layers(tiny_model)):
        for draft_model in (tiny_model, other_model):
            async with LocalPipeline(tiny_model, ranges, draft_model=draft_model) as pipe:
                plain = await generate(pipe, prompt, 24, "plain", Speculation("off"))
                for k in (1, 5):
                    spec = await generate(pipe, prompt, 24, f"k{k}", Speculation("draft", k))
                    assert spec.output_ids == plain.output_ids, (ranges, draft_model, k)
                    if draft_model == tiny_model:  # every draft right, once it drafts
                        every = 1 + -(-23 // (k + 1))  # the prompt's, then k + 1 tokens each
                        # the first MIN_HITS tokens decode plainly: the small model guessed
                        # none of the prompt's (one near tie spared)
                        assert spec.timings["traversals"] <= every + MIN_HITS + 1, (ranges, k)
                for new in (1, 2, 3):
                    short = await generate(pipe, prompt, new, f"s{new}", Speculation("draft", 8))
                    assert short.output_ids == plain.output_ids[:new]
                drafter = pipe.engine._drafter
                assert drafter is not None and drafter.held() == 0  # released at the end


async def test_a_biased_request_is_drafted_for_as_an_unbiased_one_is(tiny_model: Path) -> None:
    """The small model's guesses of the history, which decide whether it drafts
    (`MIN_HITS`), are biased as the request is: judged raw, they missed every token a
    bias changed, and a biased request was never drafted for (a review). The served
    model as its own draft model: every draft right, biased or not."""
    prompt = tuple(TextCodec.load(tiny_model).encode("a plain sentence that does not repeat"))
    forced = SamplingParams(logit_bias=((ord("z"), 100.0),))
    async with LocalPipeline(
        tiny_model, [LayerRange(0, 2), LayerRange(2, 4)], draft_model=tiny_model
    ) as pipe:
        plain = await generate(pipe, prompt, 40, "plain", Speculation("off"), sampling=forced)
        assert plain.output_ids == (ord("z"),) * 40
        spec = await generate(pipe, prompt, 40, "drafted", Speculation("draft", 4), sampling=forced)
        assert spec.output_ids == plain.output_ids
        assert spec.timings["traversals"] <= 1 + -(-39 // 5) + MIN_HITS + 1  # as unbiased


async def test_a_sampled_request_drafted_by_a_model_is_reproducible_from_its_seed(
    tiny_model: Path, other_model: Path
) -> None:
    prompt = tuple(TextCodec.load(tiny_model).encode(TEXT))
    sampling = SamplingParams(temperature=0.8, seed=5)
    n = num_layers(tiny_model)
    ranges = [LayerRange(0, 1), LayerRange(1, n)]
    async with LocalPipeline(tiny_model, ranges, draft_model=other_model) as pipe:
        a = await generate(pipe, prompt, 30, "a", Speculation("draft", 4), sampling=sampling)
        b = await generate(pipe, prompt, 30, "b", Speculation("draft", 4), sampling=sampling)
    assert a.output_ids == b.output_ids and len(a.output_ids) == 30


async def test_a_sampled_request_keeps_nearly_every_token_its_own_model_drafts(
    tiny_model: Path, other_model: Path
) -> None:
    """The served model drafting for itself at temperature 0.8: q is p, so the draws are
    kept and a traversal yields about k + 1 tokens; another model's draws are mostly
    rejected, and its request then drafts now and then only."""
    prompt = tuple(TextCodec.load(tiny_model).encode(TEXT))
    sampling = SamplingParams(temperature=0.8, seed=5)
    n = num_layers(tiny_model)
    ranges = [LayerRange(0, 1), LayerRange(1, n)]
    traversals = {}
    for draft_model in (tiny_model, other_model):
        async with LocalPipeline(tiny_model, ranges, draft_model=draft_model) as pipe:
            got = await generate(pipe, prompt, 30, "s", Speculation("draft", 4), sampling=sampling)
        assert len(got.output_ids) == 30
        traversals[draft_model] = got.timings["traversals"]
    assert traversals[tiny_model] <= 1 + 6 + 2  # the prompt's, then 5 tokens each (29 / 5)
    assert traversals[other_model] > 20


async def test_without_a_draft_model_mode_draft_decodes_plainly(tiny_model: Path) -> None:
    prompt = tuple(TextCodec.load(tiny_model).encode(TEXT))
    async with LocalPipeline(tiny_model, [LayerRange(0, num_layers(tiny_model))]) as pipe:
        assert pipe.engine._drafter is None
        got = await generate(pipe, prompt, 10, "d", Speculation("draft", 4))
    assert got.timings["traversals"] == 10


def test_a_draft_model_of_another_vocabulary_or_none_at_all_is_refused(
    tiny_model: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other-vocab"
    shutil.copytree(tiny_model, other)
    config = json.loads((other / "config.json").read_text())
    config["vocab_size"] += 1
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"vocabulary of \d+ tokens, the served model \d+"):
        check_draft_model(other, tiny_model)
    with pytest.raises(ConfigError, match=r"speculative\.draft_model .* is not a model"):
        check_draft_model(tmp_path / "nowhere", tiny_model)
    check_draft_model(tiny_model, tiny_model)  # the served model may draft for itself


def test_mode_draft_without_a_draft_model_is_a_config_error(tmp_path: Path) -> None:
    cfg = ButterflyConfig.model_validate({"generation": {"speculative": {"mode": "draft"}}})
    issues = cross_check(cfg)
    assert [i.key for i in issues] == ["generation.speculative.mode"]
    assert "generation.speculative.draft_model" in issues[0].message
    missing = {"mode": "draft", "draft_model": str(tmp_path / "none")}
    cfg = ButterflyConfig.model_validate({"generation": {"speculative": missing}})
    assert [i.key for i in cross_check(cfg)] == ["generation.speculative.draft_model"]


def test_a_gateway_capable_node_keeps_its_draft_models_weights_from_the_planner(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Every node that may act as the gateway reports the draft model's weights (as the
    loader sizes them, any family) less memory; the others report all of it. A limit the
    draft model alone fills is refused on a gateway-capable node only."""
    members = [f"127.0.0.1:{7000 + i}" for i in range(4)]
    settings = {
        "cluster": {"members": members, "gateways": [0, 1]},
        "generation": {"speculative": {"mode": "draft", "draft_model": str(tiny_model)}},
        "model": {"dtype": "bfloat16"},
    }
    cfg = ButterflyConfig.model_validate(settings)
    held = sum(i.memory_bytes for i in layer_infos(tiny_model, Precision(torch.bfloat16)))
    assert held > 0
    assert [draft_model_bytes(cfg, NodeId(n)) for n in range(4)] == [held, held, 0, 0]
    plain = ButterflyConfig.model_validate({**settings, "generation": {}})
    assert draft_model_bytes(plain, NodeId(0)) == 0

    # a GPT-2 draft model (n_embd, n_layer: keys the config-only estimate does not read)
    gpt2 = tmp_path / "gpt2"
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=512)
    transformers.GPT2LMHeadModel(config).save_pretrained(gpt2, safe_serialization=True)
    on_gpt2 = {**settings, "generation": {"speculative": {"draft_model": str(gpt2)}}}
    assert draft_model_bytes(ButterflyConfig.model_validate(on_gpt2), NodeId(1)) > 0

    def refused(node: int, limit: int) -> bool:
        tight = {**settings, "node": {"id": node}, "resources": {"memory_limit_bytes": limit}}
        issues = cross_check(ButterflyConfig.model_validate(tight))
        return any(i.rule == "draft model fits memory" for i in issues)

    estimate = estimate_model_bytes(tiny_model, "bfloat16")
    assert refused(0, estimate) and refused(1, estimate)
    assert not refused(2, estimate)  # never the gateway: it never loads the draft model
    assert not refused(0, 64 * estimate)


async def test_a_draft_checkpoint_that_will_not_load_leaves_requests_undrafted(
    tiny_model: Path, tmp_path: Path
) -> None:
    """The config is a checkpoint's and the weights are not: the first draft fails to load
    it, says why once, and every request decodes plainly with the right tokens."""
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(tiny_model / "config.json", broken / "config.json")
    check_draft_model(broken, tiny_model)  # what start checks passes: the config is fine
    prompt = tuple(own_text(tiny_model)[:30])
    n = num_layers(tiny_model)
    async with LocalPipeline(tiny_model, [LayerRange(0, n)], draft_model=broken) as pipe:
        plain = await generate(pipe, prompt, 12, "plain", Speculation("off"))
        for name in ("a", "b"):
            got = await generate(pipe, prompt, 12, name, Speculation("draft", 4))
            assert got.output_ids == plain.output_ids
            assert got.timings["traversals"] == 12
        drafter = pipe.engine._drafter
        assert drafter is not None and drafter.failed and drafter.held() == 0


async def test_the_draft_model_loads_when_the_gateway_starts_serving(tiny_model: Path) -> None:
    n = num_layers(tiny_model)
    async with LocalPipeline(tiny_model, [LayerRange(0, n)], draft_model=tiny_model) as pipe:
        drafter = pipe.engine._drafter
        assert drafter is not None
        async with asyncio.timeout(60):
            while not drafter.loaded:  # no request has drafted yet
                await asyncio.sleep(0.01)


async def test_a_release_waits_for_the_requests_draft_still_running(tiny_model: Path) -> None:
    """A request that ends (or is cancelled) while its first draft loads the small model:
    the release runs after that draft, so no cache is left behind."""
    text = own_text(tiny_model)[:30]
    torch_thread = TorchThread(name="draft-test")
    try:
        drafter = ModelDrafter(tiny_model, torch_thread)
        drafting = asyncio.ensure_future(drafter.propose("r", text, 4))
        await asyncio.sleep(0)  # the draft is queued on the torch thread
        await drafter.release("r")
        assert drafter.held() == 0
        assert len((await drafting).tokens) == 4
    finally:
        torch_thread.close(wait=True)


def test_the_planner_plans_around_the_draft_models_weights(tiny_model: Path) -> None:
    """End to end through a node's own parts as the node process wires them: its probe
    (wiring.edges) reports its memory to the gateway's status query (control.status) and
    the planner places layers on what is reported. Each node may hold 0.6 of what the
    model needs (weights and KV caches): two of them hold it without a draft model; with
    one on the gateway's node (the tiny model itself, 0.29 of the need) they cannot, and
    the planner says which stage lacks what instead of overcommitting the gateway."""
    layers = layer_infos(tiny_model, FP32)
    need = sum(layer_memory(layer, DEFAULT_CONTEXT_TOKENS) for layer in layers)
    held = sum(layer.memory_bytes for layer in layers)
    members = [f"127.0.0.1:{7000 + i}" for i in range(2)]
    limit = int(need * 0.6)
    assert 2 * limit >= need > 2 * limit - held  # room for the model, not for both

    async def reported(drafts: bool) -> dict[NodeId, StatusReply]:
        net, out = MemoryNetwork(), {}
        speculative = {"mode": "draft", "draft_model": str(tiny_model)} if drafts else {}
        for n in (0, 1):
            cfg = ButterflyConfig.model_validate(
                {
                    "cluster": {"members": members, "gateways": [0]},
                    "node": {"id": n},
                    "generation": {"speculative": speculative},
                    "resources": {"memory_limit_bytes": limit},
                }
            )
            node, torch_thread = NodeId(n), TorchThread()
            transport = net.transport(node, lambda e: None)
            probe = NetworkEdges(cfg, tiny_model).probe(node, [node], transport, torch_thread)
            server = StageServer(
                node=node, model_dir=tiny_model, max_tensor_bytes=1 << 30, torch_thread=torch_thread
            )
            out[node] = await NodeReport(node=node, server=server, probe=probe).status()
            torch_thread.close()
        return out

    nodes = [NodeId(0), NodeId(1)]
    plain = asyncio.run(reported(False))
    assert [plain[n].memory_bytes for n in nodes] == [limit, limit]
    placed = place(Epoch(1), nodes, plain, layers=layers, strategy="load_balanced").stages
    assert [n for n, _ in placed.stages] == nodes  # both needed: neither holds it alone
    drafting = asyncio.run(reported(True))
    assert [drafting[n].memory_bytes for n in nodes] == [limit - held, limit]
    with pytest.raises(InsufficientResources, match="missing"):
        place(Epoch(1), nodes, drafting, layers=layers, strategy="load_balanced")
