"""A checkpoint's tokenizer is used as transformers uses it: the padding and truncation a
`tokenizer.json` may record (the state it was saved in) do not apply to a prompt."""

from __future__ import annotations

import shutil
from pathlib import Path

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from butterfly.runtime.tokenizer import TextCodec

TEXT = "Once upon a time, there was a prompt longer than eight tokens"


def test_saved_padding_and_truncation_do_not_cut_or_pad_a_prompt(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Saved with truncation at 8 and fixed padding to 16 (as transformers saves a
    backend's last state, and sentence-transformers ships Fixed 128), the prompt was cut
    at 8 tokens and padded with pad tokens to 16: silently another prompt."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    tok.enable_truncation(max_length=8)
    pad = tok.token_to_id("<|pad|>")
    tok.enable_padding(length=16, pad_id=pad, pad_token="<|pad|>")
    tok.save(str(model / "tokenizer.json"))

    ids = TextCodec.load(model).encode(TEXT)
    assert ids == PreTrainedTokenizerFast.from_pretrained(model)(TEXT)["input_ids"]
    assert len(ids) > 16 and pad not in ids
    assert TextCodec.load(model).decode(ids) == TEXT
