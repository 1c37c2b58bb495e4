"""Which nodes may act as gateway, and where each serves its API.

`cluster.gateways` lists them in takeover order: the first acts when the cluster starts,
and when the acting one fails the next one alive takes over (`control.gateway_role`).
Empty means the first `max(2, f + 1)` members: two, so one death never leaves the API
without a successor, and f + 1 so that f failures still leave one.

Each gateway-capable node serves its own HTTP API (standbys answer with a redirect to the
acting one). The k-th gateway's port is `api.port + k`, on its member host, so one
`api.port` in every node's file describes them all (`cluster up --api-port` gives the
first, the others follow); `api.port = 0` gives each any free port, and then no URL
is known in advance.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from butterfly.config.fields import config_leaves, field_specs
from butterfly.config.issues import ConfigIssue
from butterfly.config.schema import ButterflyConfig, Mutability
from butterfly.types.ids import NodeId


def _size(cfg: ButterflyConfig) -> int:
    return max(1, len(cfg.cluster.members))


def listed_gateways(cfg: ButterflyConfig) -> tuple[NodeId, ...]:
    """The gateway-capable nodes as configured (or the default), removed ones included:
    a gateway's place in this list fixes its API port, so a removal moves no one's."""
    if cfg.cluster.gateways:
        return tuple(NodeId(g) for g in cfg.cluster.gateways)
    return tuple(NodeId(i) for i in range(min(_size(cfg), max(2, cfg.byzantine.f + 1))))


def gateway_nodes(cfg: ButterflyConfig) -> tuple[NodeId, ...]:
    """The gateway-capable nodes in takeover order (the configured ones, or the default),
    without members removed from the cluster (`config.roster`: an empty slot).

    >>> gateway_nodes(ButterflyConfig())
    (0,)
    """
    members = cfg.cluster.members
    return tuple(g for g in listed_gateways(cfg) if g >= len(members) or members[g] != "")


def api_port(cfg: ButterflyConfig, node: NodeId) -> int:
    """The port `node` serves its API on: `api.port` plus its place among the gateways
    as listed (0 stays 0: any free port)."""
    gateways = listed_gateways(cfg)
    if cfg.api.port == 0 or node not in gateways:
        return cfg.api.port
    return cfg.api.port + gateways.index(node)


def gateway_urls(cfg: ButterflyConfig) -> dict[NodeId, str]:
    """Each gateway-capable node's API URL, by node id; empty when ports are not fixed
    (`api.port = 0`) or the node runs alone without a member list."""
    if cfg.api.port == 0 or not cfg.cluster.members:
        return {}
    urls = {}
    for node in gateway_nodes(cfg):
        host = cfg.cluster.members[node].rsplit(":", 1)[0]
        urls[node] = f"http://{host}:{api_port(cfg, node)}"
    return urls


def check_gateways(cfg: ButterflyConfig) -> Iterator[ConfigIssue]:
    """Every listed gateway is a member, listed once; no API port lands on a peer port."""
    n, listed = _size(cfg), cfg.cluster.gateways
    strangers = sorted({g for g in listed if not 0 <= g < n})
    if strangers:
        yield ConfigIssue(
            "cluster.gateways",
            "gateways are members",
            f"{strangers} {'is' if len(strangers) == 1 else 'are'} not a node id "
            f"(cluster.members has ids 0..{n - 1})",
            related=("cluster.members",),
        )
    dupes = sorted({g for g in listed if listed.count(g) > 1})
    if dupes:
        yield ConfigIssue("cluster.gateways", "unique-gateways", f"listed twice: {dupes}")
    if strangers or dupes:
        return
    if cfg.api.port == 0 or not cfg.cluster.members:
        return
    members = cfg.cluster.members
    taken = {(m.rsplit(":", 1)[0], int(m.rsplit(":", 1)[1])) for m in members if m}
    clash = sorted(
        f"{host}:{port}"
        for g in gateway_nodes(cfg)
        if members[g]  # a removed member (config.roster) serves nothing
        and (host := members[g].rsplit(":", 1)[0], port := api_port(cfg, g)) in taken
    )
    if clash:
        yield ConfigIssue(
            "api.port",
            "distinct ports",
            f"gateway API address(es) {clash} (api.port plus each gateway's place in "
            "cluster.gateways) are also cluster.members addresses; pick another api.port",
            related=("cluster.members", "cluster.gateways"),
        )


GATEWAY_ROLE_SECTIONS = ("api", "scheduling", "generation")
"""Where the node-local options of the gateway's role live (its API's tokens and limits,
its queue, how it generates): what the acting gateway is told to change through its API,
the standbys adopt too (`agreement.config_coordinator`), so a takeover keeps them."""

GATEWAY_ROLE_OPTIONS = ("observability.tracing", "observability.trace_sample_rate")
"""Role options outside those sections: the acting gateway starts every trace and draws
its sample, so tracing turned on through the API stopped at the next takeover when the
standbys were not told."""


def gateway_role(key: str) -> bool:
    """Whether dotted option `key` is one of the gateway's role: a dynamic node-local
    option of `GATEWAY_ROLE_SECTIONS` or `GATEWAY_ROLE_OPTIONS`. A cluster-wide one there
    (`scheduling.policy`) already moves on every node by agreement, and a static one only
    by a restart: neither is the acting gateway's to hand on."""
    spec = field_specs().get(key)
    if spec is None or spec.mutability is not Mutability.DYNAMIC_LOCAL:
        return False
    return key in GATEWAY_ROLE_OPTIONS or key.split(".", 1)[0] in GATEWAY_ROLE_SECTIONS


def gateway_role_values(cfg: ButterflyConfig, keys: Iterable[str]) -> dict[str, Any]:
    """`cfg`'s values of those of `keys` that are the gateway's role, by dotted key."""
    leaves = config_leaves(cfg)
    return {k: leaves[k] for k in sorted(set(keys)) if gateway_role(k)}


__all__ = [
    "GATEWAY_ROLE_OPTIONS",
    "GATEWAY_ROLE_SECTIONS",
    "api_port",
    "check_gateways",
    "gateway_nodes",
    "gateway_role",
    "gateway_role_values",
    "gateway_urls",
    "listed_gateways",
]
