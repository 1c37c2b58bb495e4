"""The gateway's role options, handed from the acting gateway to the standby gateways.

An option of the gateway's role (`config.gateways.gateway_role`: its API's tokens and
limits, its queue, how it generates, whether it traces) changed through the acting
gateway's API is sent to every standby gateway too (`ConfigLocal`), which adopts it, so
the next one to take over serves as the last one did. Both halves are here: what the
gateway sends and how it reads the answers (`tell_standbys`), and what a standby does
with them (`adopt`).

A standby answers with the keys that changed there, so the gateway can tell a standby
brought in line from one that had the values already: sending values that are in force
on the gateway is how a standby that was unreachable when they changed gets them.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from butterfly.config import ConfigManager, UpdateRefused
from butterfly.config.gateways import gateway_role
from butterfly.config.versions import canonical_json
from butterfly.net.transport import Transport
from butterfly.types.errors import ButterflyError, ConfigError
from butterfly.types.ids import NodeId
from butterfly.types.wire.control import ConfigLocal, ConfigStatus

log = logging.getLogger(__name__)

ALREADY = "already in force"
"""A node's state in a change's report when the values it was sent were its own already."""


def parse(body: bytes) -> dict[str, Any]:
    """The acting gateway's `ConfigLocal` payload: role options only, by dotted key (a
    node's identity and the cluster's options are not the gateway's to set elsewhere)."""
    try:
        values = json.loads(body)
    except ValueError as e:
        raise UpdateRefused(f"the gateway's role options are not JSON: {e}") from None
    if not isinstance(values, dict) or not all(map(gateway_role, values)):
        raise UpdateRefused("a gateway's role options only, as a JSON object")
    return values


def adopt(manager: ConfigManager, body: bytes) -> tuple[list[str], str]:
    """Adopt the acting gateway's role options here, section by section: the keys that
    changed, and why a part was refused ("" when none was). Apart, so that one
    component's veto (tracing on a node without an OTLP endpoint: spans would go nowhere)
    does not keep the API's tokens from it: a revoked token came back at the takeover."""
    try:
        values = parse(body)
    except ConfigError as e:
        return [], f"gateway options: {e}"
    sections: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        sections.setdefault(key.split(".", 1)[0], {})[key] = value
    changed: list[str] = []
    refused: list[str] = []
    for section, part in sorted(sections.items()):
        try:
            result = manager.update(part, source="the acting gateway")
        except ConfigError as e:
            refused.append(f"{section}: {e}")
            continue
        changed += [c.key for c in result.applied]
    if not refused:
        return changed, ""
    log.warning("the gateway's role options were refused here: %s", refused)
    rest = f"; applied {changed}" if changed else ""
    return changed, f"gateway options refused: {'; '.join(refused)}{rest}"


def told(status: ConfigStatus, payload: bytes) -> str:
    """A standby's answer to `ConfigLocal` as a change's report says it."""
    if status.error:
        return f"failed: {status.error}"
    return ALREADY if payload == canonical_json([]) else "applied"


async def tell_standbys(
    transport: Transport, standbys: Sequence[NodeId], values: Mapping[str, Any], timeout: float
) -> dict[int, str]:
    """Send the role `values` to every standby at once; each one's state, by node id."""
    if not values or not standbys:
        return {}
    body = canonical_json(values)

    async def tell(node: NodeId) -> str:
        try:
            status, payload = await transport.ask(
                node, ConfigLocal(), body, timeout=timeout, channel="control"
            )
        except ButterflyError as e:
            return f"unreachable ({e}): it keeps its own values of {sorted(values)}"
        return told(status, payload)

    states = await asyncio.gather(*(tell(n) for n in standbys))
    return {int(n): state for n, state in zip(standbys, states, strict=True)}


__all__ = ["ALREADY", "adopt", "parse", "tell_standbys", "told"]
