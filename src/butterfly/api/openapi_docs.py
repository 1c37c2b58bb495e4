"""What the OpenAPI document says about bodies the routes parse themselves.

Routes read their body within a size limit before parsing it (`api.requests.parse`), so
FastAPI never sees the body model and would document none. Each route names its model
with `body_of`, and `install` adds those models' schemas to the document's components,
so a client generated from `/openapi.json` knows every field; `streamed` and `errors`
declare the statuses the routes answer, each with its body.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from butterfly.api.openai_schema import Accepted, ErrorResponse

REF = "#/components/schemas/{model}"

WHY = {
    400: "The request is invalid; the message names the field and the problem.",
    401: "A bearer token is required (api.tokens) and was missing or wrong.",
    404: "No such task, model (`model` names another; `code` model_not_found) or route.",
    409: "The task was cancelled, or cannot change state that way.",
    413: "The body or the prompt is over the configured limit.",
    429: "The queue is full or the client is over its rate limit; see Retry-After.",
    500: "A bug; the gateway log has the details.",
    503: (
        "The cluster cannot serve now (no plan, too few nodes, shutting down, or this "
        "gateway lost a quorum of the members): try another gateway."
    ),
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """Responses for these error statuses, each with the error body."""
    return {s: {"model": ErrorResponse, "description": WHY[s]} for s in statuses}


ERRORS = errors(401, 500)
"""What any route may answer besides its own statuses."""


def streamed(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """A route answering `model` as JSON, or with `stream: true` as server-sent events."""
    event = {
        "type": "object",
        "description": "One server-sent event: `data` is a chunk (JSON) or `[DONE]`.",
        "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
        "required": ["data"],
    }
    sse = {"schema": event}
    return {
        200: {"model": model, "content": {"text/event-stream": sse}},
        202: {"model": Accepted, "description": WHY_202},
        **errors(400, 401, 404, 409, 413, 429, 500, 503),
    }


WHY_202 = (
    "The answer was not ready within the call's wait (at most 300 s: ApiSettings.max_wait_s);"
    " read it at /result/{task_id}."
)


def body_of(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` declaring the JSON body `model` (add it with `install`)."""
    ref = {"$ref": REF.format(model=model.__name__)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def install(app: FastAPI, bodies: Sequence[type[BaseModel]], model_name: str) -> None:
    """Make `/openapi.json` carry the schemas of `bodies` (and of what they refer to);
    a body's `model` field is the one name served here (`model.served_name`)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title, version=app.version, routes=app.routes, description=app.description
            )
            _, defs = models_json_schema([(m, "validation") for m in bodies], ref_template=REF)
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            for name, schema in defs.get("$defs", {}).items():
                if "model" in schema.get("properties", {}):
                    schema["properties"]["model"]["enum"] = [model_name]
                schemas.setdefault(name, schema)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


__all__ = ["ERRORS", "body_of", "errors", "install", "streamed"]
