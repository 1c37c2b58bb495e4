"""The specification's option names (seeds 001 and 004) load as deprecated aliases.

Each old name sets the option it means and warns naming the new key; what cannot carry
over is refused with what to write instead; the unsafe examples (3 nodes with f = 1,
5 nodes with f = 2) are still refused by n >= 3f+1; `butterfly config migrate` rewrites.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from butterfly.cli import app
from butterfly.config import ConfigInvalid, DeprecatedOption, load_config
from butterfly.config.fields import config_leaves

# seed 004's example config.toml, verbatim
SEED_004 = """\
[api]
bind_address = "0.0.0.0:8080"
max_request_size_mb = 100
request_timeout_secs = 30

[scheduling]
scheduler_type = "priority"
max_queue_size = 1000
dispatch_batch_size = 10

[partition]
default_strategy = "load_balanced"
cache_size = 100
recompute_threshold = 0.1

[coordination]
node_id = 0
cluster_size = 3
max_byzantine = 1
phase_timeout_ms = 5000
checkpoint_interval = 10

[network]
backend_type = "tcp"
listen_address = "0.0.0.0:9000"
peer_addresses = ["192.168.1.101:9000", "192.168.1.102:9000"]
max_connections = 100
send_timeout_ms = 1000
retry_attempts = 3
retry_backoff_ms = 100

[metrics]
collector_type = "prometheus"
export_interval_secs = 60
retention_duration_secs = 3600
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def issues(e: pytest.ExceptionInfo[ConfigInvalid]) -> list[tuple[str, int | None, str]]:
    return [(i.key, i.line, i.rule) for i in e.value.issues]


@pytest.mark.parametrize(
    ("section", "old", "value", "new", "expected"),
    [
        ("coordination", "node_id", 0, "node.id", 0),
        ("coordination", "max_byzantine", 0, "byzantine.f", 0),
        ("coordination", "checkpoint_interval", 7, "coordination.checkpoint_frequency", 7),
        ("network", "listen_address", '"10.0.0.1:9001"', "node.listen", "10.0.0.1:9001"),
        ("network", "backend_type", '"tcp"', "network.backend", "tcp"),
        ("scheduling", "scheduler_type", '"priority"', "scheduling.policy", "priority"),
        ("scheduling", "max_queue_size", 17, "scheduling.max_queue", 17),
        ("partition", "default_strategy", '"uniform"', "partition.strategy", "uniform"),
        ("api", "request_timeout_secs", 30, "api.request_timeout_s", 30.0),
        ("metrics", "collector_type", '"prometheus"', "metrics.collector", "prometheus"),
        ("metrics", "export_interval_secs", 0, "metrics.export_interval_s", 0),
        ("metrics", "retention_duration_secs", 3600, "metrics.retention_s", 3600),
        ("api", "max_request_size_mb", 3, "api.max_request_bytes", 3 * 2**20),
    ],
)
def test_each_old_name_sets_the_new_option_and_warns_naming_it(
    tmp_path: Path, section: str, old: str, value: object, new: str, expected: object
) -> None:
    path = write(tmp_path, f"# seed name\n[{section}]\n{old} = {value}\n")
    with pytest.warns(DeprecatedOption, match=re.escape(f"{section}.{old}")) as caught:
        cfg = load_config([path])
    assert config_leaves(cfg)[new] == expected
    (warning,) = caught
    assert f"use {new}" in str(warning.message)
    assert (warning.filename, warning.lineno) == (str(path), 3)  # points at the old line


def test_bind_address_sets_host_and_port(tmp_path: Path) -> None:
    path = write(tmp_path, '[api]\nbind_address = "0.0.0.0:8081"\n')
    with pytest.warns(DeprecatedOption, match="api.host and api.port"):
        cfg = load_config([path])
    assert (cfg.api.host, cfg.api.port) == ("0.0.0.0", 8081)


def four_nodes(node_id: int, listen: str, extra: str = "") -> str:
    peers = [f"10.0.0.{i}:9000" for i in range(4) if i != node_id]
    return (
        f"[coordination]\nnode_id = {node_id}\ncluster_size = 4\nmax_byzantine = 1\n{extra}"
        f'[network]\nlisten_address = "{listen}"\npeer_addresses = {peers!r}\n'.replace("'", '"')
    )


def test_peer_addresses_take_this_node_at_its_id(tmp_path: Path) -> None:
    path = write(tmp_path, four_nodes(2, "10.0.0.2:9000"))
    with pytest.warns(DeprecatedOption) as caught:
        cfg = load_config([path])
    assert cfg.cluster.members == tuple(f"10.0.0.{i}:9000" for i in range(4))
    assert (cfg.node.id, cfg.byzantine.f, cfg.node.listen) == (2, 1, "10.0.0.2:9000")
    said = " ".join(str(w.message) for w in caught)
    assert "network.peer_addresses is an old name; use cluster.members" in said
    assert "coordination.cluster_size is an old name; drop it" in said


