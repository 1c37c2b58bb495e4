"""Nodes forked by the launcher's fork server (`butterfly.cli.prefork`) run as though
`python -m <module>` had started them: their arguments, directory, output, exit codes
and randomness are their own, and they start with a node's imports already done."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from butterfly.cli import launcher, prefork
from butterfly.cli.launcher import CHILD_ENV, LocalCluster
from butterfly.cli.prefork import LOST, CannotFork, ForkedNode, fork_node, forkable

pytestmark = pytest.mark.timeout(120)

PROBE = """
import json, os, random, sys, time
print(json.dumps({
    "argv": sys.argv[1:],
    "cwd": os.getcwd(),
    "torch_before": "torch" in sys.modules,
    "random": random.random(),
    "spin": os.environ.get("GOMP_SPINCOUNT"),
    "main": __name__,
    "tag": os.environ.get("PROBE_TAG"),
    "server": os.getppid(),
}), flush=True)
if sys.argv[1] == "sleep":
    time.sleep(60)
if sys.argv[1] == "fail":
    raise RuntimeError("the probe failed")
if sys.argv[1] == "interrupt":
    raise KeyboardInterrupt
if sys.argv[1] == "say":
    sys.exit("the probe says no")
sys.exit(int(sys.argv[1]))
"""


def probe(
    tmp_path: Path, name: str, *args: str, tag: str = "", **env: str
) -> tuple[ForkedNode, Path]:
    program = tmp_path / "forked_probe.py"
    if not program.exists():  # rewritten, it could be read half-written by a node starting
        program.write_text(PROBE)
    log = tmp_path / f"{name}.log"
    given = {**os.environ, **CHILD_ENV, **({"PROBE_TAG": tag} if tag else {}), **env}
    node = fork_node([sys.executable, "-m", "forked_probe", *args], log, given, tmp_path)
    return node, log


def started(log: Path) -> None:
    deadline = time.monotonic() + 30
    while not log.read_text():
        assert time.monotonic() < deadline, "the probe never started"
        time.sleep(0.05)


def said(log: Path) -> dict[str, object]:
    first: dict[str, object] = json.loads(log.read_text().splitlines()[0])
    return first


def test_a_forked_node_runs_its_module_as_main_with_its_arguments(tmp_path: Path) -> None:
    a, log_a = probe(tmp_path, "a", "3", "x")
    b, log_b = probe(tmp_path, "b", "0")
    assert a.wait(timeout=60) == 3 and a.returncode == 3
    assert b.wait(timeout=60) == 0
    out_a, out_b = said(log_a), said(log_b)
    assert out_a["argv"] == ["3", "x"] and out_b["argv"] == ["0"]
    assert out_a["main"] == "__main__"
    assert out_a["cwd"] == str(tmp_path)
    assert out_a["torch_before"] is True  # the fork server imported a node's code once
    assert out_a["spin"] == CHILD_ENV["GOMP_SPINCOUNT"]
    assert out_a["random"] != out_b["random"]  # reseeded in each fork


def test_a_node_given_another_environment_runs_with_it(tmp_path: Path) -> None:
    """A bench's A/B gives the other checkout's nodes its `PYTHONPATH`: a node forked
    from a server started with another environment would run the wrong code."""
    a, log_a = probe(tmp_path, "a", "0", tag="a")
    b, log_b = probe(tmp_path, "b", "0", tag="b")
    assert a.wait(timeout=60) == 0 and b.wait(timeout=60) == 0
    assert (said(log_a)["tag"], said(log_b)["tag"]) == ("a", "b")
    assert said(log_a)["server"] == said(log_b)["server"]  # one server: `tag` is read late


def test_one_server_serves_every_test_and_another_runs_another_pythonpath(
    tmp_path: Path,
) -> None:
    """Keyed on the whole environment, every test had its own server (pytest sets
    `PYTEST_CURRENT_TEST`), each importing torch again and kept to the session's end."""
    path = os.environ.get("PYTHONPATH", "")
    runs = [
        probe(tmp_path, "one", "0", PYTEST_CURRENT_TEST="a test"),
        probe(tmp_path, "two", "0", PYTEST_CURRENT_TEST="another test"),
        probe(tmp_path, "three", "0", PYTHONPATH=f"{path}:{tmp_path}" if path else str(tmp_path)),
    ]
    assert all(node.wait(timeout=60) == 0 for node, _ in runs)
    one, two, three = (said(log)["server"] for _, log in runs)
    assert one == two != three


def test_exits_are_an_interpreters(tmp_path: Path) -> None:
    interrupted, _ = probe(tmp_path, "interrupted", "interrupt")
    refused, log = probe(tmp_path, "refused", "say")
    assert interrupted.wait(timeout=60) == -signal.SIGINT
    assert refused.wait(timeout=60) == 1
    assert "the probe says no" in log.read_text()


