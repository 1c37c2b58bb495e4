"""The split Llama model equals the unsplit Hugging Face model, at every boundary."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from butterfly.runtime.generate import generate, run_pipeline
from butterfly.runtime.loader import load_stage, num_layers
from butterfly.types.model import LayerRange

ATOL = 1e-5


def splits(n: int) -> list[list[LayerRange]]:
    """Every single boundary, plus one stage per layer, plus the whole model."""
    two = [[LayerRange(0, k), LayerRange(k, n)] for k in range(1, n)]
    return [[LayerRange(0, n)], *two, [LayerRange(i, i + 1) for i in range(n)]]


@pytest.fixture(scope="module")
def hf_model(tiny_model: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(tiny_model).eval()


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(0, 259, (1, 24), generator=torch.Generator().manual_seed(7))


def test_logits_match_at_every_split(tiny_model: Path, hf_model, prompt) -> None:
    with torch.inference_mode():
        ref = hf_model(prompt).logits
        for ranges in splits(num_layers(tiny_model)):
            stages = [load_stage(tiny_model, r) for r in ranges]
            caches = [s.new_cache() for s in stages]
            # prefill part of the prompt, a chunk after it, then token by token
            out = [run_pipeline(stages, caches, prompt[:, :10], 0, last_only=False)]
            out.append(run_pipeline(stages, caches, prompt[:, 10:16], 10, last_only=False))
            for p in range(16, prompt.shape[1]):
                out.append(run_pipeline(stages, caches, prompt[:, p : p + 1], p, last_only=False))
            got = torch.cat(out, dim=1)
            assert got.shape == ref.shape
            torch.testing.assert_close(got, ref, atol=ATOL, rtol=0, msg=f"split {ranges}")


def test_greedy_tokens_match_over_32_steps(tiny_model: Path, hf_model, prompt) -> None:
    with torch.inference_mode():
        ids = prompt[:, :8]
        for _ in range(32):
            nxt = hf_model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    expected = ids[0, 8:].tolist()
    assert len(set(expected)) > 4, "the demo model must not be degenerate"
    for ranges in splits(num_layers(tiny_model)):
        stages = [load_stage(tiny_model, r) for r in ranges]
        assert list(generate(stages, prompt[0, :8].tolist(), 32)) == expected, ranges