def test_what_does_not_carry_over_is_refused_with_what_to_write(tmp_path: Path) -> None:
    path = write(tmp_path, four_nodes(0, "0.0.0.0:9000"))
    wildcard = re.escape("0.0.0.0:9000")
    with pytest.warns(DeprecatedOption), pytest.raises(ConfigInvalid, match=wildcard) as e:
        load_config([path])
    assert ("network.peer_addresses", 7, "own-address") in issues(e)
    assert "cluster.members" in str(e.value)
    wrong_size = four_nodes(1, "10.0.0.1:9000").replace("cluster_size = 4", "cluster_size = 5")
    with pytest.warns(DeprecatedOption), pytest.raises(ConfigInvalid) as e:
        load_config([write(tmp_path, wrong_size)])
    assert issues(e) == [("coordination.cluster_size", 3, "cluster-size")]
    both = "[coordination]\nmax_byzantine = 1\n[byzantine]\nf = 0\n"
    with pytest.raises(ConfigInvalid) as e:
        load_config([write(tmp_path, both)])
    assert issues(e) == [("coordination.max_byzantine", 2, "alias-conflict")]


def test_a_lone_node_example_loads(tmp_path: Path) -> None:
    text = "[coordination]\nnode_id = 0\ncluster_size = 1\nmax_byzantine = 0\n"
    with pytest.warns(DeprecatedOption):
        cfg = load_config([write(tmp_path, text)])
    assert cfg.cluster.members == () and cfg.byzantine.f == 0


def test_seed_004_as_written_is_refused_by_the_3f1_rule(tmp_path: Path) -> None:
    with pytest.warns(DeprecatedOption), pytest.raises(ConfigInvalid) as e:
        load_config([write(tmp_path, SEED_004)])
    assert ("coordination.cluster_size", 18, "n >= 3f+1") in issues(e)
    assert "3 nodes tolerate at most f=0 (n >= 3f+1); f=1 needs 4 nodes" in str(e.value)


@pytest.mark.parametrize("with_peers", [True, False])
def test_five_nodes_with_f2_is_refused_by_the_3f1_rule(tmp_path: Path, with_peers: bool) -> None:
    """Seed 001's production example: cluster_size 5, max_byzantine 2."""
    text = "[coordination]\nnode_id = 0\ncluster_size = 5\nmax_byzantine = 2\n"
    if with_peers:
        peers = ", ".join(f'"node{i}:9000"' for i in range(1, 5))
        text += f'[network]\nlisten_address = "node0:9000"\npeer_addresses = [{peers}]\n'
    with pytest.warns(DeprecatedOption), pytest.raises(ConfigInvalid) as e:
        load_config([write(tmp_path, text)])
    assert "5 nodes tolerate at most f=1 (n >= 3f+1); f=2 needs 7 nodes" in str(e.value)
    assert "n >= 3f+1" in [i.rule for i in e.value.issues]


def test_migrate_rewrites_the_names_and_keeps_the_old_file(tmp_path: Path) -> None:
    text = four_nodes(1, "10.0.0.1:9000", "checkpoint_interval = 12\n")
    path = write(tmp_path, text + '[api]\nbind_address = "0.0.0.0:8081"\n')
    result = CliRunner().invoke(app, ["config", "migrate", str(path)])
    assert result.exit_code == 0, result.output
    assert "coordination.max_byzantine -> byzantine.f" in result.output
    assert (tmp_path / "node.toml.bak").read_text().startswith(text)
    cfg = load_config([path])  # no DeprecatedOption: warnings are errors in this suite
    leaves: dict[str, Any] = config_leaves(cfg)
    assert leaves["cluster.members"] == [f"10.0.0.{i}:9000" for i in range(4)]
    assert (leaves["node.id"], leaves["byzantine.f"], leaves["api.port"]) == (1, 1, 8081)
    assert leaves["coordination.checkpoint_frequency"] == 12


def test_migrate_refuses_to_guess(tmp_path: Path) -> None:
    path = write(tmp_path, SEED_004)
    result = CliRunner().invoke(app, ["config", "migrate", str(path)])
    assert result.exit_code == 2 and "nothing written" in result.output
    assert path.read_text() == SEED_004 and not (tmp_path / "node.toml.bak").exists()


def test_migrate_twice_keeps_every_backup_and_refuses_bad_bytes(tmp_path: Path) -> None:
    """A second migrate (or one of a file already current) writes FILE.bak.1, never over
    the first backup, which holds the original with its comments; a file that is not
    UTF-8, or an --out whose directory is missing, is a clear error, not a traceback."""
    text = four_nodes(1, "10.0.0.1:9000", "checkpoint_interval = 12\n") + "# mine\n"
    path = write(tmp_path, text)
    for _ in range(2):
        result = CliRunner().invoke(app, ["config", "migrate", str(path)])
        assert result.exit_code == 0, result.output
    assert (tmp_path / "node.toml.bak").read_text() == text
    assert (tmp_path / "node.toml.bak.1").read_text() != text  # the first migration's file
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"[node]\nid = \xff\xfe\n")
    result = CliRunner().invoke(app, ["config", "migrate", str(binary)])
    assert result.exit_code == 2 and "is not UTF-8 text" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    result = CliRunner().invoke(
        app, ["config", "migrate", str(path), "--out", str(tmp_path / "no" / "such.toml")]
    )
    assert result.exit_code == 2 and "No such file or directory" in result.output
    assert isinstance(result.exception, SystemExit)


def test_an_old_size_in_mib_that_is_not_finite_is_refused_by_name(tmp_path: Path) -> None:
    """`max_request_size_mb = inf` (or nan) was multiplied into an int and crashed every
    config command with OverflowError; the new option now refuses it, naming itself."""
    for bad in ("inf", "nan"):
        path = write(tmp_path, f"[node]\nid = 0\n[api]\nmax_request_size_mb = {bad}\n")
        with pytest.warns(DeprecatedOption), pytest.raises(ConfigInvalid) as e:
            load_config([path])
        assert "api.max_request_bytes" in str(e.value)
