"""The `butterfly` command: parses arguments and calls the library; no logic of its own."""

from __future__ import annotations

import typer

from butterfly.cli import config, model

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
app.add_typer(model.app, name="model", help="Create and inspect model directories.")
app.command("generate")(model.generate)
app.add_typer(config.app, name="config", help="Validate, show, update, roll back configuration.")


def main() -> None:
    app()
