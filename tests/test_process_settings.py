"""What a node process's set-up (`wiring.process.prepare_process`) does with the config:
`advanced.deterministic` switches torch's deterministic algorithms on or off, and
`observability.log_file` sends the node's log there instead of stderr (README, "Other
settings that take effect"). Both change process-global state, so each case runs in a
child process of its own."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(120)

SRC = Path(__file__).resolve().parents[1] / "src"
CHILD = """
import gc, json, logging, sys
import torch
from butterfly.config import load_config
from butterfly.wiring.process import prepare_process, use_deterministic_algorithms

overrides, flip = json.loads(sys.argv[1]), sys.argv[2] == "flip"
cfg = load_config(env={}, overrides=overrides)
use_deterministic_algorithms(flip)  # the opposite of what the config asks
alive = len(gc.get_objects())
prepare_process(cfg)
logging.getLogger("butterfly.node").warning("a line of node 0's log")
print(json.dumps({
    "deterministic": torch.are_deterministic_algorithms_enabled(),
    # what the mode does: torch fills new memory (NaN for floats) instead of leaving it
    "filled": bool(torch.empty(64).isnan().all()),
    "compiler": "torch._inductor" in sys.modules,
    "alive": alive,
    "frozen": gc.get_freeze_count(),
    # what a full collection would scan now: every generation but the frozen objects
    "scanned": sum(len(gc.get_objects(g)) for g in range(3)),
}))
"""


@dataclass(frozen=True)
class Setup:
    deterministic: bool  # torch's deterministic algorithms after prepare_process
    filled: bool  # torch.empty gave NaN: the mode acts, not only reports
    compiler: bool  # torch's compiler was imported (it costs 0.9 s of a node's start)
    alive: int  # objects the collector tracked before prepare_process
    frozen: int  # objects out of its reach after it
    scanned: int  # objects a full collection would scan after it
    stderr: str


def run_node_setup(overrides: dict[str, Any], *, flip: bool) -> Setup:
    """`prepare_process` with `overrides` in a fresh process that had set torch's
    deterministic algorithms to `flip` first."""
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(overrides), "flip" if flip else "-"],
        capture_output=True,
        text=True,
        timeout=90,  # run() kills the child by its PID on expiry
        cwd=SRC,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    return Setup(
        out["deterministic"],
        out["filled"],
        out["compiler"],
        out["alive"],
        out["frozen"],
        out["scanned"],
        done.stderr,
    )


@pytest.fixture(scope="module")
def setups(tmp_path_factory: pytest.TempPathFactory) -> tuple[Setup, Setup, Path]:
    """A node process set up with the defaults, and one with deterministic algorithms
    off and a log file (two child processes for the module's tests: ~3 s each)."""
    log_file = tmp_path_factory.mktemp("logs") / "node-0.log"
    default = run_node_setup({}, flip=False)
    configured = {"advanced.deterministic": False, "observability.log_file": str(log_file)}
    return default, run_node_setup(configured, flip=True), log_file


def test_deterministic_algorithms_are_on_by_default_and_off_when_asked(
    setups: tuple[Setup, Setup, Path],
) -> None:
    default, configured, _ = setups
    assert default.deterministic and not configured.deterministic
    assert default.filled and not configured.filled


def test_setting_the_mode_loads_no_compiler(setups: tuple[Setup, Setup, Path]) -> None:
    """torch's own `use_deterministic_algorithms` imports its compiler to set a flag
    nothing here reads; a node compiles nothing and starts 0.9 s sooner without it."""
    default, configured, _ = setups
    assert not default.compiler and not configured.compiler


def test_a_node_logs_to_its_log_file_and_not_to_stderr(setups: tuple[Setup, Setup, Path]) -> None:
    default, configured, log_file = setups
    line = "WARNING butterfly.node: a line of node 0's log"
    assert line in log_file.read_text()
    assert "a line of node 0's log" not in configured.stderr
    assert line in default.stderr  # without a log file, the same line goes to stderr


def test_the_imports_objects_are_out_of_the_collectors_reach(
    setups: tuple[Setup, Setup, Path],
) -> None:
    """A full collection scanned every object the imports made (torch's, FastAPI's...),
    and stopped a gateway under load for 150-170 ms every few seconds: after the set-up
    they are frozen, and a full collection scans a tenth of them or less."""
    default, _, _ = setups
    assert default.alive > 50_000  # torch and the config's imports, at least
    assert default.frozen >= 0.9 * default.alive
    assert default.scanned < default.alive / 10
