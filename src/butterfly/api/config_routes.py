"""`/api/v1/config`: read the cluster's configuration, change it, roll it back, sync it.

Thin like the rest of the API: each endpoint reads its input within the size limit, calls
the gateway's `ConfigCoordinator` once and shapes the answer. Changing anything needs a
bearer token when `api.tokens` is set. Failures keep the contract's error shape, with a
status that says who has to act:

    400 invalid_config     a key or value the schema refuses ("did you mean ...")
    409 update_refused     restart required, nothing to change, or a concurrent change won
    409 update_rejected    a node voted REJECT, or one of the gateway's components vetoed
                           its node-local part; `node` and `reason` say which and why
                           (and for a veto, `subscriber` and the `keys` it was asked)
    504 consensus_timeout  not agreed in time; the message says whether it rolled back
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.params import Depends
from fastapi.responses import JSONResponse

from butterfly.agreement.config_coordinator import (
    ChangeResult,
    ConfigCoordinator,
    ConfigRejected,
    ConfigTimeout,
)
from butterfly.api.errors import error_response
from butterfly.api.requests import read_body
from butterfly.config import ConfigInvalid, UpdateRefused, UpdateRejected
from butterfly.config.redaction import public_change, public_config
from butterfly.types.errors import InvalidRequest
from butterfly.types.ids import NodeId

REFUSALS = (ConfigInvalid, UpdateRefused, UpdateRejected, ConfigTimeout)
"""What a change that did not happen raises (`refusal` shapes each one's answer)."""


def change_body(result: ChangeResult) -> dict[str, Any]:
    """The answer to a change; secrets' values redacted, as in every read."""
    return {
        "seq": result.seq,
        "version": result.version,
        "config_hash": result.config_hash,
        "cluster_hash": result.cluster_hash,
        "changes": [dataclasses.asdict(public_change(c)) for c in result.changes],
        "nodes": {str(n): state for n, state in result.nodes.items()},
    }


def refusal(e: Exception, here: NodeId) -> JSONResponse:
    """The answer for a change that did not happen (nothing was applied anywhere); `here`:
    the gateway, whose components' veto (`UpdateRejected`) was a 500 "internal"."""
    if isinstance(e, ConfigInvalid):
        issues = [str(i) for i in e.issues]
        return error_response(400, "invalid_config", str(e), extra={"issues": issues})
    if isinstance(e, ConfigRejected):
        extra = {"node": int(e.node), "reason": e.reason}
        return error_response(409, "update_rejected", str(e), extra=extra)
    if isinstance(e, UpdateRejected):
        extra = {
            "node": int(here),
            "reason": str(e.reason),
            "subscriber": e.subscriber,
            "keys": list(e.keys),
        }
        return error_response(409, "update_rejected", str(e), extra=extra)
    if isinstance(e, ConfigTimeout):
        return error_response(504, "consensus_timeout", str(e))
    if isinstance(e, UpdateRefused):
        return error_response(409, "update_refused", str(e), extra={"keys": list(e.keys)})
    raise e


async def json_object(request: Request, limit: int, what: str) -> dict[str, Any]:
    body = await read_body(request, limit)
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:  # RecursionError: nested past the stack
        raise InvalidRequest(f"the body is not valid JSON ({e!s:.200})") from None
    if not isinstance(data, dict):
        raise InvalidRequest(f"the body must be a JSON object: {what}")
    return data


def router(config: ConfigCoordinator, *, auth: Depends, max_request_bytes: int) -> APIRouter:
    r = APIRouter(prefix="/api/v1/config")

    @r.get("")
    async def current() -> dict[str, Any]:
        """This gateway's config, version and cluster hash, and every node's position."""
        manager = config.replica.manager
        statuses = await config.cluster_status()
        ref = config.reference_hash(statuses)
        rec = manager.record
        public = public_config(manager.current)
        nodes = [
            {**dataclasses.asdict(s), "in_sync": s.reachable and s.cluster_hash == ref}
            for s in statuses
        ]
        return {
            "version": rec.version,
            "config_hash": rec.config_hash,
            "cluster_hash": rec.cluster_hash,
            "seq": manager.history.last_cluster_seq(),
            "in_sync": all(n["in_sync"] for n in nodes if n["reachable"]),
            "nodes": nodes,
            "config": public,
        }

    @r.post("", dependencies=[auth])
    async def update(request: Request, reason: str = "") -> JSONResponse:
        """Body: the options to change, dotted (`{"partition.strategy": "uniform"}`) or
        nested. Cluster-wide options go through PREPARE/COMMIT on every node."""
        patch = await json_object(request, max_request_bytes, "the options to change")
        try:
            result = await config.update(patch, reason=reason)
        except REFUSALS as e:
            return refusal(e, config.me)
        return JSONResponse(change_body(result))

    @r.post("/rollback", dependencies=[auth])
    async def rollback(request: Request) -> JSONResponse:
        """Body `{"version": V}`: go back to this gateway's version V as a new version."""
        body = await json_object(request, max_request_bytes, '{"version": V}')
        version = body.get("version")
        if type(version) is not int or set(body) - {"version", "reason"}:
            raise InvalidRequest('the body must be {"version": <int>} (and optional "reason")')
        reason = body.get("reason", "")
        try:
            result = await config.rollback(version, reason=str(reason))
        except REFUSALS as e:
            return refusal(e, config.me)
        return JSONResponse(change_body(result))

    @r.get("/history")
    async def history(limit: int = Query(20, ge=1, le=1000)) -> list[dict[str, Any]]:
        """This gateway's versions, newest first."""
        return [dataclasses.asdict(v) for v in config.replica.manager.history.versions(limit)]

    @r.post("/sync", dependencies=[auth])
    async def sync() -> dict[str, Any]:
        """Nodes off the majority's cluster hash adopt what f+1 peers agree on."""
        report = await config.sync()
        return {"nodes": {str(n): state for n, state in report.items()}, **config.health()}

    return r


__all__ = ["change_body", "refusal", "router"]
