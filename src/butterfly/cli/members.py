"""`butterfly cluster add-member` and `remove-member`: membership through the agreement.

Thin: read the acting gateway's agreed config, build the patch `config.roster` describes
(append a member; turn one into a tombstone), and send it to the config-update route,
which puts it through PREPARE (every node checks `config.roster.roster_change`) and the
agreed log. The gateway answers once the change applied at one config sequence on every
node, or with the reason it was refused.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from butterfly.cli.config_remote import call, gateway_answer, report_change
from butterfly.config import ButterflyConfig
from butterfly.config.roster import add_member as add_patch
from butterfly.config.roster import remove_member as remove_patch
from butterfly.types.ids import NodeId

UrlOpt = Annotated[str, typer.Option(help="The acting gateway's URL.")]
TokenOpt = Annotated[
    str | None,
    typer.Option("--token", envvar="BUTTERFLY_API_TOKEN", help="Bearer token (api.tokens)."),
]


def _agreed(url: str, token: str | None) -> ButterflyConfig:
    """The gateway's config as last agreed (its member lists are the cluster's)."""
    with gateway_answer(url):
        data: dict[str, Any] = call("GET", url, "/api/v1/config", token=token)
        cluster = data["config"]["cluster"]
        return ButterflyConfig.model_validate(
            {"cluster": {"members": cluster["members"], "public_keys": cluster["public_keys"]}}
        )


def add_member(
    address: Annotated[str, typer.Argument(help="The new node's host:port (its node.listen).")],
    public_key: Annotated[
        str, typer.Option(help="Its Ed25519 public key, hex (`butterfly keys show`).")
    ],
    url: UrlOpt,
    token: TokenOpt = None,
) -> None:
    """Add a member while the cluster runs; start the new node with the roster printed."""
    cfg = _agreed(url, token)
    patch = add_patch(cfg, address, public_key)
    new = len(patch["cluster.members"]) - 1
    result = call(
        "POST", url, "/api/v1/config", token=token, body=patch, reason=f"add member {new}"
    )
    report_change(result)
    typer.echo(f"node {new} added: start it with node.id = {new} and this [cluster] roster:")
    typer.echo(f"members = {patch['cluster.members']!r}")
    typer.echo(f"public_keys = {patch['cluster.public_keys']!r}")


def remove_member(
    node: Annotated[int, typer.Argument(help="The member's node id.")],
    url: UrlOpt,
    token: TokenOpt = None,
) -> None:
    """Remove a member while the cluster runs; its id is never reused."""
    cfg = _agreed(url, token)
    try:
        patch = remove_patch(cfg, NodeId(node))
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    result = call(
        "POST", url, "/api/v1/config", token=token, body=patch, reason=f"remove member {node}"
    )
    report_change(result)


__all__ = ["add_member", "remove_member"]
