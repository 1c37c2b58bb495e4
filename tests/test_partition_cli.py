"""`butterfly plan` through typer's CliRunner: output shape, degradation, bad files."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from butterfly.cli import app

runner = CliRunner()


def write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    layers = [
        {"id": i, "compute_cost": (i + 1) * 1e9, "memory_bytes": 1 << 20, "output_size": 768}
        for i in range(20)
    ]
    rack = {0: "a", 1: "b", 2: "a", 3: "b"}
    nodes = [
        {
            "id": k,
            "flops_per_s": 1e12,
            "memory_bytes": 1 << 30,
            "links": {
                str(j): {
                    "latency_ms": 0.1 if rack[j] == rack[k] else 5.0,
                    "bandwidth_bytes_per_s": 1e9,
                }
                for j in rack
                if j != k
            },
        }
        for k in rack
    ]
    return write(tmp_path / "layers.json", layers), write(tmp_path / "nodes.json", nodes)


def run(*args: str) -> dict[str, object]:
    result = runner.invoke(app, ["plan", *args, "--json"])
    assert result.exit_code == 0, result.output
    out: dict[str, object] = json.loads(result.stdout)
    return out


def test_json_output_has_the_documented_shape(files: tuple[Path, Path]) -> None:
    layers, nodes = files
    out = run("--layers", str(layers), "--nodes", str(nodes), "--strategy", "topology_aware")
    assert {"strategy", "stages", "bottleneck_ms", "quality"} <= out.keys()
    assert out["strategy"] == "topology_aware"
    stages = out["stages"]
    assert isinstance(stages, list)
    assert [set(s) for s in stages] == [{"node", "start", "end", "est_ms"}] * len(stages)
    assert stages[0]["start"] == 0 and stages[-1]["end"] == 20
    assert all(a["end"] == b["start"] for a, b in itertools.pairwise(stages))
    assert out["bottleneck_ms"] == max(s["est_ms"] for s in stages)
    quality = out["quality"]
    assert isinstance(quality, dict)
    for key in ("imbalance_pct", "per_token_latency_ms", "throughput_tokens_per_s"):
        assert isinstance(quality[key], float)
    rack_of = {0: "a", 1: "b", 2: "a", 3: "b"}
    crossings = sum(rack_of[a["node"]] != rack_of[b["node"]] for a, b in itertools.pairwise(stages))
    assert crossings == 1


def test_degradation_is_reported_in_the_output(tmp_path: Path, files: tuple[Path, Path]) -> None:
    layers, _ = files
    bare = write(
        tmp_path / "bare.json",
        [{"id": k, "flops_per_s": 1e12, "memory_bytes": 1 << 30} for k in range(2)],
    )
    out = run("--layers", str(layers), "--nodes", str(bare), "--strategy", "topology_aware")
    assert out["strategy"] == "load_balanced"
    notes = out["notes"]
    assert isinstance(notes, list) and "link measurements" in notes[0]


def test_table_output(files: tuple[Path, Path]) -> None:
    layers, nodes = files
    result = runner.invoke(app, ["plan", "--layers", str(layers), "--nodes", str(nodes)])
    assert result.exit_code == 0, result.output
    assert "load_balanced placement" in result.stdout
    assert "tokens/s" in result.stdout and "[0, " in result.stdout


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[{", "not valid JSON"),
        ('{"id": 0}', "expected a JSON list of objects"),
        ('[{"id": 0, "flops_per_s": 1e12}]', "missing memory_bytes"),
        ('[{"id": 0, "flops_per_s": 1e12, "memory_bytes": 1, "ram": 2}]', "unknown key(s) ram"),
        ('[{"id": 0, "flops_per_s": "fast", "memory_bytes": 1}]', "flops_per_s must be a number"),
        ('[{"id": true, "flops_per_s": 1, "memory_bytes": 1}]', "id must be a whole number"),
        ('[{"id": 0, "flops_per_s": 1, "memory_bytes": 1, "links": {"x": {}}}]', "links['x']"),
        (
            '[{"id": 0, "flops_per_s": 1, "memory_bytes": 1, "links": '
            '{"1": {"latency_ms": 1, "bandwidth_bytes_per_s": 0}}}]',
            "bandwidth_bytes_per_s must be > 0",
        ),
        ("[]", "no nodes available"),
    ],
)
def test_bad_node_files_exit_2_with_a_message(
    tmp_path: Path, files: tuple[Path, Path], content: str, message: str
) -> None:
    layers, _ = files
    bad = tmp_path / "nodes.json"
    bad.write_text(content)
    result = runner.invoke(app, ["plan", "--layers", str(layers), "--nodes", str(bad)])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_bad_layer_files_and_arguments_exit_2(tmp_path: Path, files: tuple[Path, Path]) -> None:
    layers, nodes = files
    gap = write(
        tmp_path / "gap.json", [{"id": 1, "compute_cost": 1, "memory_bytes": 1, "output_size": 1}]
    )
    for args, message in [
        (["--layers", str(gap)], "without gaps"),
        (["--layers", str(tmp_path / "missing.json")], "cannot read"),
        ([], "exactly one of --model"),
        (["--layers", str(layers), "--model", str(tmp_path)], "exactly one of --model"),
        (["--layers", str(layers), "--strategy", "fastest"], "unknown strategy"),
    ]:
        result = runner.invoke(app, ["plan", *args, "--nodes", str(nodes)])
        assert result.exit_code == 2, args
        assert message in " ".join(result.output.split()), args
        assert "Traceback" not in result.output


def test_a_model_that_does_not_fit_exits_2_naming_the_node(
    tmp_path: Path, files: tuple[Path, Path]
) -> None:
    layers, _ = files
    small = write(
        tmp_path / "small.json", [{"id": 0, "flops_per_s": 1e12, "memory_bytes": 1 << 20}]
    )
    result = runner.invoke(app, ["plan", "--layers", str(layers), "--nodes", str(small)])
    assert result.exit_code == 2
    assert "node 0" in result.output and "missing" in result.output


def test_model_directory(tiny_model: Path, files: tuple[Path, Path]) -> None:
    _, nodes = files
    out = run("--model", str(tiny_model), "--nodes", str(nodes), "--context-tokens", "256")
    stages = out["stages"]
    assert isinstance(stages, list) and stages[0]["start"] == 0
    assert stages[-1]["end"] >= 2


def test_a_model_is_costed_as_the_cluster_costs_it(tiny_model: Path, tmp_path: Path) -> None:
    """The cluster plans a model with the KV cache of its own context
    (`wiring.parts.placing`: `max_context`) at model.dtype; the preview budgeted 2048
    tokens at float32, refusing the tiny model (512 tokens) on a node the cluster would
    place it on, and under-counting models of longer context."""
    from butterfly.partition.capability import layer_memory
    from butterfly.runtime.loader import layer_infos
    from butterfly.runtime.precision import Precision
    from butterfly.wiring.parts import max_context

    context = max_context(tiny_model)
    assert context < 2048

    def need(dtype: str) -> int:
        infos = layer_infos(tiny_model, Precision.named(dtype))
        return sum(layer_memory(layer, context) for layer in infos)

    assert need("bfloat16") < need("float32")
    nodes = write(
        tmp_path / "nodes.json",
        [{"id": 0, "flops_per_s": 1e12, "memory_bytes": need("bfloat16") + 1024}],
    )
    args = ["plan", "--model", str(tiny_model), "--nodes", str(nodes), "--json"]
    fp32 = runner.invoke(app, args)
    assert fp32.exit_code == 2 and "node 0" in fp32.output  # float32 does not fit
    bf16 = runner.invoke(app, [*args, "--dtype", "bfloat16"])
    assert bf16.exit_code == 0, bf16.output
    assert json.loads(bf16.output)["stages"][0]["node"] == 0
    # the budget follows --context-tokens when given, so 2048 tokens no longer fit
    longer = runner.invoke(app, [*args, "--dtype", "bfloat16", "--context-tokens", "2048"])
    assert longer.exit_code == 2, longer.output
    bad = runner.invoke(app, [*args, "--dtype", "float64"])
    assert bad.exit_code == 2 and "model.dtype 'float64'" in bad.output


def test_a_whole_number_written_as_a_float_is_taken(
    tmp_path: Path, files: tuple[Path, Path]
) -> None:
    """JSON writers (and people) write 1e9; only a fraction is refused."""
    layers, _ = files
    for memory, code in ((1e9, 0), (1.5e9 + 0.5, 2)):
        nodes = write(tmp_path / "n.json", [{"id": 0, "flops_per_s": 1e12, "memory_bytes": memory}])
        result = runner.invoke(app, ["plan", "--layers", str(layers), "--nodes", str(nodes)])
        assert result.exit_code == code, result.output
        assert ("must be a whole number" in result.output) == (code == 2), result.output
