"""End of sequence comes from the checkpoint's own `eos_token_id`, so generation stops
where an instruct model ends its turn (Llama 3's `<|eot_id|>`, Qwen2's `<|im_end|>`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from butterfly.runtime.generate import generate
from butterfly.runtime.loader import load_stage
from butterfly.runtime.tokenizer import TextCodec
from butterfly.runtime.weights import declared_eos_ids

PROMPT = [5, 17, 99, 3, 42, 7]


@pytest.fixture
def model(tiny_model: Path, tmp_path: Path) -> Path:
    out = tmp_path / "model"
    shutil.copytree(tiny_model, out)
    return out


def _edit(path: Path, **fields: object) -> None:
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update(fields)
    path.write_text(json.dumps(data))


def test_generation_config_list_wins_over_config(model: Path) -> None:
    _edit(model / "config.json", eos_token_id=257)
    _edit(model / "generation_config.json", eos_token_id=[11, 257])
    assert declared_eos_ids(model) == {11, 257}
    assert TextCodec.load(model).eos_ids == {11, 257}


def test_config_single_id_when_no_generation_config(model: Path) -> None:
    _edit(model / "config.json", eos_token_id=3)
    assert TextCodec.load(model).eos_ids == {3}


def test_token_strings_only_when_nothing_is_declared(model: Path) -> None:
    _edit(model / "config.json", eos_token_id=None)
    assert declared_eos_ids(model) == frozenset()
    codec = TextCodec.load(model)
    assert codec.eos_ids == {codec.tokenizer.token_to_id("<|eos|>")}


def test_generation_stops_at_a_declared_id(model: Path) -> None:
    stage = load_stage(model)
    free = list(generate([stage], PROMPT, 16))
    assert len(free) == 16
    stop = free[5]
    first = free.index(stop)
    _edit(model / "generation_config.json", eos_token_id=[stop])
    stopped = list(generate([stage], PROMPT, 16, stop_ids=TextCodec.load(model).eos_ids))
    assert stopped == free[: first + 1]
