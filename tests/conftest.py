from __future__ import annotations

import ast
import functools
from pathlib import Path
from typing import Any

import pytest

from butterfly.runtime.demo import create_demo

_PROCESS_SOURCES = frozenset(
    {
        "subprocess",
        "multiprocessing",
        "butterfly.cli.launcher",
        "butterfly.cli.prefork",
        "butterfly.testing.chaos",
        "butterfly.testing.netns",
        "butterfly.testing.latency",
        "tests.cluster_util",
    }
)
"""What a test module imports when its tests start processes, bind ports chosen in
advance, or build network namespaces (or a test in it is marked `cluster`, `chaos` or
`ports`)."""
_PROCESS_MARKERS = frozenset({"cluster", "chaos", "ports"})


@functools.cache
def starts_processes(path: str) -> bool:
    """Whether the test module at `path` is one of the process tests (read from its
    source: the xdist controller groups tests by node id, without importing them)."""
    for node in ast.walk(ast.parse(Path(path).read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):  # `from a import b` may import module a.b
            names = [node.module or "", *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Attribute) and node.attr in _PROCESS_MARKERS:
            names = ["mark"] if ast.unparse(node.value).endswith("mark") else []
            if names:
                return True
            continue
        else:
            continue
        if any(name in _PROCESS_SOURCES for name in names):
            return True
    return False


@pytest.hookimpl(optionalhook=True)  # `pytest -p no:xdist` has no such hook
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`make test` runs two xdist workers with `--dist loadgroup`. The process tests all
    go to one of them as one unit, one at a time, so two clusters never share the two
    cores or race for the same free ports, while the other worker runs the in-process
    tests beside them. (xdist's own `xdist_group` markers set the group in a node id
    attribute pytest 9 no longer reads, so the group is decided here, from the id.)"""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    root = config.rootpath

    class ProcessTestsTogether(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "processes" if starts_processes(str(root / path)) else nodeid

    return ProcessTestsTogether(config, log)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny demo model, written once per test session (once per xdist worker)."""
    return create_demo(tmp_path_factory.mktemp("models") / "tiny", "tiny", seed=0)