def test_nodes_die_with_their_server_and_the_next_fork_starts_another(tmp_path: Path) -> None:
    """Their exits could no longer be told, and a PID the kernel gave to another process
    would have been signalled as the node's."""
    node, log = probe(tmp_path, "orphan", "sleep")
    started(log)
    server = int(str(said(log)["server"]))
    os.kill(server, signal.SIGKILL)
    assert node.wait(timeout=10) == LOST
    deadline = time.monotonic() + 10
    while running(node.pid):
        assert time.monotonic() < deadline, "the node outlived its server"
        time.sleep(0.05)
    again, log_again = probe(tmp_path, "again", "0")
    assert again.wait(timeout=60) == 0
    assert said(log_again)["server"] != server


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_fork_not_waited_for_leaves_no_answer_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interrupted (Ctrl-C) or timed out while the server forked, the launcher took the
    next node's PID from that fork's answer, and the node ran on untracked (a review)."""
    monkeypatch.setattr(prefork, "ANSWER_S", 0.0)
    with pytest.raises(CannotFork, match="did not start"):
        probe(tmp_path, "abandoned", "sleep")
    monkeypatch.setattr(prefork, "ANSWER_S", 60.0)
    node, log = probe(tmp_path, "next", "5")
    assert node.wait(timeout=60) == 5
    assert said(log)["argv"] == ["5"]


def test_a_forked_node_is_signalled_and_waited_for_by_pid(tmp_path: Path) -> None:
    node, log = probe(tmp_path, "sleeper", "sleep")
    started(log)
    assert node.poll() is None
    # its command line is its own (`pgrep -f node-1.toml` finds a node), not the server's
    cmdline = Path(f"/proc/{node.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    assert "-m forked_probe sleep" in cmdline, cmdline
    with pytest.raises(subprocess.TimeoutExpired):
        node.wait(timeout=0.2)
    node.send_signal(signal.SIGTERM)
    assert node.wait(timeout=10) == -signal.SIGTERM
    node.kill()  # once it has exited: nothing to signal


def test_an_unhandled_error_exits_1_with_its_traceback_in_the_log(tmp_path: Path) -> None:
    node, log = probe(tmp_path, "failing", "fail")
    assert node.wait(timeout=60) == 1
    assert "RuntimeError: the probe failed" in log.read_text()


def test_only_python_dash_m_commands_are_forked() -> None:
    assert forkable([sys.executable, "-m", "butterfly", "start"]) == "butterfly"
    assert forkable(["ip", "netns", "exec", "ns0", sys.executable, "-m", "butterfly"]) is None
    assert forkable([sys.executable, "script.py"]) is None
    with pytest.raises(ValueError, match="-m module"):
        fork_node(["/bin/true"], Path("/dev/null"), CHILD_ENV)


def test_a_node_the_fork_server_cannot_start_starts_anew(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def gone(*_: object) -> ForkedNode:
        raise CannotFork("the fork server exited before it started platform")

    monkeypatch.setattr(launcher, "fork_node", gone)
    cluster = LocalCluster(
        [tmp_path / "node-0.toml"],
        "http://127.0.0.1:9",
        tmp_path,
        command=(sys.executable, "-m", "platform"),
    )
    cluster.start()
    assert isinstance(cluster.procs[0], subprocess.Popen)
    assert cluster.procs[0].wait(timeout=60) == 0
    assert "Linux" in (tmp_path / "node-0.log").read_text()


def test_a_clusters_nodes_are_forked(tmp_path: Path) -> None:
    command = (sys.executable, "-m", "platform")
    cluster = LocalCluster(
        [tmp_path / "node-0.toml"], "http://127.0.0.1:9", tmp_path, command=command
    )
    cluster.start()
    assert isinstance(cluster.procs[0], ForkedNode)
    assert cluster.procs[0].wait(timeout=60) == 0
    assert "Linux" in (tmp_path / "node-0.log").read_text()


def test_a_server_whose_code_changed_forks_no_more(tmp_path: Path) -> None:
    """A node restarted by a long-running `cluster up` after an upgrade runs the code on
    disk, not what its server imported before (a review)."""
    code = tmp_path / "src"
    shutil.copytree(Path(prefork.__file__).parents[1], code / "butterfly")
    first, log_first = probe(tmp_path, "first", "0", PYTHONPATH=str(code))
    assert first.wait(timeout=60) == 0
    changed = code / "butterfly" / "node.py"  # what an upgrade does to a file
    os.utime(changed, (changed.stat().st_atime, changed.stat().st_mtime + 1))
    second, log_second = probe(tmp_path, "second", "0", PYTHONPATH=str(code))
    assert second.wait(timeout=60) == 0
    assert said(log_first)["server"] != said(log_second)["server"]
    third, log_third = probe(tmp_path, "third", "0", PYTHONPATH=str(code))
    assert third.wait(timeout=60) == 0
    assert said(log_third)["server"] == said(log_second)["server"]  # the new one serves on
