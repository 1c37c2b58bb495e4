from __future__ import annotations

from pathlib import Path

import pytest

from butterfly.runtime.demo import create_demo


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny demo model, written once per test session."""
    return create_demo(tmp_path_factory.mktemp("models") / "tiny", "tiny", seed=0)
