"""`python -m butterfly.testing.cluster up --nodes N --f F [--liar NODE:BEHAVIOUR ...]`.

The same as `butterfly cluster up`, except that the named nodes run a faulty stage
server from `butterfly.testing.liars` (corrupt, wrong-layer, slow, silent) or lying votes
from `butterfly.testing.liar_votes` (equivocate; silent votes too).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from butterfly.cli.cluster import launch
from butterfly.testing.liars import BEHAVIOURS

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)


def parse_liars(specs: list[str]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for spec in specs:
        node, _, behaviour = spec.partition(":")
        if not node.isdigit() or behaviour not in BEHAVIOURS:
            raise typer.BadParameter(
                f"--liar {spec!r}: expected NODE:BEHAVIOUR, behaviour one of {sorted(BEHAVIOURS)}"
            )
        if int(node) == 0:
            raise typer.BadParameter("node 0 is the gateway, which clients trust; pick another")
        out[int(node)] = ["--behaviour", behaviour]
    return out


@app.command("up")
def up(
    nodes: Annotated[int, typer.Option(min=1, max=64)] = 4,
    f: Annotated[int, typer.Option(min=0)] = 0,
    model: Annotated[Path | None, typer.Option()] = None,
    api_port: Annotated[int, typer.Option()] = 8080,
    data: Annotated[Path | None, typer.Option()] = None,
    set_: Annotated[list[str] | None, typer.Option("--set")] = None,
    liar: Annotated[list[str] | None, typer.Option(help="NODE:BEHAVIOUR, repeatable.")] = None,
) -> None:
    """Start a local cluster in which the named nodes lie."""
    launch(
        nodes=nodes,
        f=f,
        model=model,
        api_port=api_port,
        data=data,
        settings_=set_,
        command=(sys.executable, "-m", "butterfly.testing.node", "--config"),
        extra_args=parse_liars(liar or []),
    )


@app.command("behaviours")
def behaviours() -> None:
    """List the faulty behaviours a node can be given."""
    for name in sorted(BEHAVIOURS):
        typer.echo(name)


if __name__ == "__main__":
    app()
