"""`butterfly config ...` through the real entry point, with a history in tmp_path."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from butterfly.agreement.build import open_config
from butterfly.cli import app
from butterfly.config import ConfigHistory, config_hash, load_config

Invoke = Callable[..., Result]


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Invoke]:
    """Invoke `butterfly config ...` with the data directory (and history) under tmp_path."""
    for name in [n for n in os.environ if n.startswith("BUTTERFLY_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("BUTTERFLY_DATA_DIR", str(tmp_path / "data"))
    runner = CliRunner()

    def invoke(*args: str) -> Result:
        result = runner.invoke(app, ["config", *args])
        assert "Traceback" not in result.output
        return result

    yield invoke


def test_template_validates_and_shows_the_same_hash(run: Invoke, tmp_path: Path) -> None:
    text = run("template").stdout
    path = tmp_path / "node.toml"
    path.write_text(text)
    ok = run("validate", "--config", str(path))
    assert ok.exit_code == 0 and ok.stdout.startswith("ok:")
    shown = run("show", "--config", str(path), "--hash", "--json")
    assert json.loads(shown.stdout)["config_hash"] == config_hash(load_config([path]))
    as_toml = run("show", "--config", str(path), "--set", "api.port=8181").stdout
    (tmp_path / "shown.toml").write_text(as_toml)
    assert load_config([tmp_path / "shown.toml"]).api.port == 8181


def test_show_redacts_tokens(run: Invoke) -> None:
    out = run("show", "--json", "--set", "api.tokens=s3cret").stdout
    assert "s3cret" not in out and json.loads(out)["api"]["tokens"] == ["<redacted>"]
    assert "s3cret" in run("show", "--secrets", "--set", "api.tokens=s3cret").stdout


def test_diff_redacts_tokens(run: Invoke, tmp_path: Path) -> None:
    """`diff` (and the changes `update` prints) redact tokens as `show` does."""
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text("")
    b.write_text('[api]\ntokens = ["hunter2"]\n')
    text = run("diff", str(a), str(b))
    assert text.stdout.strip() == 'api.tokens: [] -> ["<redacted>"]', text.output
    listed = run("diff", str(b), str(a), "--json").stdout
    assert json.loads(listed) == [{"key": "api.tokens", "old": ["<redacted>"], "new": []}]


def test_errors_exit_2_with_location_and_no_traceback(run: Invoke, tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(
        '[cluster]\nmembers = ["a:1", "a:2", "a:3", "a:4", "a:5"]\n[byzantine]\nf = 2\n'
    )
    bad = run("validate", "--config", str(path))
    assert bad.exit_code == 2
    assert f"{path}:4: byzantine.f:" in bad.stderr
    assert "5 nodes tolerate at most f=1 (n >= 3f+1); f=2 needs 7 nodes" in bad.stderr
    typo = run("validate", "--set", "scheduling.max_queue_size=3")
    assert typo.exit_code == 2 and "did you mean scheduling.max_queue" in typo.stderr


def test_update_history_diff_rollback(run: Invoke, tmp_path: Path) -> None:
    """Offline, a one-node cluster is its own quorum: `update --file` and `rollback`
    change its cluster-wide options, each a new version that `history` lists and `diff`
    compares."""
    base = tmp_path / "node.toml"
    base.write_text("[byzantine]\naudit_fraction = 0.1\n")
    assert "version 1" in run("update", "--file", str(base)).stdout
    changed = tmp_path / "changed.toml"
    changed.write_text('[byzantine]\naudit_fraction = 0.5\n[scheduling]\npolicy = "priority"\n')
    out = run("update", "--file", str(changed))
    assert out.exit_code == 0, out.output
    assert "byzantine.audit_fraction: 0.1 -> 0.5" in out.stdout
    assert 'scheduling.policy: "fifo" -> "priority"' in out.stdout
    listing = run("history", "--json").stdout
    versions = [r["version"] for r in json.loads(listing)]
    assert versions == [2, 1]
    assert run("diff", "1", "2").stdout.strip() == (
        'byzantine.audit_fraction: 0.1 -> 0.5\nscheduling.policy: "fifo" -> "priority"'
    )
    assert "scheduling.policy" in run("diff", "1", str(changed)).stdout
    back = run("rollback", "--version", "1")
    assert back.exit_code == 0 and 'scheduling.policy: "priority" -> "fifo"' in back.stdout
    top = json.loads(run("history", "--limit", "1", "--json").stdout)
    assert len(top) == 1 and top[0]["config_hash"] == json.loads(listing)[-1]["config_hash"]
    assert "version" in run("history").stdout


def write_node(path: Path, data_dir: Path, rate: float) -> Path:
    path.write_text(f'[node]\ndata_dir = "{data_dir}"\n\n[api]\nrate_limit = {rate}\n')
    return path


def started(node_toml: Path) -> float:
    """The rate limit a node started from `node_toml` serves with (`open_config`, what
    `butterfly start` runs)."""
    manager = open_config(load_config([node_toml]))
    try:
        return manager.current.api.rate_limit
    finally:
        manager.history.close()


def test_node_local_options_are_refused_offline(run: Invoke, tmp_path: Path) -> None:
    """A node's files decide its node-local options when it starts (only agreed values
    resume from the history): an offline rollback or `update --file` that moved one was
    reported as a new version, and the node started next ran with the file's value. It is
    refused, naming the option and the file as the place to set it, and nothing is
    recorded."""
    node = write_node(tmp_path / "node.toml", tmp_path / "data", 100.0)
    assert started(node) == 100.0  # version 1: the node ran with 100 requests/s
    write_node(node, tmp_path / "data", 5.0)  # the operator edits the file
    assert started(node) == 5.0  # version 2
    back = run("rollback", "--version", "1", "--config", str(node))
    assert back.exit_code == 2, back.output
    assert "api.rate_limit = 100.0 (now 5.0)" in back.stderr
    assert "config file" in back.stderr
    other = write_node(tmp_path / "other.toml", tmp_path / "data", 7.0)
    out = run("update", "--file", str(other))
    assert out.exit_code == 2 and "api.rate_limit = 7.0" in out.stderr, out.output
    assert [r["version"] for r in json.loads(run("history", "--json").stdout)] == [2, 1]
    assert started(node) == 5.0


def test_update_refuses_static_changes(run: Invoke, tmp_path: Path) -> None:
    first = tmp_path / "a.toml"
    first.write_text("")
    run("update", "--file", str(first))
    second = tmp_path / "b.toml"
    second.write_text('[node]\nlisten = "127.0.0.1:9100"\n[observability]\nlog_level = "debug"\n')
    out = run("update", "--file", str(second))
    assert out.exit_code == 2 and "restart required: node.listen" in out.stderr
    assert [r["version"] for r in json.loads(run("history", "--json").stdout)] == [1]


def test_cluster_wide_change_needs_a_running_cluster(run: Invoke, tmp_path: Path) -> None:
    members = '[cluster]\nmembers = ["a:1", "a:2", "a:3", "a:4"]\n'
    first = tmp_path / "a.toml"
    first.write_text(members)
    run("update", "--file", str(first))
    second = tmp_path / "b.toml"
    second.write_text(members + '[partition]\nstrategy = "uniform"\n')
    out = run("update", "--file", str(second))
    assert out.exit_code == 2 and "need the agreement of the running cluster" in out.stderr


def test_offline_rollback_keeps_the_roster(run: Invoke, tmp_path: Path) -> None:
    """A node that ran alone (version 1) and then joined a cluster of four (version 2,
    agreed while running): `config rollback` without --url keeps the members, as the
    agreed rollback does. Taking version 1's roster, a one-node cluster, it passed as its
    own quorum's change and dropped the three others."""
    members = ("127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3", "127.0.0.1:4")
    with ConfigHistory.in_data_dir(tmp_path / "data") as history:
        history.record(load_config(), source="startup", reason="start")
        joined = load_config(overrides=[f"cluster.members={json.dumps(members)}"])
        history.record(joined, source="cluster seq 1", reason="add-member", cluster_seq=1)
    out = run("rollback", "--version", "1")
    assert out.exit_code == 0, out.output
    assert "no changes" in out.stdout and "cluster.members" not in out.stdout
    with ConfigHistory.in_data_dir(tmp_path / "data") as history:
        now = history.config_at(history.latest().version)  # type: ignore[union-attr]
    assert now.cluster.members == members


