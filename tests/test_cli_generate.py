"""`butterfly generate`: the README's one-process command, split into K stages, gives the
unsplit model's tokens at every K (README, "Command line" and "Set-up"), and refuses an
encoder as the API's generating routes do (README, "Models")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import BertConfig, BertModel
from typer.testing import CliRunner

from butterfly.cli import app


def generated(model: Path, stages: int) -> list[int]:
    args = ["generate", "--model", str(model), "Butterfly splits", "--max-tokens", "8"]
    result = CliRunner().invoke(app, [*args, "--stages", str(stages), "--json"])
    assert result.exit_code == 0, result.output
    ids = json.loads(result.stdout)["output_ids"]
    assert isinstance(ids, list) and len(ids) == 8
    return [int(i) for i in ids]


def test_every_stage_count_generates_the_unsplit_models_tokens(tiny_model: Path) -> None:
    whole = generated(tiny_model, 1)
    assert generated(tiny_model, 2) == whole
    assert generated(tiny_model, 4) == whole


@pytest.fixture
def encoder(tmp_path: Path) -> Path:
    """A tiny BERT checkpoint with a WordPiece tokenizer."""
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    BertModel(cfg).eval().save_pretrained(tmp_path)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *map(chr, range(97, 123)), "hello"]
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok.decoder = decoders.WordPiece()
    tok.save(str(tmp_path / "tokenizer.json"))
    return tmp_path


@pytest.mark.parametrize("tokens", [1, 4])
def test_generate_refuses_an_encoder_by_name(encoder: Path, tokens: int) -> None:
    """Sampled "tokens" from the hidden states before (one step exited 0 printing one;
    the second step failed on the encoder's whole-sequence input, naming no cause)."""
    args = ["generate", "--model", str(encoder), "hello", "--max-tokens", str(tokens), "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, f"generated from an encoder's hidden states: {result.output}"
    assert result.stdout == ""
    assert "is an encoder" in result.output and "cannot generate text" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
