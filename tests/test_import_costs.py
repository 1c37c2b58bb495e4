"""What a process imports before it does anything, where that was measured to cost:
the CLI's light commands start without torch (docs/CONTRIBUTING.md), which took about a
second of the two `butterfly status` took to answer, and a node that is not
gateway-capable starts without the HTTP API (FastAPI and the OpenAI routes, 0.25 s of
CPU), both on the AMD EPYC (docs/PERFORMANCE.md, "Start-up")."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)

CHILD = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(m for m in sys.argv[2:] if m in sys.modules)))
"""


def imported(module: str, *watched: str) -> list[str]:
    """Which of `watched` a fresh interpreter has loaded after importing `module`."""
    done = subprocess.run(
        [sys.executable, "-c", CHILD, module, *watched],
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    loaded: list[str] = json.loads(done.stdout.splitlines()[-1])
    return loaded


def test_importing_the_cli_loads_no_torch() -> None:
    assert imported("butterfly.cli", "torch", "transformers", "safetensors") == []


def test_a_node_loads_the_http_api_only_when_it_may_serve_it() -> None:
    """`butterfly.node` is what `butterfly start` imports; the gateway's parts come in
    when `build_node` makes a gateway-capable node."""
    assert imported("butterfly.node", "fastapi", "butterfly.api.app") == []
    assert imported("butterfly.wiring.gateway", "fastapi", "butterfly.api.app") == [
        "butterfly.api.app",
        "fastapi",
    ]
