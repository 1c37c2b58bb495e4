"""The CLI answers bad input with one line naming the problem and exit code 2, never a
traceback: sampling values torch would fail on mid-run, a gateway URL that is not one,
a server that is not a Butterfly gateway, and a node whose model it cannot use."""

from __future__ import annotations

import http.server
import json
import shutil
import sqlite3
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from butterfly.cli import app
from butterfly.cli.keeper import CANNOT_START
from butterfly.cli.launcher import free_port_block, node_configs
from butterfly.runtime.loader import load_stage
from butterfly.runtime.weights import CheckpointReader, model_hash
from butterfly.types.errors import InvalidInput, MissingTensor
from butterfly.types.tasks import SamplingParams
from tests.http_util import serving


def refused(args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # no traceback
    assert message in " ".join(result.output.split()), result.output


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--temperature", "nan"], "temperature must be a finite number >= 0, got nan"),
        (["--temperature", "-1"], "temperature must be a finite number >= 0, got -1.0"),
        (["--temperature", "1", "--top-p", "0"], "top_p must be in (0, 1]"),
        (["--top-p", "5"], "top_p must be in (0, 1]"),
        (["--top-k", "-5"], "top_k must be >= 0"),
        (["--temperature", "1", "--seed", str(1 << 70)], "seed must be in [0, 2**63)"),
    ],
)
def test_generate_refuses_sampling_values_before_loading_anything(
    option: list[str], message: str, tmp_path: Path
) -> None:
    refused(["generate", "hi", "--model", str(tmp_path / "absent"), *option], message)


def test_the_same_checks_hold_for_every_way_in() -> None:
    """The HTTP APIs validate their bodies first; SamplingParams refuses whatever gets past
    (an infinite temperature is a float JSON may not carry but Python can)."""
    for bad in (
        {"temperature": float("inf")},
        {"presence_penalty": float("nan")},
        {"logprobs": -1},
        {"seed": -1},
    ):
        with pytest.raises(InvalidInput):
            SamplingParams(**bad)  # type: ignore[arg-type]
    assert SamplingParams(temperature=0.7, top_k=40, top_p=0.9, seed=(1 << 63) - 1).seed


@pytest.fixture
def not_a_gateway() -> Iterator[str]:
    """An HTTP server answering every request with an HTML page."""

    class Page(http.server.BaseHTTPRequestHandler):
        def _page(self) -> None:
            body = b"<html>hello</html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _page

        def log_message(self, *args: object) -> None:
            pass

    with serving(Page) as url:
        yield url


def test_infer_names_a_bad_url_a_bad_temperature_and_a_server_that_is_not_a_gateway(
    not_a_gateway: str,
) -> None:
    refused(["infer", "hi", "--url", "http://[::1"], "cannot reach http://[::1")
    refused(["infer", "hi", "--temperature", "nan"], "temperature must be a finite number")
    refused(["infer", "hi", "--url", not_a_gateway], "did not answer as a Butterfly gateway")


def _truncate(model: Path) -> None:
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])


def _shard(model: Path, index_text: str) -> None:
    (model / "model.safetensors").rename(model / "model-00001-of-00001.safetensors")
    (model / "model.safetensors.index.json").write_text(index_text)


CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated": (_truncate, "model.safetensors is not a readable safetensors file"),
    "empty": (
        lambda d: (d / "model.safetensors").write_bytes(b""),
        "model.safetensors is not a readable safetensors file",
    ),
    "index_not_json": (
        lambda d: _shard(d, '{"metadata": {}'),
        "model.safetensors.index.json is not valid JSON",
    ),
    "index_without_weight_map": (
        lambda d: _shard(d, '{"metadata": {}}'),
        "model.safetensors.index.json has no 'weight_map'",
    ),
    "index_a_list": (
        lambda d: _shard(d, "[]"),
        "model.safetensors.index.json has no 'weight_map'",
    ),
    "tokenizer_not_json": (
        lambda d: (d / "tokenizer.json").write_text("{"),
        "tokenizer.json does not load as a tokenizer",
    ),
    # not corrupt, but the advice was "send input_ids instead of text", which the CLI cannot
    "tokenizer_missing": (
        lambda d: (d / "tokenizer.json").unlink(),
        "has no tokenizer.json, which turns text into the model's token ids",
    ),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_generate_names_a_corrupt_checkpoint_file(
    name: str, tiny_model: Path, tmp_path: Path
) -> None:
    """A truncated download, an index or tokenizer.json that does not parse: the
    libraries' own exceptions (SafetensorError, JSONDecodeError, KeyError, TypeError,
    tokenizers' bare Exception) escaped as a traceback and exit 1."""
    corrupt, message = CORRUPTIONS[name]
    broken = tmp_path / name
    shutil.copytree(tiny_model, broken)
    corrupt(broken)
    refused(["generate", "hi", "--model", str(broken), "--max-tokens", "2"], message)


def test_a_safetensors_file_shorter_than_its_header_length_is_named(
    tiny_model: Path, tmp_path: Path
) -> None:
    """The checkpoint's hash (checked in every handshake) reads each file's 8-byte header
    length first: a 3-byte file raised struct.error."""
    shutil.copytree(tiny_model, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"abc")
    with pytest.raises(MissingTensor, match=r"model\.safetensors is not a readable safetensors"):
        model_hash(tmp_path / "m")


@pytest.mark.parametrize("fault", ["no_weights", "truncated_weights"])
def test_a_node_whose_model_it_cannot_use_says_so_and_exits_2(
    fault: str, tiny_model: Path, tmp_path: Path
) -> None:
    """The model directory holds a config but no weights, or a truncated shard: the node
    process ends at once with one line naming the problem (it printed a 184-line
    traceback) and CANNOT_START, so `cluster up` reports it instead of restarting it in
    a loop (a truncated shard exited 1)."""
    broken = tmp_path / fault
    if fault == "no_weights":
        broken.mkdir()
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            if (tiny_model / name).exists():
                shutil.copy(tiny_model / name, broken / name)
    else:
        shutil.copytree(tiny_model, broken)
        _truncate(broken)
    config = node_configs(
        nodes=1, f=0, model=broken, api_port=free_port_block(2), data_dir=tmp_path
    )[0]
    run = subprocess.run(
        [sys.executable, "-m", "butterfly", "start", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == CANNOT_START, run.stderr[-3000:]
    assert "node 0 cannot start" in run.stderr
    assert "Traceback" not in run.stderr, run.stderr[-3000:]


@pytest.mark.parametrize("fault", ["corrupt", "locked"])
def test_a_node_whose_task_store_is_unusable_names_the_file_and_exits_2(
    fault: str, tiny_model: Path, tmp_path: Path
) -> None:
    """A corrupt `tasks.sqlite` (a disk error, a half-restored file), or one another
    process holds locked: one line naming the file and what to do, and CANNOT_START (it
    printed a 130-line traceback naming no file and exited 1, restarted in a loop)."""
    config = node_configs(
        nodes=1, f=0, model=tiny_model, api_port=free_port_block(2), data_dir=tmp_path
    )[0]
    data = Path(tomllib.loads(config.read_text())["node"]["data_dir"])
    data.mkdir(parents=True, exist_ok=True)
    store = data / "tasks.sqlite"
    holder = None
    if fault == "corrupt":
        store.write_bytes(b"this is not a database " * 200)
    else:
        holder = sqlite3.connect(store, isolation_level=None)
        holder.execute("PRAGMA locking_mode=EXCLUSIVE")
        holder.execute("CREATE TABLE x (a)")
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute("INSERT INTO x VALUES (1)")
    try:
        run = subprocess.run(
            [sys.executable, "-m", "butterfly", "start", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        if holder is not None:
            holder.close()
    assert run.returncode == CANNOT_START, run.stderr[-3000:]
    assert "node 0 cannot start" in run.stderr and str(store) in run.stderr, run.stderr
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    assert ("another process" if fault == "locked" else "move it aside") in run.stderr


@pytest.mark.parametrize(
    "command",
    [["status"], ["config", "show"], ["config", "history"], ["cluster", "remove-member", "3"]],
)
def test_remote_commands_name_a_malformed_url(command: list[str]) -> None:
    refused([*command, "--url", "http://[::1"], "cannot reach http://[::1")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "foo=1"], "expected section.key=VALUE"),
        (["--set", "api.port=null"], "null is not a value"),
        (["--api-port", "70000"], "invalid config"),
        (["--set", 'api.port={"a":1}'], "invalid config"),
        (["--set", "api.port=0"], "needs a fixed API port"),  # no URL to wait on
    ],
)
def test_cluster_up_refuses_a_bad_setting_before_starting_a_node(
    extra: list[str], message: str, tiny_model: Path, tmp_path: Path
) -> None:
    """Nodes started with a config they refuse exited 2 and were restarted every 30 s
    until the 120 s wait gave up, the reason only in their logs."""
    args = ["cluster", "up", "--nodes", "1", "--model", str(tiny_model), "--data", str(tmp_path)]
    refused([*args, *extra], message)
    assert not list(tmp_path.glob("**/*.log"))  # no node was started


def test_cluster_up_takes_a_plain_string_as_config_set_does() -> None:
    from butterfly.cli.cluster import parse_settings

    assert parse_settings(["partition.strategy=uniform", "api.port=8081"]) == {
        "partition.strategy": "uniform",
        "api.port": 8081,
    }


