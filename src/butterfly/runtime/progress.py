"""Progress bars while a stage reads and packs its weights.

A large stage takes minutes to load: reading its tensors from safetensors, then packing
each layer's matrices for oneDNN (runtime.linear). An operator starting a node in a
terminal sees how far it got; a node whose stderr is a file, a pipe or a journal (the
local launcher, systemd, containers) gets no bars, so its log holds no cursor codes.

The loading code reports through a plain callable, `Report(phase, done, total)`; `bars`
turns that into rich progress bars, or into nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn

Report = Callable[[str, int, int], None]
"""(phase, done, total): `done` of `total` items of a phase ("read": tensors, in layer
order; "pack": layers) are finished."""


def quiet(phase: str, done: int, total: int) -> None:
    """A `Report` that shows nothing."""


def wanted(show: bool | None) -> bool:
    """Bars when asked (True), never when refused (False); by default only when stderr
    is a terminal."""
    if show is not None:
        return show
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


@contextmanager
def bars(title: str, show: bool | None = None) -> Iterator[Report]:
    """A `Report` drawing one bar per phase on stderr while the block runs; the bars
    are removed when it ends (the node's log line says what was loaded)."""
    if not wanted(show):
        yield quiet
        return
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    tasks: dict[str, TaskID] = {}
    names = {"read": "reading weights", "pack": "packing layers"}

    def report(phase: str, done: int, total: int) -> None:
        task = tasks.get(phase)
        if task is None:
            label = f"{title}: {names.get(phase, phase)}"
            task = tasks[phase] = progress.add_task(label, total=total)
        progress.update(task, completed=done, total=total)

    with progress:
        yield report


__all__ = ["Report", "bars", "quiet", "wanted"]
