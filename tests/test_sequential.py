"""The generic sequential stack against a plain torch `nn.Sequential` of the same weights.

The reference loads the checkpoint with `strict=True`, so a renamed or reshaped tensor in
`create_sequential` fails here as well as a wrong forward pass in a stage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from butterfly.runtime import loader
from butterfly.runtime.sequential import create_sequential
from butterfly.runtime.weights import CheckpointReader
from butterfly.types.errors import InvalidInput, UnknownArchitecture
from butterfly.types.model import Activation, LayerRange, Linear, TransformerBlock
from tests.cluster_util import running_cluster

SPEC: list[dict[str, Any]] = [
    {"type": "linear", "input_dim": 3, "output_dim": 16},
    {"type": "activation", "kind": "relu"},
    {"type": "transformer_block", "hidden_dim": 16, "num_heads": 2, "ff_dim": 32},
    {"type": "activation", "kind": "gelu"},
    {"type": "transformer_block", "hidden_dim": 16, "num_heads": 4, "ff_dim": 24},
    {"type": "linear", "input_dim": 16, "output_dim": 5},
    {"type": "activation", "kind": "tanh"},
]
N = len(SPEC)


def reference(model_dir: Path) -> nn.Sequential:
    mods: list[nn.Module] = []
    for spec in SPEC:
        if spec["type"] == "linear":
            mods.append(nn.Linear(spec["input_dim"], spec["output_dim"]))
        elif spec["type"] == "activation":
            mods.append({"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}[spec["kind"]]())
        else:
            mods.append(
                nn.TransformerEncoderLayer(
                    spec["hidden_dim"], spec["num_heads"], spec["ff_dim"],
                    dropout=0.0, batch_first=True, norm_first=True,
                )
            )  # fmt: skip
    model = nn.Sequential(*mods).eval()
    state = load_file(model_dir / "model.safetensors")
    model.load_state_dict({k.removeprefix("layers."): v for k, v in state.items()}, strict=True)
    return model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_sequential(tmp_path_factory.mktemp("seq"), SPEC, input_dim=3, seed=11)


@pytest.fixture(scope="module")
def inputs() -> torch.Tensor:
    return torch.randn(2, 6, 3, generator=torch.Generator().manual_seed(3))


def run(ranges: list[LayerRange], model_dir: Path, x: torch.Tensor) -> torch.Tensor:
    h = x
    for stage in loader.load_pipeline(model_dir, ranges):
        assert stage.new_cache() is None
        h = stage.forward(h, None, 0)
    return h


@pytest.mark.parametrize("k", range(1, N))
def test_every_two_stage_split_matches_nn_sequential(
    model_dir: Path, inputs: torch.Tensor, k: int
) -> None:
    with torch.no_grad():
        expected = reference(model_dir)(inputs)
    got = run([LayerRange(0, k), LayerRange(k, N)], model_dir, inputs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_one_stage_per_layer_and_unsplit_match(model_dir: Path, inputs: torch.Tensor) -> None:
    with torch.no_grad():
        expected = reference(model_dir)(inputs)
    per_layer = run([LayerRange(i, i + 1) for i in range(N)], model_dir, inputs)
    torch.testing.assert_close(per_layer, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        run([LayerRange(0, N)], model_dir, inputs), expected, atol=1e-5, rtol=0
    )


def test_a_vector_input_becomes_one_row(model_dir: Path) -> None:
    """`{"input": [1.0, 2.0, 3.0]}` reaches the stage as a 1-D tensor."""
    vector = torch.tensor([1.0, 2.0, 3.0])
    stage = loader.load_stage(model_dir)
    assert stage.input_kind == "vectors"
    with torch.no_grad():
        expected = reference(model_dir)(vector.view(1, 1, 3))
    got = stage.forward(vector, None, 0)
    assert got.shape == (1, 1, 5)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_input_of_the_wrong_width_is_refused(model_dir: Path) -> None:
    first, rest = loader.load_pipeline(model_dir, [LayerRange(0, 2), LayerRange(2, N)])
    with pytest.raises(InvalidInput, match="input vector must have 3 features"):
        first.forward(torch.tensor([1.0, 2.0]), None, 0)
    with pytest.raises(InvalidInput, match=r"hidden state \[B, S, D\] must have 16 features"):
        rest.forward(torch.zeros(1, 1, 3), None, 0)
    with pytest.raises(InvalidInput, match="whole input at once"):
        first.forward(torch.zeros(1, 1, 3), None, 4)  # no cache: a chunk cannot see the rest


def test_middle_stage_reads_only_its_tensors(model_dir: Path) -> None:
    reader = CheckpointReader(model_dir)
    loader.load_stage(model_dir, LayerRange(2, 5), reader=reader)
    assert reader.names_read
    assert {n.split(".")[1] for n in reader.names_read} == {"2", "4"}  # 3 is an activation
    assert len(reader.names_read) == 24


def test_same_seed_same_bytes(tmp_path: Path, model_dir: Path) -> None:
    again = create_sequential(tmp_path / "again", SPEC, input_dim=3, seed=11)
    assert (again / "model.safetensors").read_bytes() == (
        model_dir / "model.safetensors"
    ).read_bytes()
    other = create_sequential(tmp_path / "other", SPEC, input_dim=3, seed=12)
    assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()


def test_layer_infos(model_dir: Path) -> None:
    infos = loader.layer_infos(model_dir)
    assert [i.layer_type for i in infos] == [
        Linear(3, 16), Activation("relu"), TransformerBlock(16, 2, 32), Activation("gelu"),
        TransformerBlock(16, 4, 24), Linear(16, 5), Activation("tanh"),
    ]  # fmt: skip
    assert [i.output_size for i in infos] == [16, 16, 16, 16, 16, 5, 5]
    params = sum(p.numel() for p in reference(model_dir).parameters())
    assert sum(i.memory_bytes for i in infos) == 4 * params
    assert all(i.kv_bytes_per_token == 0 for i in infos)


def write_config(tmp_path: Path, layers: Any, input_dim: Any = 3) -> Path:
    config = {"model_type": "butterfly_sequential", "input_dim": input_dim, "layers": layers}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ([{"type": "conv", "input_dim": 3}], r"layer 0: unknown layer type 'conv'"),
        (
            [{"type": "linear", "input_dim": 3, "output_dim": 8},
             {"type": "linear", "input_dim": 4, "output_dim": 2}],
            r"layer 1 \(linear\) takes 4 features, layer 0 gives 8",
        ),
        ([{"type": "linear", "input_dim": 5, "output_dim": 2}], r"layer 0.*model's input_dim"),
        ([{"type": "activation", "kind": "softmax"}], r"layer 0: activation kind 'softmax'"),
        (
            [{"type": "linear", "input_dim": 3, "output_dim": 10},
             {"type": "transformer_block", "hidden_dim": 10, "num_heads": 3, "ff_dim": 8}],
            r"layer 1: hidden_dim 10 is not divisible by 3 heads",
        ),
        ([{"type": "linear", "input_dim": 3, "output_dim": 0}], r"'output_dim' must be a posit"),
        ([{"type": "linear", "input_dim": 3}], r"layer 0: 'output_dim' must be"),
        ([], r"non-empty 'layers' list"),
        (["linear"], r"layer 0 must be a JSON object"),
    ],
)  # fmt: skip
def test_bad_specs_name_the_layer(tmp_path: Path, layers: Any, message: str) -> None:
    with pytest.raises(UnknownArchitecture, match=message):
        loader.num_layers(write_config(tmp_path, layers))
    with pytest.raises(UnknownArchitecture, match=message):
        create_sequential(tmp_path / "out", layers, input_dim=3, seed=0)
    assert not (tmp_path / "out").exists()  # nothing written for a bad spec


def test_bad_input_dim(tmp_path: Path) -> None:
    with pytest.raises(UnknownArchitecture, match="'input_dim' must be a positive integer"):
        loader.num_layers(write_config(tmp_path, [{"type": "activation", "kind": "relu"}], "3"))


@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_a_cluster_of_real_nodes_serves_the_vector_model(model_dir: Path, tmp_path: Path) -> None:
    """The specification's example end to end: `{"input": [...]}` to a 2-node cluster
    (each node a process running part of the stack) gives the unsplit stack's output."""
    vector = [1.0, 2.0, 3.0]
    with torch.no_grad():
        expected = reference(model_dir)(torch.tensor(vector).view(1, 1, 3)).flatten()
    with running_cluster(model_dir, 2, tmp_path / "data") as cluster:
        r = httpx.post(
            f"{cluster.api_url}/inference", json={"input": vector, "wait": True}, timeout=60
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["output_vector"] == pytest.approx(expected.tolist(), abs=1e-5)
        assert len({s["node"] for s in body["stages"]}) == 2
