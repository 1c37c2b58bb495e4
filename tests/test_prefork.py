"""Nodes forked by the launcher's fork server (`butterfly.cli.prefork`) run as though
`python -m <module>` had started them: their arguments, directory, output, exit codes
and randomness are their own, and they start with a node's imports already done."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from butterfly.cli.launcher import CHILD_ENV
from butterfly.cli.prefork import ForkedNode, fork_node, forkable

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
}), flush=True)
if sys.argv[1] == "sleep":
    time.sleep(60)
if sys.argv[1] == "fail":
    raise RuntimeError("the probe failed")
sys.exit(int(sys.argv[1]))
"""


def probe(tmp_path: Path, name: str, *args: str, tag: str = "") -> tuple[ForkedNode, Path]:
    program = tmp_path / "forked_probe.py"
    if not program.exists():  # rewritten, it could be read half-written by a node starting
        program.write_text(PROBE)
    log = tmp_path / f"{name}.log"
    env = {**os.environ, **CHILD_ENV, **({"PROBE_TAG": tag} if tag else {})}
    node = fork_node([sys.executable, "-m", "forked_probe", *args], log, env, tmp_path)
    return node, log


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


def test_a_forked_node_is_signalled_and_waited_for_by_pid(tmp_path: Path) -> None:
    node, log = probe(tmp_path, "sleeper", "sleep")
    deadline = time.monotonic() + 30
    while not log.exists() or not log.read_text():
        assert time.monotonic() < deadline, "the probe never started"
        time.sleep(0.05)
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
