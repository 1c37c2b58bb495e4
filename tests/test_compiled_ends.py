"""A first stage's embedding and a last stage's final norm and head run beside the
compiled layers (runtime/fused_layers.py `Ends`), so a decode step takes no torch
operation: they compute what llama.py's torch operations compute, for the rows asked
for, and are left to torch where they do not apply or do not agree."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import torch

from butterfly.runtime import fused_layers, native
from butterfly.runtime.llama import LlamaStage
from butterfly.runtime.llama_args import LlamaArgs
from butterfly.runtime.precision import quantize_int8
from butterfly.runtime.stage import forward_floats
from butterfly.runtime.wire import decode_tensor, encode_tensor, read_tensor
from butterfly.types.errors import InvalidInput
from tests.test_fused_layers import BASE, stages

HEADS = ("fp32", "bf16", "int8")  # the head's weights, on a stage of the matching dtype


def whole(head: str, *, torch_only: bool = False, vocab: int = 200) -> LlamaStage:
    """The whole model on the compiled layers, its head blocked in `head`'s type; with
    `torch_only`, the same weights on llama.py's operations throughout."""
    dtype = torch.bfloat16 if head == "bf16" else torch.float32
    args = dataclasses.replace(BASE, vocab_size=vocab, n_kv_heads=2, dtype=dtype)
    layers = stages(args)[0]
    g = torch.Generator().manual_seed(21)
    embed = torch.randn(vocab, args.dim, generator=g).to(dtype)
    norm = (1 + 0.1 * torch.randn(args.dim, generator=g)).to(dtype)
    dense = (torch.randn(vocab, args.dim, generator=g) * 0.2).to(dtype)
    if head == "int8":
        q, scales = quantize_int8(dense)
        weight = native.block_int8(q, scales)
    else:
        weight = native.block(dense)
    stage = LlamaStage(args, layers.layers, layers.blocks, embed, norm, weight)
    if torch_only:
        stage._fused = None  # type: ignore[misc]  # never planned: the torch operations
    return stage


