"""Where Butterfly keeps its files when the user names no directory."""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    """`$BUTTERFLY_DATA_DIR`, else `$XDG_DATA_HOME/butterfly`, else ~/.local/share/butterfly."""
    if env := os.environ.get("BUTTERFLY_DATA_DIR"):
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "butterfly"


def demo_model(size: str = "small") -> Path:
    """The demo model under the data directory, created on first use."""
    path = data_dir() / "models" / f"demo-{size}"
    if (path / "config.json").is_file():
        return path
    # imported here: torch comes with it, and the CLI's other commands start without
    from butterfly.runtime.demo import demo_at

    return demo_at(path, size)
