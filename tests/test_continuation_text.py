"""A generation's text continues its prompt's, on a SentencePiece (Llama 2 / Mistral-style,
Metaspace decoder) tokenizer too: prompt "Hello" and token "▁brown" answer " brown", as
transformers' text-generation pipeline and vLLM do, so a client appending the text to its
prompt reads "Hello brown". Decoded alone, the decoder dropped the first token's space as
if it began the text ("Hellobrown", a review), in every place that turns tokens into
text: the OpenAI choices (whole and streamed), the engine's stop strings, `/inference`'s
result and `butterfly generate`; and a token's logprobs name (" brown", as OpenAI names
tokens) and `text_offset` point at its text (named "brown" each, the offsets fell one
behind per word).

The model is rigged to answer "▁brown" at every step, whatever the prompt (no layer adds
to the residual stream, whose first dimension the embedding makes positive; only
"▁brown"'s output row reads it), so the tests need no sampling tricks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from butterfly.cli import app
from butterfly.runtime.detok import IncrementalText, continuation
from tests.api_util import Served, serving

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]
CORPUS = ["Hello world, the quick brown fox jumps over the lazy dog."] * 20


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def sentencepiece_style() -> Tokenizer:
    """A SentencePiece BPE as tokenizer.json writes it (transformers' LlamaConverter,
    Mistral's and Llama 2's later files): Metaspace pieces, "first" prepend scheme."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"])
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return tok


@pytest.fixture(scope="module")
def brown_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama checkpoint with the tokenizer above whose greedy answer is always ▁brown."""
    tok = sentencepiece_style()
    cfg = LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=96,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 10.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[tok.token_to_id("▁brown"), 0] = 1.0
    out = tmp_path_factory.mktemp("models") / "sentencepiece"
    model.save_pretrained(out)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    return out


def expected_text(tok: Tokenizer, prompt: str, n: int) -> str:
    """transformers' pipeline (`return_full_text=False`): prompt and answer decoded
    together, the prompt's text cut off."""
    ids = tok.encode(prompt).ids
    whole = tok.decode([*ids, *[tok.token_to_id("▁brown")] * n], skip_special_tokens=True)
    return whole[len(tok.decode(ids, skip_special_tokens=True)) :]


async def complete(s: Served, **body: Any) -> Any:
    r = await s.client.post("/v1/completions", json={"model": "tiny", "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r


def test_the_decoders_keep_the_space_a_prompt_gives_the_first_token() -> None:
    tok = sentencepiece_style()
    prompt, brown = tok.encode("Hello").ids, tok.token_to_id("▁brown")
    text = IncrementalText(tok, prompt)
    assert text.push(brown) + text.push(brown) + text.flush() == " brown brown"
    assert continuation(tok, prompt, [brown, brown]) == " brown brown"
    # nothing before it: the text's start, whose space the decoder drops
    assert continuation(tok, [], [brown]) == "brown"
    assert continuation(tok, [tok.token_to_id("<s>")], [brown]) == "brown"


async def test_completions_continue_the_prompts_text(brown_model: Path, tmp_path: Path) -> None:
    tok = Tokenizer.from_file(str(brown_model / "tokenizer.json"))
    expected = expected_text(tok, "Hello", 2)
    assert expected == " brown brown"
    async with serving(brown_model, tmp_path / "db.sqlite") as s:
        whole = (await complete(s, prompt="Hello", max_tokens=2)).json()["choices"][0]
        assert whole["text"] == expected, f"'Hello' continued as 'Hello{whole['text']}'"

        r = await complete(s, prompt="Hello", max_tokens=2, stream=True)
        chunks = [b.removeprefix("data: ") for b in r.text.split("\n\n") if b.strip()]
        assert chunks[-1] == "[DONE]"
        streamed = "".join(json.loads(c)["choices"][0]["text"] for c in chunks[:-1])
        assert streamed == expected

        echoed = (await complete(s, prompt="Hello", max_tokens=2, echo=True)).json()
        assert echoed["choices"][0]["text"] == "Hello brown brown"

        scored = (await complete(s, prompt="Hello", max_tokens=2, logprobs=0)).json()
        text, logprobs = scored["choices"][0]["text"], scored["choices"][0]["logprobs"]
        assert text == expected
        named = zip(logprobs["tokens"], logprobs["text_offset"], strict=True)
        assert [text[at : at + len(name)] for name, at in named] == [" brown", " brown"]

        body = {"prompt": "Hello", "max_new_tokens": 2, "wait": True}
        r = await s.client.post("/inference", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["text"] == expected


async def test_a_stop_string_matches_at_the_first_tokens_space(
    brown_model: Path, tmp_path: Path
) -> None:
    """The engine ends the generation at the first token, whose text " brown" is the stop
    string, and the choice's text is empty before it."""
    async with serving(brown_model, tmp_path / "db.sqlite") as s:
        body = (await complete(s, prompt="Hello", max_tokens=4, stop=[" brown"])).json()
        assert body["choices"][0]["text"] == ""
        assert body["choices"][0]["finish_reason"] == "stop"
        assert body["usage"]["completion_tokens"] == 1


def test_generate_prints_the_prompts_continuation(brown_model: Path) -> None:
    args = ["generate", "--model", str(brown_model), "Hello", "--max-tokens", "2", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["text"] == " brown brown"