@pytest.fixture
def ends_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Which compiled ends each step ran, and for how many rows."""
    made: list[str] = []
    embed, head = fused_layers.embed_rows, fused_layers.head_rows

    def embedded(ends: fused_layers.Ends, ids: object, out: int) -> None:
        made.append(f"embed {len(ids)}")  # type: ignore[arg-type]
        embed(ends, ids, out)  # type: ignore[arg-type]

    def headed(ends: fused_layers.Ends, h: int, rows: object, out: int) -> None:
        made.append(f"head {list(rows)}")  # type: ignore[call-overload]
        head(ends, h, rows, out)  # type: ignore[arg-type]

    monkeypatch.setattr(fused_layers, "embed_rows", embedded)
    monkeypatch.setattr(fused_layers, "head_rows", headed)
    yield made


def _skip_without(head: str) -> None:
    if head == "int8" and not native.available(torch.int8):
        pytest.skip("no int8 blocked kernel here")


@pytest.mark.parametrize("head", HEADS)
def test_a_whole_model_step_equals_the_torch_operations(head: str, ends_calls: list[str]) -> None:
    """A prompt, then decode steps of two requests batched: the compiled embedding, layers,
    norm and head against llama.py's operations on the same weights, logits within the
    dtype's rounding, and only each request's last row through the head."""
    _skip_without(head)
    mine, reference = planned(whole(head), ends_calls), whole(head, torch_only=True)
    g = torch.Generator().manual_seed(4)
    caches = [[s.new_cache(), s.new_cache()] for s in (mine, reference)]
    prompts = torch.randint(0, 200, (2, 5), generator=g)
    got = mine.forward_rows(prompts, caches[0], [0, 0], last_only=True)
    want = reference.forward_rows(prompts, caches[1], [0, 0], last_only=True)
    assert got.shape == want.shape == (2, 1, 200) and got.dtype == want.dtype
    near(got, want)
    assert ends_calls == ["embed 10", "head [4, 9]"]
    for pos in range(5, 9):
        x = torch.randint(0, 200, (2, 1), generator=g)
        got = mine.forward_rows(x, caches[0], [pos, pos])
        near(got, reference.forward_rows(x, caches[1], [pos, pos]))
    assert ends_calls[2:] == ["embed 2", "head [0, 1]"] * 4


def planned(stage: LlamaStage, ends_calls: list[str]) -> LlamaStage:
    """The stage with its ends planned (the head's check run), the calls forgotten."""
    assert stage._ends is not None
    ends_calls.clear()
    return stage


def near(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal within fp32's rounding, or bf16's: the compiled layers round their output
    and cache once where torch's bf16 operations round after each (a few per cent of
    the logits' scale, runtime/fused_layers.py)."""
    if want.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        return
    scale = float(want.float().abs().max())
    assert float((got.float() - want.float()).abs().max()) <= 0.03 * scale


@pytest.mark.parametrize("head", HEADS)
def test_the_compiled_head_rounds_where_torchs_head_rounds(head: str) -> None:
    """On the same layers' output, the compiled norm and head give torch's norm and head
    (runtime/llama.py's rms_norm, the blocked product) to the last bit but for the
    variance's order of summing: bf16 rounded at each of torch's steps, not once."""
    _skip_without(head)
    stage = whole(head)
    ends = stage._ends
    assert ends is not None and ends.head is not None
    h = torch.randn(3, BASE.dim, generator=torch.Generator().manual_seed(5)) * 3
    want = stage._fused_output.__func__  # type: ignore[attr-defined]
    stage._ends_seen = ((stage.embed, stage.norm, stage.head), None)  # torch's head
    on_torch = want(stage, h.clone(), (1, 3), None)
    stage._ends_seen = None
    compiled = stage._fused_output(h.clone(), (1, 3), None)
    assert compiled.shape == on_torch.shape == (1, 3, 200)
    assert compiled.dtype == on_torch.dtype == stage.args.dtype
    differ = compiled.float() != on_torch.float()
    if head == "bf16":  # a variance one ulp apart may move a logit to its neighbour
        step = on_torch.float().abs() * 2**-7
        assert bool(((compiled.float() - on_torch.float()).abs() <= step + 1e-6).all())
        assert int(differ.sum()) <= 0.05 * differ.numel()
    else:
        torch.testing.assert_close(compiled, on_torch, rtol=1e-5, atol=1e-5)


def test_packed_entries_take_each_entrys_last_row_through_the_head(
    ends_calls: list[str],
) -> None:
    """A prompt chunk packed beside two decode rows (the engine's mixed step): only each
    entry's last row reaches the head, and those logits are the torch operations'."""
    mine, reference = planned(whole("fp32"), ends_calls), whole("fp32", torch_only=True)
    g = torch.Generator().manual_seed(6)
    caches = [[s.new_cache() for _ in range(3)] for s in (mine, reference)]
    for c in caches:
        for i, stage_cache in enumerate(c[:2]):
            stage = mine if c is caches[0] else reference
            stage.forward(torch.tensor([[1 + i, 2, 3]]), stage_cache, 0)
    ends_calls.clear()
    x = torch.randint(0, 200, (1, 6), generator=g)
    lengths, starts = [1, 1, 4], [3, 3, 0]
    got = mine.forward_packed(x, caches[0], starts, lengths, last_only=True)
    want = reference.forward_packed(x, caches[1], starts, lengths, last_only=True)
    assert got.shape == want.shape == (1, 3, 200)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert ends_calls == ["embed 6", "head [0, 1, 5]"]
    every = mine.forward_packed(x[:, :2], caches[0][:2], [4, 4], [1, 1])
    assert every.shape == (1, 2, 200)


def test_the_wire_bytes_path_runs_the_compiled_ends_and_equals_forward_rows() -> None:
    """What a node's stage server runs for a plain fp32 decode step answers the tensor
    path's logits bit for bit with a blocked head too (both on the compiled head)."""
    on_bytes, on_tensors = whole("fp32"), whole("fp32")
    caches = [[s.new_cache() for _ in range(2)] for s in (on_bytes, on_tensors)]
    for stage, pair in zip((on_bytes, on_tensors), caches, strict=True):
        for c in pair:
            stage.forward(torch.tensor([[5, 6, 7]]), c, 0)
    ids = torch.tensor([[8, 9]])
    got = forward_floats(on_bytes, read_tensor(encode_tensor(ids)), caches[0], [3, 3])
    want = on_tensors.forward_rows(ids.reshape(2, 1), caches[1], [3, 3], last_only=True)
    assert got is not None
    assert torch.equal(decode_tensor(got), want.reshape(1, 2, -1))


def test_token_ids_outside_the_vocabulary_are_refused_before_any_cache_moves() -> None:
    stage = whole("bf16")
    for bad in (-1, 200):
        cache = stage.new_cache()
        with pytest.raises(InvalidInput, match=r"token ids must lie in \[0, 200\)"):
            stage.forward(torch.tensor([[3, bad]]), cache, 0)
        assert cache.length == 0
    with pytest.raises(InvalidInput, match="must be integers"):
        stage.forward(torch.tensor([[3.0]]), stage.new_cache(), 0)


def test_a_compiled_head_that_disagrees_with_torch_is_not_used(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, ends_calls: list[str]
) -> None:
    """A head that computes something else (here: another matrix, as a miscompiled kernel
    might) is found when planned, and the head runs on torch's operations: the right
    logits, the embedding still compiled."""
    real = fused_layers.plan_ends

    def wrong_head(args: LlamaArgs, embed: object, norm: object, head: object) -> object:
        ends = real(args, embed, norm, head)  # type: ignore[arg-type]
        assert ends is not None and ends.head is not None
        other = native.block(torch.randn(ends.head.out_features, args.dim))
        return dataclasses.replace(ends, head=other)

    monkeypatch.setattr(fused_layers, "plan_ends", wrong_head)
    mine, reference = planned(whole("fp32"), ends_calls), whole("fp32", torch_only=True)
    x = torch.tensor([[1, 2, 3]])
    got = mine.forward(x, mine.new_cache(), 0, last_only=True)
    torch.testing.assert_close(got, reference.forward(x, reference.new_cache(), 0, last_only=True))
    assert "compiled head disagrees" in caplog.text
    assert mine._ends is not None and mine._ends.head is None
    assert ends_calls == ["embed 3"]  # the head's check is not a step's


def test_a_replaced_table_norm_or_head_is_planned_anew() -> None:
    """The ends follow the stage's own tensors: replace the embedding table and the next
    step reads the new one."""
    stage, twin = whole("fp32"), whole("fp32")
    x = torch.tensor([[4]])
    before = stage.forward(x, stage.new_cache(), 0)
    assert stage.embed is not None
    stage.embed = stage.embed * 2
    twin.embed = stage.embed.clone()
    after = stage.forward(x, stage.new_cache(), 0)
    assert not torch.equal(before, after)
    assert torch.equal(after, twin.forward(x, twin.new_cache(), 0))


def test_a_first_stage_answers_every_row_whatever_last_only_says(ends_calls: list[str]) -> None:
    """`last_only` picks rows for a head only: a first stage sends all its rows on, as
    the torch operations do, embedded by the compiled call."""
    whole_model = whole("bf16")
    first = LlamaStage(
        whole_model.args, whole_model.layers, whole_model.blocks, whole_model.embed, None, None
    )
    reference = whole("bf16", torch_only=True)
    twin = LlamaStage(
        reference.args, reference.layers, reference.blocks, reference.embed, None, None
    )
    twin._fused = None  # type: ignore[misc]
    x = torch.tensor([[1, 2, 3], [4, 5, 6]])
    got = first.forward_rows(x, [first.new_cache(), first.new_cache()], [0, 0], last_only=True)
    want = twin.forward_rows(x, [twin.new_cache(), twin.new_cache()], [0, 0], last_only=True)
    assert got.shape == want.shape == (2, 3, BASE.dim) and got.dtype == torch.bfloat16
    near(got, want)
    assert ends_calls == ["embed 6"]
