"""`butterfly status [--watch]`: the cluster's nodes, health and stages, as a table.

With `--watch` the table is redrawn in place every `--interval` seconds (rich Live) until
Ctrl-C, which ends it with exit status 0: watching is the command's normal end, not an
error. A gateway that stops answering shows as an error line in the table's place (the
acting gateway may be failing over), and watching goes on.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from butterfly.cli.cluster import DEFAULT_URL
from butterfly.cli.gateways import first_answer, parse_urls
from butterfly.cli.report import fail


def health_body(response: httpx.Response) -> dict[str, Any]:
    """A gateway's `/health` body: an object with `healthy`, and `nodes` and `gateways`
    lists of objects. ValueError naming what is off for other JSON (another server on
    that port): the table read it as a gateway's and crashed with a traceback."""
    body = response.json()
    if not isinstance(body, dict) or not isinstance(body.get("healthy"), bool):
        raise ValueError("a /health object saying `healthy` was expected")
    for key in ("nodes", "gateways"):
        entries = body.get(key, [])
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise ValueError(f"/health's {key!r} is not a list of objects")
    return body


def _health(address: str) -> httpx.Response:
    response = httpx.get(f"{address}/health", timeout=10.0)
    gateways = health_body(response).get("gateways", []) if response.status_code == 503 else []
    for g in gateways:
        if g.get("acting") and g.get("url"):  # a standby: ask the acting gateway
            return httpx.get(f"{g['url']}/health", timeout=10.0)
    return response


def fetch(urls: str) -> tuple[str, dict[str, Any]]:
    """The address of the gateway whose `/health` body this is, and the body (any status
    code: 503 still describes the nodes); `urls` are tried in turn (`cli.gateways`), and
    a standby's answer leads to the acting gateway's, whose address is then the one
    returned: a table titled with the standby's address but showing the acting
    gateway's nodes named the wrong gateway. ValueError for a body that is not a
    gateway's (`health_body`)."""
    _, answer = first_answer(parse_urls(urls), _health)
    return str(answer.request.url).removesuffix("/health"), health_body(answer)


def table(url: str, health: dict[str, Any], *, stamp: str = "") -> Table:
    state = "healthy" if health.get("healthy") else "UNHEALTHY"
    down = [str(n.get("id")) for n in health.get("nodes", []) if n.get("status") != "healthy"]
    if health.get("healthy") and down:  # serving, without every spare holder
        state += f", degraded (node {', '.join(down)} not healthy)"
    title = f"Butterfly at {url}: {state}" + (f" ({stamp})" if stamp else "")
    out = Table(title=title)
    for col in ("node", "address", "status", "layers", "requests", "last heartbeat"):
        out.add_column(col)
    for n in health.get("nodes", []):
        seen = n.get("last_seen_s")
        out.add_row(
            str(n.get("id")),
            str(n.get("address")),
            str(n.get("status")),
            str(n.get("layers") or "-"),
            str(n.get("requests", 0)),
            "-" if seen is None else f"{seen * 1000:.0f} ms ago",
        )
    return out


def _frame(url: str) -> RenderableType:
    stamp = datetime.now(UTC).strftime("%H:%M:%S UTC")
    try:
        return table(*fetch(url), stamp=stamp)
    except (httpx.HTTPError, httpx.InvalidURL) as e:
        return Text(f"{stamp}: cannot reach {url}: {e}; retrying", style="red")
    except ValueError as e:
        return Text(f"{stamp}: {not_a_gateway(url, e)}; retrying", style="red")


def not_a_gateway(url: str, e: ValueError) -> str:
    return f"{url} did not answer as a Butterfly gateway: {e}"


def status(
    url: Annotated[
        str, typer.Option(help="Gateway URL; several, comma-separated, are tried in turn.")
    ] = DEFAULT_URL,
    watch: Annotated[bool, typer.Option("--watch", help="Redraw until Ctrl-C.")] = False,
    interval: Annotated[
        float, typer.Option(min=0.2, max=3600.0, help="Seconds between redraws (--watch).")
    ] = 2.0,
) -> None:
    """Nodes, their health and stages, as a table."""
    if not watch:
        try:
            answered, health = fetch(url)
        except (httpx.HTTPError, httpx.InvalidURL) as e:
            raise fail(f"cannot reach {url}: {e}") from e
        except ValueError as e:
            raise fail(not_a_gateway(url, e)) from e
        Console().print(table(answered, health))
        return
    try:
        with Live(_frame(url), console=Console(), auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                live.update(_frame(url), refresh=True)
    except KeyboardInterrupt:
        return  # Ctrl-C is how watching ends


__all__ = ["status"]
