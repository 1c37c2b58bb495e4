"""How every command reports a failure: one line on stderr, the exit to raise returned.

The line is not wrapped at the terminal's width (a path cut in two cannot be pasted),
and the message is printed as written: rich reads "[1, 64]" in an error's text as
markup and dropped it from several commands' output (a review)."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

err = Console(stderr=True)
"""stderr, for what a command says besides its output."""


def say(label: str, message: object, *, style: str = "red") -> None:
    """`label: message` on one line, the label styled, the message as written."""
    err.print(f"[{style}]{escape(label)}:[/{style}] {escape(str(message))}", soft_wrap=True)


def fail(message: object, *, label: str = "error", code: int = 2) -> typer.Exit:
    """Say `message` and return the exit to raise (2: the input's fault, by default)."""
    say(label, message)
    return typer.Exit(code=code)
