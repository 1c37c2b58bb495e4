"""The CLI's light commands start without torch (docs/CONTRIBUTING.md): importing it took
about a second of the two that `butterfly status` took to answer (AMD EPYC)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)

CHILD = """
import json, sys
import butterfly.cli
print(json.dumps(sorted(m for m in ("torch", "transformers", "safetensors") if m in sys.modules)))
"""


def test_importing_the_cli_loads_no_torch() -> None:
    done = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=50, check=False
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == []
