"""Stage loading, KV snapshots, wire format and bad input of the model runtime."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from butterfly.runtime import linear as lin
from butterfly.runtime import llama
from butterfly.runtime.demo import create_demo, demo_at
from butterfly.runtime.generate import generate, run_pipeline
from butterfly.runtime.kvcache import KVSnapshot
from butterfly.runtime.linear import EXACT_ROWS
from butterfly.runtime.loader import layer_infos, load_stage
from butterfly.runtime.sampling import make_generator, sample
from butterfly.runtime.stage import forward_rows, prefill_outputs
from butterfly.runtime.tokenizer import TextCodec
from butterfly.runtime.weights import CheckpointReader
from butterfly.runtime.wire import DTYPES, decode_tensor, encode_tensor
from butterfly.types.errors import (
    ContextLengthExceeded,
    InvalidInput,
    LayerRangeError,
    MissingTensor,
    TensorShapeMismatch,
    UnknownArchitecture,
    WireFormatError,
)
from butterfly.types.model import LayerRange
from butterfly.types.tasks import SamplingParams


def file_digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def test_demo_model_is_deterministic(tmp_path: Path) -> None:
    a = create_demo(tmp_path / "a", "tiny", seed=3)
    b = create_demo(tmp_path / "b", "tiny", seed=3)
    c = create_demo(tmp_path / "c", "tiny", seed=4)
    assert file_digests(a) == file_digests(b)
    assert file_digests(a)["model.safetensors"] != file_digests(c)["model.safetensors"]


def test_stage_reads_only_its_layers(tiny_model: Path) -> None:
    reader = CheckpointReader(tiny_model)
    load_stage(tiny_model, LayerRange(1, 3), reader=reader)
    assert reader.names_read, "nothing was read"
    layers_read = {int(n.split(".")[2]) for n in reader.names_read if n.startswith("model.layers.")}
    assert layers_read == {1, 2}
    assert not {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} & set(
        reader.names_read
    )

    first = CheckpointReader(tiny_model)
    load_stage(tiny_model, LayerRange(0, 1), reader=first)
    assert "model.embed_tokens.weight" in first.names_read
    assert "lm_head.weight" not in first.names_read
    # a middle quarter of the model reads well under half the bytes of the whole
    whole = CheckpointReader(tiny_model)
    load_stage(tiny_model, reader=whole)
    assert reader.bytes_read < 0.6 * whole.bytes_read


def test_stage_loads_from_a_checkpoint_holding_only_its_tensors(
    tiny_model: Path, tmp_path: Path
) -> None:
    """The strongest proof that nothing else is read: the other tensors do not exist."""
    sharded = create_demo(tmp_path / "sharded", "tiny", shard_bytes=60_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    keep = {f for n, f in index["weight_map"].items() if n.startswith("model.layers.2.")}
    assert 1 <= len(keep) < len(set(index["weight_map"].values()))
    for shard in set(index["weight_map"].values()) - keep:
        (sharded / shard).unlink()
    stage = load_stage(sharded, LayerRange(2, 3))
    full = load_stage(tiny_model, LayerRange(2, 3))
    h = torch.randn(1, 5, 64)
    with torch.inference_mode():
        torch.testing.assert_close(
            stage.forward(h, stage.new_cache(), 0), full.forward(h, full.new_cache(), 0)
        )
    with pytest.raises(MissingTensor, match="missing"):
        load_stage(sharded, LayerRange(0, 1))


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/tmp/elsewhere.safetensors"])
def test_an_index_naming_a_shard_outside_the_checkpoint_is_refused(
    tmp_path: Path, shard: str
) -> None:
    """A weight_map value is a file name inside the model directory; `../x` or an absolute
    path was opened wherever it pointed."""
    sharded = create_demo(tmp_path / "sharded", "tiny", shard_bytes=60_000)
    index_file = sharded / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["model.norm.weight"] = shard
    index_file.write_text(json.dumps(index))
    with pytest.raises(MissingTensor, match="outside the model directory"):
        CheckpointReader(sharded)


def test_the_weights_file_a_config_names_is_the_one_read(tiny_model: Path, tmp_path: Path) -> None:
    """`transformers_weights` in config.json picks the file transformers loads, ahead of
    `model.safetensors`; it must name one inside the directory."""
    path = tmp_path / "m"
    shutil.copytree(tiny_model, path)
    tensors = load_file(path / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 2
    save_file(tensors, path / "chosen.safetensors")
    config = json.loads((path / "config.json").read_text())
    for name, named in [("../model.safetensors", "outside"), ("chosen.bin", "safetensors")]:
        (path / "config.json").write_text(json.dumps(config | {"transformers_weights": name}))
        with pytest.raises(MissingTensor, match=named):
            CheckpointReader(path)
    (path / "config.json").write_text(
        json.dumps(config | {"transformers_weights": "chosen.safetensors"})
    )
    read = CheckpointReader(path).read_many([("model.norm.weight", None)])
    torch.testing.assert_close(read["model.norm.weight"], tensors["model.norm.weight"])


@pytest.mark.parametrize("trial", range(5))
def test_snapshot_restore_continues_identically(tiny_model: Path, trial: int) -> None:
    rng = random.Random(trial)
    prompt = [rng.randrange(259) for _ in range(rng.randrange(1, 12))]
    total = 24
    reference = list(generate([load_stage(tiny_model)], prompt, total))
    ranges = [LayerRange(0, 2), LayerRange(2, 4)]
    stages = [load_stage(tiny_model, r) for r in ranges]
    caches = [s.new_cache() for s in stages]
    seq = prompt + reference
    cut = rng.randrange(1, len(prompt) + total - 1)  # positions already in the cache
    with torch.inference_mode():
        run_pipeline(stages, caches, torch.tensor([seq[:cut]]), 0)
        # ship each stage's snapshot through the wire format into a fresh stage
        fresh_stages = [load_stage(tiny_model, r) for r in ranges]
        fresh_caches = []
        for stage, cache in zip(fresh_stages, caches, strict=True):
            snap = cache.snapshot()
            wire = {k: decode_tensor(encode_tensor(v)) for k, v in snap.tensors().items()}
            fresh = stage.new_cache()
            fresh.restore(KVSnapshot.from_tensors(snap.position, wire))
            fresh_caches.append(fresh)
        # what a recovering gateway knows: the prompt and every token generated so far
        known = seq[: max(cut + 1, len(prompt))]
        pos, x = cut, torch.tensor([known[cut:]])
        while len(known) < len(seq):
            logits = run_pipeline(fresh_stages, fresh_caches, x, pos)
            pos += x.shape[1]
            known.append(int(logits[0, -1].argmax()))
            x = torch.tensor([known[-1:]])
    assert known == seq


def test_sampling_is_reproducible_with_a_seed() -> None:
    logits = torch.randn(100, generator=torch.Generator().manual_seed(1))
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=42)
    a = [sample(logits, params, g) for g in [make_generator(params)] for _ in range(20)]
    b = [sample(logits, params, g) for g in [make_generator(params)] for _ in range(20)]
    assert a == b and len(set(a)) > 1
    top20 = set(torch.topk(logits, 20).indices.tolist())
    assert set(a) <= top20
    assert sample(logits, SamplingParams(), make_generator(SamplingParams())) == int(
        logits.argmax()
    )


@pytest.mark.parametrize("top_p", [1e-300, 1e-50, 1e-46])
def test_a_top_p_below_float32s_range_keeps_the_likeliest_token(top_p: float) -> None:
    """Such a top_p compares as 0 in float32: every token was dropped and the draw
    raised, failing the accepted task with a 500. A nucleus of one is what it asks."""
    logits = torch.randn(100, generator=torch.Generator().manual_seed(3))
    params = SamplingParams(temperature=1.0, top_p=top_p, seed=1)
    g = make_generator(params)
    assert {sample(logits, params, g) for _ in range(10)} == {int(logits.argmax())}


def test_rng_state_round_trip_resumes_the_same_stream() -> None:
    logits = torch.randn(50)
    params = SamplingParams(temperature=1.0, seed=5)
    g = make_generator(params)
    first = [sample(logits, params, g) for _ in range(5)]
    state = g.get_state()
    rest = [sample(logits, params, g) for _ in range(5)]
    g2 = torch.Generator()
    g2.set_state(state)
    assert [sample(logits, params, g2) for _ in range(5)] == rest
    assert first != rest or len(set(first)) == 1


# --- wire format -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.float16])
def test_wire_round_trip(dtype: torch.dtype) -> None:
    t = (torch.randn(2, 3, 5) * 10).to(dtype)
    out = decode_tensor(encode_tensor(t))
    assert out.dtype == dtype and torch.equal(out, t)
    assert decode_tensor(encode_tensor(torch.empty(0, 4))).shape == (0, 4)


def test_wire_sends_views_as_their_values() -> None:
    """Bytes are copied from a tensor's memory: views whose memory is not their values
    in order (strided, offset, negated) are sent as their values."""
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    for view in (base.t(), base[1:, 2:], base[:, ::2], torch._neg_view(base[1])):
        out = decode_tensor(encode_tensor(view))
        assert torch.equal(out, view.resolve_neg()) and out.shape == view.shape


def test_wire_rejects_bad_frames() -> None:
    good = encode_tensor(torch.ones(4, 4))
    with pytest.raises(WireFormatError, match="shorter"):
        decode_tensor(b"\x00")
    with pytest.raises(WireFormatError, match="needs 64 bytes"):
        decode_tensor(good[:-1])
    with pytest.raises(WireFormatError, match="exceeds the limit"):
        decode_tensor(good, max_bytes=32)
    with pytest.raises(WireFormatError, match="header length"):
        decode_tensor(b"\xff\xff\xff\xff" + good[4:])
    import msgpack

    for header in (
        {"dtype": "pickle", "shape": [1]},
        {"dtype": "float32", "shape": [-1]},
        {"dtype": "float32", "shape": [1], "x": 1},
        [1, 2],
    ):
        h = msgpack.packb(header)
        with pytest.raises(WireFormatError):
            decode_tensor(len(h).to_bytes(4, "big") + h + b"\x00" * 4)
    with pytest.raises(WireFormatError, match="msgpack"):
        decode_tensor(b"\x00\x00\x00\x02\xc1\xc1")


def test_tensor_headers_checked_in_c_get_the_python_checks_verdict() -> None:
    """A tensor header is decoded and checked in C (msgspec); the field-by-field checks
    (`checked_header`) only name what it refuses. Both must agree on every header."""
    import msgpack

    from butterfly.runtime import wire
    from butterfly.runtime.wire import _header, checked_header

    shapes: list[object] = [[], [0], [1, 64], [2] * 8, [2] * 9, [-1], [True], [1.0], ["1"],
                            [1 << 63], [(1 << 64) - 1], [[1]], None, (1,), {"a": 1}]  # fmt: skip
    dtypes: list[object] = [*DTYPES, "pickle", "", 1, None, b"float32", ["float32"]]
    headers: list[object] = [
        {"dtype": d, "shape": sh} for d in dtypes for sh in shapes
    ] + [{"dtype": "float32"}, {"shape": [1]}, {}, {"dtype": "float32", "shape": [1], "x": 1},
         [1, 2], "float32", 5, None]  # fmt: skip
    seen = {"ok": 0, "refused": 0}
    for header in headers:
        data = memoryview(msgpack.packb(header, use_bin_type=True))
        verdicts = []
        for check in (_header, checked_header):
            try:
                verdicts.append(("ok", check(data)))
            except WireFormatError:
                verdicts.append(("refused", None))
        assert verdicts[0] == verdicts[1], (header, verdicts)
        seen[verdicts[0][0]] += 1
    assert seen["ok"] >= 20 and seen["refused"] >= 40  # both verdicts were exercised
    with pytest.MonkeyPatch.context() as patch:  # a valid header is read in C alone
        patch.setattr(wire, "checked_header", lambda _: pytest.fail("went to Python"))
        assert decode_tensor(encode_tensor(torch.ones(2, 3))).shape == (2, 3)
    with pytest.raises(WireFormatError):  # nested past the recursion limit: refused
        _header(memoryview(b"\x82\xa5dtype\xa7float32\xa5shape" + b"\x91" * 5000 + b"\x01"))


# --- bad input ---------------------------------------------------------------------------


def test_missing_tensor_is_named(tiny_model: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors")
    load_stage(broken, LayerRange(2, 4))  # other layers are unaffected
    with pytest.raises(MissingTensor, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_stage(broken, LayerRange(0, 2))


def test_wrong_shape_is_named(tiny_model: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    tensors = load_file(broken / "model.safetensors")
    tensors["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(64, 32)
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(TensorShapeMismatch, match=r"o_proj.*\(64, 32\).*\(64, 64\)"):
        load_stage(broken, LayerRange(0, 1))


def test_unknown_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(UnknownArchitecture, match=r"'mamba'.*llama"):
        load_stage(tmp_path)
    with pytest.raises(UnknownArchitecture, match=r"no config\.json"):
        load_stage(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("num_hidden_layers", "four", "not a whole number"),
        ("num_hidden_layers", None, "lacks required field"),  # an assert's error before
        ("num_attention_heads", 0, "must be at least 1"),
        ("hidden_size", 64.5, "not a whole number"),
        ("vocab_size", True, "not a whole number"),
        ("rope_theta", "big", "rope_theta='big'"),
        ("rope_theta", None, "rope_theta=None"),  # 10000 silently before; transformers fails
    ],
)
def test_a_config_size_that_is_not_a_count_is_named(
    tiny_model: Path, tmp_path: Path, field: str, value: object, named: str
) -> None:
    """A hand-edited config.json names its bad field (a ValueError's traceback before, a
    zero a division by zero)."""
    shutil.copytree(tiny_model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps(config | {field: value}))
    with pytest.raises(UnknownArchitecture, match=named):
        load_stage(tmp_path / "m")


def test_layer_range_out_of_bounds(tiny_model: Path) -> None:
    with pytest.raises(LayerRangeError, match=r"\[2, 9\) is out of bounds.*4 layers"):
        load_stage(tiny_model, LayerRange(2, 9))
    with pytest.raises(LayerRangeError, match="empty"):
        LayerRange(3, 3)


def test_prompt_longer_than_context(tiny_model: Path) -> None:
    stage = load_stage(tiny_model)
    with pytest.raises(ContextLengthExceeded, match="context of 512"):
        list(generate([stage], [1] * 500, 20))
    with pytest.raises(ContextLengthExceeded, match="context of 512"):
        stage.forward(torch.ones(1, 513, dtype=torch.int64), stage.new_cache(), 0)


def test_token_ids_out_of_vocabulary(tiny_model: Path) -> None:
    stage = load_stage(tiny_model)
    with pytest.raises(InvalidInput, match=r"\[0, 259\)"):
        stage.forward(torch.tensor([[3, 259]]), stage.new_cache(), 0)
    with pytest.raises(InvalidInput, match="empty"):
        list(generate([stage], [], 4))


def test_layer_infos_fold_embedding_and_head(tiny_model: Path) -> None:
    infos = layer_infos(tiny_model)
    assert [i.id for i in infos] == [0, 1, 2, 3]
    middle = infos[1]
    assert infos[0].memory_bytes > middle.memory_bytes  # embedding
    assert infos[-1].compute_cost > middle.compute_cost  # output head
    assert infos[-1].memory_bytes > middle.memory_bytes
    assert middle.kv_bytes_per_token == 2 * 2 * 16 * 4  # k and v, 2 kv heads of 16, fp32
    assert middle.activation_bytes_per_token == 64 * 4
    params = sum(p.numel() for p in load_file(tiny_model / "model.safetensors").values())
    assert sum(i.memory_bytes for i in infos) == params * 4


def test_batched_rows_equal_one_request_at_a_time(tiny_model: Path) -> None:
    """Decode steps of requests at different positions, run as one batch, give each
    request exactly what it gets alone."""
    stage = load_stage(tiny_model)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
    with torch.inference_mode():
        alone, batched = [], []
        for target in (alone, batched):
            caches = [stage.new_cache() for _ in prompts]
            for p, c in zip(prompts, caches, strict=True):
                stage.forward(torch.tensor([p]), c, 0)
            starts = [len(p) for p in prompts]
            x = torch.tensor([[40], [41], [42]])
            for _ in range(3):
                if target is alone:
                    out = torch.cat(
                        [stage.forward(x[b : b + 1], caches[b], starts[b]) for b in range(3)]
                    )
                else:
                    out = forward_rows(stage, x, caches, starts, last_only=True)
                target.append(out[:, -1])
                x = out[:, -1].argmax(-1, keepdim=True)
                starts = [s + 1 for s in starts]
    for a, b in zip(alone, batched, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_prefill_outputs_from_a_position_equal_the_full_prefill_there(tiny_model: Path) -> None:
    """An audit of a last stage computes the output layer only where tokens were sampled;
    the rows it returns are those of a full prefill."""
    last, first = load_stage(tiny_model, LayerRange(2, 4)), load_stage(tiny_model, LayerRange(0, 2))
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3]])
    with torch.inference_mode():
        h = forward_rows(first, ids, [first.new_cache()], [0])
        full = forward_rows(last, h, [last.new_cache()], [0])
        part = prefill_outputs(last, h, last.new_cache(), outputs_from=6)
        assert torch.equal(prefill_outputs(first, ids, first.new_cache(), outputs_from=6), h)
    assert part.shape[1] == 4 and full.shape[1] == 10
    assert torch.allclose(part, full[:, 6:], atol=1e-5)
    with pytest.raises(ValueError, match="outputs from 10"):
        prefill_outputs(last, h, last.new_cache(), outputs_from=10)


@pytest.mark.parametrize("outputs_from", [35, 38, 10, 3])
def test_prefill_outputs_runs_no_product_in_a_decode_shape(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch, outputs_from: int
) -> None:
    """An audit's prefill keeps to the products' padded shapes (more than EXACT_ROWS
    rows), whatever the number of sampled positions: every row count up to EXACT_ROWS
    is a oneDNN kernel of its own, and an auditor of the last stage grew with each one
    (bench/soak.py). Its outputs are still the full prefill's from `outputs_from`. Every
    weight on oneDNN (or plain where torch has none), as a loaded machine may choose: a
    blocked one runs no oneDNN kernel, and a blocked head runs in the compiled call."""
    kernel = "packed" if lin.packing_available() else "plain"
    monkeypatch.setattr(lin, "candidates", lambda precision: (kernel,))
    monkeypatch.setattr(lin, "_CHOSEN", {})
    last, first = load_stage(tiny_model, LayerRange(2, 4)), load_stage(tiny_model, LayerRange(0, 2))
    ids = torch.arange(40).remainder(200).add(5).unsqueeze(0)
    rows: list[int] = []
    linear = llama.linear

    def counted(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        rows.append(x.numel() // x.shape[-1])
        return linear(x, w, b)

    with torch.inference_mode():
        h = forward_rows(first, ids, [first.new_cache()], [0])
        full = forward_rows(last, h, [last.new_cache()], [0])
        monkeypatch.setattr(llama, "linear", counted)
        part = prefill_outputs(last, h, last.new_cache(), outputs_from=outputs_from)
    assert rows and all(n == 1 or n > EXACT_ROWS for n in rows), rows
    assert part.shape[1] == 40 - outputs_from
    assert torch.allclose(part, full[:, outputs_from:], atol=1e-5)


def test_a_demo_model_is_never_taken_from_an_interrupted_creation(tmp_path: Path) -> None:
    """`demo_at` writes beside the path and renames into place: a directory a killed
    creation left (files, no config) or its `.partial` is replaced, a whole model is
    reused as it is. Before, the config came first and a directory holding it was
    reused without its weights."""
    path = tmp_path / "demo-tiny"
    path.mkdir()
    (path / "tokenizer.json").write_text("{")  # what a killed creation left
    (tmp_path / "demo-tiny.partial").mkdir()
    (tmp_path / "demo-tiny.partial" / "config.json").write_text("{}")
    assert demo_at(path, "tiny") == path
    assert load_stage(path).layers.end == 4  # whole: weights, tokenizer and all
    TextCodec.load(path)
    assert not (tmp_path / "demo-tiny.partial").exists()
    stamp = (path / "config.json").stat().st_mtime_ns
    assert demo_at(path, "tiny") == path
    assert (path / "config.json").stat().st_mtime_ns == stamp  # reused, not rewritten