@pytest.mark.parametrize(
    "command",
    [
        ["config", "show"],
        ["config", "rollback", "--version", "3"],
        ["cluster", "remove-member", "3"],
        ["config", "sync"],  # was "still diverged: None", exit 1
    ],
)
def test_remote_commands_name_a_server_that_is_not_a_gateway(
    command: list[str], json_gateway: str
) -> None:
    refused([*command, "--url", json_gateway], "did not answer as a Butterfly gateway")


def _answering(body: bytes, code: int) -> type[http.server.BaseHTTPRequestHandler]:
    class Answer(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *args: object) -> None:
            pass

    return Answer


@pytest.fixture
def json_gateway() -> Iterator[str]:
    """An HTTP server answering every request with `{}`: JSON, but not a gateway's."""
    with serving(_answering(b"{}", 200)) as url:
        yield url


@pytest.mark.parametrize(
    ("body", "code"),
    [(b"[]", 200), (b'"ok"', 200), (b'{"healthy": true, "nodes": [1]}', 200), (b"[]", 503),
     (b'{"healthy": false, "gateways": [1]}', 503), (b'{"service": "other"}', 200)],
    ids=["list", "string", "nodes-not-objects", "list-503", "gateways-not-objects", "other"],
)  # fmt: skip
def test_status_names_a_server_that_is_not_a_gateway(body: bytes, code: int) -> None:
    """`status` read any JSON as a gateway's /health: a list crashed the table with an
    AttributeError's traceback (a review)."""
    with serving(_answering(body, code)) as url:
        refused(["status", "--url", url], "did not answer as a Butterfly gateway")


def test_infer_names_a_finished_answer_that_is_no_task() -> None:
    """Another server's 200 object printed an empty line and exited 0 (a review)."""
    with serving(_answering(b'{"service": "something else"}', 200)) as url:
        refused(["infer", "hi", "--url", url], "did not answer as a Butterfly gateway")


def test_a_config_json_that_is_not_an_object_is_named(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("[]")
    refused(["generate", "hi", "--model", str(tmp_path)], "config.json must hold a JSON object")


def test_an_output_path_that_is_a_file_is_named(tmp_path: Path) -> None:
    taken = tmp_path / "afile"
    taken.write_text("mine")
    refused(["certs", "--nodes", "2", "--out", str(taken)], "is a file")
    refused(["model", "create-demo", "--out", str(taken)], "is a file")
    assert taken.read_text() == "mine"
    result = CliRunner().invoke(
        app, ["model", "create-demo", "--out", str(tmp_path / "m"), "--seed", str(1 << 70)]
    )
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)


def test_create_demo_refuses_a_directory_holding_a_model_unless_forced(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Written over, a sharded checkpoint's index stayed and routed every tensor to the
    old shard: the directory served the old weights under the new demo's name. Refused
    (the user's files untouched); with --force, the directory is exactly the demo."""
    out = tmp_path / "my-model"
    out.mkdir()
    (out / "config.json").write_text((tiny_model / "config.json").read_text())
    shard = "model-00001-of-00001.safetensors"
    (out / shard).write_bytes((tiny_model / "model.safetensors").read_bytes())
    names = CheckpointReader(tiny_model).names()
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": dict.fromkeys(names, shard)})
    )
    (out / "chat_template.jinja").write_text("OLD")  # it would win over the demo's template
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    create = ["model", "create-demo", "--out", str(out), "--seed", "1"]
    refused(create, f"{out} already holds a model")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    forced = CliRunner().invoke(app, [*create, "--force"])
    assert forced.exit_code == 0, forced.output
    new = tmp_path / "new"
    fresh = CliRunner().invoke(app, ["model", "create-demo", "--out", str(new), "--seed", "1"])
    assert fresh.exit_code == 0, fresh.output
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in new.iterdir())
    assert model_hash(out) == model_hash(new)
    x = torch.tensor([[1, 2, 3, 4]])
    a, b = load_stage(out), load_stage(new)
    with torch.no_grad():
        assert torch.equal(a.forward(x, a.new_cache(), 0), b.forward(x, b.new_cache(), 0))


def test_every_failure_is_printed_as_written(capsys: pytest.CaptureFixture[str]) -> None:
    """rich reads "[1, 64]" in an error's text as markup: several commands printed the
    message without it (a review). Now every command fails through `cli.report`."""
    from butterfly.cli.cluster import _cannot_start
    from butterfly.cli.report import fail

    exit_ = _cannot_start(1, [ValueError("a tensor of shape [1, 64] where [2, 64] fits")])
    assert exit_.exit_code == CANNOT_START
    assert fail("[bold]not markup[/bold]", label="error 409").exit_code == 2
    printed = " ".join(capsys.readouterr().err.split())
    assert "node 1 cannot start: a tensor of shape [1, 64] where [2, 64] fits" in printed
    assert "error 409: [bold]not markup[/bold]" in printed
