"""`butterfly config ... --url URL`: the config commands against a running cluster.

Locally the commands act on one node's files and history; with `--url` they ask the
gateway, which puts cluster-wide options through agreement on every node. `update --file`
sends the file's cluster-scoped and dynamic options (a node's own identity, listen
address and paths are not the cluster's business); static cluster options that differ
are refused by the gateway with "restart required".
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import typer

from butterfly.cli.gateways import RedirectRefused, request
from butterfly.cli.report import fail
from butterfly.config import ButterflyConfig, Mutability, Scope, field_specs
from butterfly.config.fields import config_leaves

TIMEOUT_S = 60.0


def file_patch(cfg: ButterflyConfig) -> dict[str, Any]:
    """What `update --file` asks the cluster to move to."""
    specs = field_specs()
    return {
        key: value
        for key, value in config_leaves(cfg).items()
        if specs[key].scope is Scope.CLUSTER or specs[key].mutability is Mutability.DYNAMIC_LOCAL
    }


def call(
    method: str, url: str, path: str, *, token: str | None = None, body: Any = None, **params: str
) -> Any:
    """One request to the gateway; an error answer is printed and exits with code 2.

    `--url` may name any gateway-capable node: a standby's 307 to the acting one is
    followed with the method, body and token (`gateways.request`). Before, the 307's
    empty body was taken for the answer (`remove-member --url <standby>` crashed with a
    KeyError), and then the token was dropped on the way (401)."""
    try:
        target = f"{url.rstrip('/')}{path}"
        r = request(method, target, token=token, json=body, params=params, timeout=TIMEOUT_S)
    except RedirectRefused as e:
        raise fail(e) from e
    except (httpx.HTTPError, httpx.InvalidURL) as e:
        raise fail(f"cannot reach {url}: {e}") from e
    try:
        data = r.json()
    except ValueError:
        data = {"error": {"type": "http_error", "message": r.text}}
    if not 200 <= r.status_code < 300:
        error = data.get("error", {}) if isinstance(data, dict) else {}
        message = error.get("message", r.text)
        raise fail(message, label=f"error {r.status_code}")
    return data


def _echo(text: str) -> None:
    sys.stdout.write(text + "\n")


def report_change(result: dict[str, Any]) -> None:
    seq = f", cluster seq {result['seq']}" if result.get("seq") else " (this gateway only)"
    _echo(f"version {result['version']} (cluster hash {result['cluster_hash'][:12]}{seq}):")
    for c in result.get("changes", []):
        _echo(f"  {c['key']}: {json.dumps(c['old'])} -> {json.dumps(c['new'])}")
    nodes = result.get("nodes", {})
    if nodes:
        _echo("nodes: " + ", ".join(f"{n} {state}" for n, state in sorted(nodes.items())))


@contextmanager
def gateway_answer(url: str) -> Iterator[None]:
    """Reading a 2xx answer: one that is not a Butterfly gateway's (another server on that
    port) exits 2 naming it, not with a KeyError's traceback."""
    try:
        yield
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as e:
        raise fail(f"{url} did not answer as a Butterfly gateway ({e!r})") from e


def update(url: str, cfg: ButterflyConfig, *, token: str | None, reason: str) -> None:
    patch = file_patch(cfg)
    with gateway_answer(url):
        report_change(call("POST", url, "/api/v1/config", token=token, body=patch, reason=reason))


def rollback(url: str, version: int, *, token: str | None) -> None:
    with gateway_answer(url):
        report_change(
            call("POST", url, "/api/v1/config/rollback", token=token, body={"version": version})
        )


def sync(url: str, *, token: str | None) -> None:
    with gateway_answer(url):
        _sync(url, token=token)


def _sync(url: str, *, token: str | None) -> None:
    data = call("POST", url, "/api/v1/config/sync", token=token)
    in_sync, nodes, cluster = data["in_sync"], data["nodes"], data["cluster_hash"]
    if not isinstance(in_sync, bool):  # another server's 2xx is not "still diverged"
        raise TypeError(f"in_sync is {in_sync!r}")
    for node, state in sorted(nodes.items()):
        _echo(f"node {node}: {state}")
    verdict = "in sync" if in_sync else f"still diverged: {data.get('diverged')}"
    _echo(f"cluster {verdict} (cluster hash {str(cluster)[:12]})")
    if not in_sync:
        raise typer.Exit(1)


def show(url: str, *, hash_only: bool, json_out: bool, token: str | None = None) -> None:
    with gateway_answer(url):
        _show(url, hash_only=hash_only, json_out=json_out, token=token)


def _show(url: str, *, hash_only: bool, json_out: bool, token: str | None) -> None:
    data = call("GET", url, "/api/v1/config", token=token)
    if json_out:
        _echo(
            json.dumps(
                data if not hash_only else {k: v for k, v in data.items() if k != "config"},
                indent=2,
            )
        )
        return
    _echo(f"gateway version {data['version']}, cluster seq {data['seq']}")
    _echo(f"config_hash {data['config_hash']}\ncluster_hash {data['cluster_hash']}")
    for n in data["nodes"]:
        if not n["reachable"]:
            _echo(f"  node {n['node']}: unreachable")
            continue
        flag = "in sync" if n["in_sync"] else "DIVERGED"
        extra = f" ({n['error']})" if n.get("error") else ""
        _echo(f"  node {n['node']}: {flag}, seq {n['seq']}, {n['cluster_hash'][:12]}{extra}")


__all__ = ["call", "file_patch", "gateway_answer", "rollback", "show", "sync", "update"]
