"""Packed oneDNN weights compute what F.linear computes, in every model path that uses them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from butterfly.runtime import linear as lin
from butterfly.runtime.generate import generate
from butterfly.runtime.loader import load_stage
from butterfly.types.model import LayerRange

pytestmark = pytest.mark.skipif(not lin.packing_available(), reason="torch built without oneDNN")


def test_large_fp32_weights_are_packed_and_small_or_other_dtypes_are_not() -> None:
    assert lin.pack(torch.randn(1024, 512)).is_mkldnn
    small = torch.randn(64, 64)
    assert lin.pack(small) is small
    half = torch.randn(1024, 512, dtype=torch.bfloat16)
    assert lin.pack(half) is half


@pytest.mark.parametrize("bias", [False, True])
def test_packed_product_equals_f_linear(bias: bool) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1024, 512, generator=g)
    b = torch.randn(1024, generator=g) if bias else None
    packed = lin.pack(w)
    for x in (
        torch.randn(1, 1, 512, generator=g),  # a decode step
        torch.randn(3, 17, 512, generator=g),  # a batch of prefills
        torch.randn(4, 9, 512, generator=g)[:, -1:],  # a strided view (last position)
        torch.randn(5, 1024, generator=g)[:, ::2],  # non-contiguous rows
        torch.randn(1, 201, 512, generator=g),  # a prefill: padded to 208, run as 128 + 80
        torch.randn(2, 150, 512, generator=g),  # a batch of long prefills: 3 chunks
    ):
        got, want = lin.linear(x, packed, b), F.linear(x, w, b)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_a_row_gives_the_same_result_alone_and_in_a_batch() -> None:
    """Audits re-run a generation as one prefill and compare it with the decode steps."""
    g = torch.Generator().manual_seed(1)
    packed = lin.pack(torch.randn(2048, 768, generator=g))
    x = torch.randn(1, 64, 768, generator=g)
    batched = lin.linear(x, packed)
    alone = torch.cat([lin.linear(x[:, i : i + 1], packed) for i in range(64)], dim=1)
    torch.testing.assert_close(alone, batched, rtol=1e-6, atol=1e-5)


def test_packed_products_run_in_few_shapes_whatever_the_length() -> None:
    """oneDNN caches a primitive and an output-sized buffer per shape (runtime/linear.py):
    one shape per prompt length grew a node's memory with every new length."""
    shapes: set[int] = set()
    for rows in range(1, 4097):
        chunks = lin.row_chunks(rows)
        assert sum(chunks) >= rows and sum(chunks) - rows < lin.ROW_ALIGN
        shapes.update(chunks)
    assert shapes == set(range(1, lin.EXACT_ROWS + 1)) | set(
        range(lin.ROW_ALIGN, lin.MAX_CHUNK_ROWS + 1, lin.ROW_ALIGN)
    )


def test_tiny_llama_with_every_matrix_packed_matches_transformers(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tiny model's matrices are below the packing threshold; lower it so the packed
    path runs the whole model, split in two."""
    monkeypatch.setattr(lin, "PACK_MIN_ELEMENTS", 0)
    stages = [load_stage(tiny_model, LayerRange(0, 2)), load_stage(tiny_model, LayerRange(2, 4))]
    assert all(blk.wqkv.is_mkldnn and blk.w2.is_mkldnn for s in stages for blk in s.blocks)
    assert stages[1].head.is_mkldnn
    prompt = torch.randint(0, 259, (1, 12), generator=torch.Generator().manual_seed(3))
    hf = LlamaForCausalLM.from_pretrained(tiny_model).eval()
    with torch.inference_mode():
        ids = prompt
        for _ in range(24):
            ids = torch.cat([ids, hf(ids).logits[0, -1].argmax().view(1, 1)], dim=1)
        caches = [s.new_cache() for s in stages]
        got = stages[1].forward(stages[0].forward(prompt, caches[0], 0), caches[1], 0)
        torch.testing.assert_close(got, hf(prompt).logits, atol=1e-5, rtol=0)
    assert list(generate(stages, prompt[0].tolist(), 24)) == ids[0, 12:].tolist()
