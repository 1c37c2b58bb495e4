"""The `butterfly` command: parses arguments and calls the library; no logic of its own."""

from __future__ import annotations

import typer

from butterfly.cli import cluster, config, deploy, model, plan, status

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
app.add_typer(model.app, name="model", help="Create and inspect model directories.")
app.command("generate")(model.generate)
app.command("start")(cluster.start)
app.add_typer(
    cluster.app,
    name="cluster",
    help="Run a local cluster on 127.0.0.1; add or remove members of a running one.",
)
app.command("infer")(cluster.infer)
app.command("status")(status.status)
app.add_typer(config.app, name="config", help="Validate, show, update, roll back configuration.")
app.command("plan")(plan.plan)
app.command("certs")(cluster.certs)
app.command("init")(deploy.init)
app.add_typer(deploy.keys_app, name="keys", help="Show node keys.")


def main() -> None:
    app()