@pytest.mark.parametrize(
    "args", [["diff", "1", str(10**23)], ["rollback", "--version", str(10**23)]]
)
def test_a_version_beyond_sqlite_integers_is_a_missing_one(
    run: Invoke, tmp_path: Path, args: list[str]
) -> None:
    """Past 2**63 SQLite raised OverflowError: a traceback and exit 1."""
    first = tmp_path / "a.toml"
    first.write_text("")
    assert run("update", "--file", str(first)).exit_code == 0
    out = run(*args)
    assert out.exit_code == 2 and f"no config version {10**23} in" in out.stderr, out.output
    assert [r["version"] for r in json.loads(run("history", "--json").stdout)] == [1]


def test_history_limit_is_bounded(run: Invoke, tmp_path: Path) -> None:
    out = run("history", "--limit", str(10**23))
    assert out.exit_code == 2 and "--limit" in out.stderr, out.output


def test_rollback_to_a_missing_version(run: Invoke) -> None:
    out = run("rollback", "--version", "3")
    assert out.exit_code == 2 and "no config history" in out.stderr


def test_validate_refuses_what_start_refuses_for_want_of_keys(run: Invoke, tmp_path: Path) -> None:
    """A multi-member file without `cluster.public_keys` passed `validate` and was refused
    by `start` (keys are never learned from peers); one member needs none."""
    path = tmp_path / "node.toml"
    path.write_text('[cluster]\nmembers = ["10.0.0.1:9000", "10.0.0.2:9000"]\n')
    refused = run("validate", "--config", str(path))
    assert refused.exit_code == 2 and "cluster.public_keys is empty" in refused.output
    path.write_text('[cluster]\nmembers = ["10.0.0.1:9000"]\n')
    assert run("validate", "--config", str(path)).exit_code == 0
