"""`butterfly start`, `butterfly cluster up`, `butterfly infer` (`status`: cli/status.py)."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from butterfly.cli import members
from butterfly.cli.gateways import RedirectRefused, first_answer, parse_urls, request, wait_result
from butterfly.cli.keeper import CANNOT_START, Restarts, keep_alive
from butterfly.cli.launcher import LocalCluster, node_configs
from butterfly.cli.paths import data_dir, demo_model
from butterfly.cli.report import err, fail, say
from butterfly.config import ConfigInvalid, load_config
from butterfly.config.gateways import gateway_urls
from butterfly.net.tls import make_certs
from butterfly.types.errors import ButterflyError
from butterfly.types.tasks import SamplingParams

log = logging.getLogger(__name__)
app = typer.Typer(no_args_is_help=True)
app.command("add-member")(members.add_member)
app.command("remove-member")(members.remove_member)
DEFAULT_URL = "http://127.0.0.1:8080"
TAKEOVER_PATIENCE_S = 10.0
"""How long `infer` goes round its addresses while none accepts (a takeover under way)."""
INFER_LIMIT_S = 600.0
"""How long `infer` waits for its task's result."""


def _model_for(path: str) -> Path:
    return Path(path) if path else demo_model("small")


def start(
    config: Annotated[Path, typer.Option(help="This node's TOML config.")],
) -> None:
    """Run one node in the foreground until SIGTERM or Ctrl-C."""
    from butterfly.node import run

    try:
        cfg = load_config([config], env=os.environ)
    except ConfigInvalid as e:
        raise fail(e, label="invalid config") from e
    try:
        run(cfg, _model_for(cfg.model.path), config_files=[config])
    except (ButterflyError, OSError) as e:  # a key, a certificate, a data directory
        raise _cannot_start(cfg.node.id, [e]) from e
    except BaseExceptionGroup as group:  # its loops' failures: a model it cannot load
        expected, other = group.split((ButterflyError, OSError))
        if expected is None or other is not None:
            raise
        raise _cannot_start(cfg.node.id, _leaves(expected)) from group


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """The exceptions a (nested) group holds."""
    return [
        leaf
        for e in group.exceptions
        for leaf in (_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    ]


def _cannot_start(node: int, errors: list[BaseException]) -> typer.Exit:
    """One line per reason a node could not start (the tracebacks in the debug log): a
    setup mistake is the operator's to fix, not a crash."""
    for e in errors:
        log.debug("node %s did not start", node, exc_info=e)
        say(f"node {node} cannot start", e)
    return typer.Exit(CANNOT_START)


@app.command("up")
def up(
    nodes: Annotated[int, typer.Option(min=1, max=64, help="Node processes to start.")] = 4,
    f: Annotated[int, typer.Option(min=0, help="Byzantine nodes tolerated.")] = 0,
    model: Annotated[Path | None, typer.Option(help="Model directory (default: demo).")] = None,
    api_port: Annotated[int, typer.Option(help="Gateway HTTP port.")] = 8080,
    data: Annotated[Path | None, typer.Option(help="Cluster data directory.")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Extra config, section.key=JSON value.")
    ] = None,
    tls: Annotated[bool, typer.Option(help="Mutual TLS between nodes (certs made once).")] = False,
    restart: Annotated[
        bool, typer.Option(help="Restart a node that exits (else stop the cluster).")
    ] = True,
) -> None:
    """Start N nodes on 127.0.0.1 (node 0 serves the API) until Ctrl-C or SIGTERM.

    A node that exits is reported and restarted (with a growing backoff) while the
    others keep serving, unless its setup stopped it (exit code 2: it would fail again);
    `--no-restart` stops the whole cluster instead.
    """
    launch(
        nodes=nodes,
        f=f,
        model=model,
        api_port=api_port,
        data=data,
        settings_=set_,
        tls=tls,
        restart=restart,
    )


def parse_settings(items: list[str]) -> dict[str, Any]:
    """`--set section.key=VALUE` items: VALUE as JSON, else as the plain string it is
    (`partition.strategy=uniform`, as `config --set` takes it). A malformed item exits 2
    naming it."""
    settings: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or "." not in key or not all(key.split(".")):
            err.print(f"[red]error:[/red] --set {item!r}: expected section.key=VALUE")
            raise typer.Exit(2)
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        if value is None:
            err.print(f"[red]error:[/red] --set {item!r}: null is not a value; leave it out")
            raise typer.Exit(2)
        settings[key] = value
    return settings


def launch(
    *,
    nodes: int,
    f: int,
    model: Path | None,
    api_port: int,
    data: Path | None,
    settings_: list[str] | None,
    command: tuple[str, ...] | None = None,
    extra_args: dict[int, list[str]] | None = None,
    tls: bool = False,
    restart: bool = True,
) -> None:
    """`cluster up`, also used by `python -m butterfly.testing.cluster up` (liars)."""
    if 3 * f + 1 > nodes:
        err.print(
            f"[red]error:[/red] {nodes} nodes tolerate at most f={(nodes - 1) // 3} Byzantine "
            f"nodes (n >= 3f+1); f={f} needs {3 * f + 1} nodes"
        )
        raise typer.Exit(2)
    base = (data or data_dir() / "cluster").resolve()  # paths in the TOMLs are absolute
    base.mkdir(parents=True, exist_ok=True)
    with err.status("preparing the model"):
        model_dir = (model or demo_model("small")).resolve()  # the TOMLs live elsewhere
    settings = parse_settings(settings_ or [])
    configs = node_configs(
        nodes=nodes,
        f=f,
        model=model_dir,
        api_port=api_port,
        data_dir=base,
        settings=settings,
        tls=tls,
    )
    for path in configs:  # refused here, not by nodes restarting in a loop
        try:
            load_config([path])
        except ConfigInvalid as e:
            raise fail(e, label="invalid config") from e
    # the written files say where the gateways serve (`--set api.port` may move them)
    urls = list(gateway_urls(load_config([configs[0]], env={})).values())
    if not urls:  # it would wait for a gateway on a port nobody knows
        raise fail(
            "cluster up needs a fixed API port (--api-port, or --set api.port): 0 lets "
            "each gateway take any free port, and then no URL is known to wait on"
        )
    url = urls[0]
    cluster = LocalCluster(configs, url, base, extra_args=dict(extra_args or {}))
    if command is not None:
        cluster.command = command
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    try:
        cluster.start()
        history = Restarts()

        def keep() -> None:
            keep_alive(cluster.dead, cluster.restart, err.print, history, time.monotonic())

        with err.status(f"starting {nodes} nodes, loading {model_dir.name}"):
            cluster.wait_ready(on_dead=keep if restart else None, stopped=stopping.is_set)
        if stopping.is_set():
            return  # SIGTERM during start-up: `finally` stops every node
        err.print(f"[green]cluster up[/green]: {nodes} nodes, API at {url} (Ctrl-C to stop)")
        # every gateway-capable node serves the API on the ports after api.port; a
        # standby redirects to the acting one, and takes over if it dies
        listed = ",".join(urls)
        err.print(f"  gateways: {listed}")
        err.print(f'  try: butterfly infer --url {listed} "Hello"')
        while not stopping.wait(0.5):
            if restart:
                keep()
            elif cluster.dead():
                say("a node exited", f"{cluster.dead()}; see logs in {base}")
                break
    except KeyboardInterrupt:
        pass
    except (RuntimeError, TimeoutError) as e:
        raise fail(e, code=1) from e
    finally:
        err.print("stopping nodes...")
        codes = cluster.stop()
        err.print(f"stopped (exit codes {codes})")


def infer(
    prompt: Annotated[str, typer.Argument(help="Text to continue.")],
    url: Annotated[
        str, typer.Option(help="Gateway URL; several, comma-separated, are tried in turn.")
    ] = DEFAULT_URL,
    max_tokens: Annotated[int, typer.Option(help="New tokens to generate.")] = 32,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the whole result.")] = False,
    token: Annotated[
        str | None,
        typer.Option("--token", envvar="BUTTERFLY_API_TOKEN", help="Bearer token (api.tokens)."),
    ] = None,
) -> None:
    """Send a prompt to the gateway and print the generated text.

    The task is submitted (202 and its id), then its result is read by id, from any of
    the `--url` addresses: a gateway that dies while the task runs costs the client a
    retry of the read, not the answer (its successor finishes the task)."""
    try:
        SamplingParams(temperature=temperature)  # refused here, not by the JSON encoder
    except ButterflyError as e:
        raise fail(e) from e
    body = {
        "prompt": prompt,
        "max_new_tokens": max_tokens,
        "temperature": temperature,
    }
    urls = parse_urls(url)

    def send(address: str) -> httpx.Response:  # a standby's 307 leads to the acting one
        return request("POST", f"{address}/inference", token=token, json=body)

    def get(address: str, path: str) -> httpx.Response:
        return request("GET", f"{address}{path}", token=token)

    try:
        _, r = first_answer(urls, send, patience_s=TAKEOVER_PATIENCE_S)
        if r.status_code == 202:
            r = wait_result(urls, answer(r)["task_id"], get, limit_s=INFER_LIMIT_S)
        result = generated(r) if r.status_code < 400 else None
    except RedirectRefused as e:
        raise fail(e) from e
    except (httpx.HTTPError, httpx.InvalidURL, TimeoutError) as e:
        raise fail(f"cannot reach {url}: {e}") from e
    except (ValueError, KeyError, TypeError) as e:  # not a Butterfly gateway's answer
        raise fail(f"{url} did not answer as a Butterfly gateway: {e!r}") from e
    if result is None:
        raise fail(r.text, label=f"error {r.status_code}")
    typer.echo(json.dumps(result) if json_out else result["text"])


def answer(r: httpx.Response) -> dict[str, Any]:
    """A gateway's JSON object; ValueError for anything else (another server's page)."""
    body = r.json()
    if not isinstance(body, dict):
        raise ValueError(f"a JSON object was expected, got {type(body).__name__}")
    return body


def generated(r: httpx.Response) -> dict[str, Any]:
    """A finished task's result: its `text` and `output_ids`. ValueError for another
    object: another server's 200 printed an empty line and exited 0, as if the model had
    generated nothing."""
    body = answer(r)
    if not isinstance(body.get("text"), str) or not isinstance(body.get("output_ids"), list):
        raise ValueError("a finished task's result (text and output_ids) was expected")
    return body


def certs(
    nodes: Annotated[int, typer.Option(min=1, max=1024, help="Node certificates to make.")],
    out: Annotated[Path, typer.Option(help="Directory for ca.pem and node-<i>.pem/.key.")],
    cluster_id: Annotated[str, typer.Option(help="Cluster id, written into each cert.")] = (
        "butterfly"
    ),
) -> None:
    """Make a cluster CA and a certificate for each node, for security.tls."""
    if out.exists() and not out.is_dir():
        err.print(f"[red]error:[/red] {out} is a file; choose a directory for the certificates")
        raise typer.Exit(2)
    if (out / "ca.pem").exists():
        err.print(f"[red]error:[/red] {out / 'ca.pem'} exists; choose an empty directory")
        raise typer.Exit(2)
    files = make_certs(out, nodes, cluster_id)
    err.print(f"[green]made[/green] a CA and {len(files)} node certificates in {out}")
    err.print("  node i: [security.tls] enabled = true, ca, cert, key = the files below")
    for node, f in files.items():
        err.print(f"  node {node}: ca = {f.ca}  cert = {f.cert}  key = {f.key}")
