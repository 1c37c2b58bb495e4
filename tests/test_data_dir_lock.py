"""One writer per data directory: a running node refuses a second node and an offline
`config update`/`rollback` on its directory (`butterfly.config.data_lock`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner, Result

from butterfly.cli import app
from butterfly.config import ConfigHistory
from butterfly.config.data_lock import LOCK_FILE, DataDirLocked, lock_data_dir
from tests.cluster_util import running_cluster


def _config(*args: str) -> Result:
    return CliRunner().invoke(app, ["config", *args])


def _versions(data: Path) -> list[int]:
    with ConfigHistory.in_data_dir(data) as history:
        return [r.version for r in history.versions()]


def test_the_lock_is_exclusive_until_released(tmp_path: Path) -> None:
    refused = pytest.raises(DataDirLocked, match=rf"process {os.getpid()} holds .*; do this$")
    with lock_data_dir(tmp_path / "data", then="do this"), refused:
        lock_data_dir(tmp_path / "data", then="do this")
    lock_data_dir(tmp_path / "data", then="").release()  # free again


@pytest.mark.timeout(60)
def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    """A node that crashes (SIGKILL) never blocks the next one: the kernel drops its lock."""
    hold = (
        "import sys, time; from pathlib import Path;"
        "from butterfly.config.data_lock import lock_data_dir;"
        "lock = lock_data_dir(Path(sys.argv[1]), then='');"
        "print('held', flush=True); time.sleep(60)"
    )
    command = [sys.executable, "-c", hold, str(tmp_path)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as child:
        try:
            assert child.stdout is not None and child.stdout.readline() == "held\n"
            with pytest.raises(DataDirLocked, match=f"process {child.pid} "):
                lock_data_dir(tmp_path, then="")
        finally:
            child.kill()
            child.wait(timeout=10)
    lock_data_dir(tmp_path, then="").release()


def test_offline_update_and_rollback_are_refused_while_a_node_runs(tmp_path: Path) -> None:
    """A running node reads its history only when it starts: a version recorded under
    it was reported applied and never ran. Reads still work."""
    data = tmp_path / "data"
    first, second = tmp_path / "a.toml", tmp_path / "b.toml"
    first.write_text(f'[node]\ndata_dir = "{data}"\n')
    second.write_text(f'[node]\ndata_dir = "{data}"\n[partition]\nstrategy = "hybrid"\n')
    assert _config("update", "--file", str(first)).exit_code == 0  # version 1
    with lock_data_dir(data, then="as a node holds it"):  # what `butterfly start` holds
        for args in (["update", "--file", str(second)], ["rollback", "-v", "1", "-c", str(first)]):
            out = _config(*args)
            assert out.exit_code == 2, out.output
            assert "in use by a running node" in out.stderr and "--url" in out.stderr
        assert _config("history", "-c", str(first)).exit_code == 0
        assert _versions(data) == [1]
    out = _config("update", "--file", str(second))  # the node stopped
    assert out.exit_code == 0 and '-> "hybrid"' in out.stdout
    assert _versions(data) == [2, 1]
    assert (data / LOCK_FILE).exists()


@pytest.mark.cluster
@pytest.mark.timeout(300)
def test_a_running_node_refuses_a_second_node_and_offline_changes(
    tiny_model: Path, tmp_path: Path
) -> None:
    with running_cluster(tiny_model, 1, tmp_path / "c") as c:
        node_file = c.configs[0]
        new = tmp_path / "new.toml"
        new.write_text(node_file.read_text().replace('strategy = "uniform"', 'strategy = "hybrid"'))
        before = httpx.get(f"{c.api_url}/api/v1/config", timeout=30).json()
        out = _config("update", "--file", str(new))
        assert out.exit_code == 2 and "--url" in out.stderr, out.output
        second = subprocess.run(
            [sys.executable, "-m", "butterfly", "start", "--config", str(node_file)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 2, second.stderr
        assert "in use by a running node" in second.stderr
        assert "own node.data_dir" in second.stderr
        view = httpx.get(f"{c.api_url}/api/v1/config", timeout=30).json()  # serving on
        assert view["config"]["partition"]["strategy"] == "uniform"
        assert (view["version"], view["seq"]) == (before["version"], before["seq"])
