"""`butterfly init` and `butterfly keys show`: the files of a cluster on real machines.

Parsing and printing only; what is written, and why, is in `cli.hosts`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from butterfly.cli import hosts
from butterfly.cli.hosts import InitOptions
from butterfly.cli.report import err, fail, say
from butterfly.types.errors import ConfigError

keys_app = typer.Typer(no_args_is_help=True)


def init(
    out: Annotated[Path, typer.Option(help="Directory for the hosts' directories.")],
    hosts_: Annotated[
        str | None,
        typer.Option("--hosts", help="HOST:PORT of node 0, 1, ... (comma-separated)."),
    ] = None,
    add_host: Annotated[
        str | None, typer.Option(help="HOST:PORT of one more node for the cluster in --out.")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Model directory, as the path it has on every host.")
    ] = None,
    f: Annotated[
        int | None, typer.Option(min=0, help="Lying nodes tolerated (default: the most n allows).")
    ] = None,
    api_port: Annotated[int, typer.Option(help="HTTP port of the gateway (node 0).")] = 8080,
    cluster_id: Annotated[str, typer.Option(help="Cluster id checked in handshakes.")] = (
        "butterfly"
    ),
    tls: Annotated[bool, typer.Option(help="Mutual TLS between nodes.")] = True,
) -> None:
    """Write one directory per host (config, node key, public keys, TLS), or add a host."""
    try:
        if add_host is not None:
            if hosts_ is not None:
                raise ConfigError("give --hosts (a new cluster) or --add-host, not both")
            _add(out, add_host)
            return
        if hosts_ is None or model is None:
            raise ConfigError("a new cluster needs --hosts and --model")
        opts = InitOptions(
            hosts=hosts.parse_hosts(hosts_),
            model=str(Path(model).expanduser().absolute()),
            f=f,
            api_port=api_port,
            cluster_id=cluster_id,
            tls=tls,
        )
        paths = hosts.init_cluster(opts, out)
        try:
            notes = hosts.check_configs(paths)
        except ConfigError:
            hosts.remove_init(out)  # nothing left behind to refuse the mended command
            raise
    except ConfigError as e:
        raise fail(e) from e
    for note in notes:
        say("note", note, style="yellow")
    err.print(f"[green]wrote[/green] {len(paths)} host directories in {out}:")
    for i, (address, path) in enumerate(zip(opts.hosts, paths, strict=True)):
        err.print(f"  node {i} ({address}): copy {path.parent}/ to that host")
    err.print(f"  keep {out / hosts.CA_DIR} (the CA key) here: `--add-host` signs with it")
    err.print("  on each host: butterfly start --config <its dir>/butterfly.toml")


def _add(out: Path, address: str) -> None:
    added = hosts.add_host(out, address)
    for note in hosts.check_configs([added.config]):
        say("note", note, style="yellow")
    n = len(added.members)
    err.print(f"[green]wrote[/green] {added.config.parent} for node {n - 1} ({address})")
    err.print(
        f"and rewrote cluster.members/public_keys in {out}/node-*/{hosts.CONFIG_FILE}. "
        "Add it to the running cluster with `butterfly cluster add-member "
        f"{address} --public-key $(butterfly keys show --config {added.config}) --url "
        "<gateway>`, then start it; or stop every "
        "node, copy each host's new butterfly.toml (the change is below) and start them all.",
        soft_wrap=True,
    )
    typer.echo(added.change, nl=False)


@keys_app.command("show")
def show(
    config: Annotated[Path, typer.Option(help="The node's TOML config.")],
) -> None:
    """Print the node's public key (hex), for cluster.public_keys."""
    try:
        key, path = hosts.public_key(config)
    except ConfigError as e:
        raise fail(e) from e
    err.print(f"key file: {path}")
    typer.echo(key)
