"""Every failure leaves the API as `{"error": {"message", "type", "param", "code"}}` with a
4xx or 5xx: the contract's `type` and `message`, plus OpenAI's `param` (the request field
at fault, when one is) and `code` (null), so OpenAI clients and SDKs parse it as theirs.

The mapping from error class to status lives here, in one table, so endpoints just raise
the `ButterflyError` that says what went wrong. Anything that is not a ButterflyError is
a bug: it is logged with its traceback and answered with a 500 in the same shape, and the
process goes on serving (a catch-all ASGI middleware guarantees it, because Starlette's
own 500 handler re-raises after answering).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from butterfly.types.errors import (
    ApiError,
    ButterflyError,
    ContextLengthExceeded,
    InvalidInput,
    InvalidRequest,
    InvalidTask,
    InvalidTransition,
    LayerRangeError,
    PayloadTooLarge,
    QueueFull,
    RateLimited,
    ServiceUnavailable,
    TaskAlreadyExists,
    TaskNotFound,
)

log = logging.getLogger(__name__)


class Unauthorized(ApiError):
    """A state-changing request without a valid bearer token."""


class InvalidField(InvalidRequest):
    """A request field that failed validation; `param` names it for OpenAI clients."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param

    @property
    def kind(self) -> str:
        return "invalid_request"


class ContextExceeded(InvalidField):
    """A prompt (with the tokens asked for) beyond the model's context: 400 with `code`
    "context_length_exceeded", which OpenAI answers and LangChain and LiteLLM read to
    tell a full context from any other bad request."""

    code = "context_length_exceeded"


class ModelNotFound(ApiError):
    """A request naming a model this cluster does not serve: 404 with `code`
    "model_not_found" and `param` "model", as OpenAI and vLLM answer it, so SDKs raise
    their NotFoundError (LiteLLM's router reads it as a missing deployment, not a bad
    request)."""

    param = "model"
    code = "model_not_found"


STATUS: tuple[tuple[type[ButterflyError], int], ...] = (
    (ModelNotFound, 404),
    (InvalidRequest, 400),
    (InvalidTask, 400),
    (InvalidInput, 400),
    (ContextLengthExceeded, 400),
    (LayerRangeError, 400),
    (Unauthorized, 401),
    (TaskNotFound, 404),
    (InvalidTransition, 409),
    (TaskAlreadyExists, 409),
    (PayloadTooLarge, 413),
    (QueueFull, 429),
    (RateLimited, 429),
    (ServiceUnavailable, 503),
)
KIND_STATUS = {cls("").kind: status for cls, status in STATUS}
"""Status by error `kind`, for failures read back from the task store."""


def allowed_methods(request: Request, given: str = "") -> str:
    """Every method `request`'s path takes, for a 405's `Allow`: a path served by two
    routes (the config's GET and POST) got the first one's only from starlette
    (`given`), and RFC 9110 asks for all (a review). Read from the app's OpenAPI
    schema, which names every route's path and methods whatever routers hold them."""
    found = {m.strip().upper() for m in given.split(",") if m.strip()}
    app = request.app
    paths = app.openapi().get("paths", {}) if isinstance(app, FastAPI) else {}
    path = request.url.path
    for template, operations in paths.items():
        if compile_path(template)[0].fullmatch(path):
            found |= {method.upper() for method in operations}
    return ", ".join(sorted(found))


def status_for(err: ButterflyError) -> int:
    for cls, status in STATUS:
        if isinstance(err, cls):
            return status
    return 503 if err.retriable else 500


def error_body(
    kind: str,
    message: str,
    extra: dict[str, Any] | None = None,
    *,
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """The contract's error shape; `extra` adds top-level keys beside `error`."""
    error = {"message": message, "type": kind, "param": param, "code": code}
    return {"error": error, **(extra or {})}


def error_response(
    status: int,
    kind: str,
    message: str,
    *,
    retry_after_s: int = 1,
    extra: dict[str, Any] | None = None,
    param: str | None = None,
    code: str | None = None,
) -> JSONResponse:
    headers = {"Retry-After": str(retry_after_s)} if status in (429, 503) else None
    body = error_body(kind, message, extra, param=param, code=code)
    return JSONResponse(body, status_code=status, headers=headers)


MAX_PROBLEMS = 10
"""Problems an error message names, the count of the rest after them: an invalid body of
10 MiB (a prompt batch of bad items) made a 146 MiB message and held the event loop for
26 s building it (a reviewer's probe, nineteenth session)."""


def field_path(loc: Sequence[Any]) -> str:
    """A pydantic location as the request's own dotted field name: without the body's
    place and the union branch pydantic tried (`stop.constrained-str` is `stop`)."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    return ".".join(p for p in parts if not _is_branch(p))


def _is_branch(part: str) -> bool:
    """A union branch's tag (`str`, `constrained-str`, `list[int]`): a request's fields
    are snake_case names, never hyphenated or bracketed, nor a plain type's name."""
    return "-" in part or "[" in part or part in ("str", "int", "float", "bool", "none")


def by_branch_size(errors: list[Any]) -> list[Any]:
    """The problems, those of a union's branch with fewer of them first: a batch of 33
    prompts fails as a string once, as a list of strings once (at most 32) and as a list
    of token ids 33 times; the first two say what is wrong."""

    def branch(e: Any) -> tuple[str, ...]:
        loc = tuple(str(p) for p in e.get("loc", ()))
        for i, part in enumerate(loc):
            if _is_branch(part):
                return loc[: i + 1]
        return loc

    branches = [branch(e) for e in errors]  # once each: a bad batch has many
    sizes = Counter(branches)
    order = sorted(range(len(errors)), key=lambda i: sizes[branches[i]])
    return [errors[i] for i in order]


def first_field(errors: list[Any]) -> str | None:
    """The dotted name of the first field pydantic found wrong, if it names one."""
    for e in errors:
        loc = field_path(e.get("loc", ()))
        if loc:
            return loc
    return None


def describe_validation(errors: list[Any], fields: tuple[str, ...] = ()) -> str:
    """One readable sentence per problem pydantic found, naming the field: the first
    `MAX_PROBLEMS` of them."""
    parts = []
    for e in by_branch_size(errors)[:MAX_PROBLEMS]:
        loc = field_path(e.get("loc", ()))
        kind = e.get("type", "")
        if kind == "json_invalid":
            parts.append(f"the body is not valid JSON ({e.get('ctx', {}).get('error', e['msg'])})")
        elif kind == "extra_forbidden":
            known = f"; known fields: {', '.join(fields)}" if fields else ""
            parts.append(f"unknown field {loc!r}{known}")
        elif kind == "missing":
            parts.append(f"missing field {loc!r}")
        elif kind == "value_error":
            message = str(e.get("msg", "")).removeprefix("Value error, ")
            parts.append(f"{loc}: {message}" if loc else message)
        else:
            parts.append(f"{loc or 'body'}: {e.get('msg', kind)}")
    if len(errors) > MAX_PROBLEMS:
        parts.append(f"and {len(errors) - MAX_PROBLEMS} more problems")
    return "; ".join(parts) or "the request is invalid"


def install(app: FastAPI, *, retry_after_s: int) -> None:
    """Register the handlers that give every error the contract's shape."""

    async def on_butterfly(request: Request, exc: Exception) -> JSONResponse:
        if not isinstance(exc, ButterflyError):
            raise exc
        status = status_for(exc)
        if status >= 500:
            log.error("%s %s failed: %s", request.method, request.url.path, exc)
        param = exc.param if isinstance(exc, InvalidField | ModelNotFound) else None
        code = exc.code if isinstance(exc, ModelNotFound | ContextExceeded) else None
        retry = retry_after_s
        if isinstance(exc, RateLimited):  # the bucket's own wait, whole seconds up
            retry = max(1, math.ceil(exc.retry_after_s))
        return error_response(
            status, exc.kind, exc.message, retry_after_s=retry, param=param, code=code
        )

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        if not isinstance(exc, StarletteHTTPException):
            raise exc
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no endpoint {request.method} {request.url.path}"
        response = error_response(exc.status_code, kind, message, retry_after_s=retry_after_s)
        # the exception's own headers: `Allow` on a 405 (RFC 9110 requires it; dropped
        # here before, a review), whatever else a route raises with
        response.headers.update(exc.headers or {})
        if exc.status_code == 405:
            given = (exc.headers or {}).get("Allow", "")
            response.headers["Allow"] = allowed_methods(request, given)
        return response

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        errors = exc.errors() if isinstance(exc, RequestValidationError | ValidationError) else []
        message, param = describe_validation(list(errors)), first_field(list(errors))
        return error_response(400, "invalid_request", message, param=param)

    app.add_exception_handler(ButterflyError, on_butterfly)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(ValidationError, on_validation)
    app.add_middleware(CatchAll)


class CatchAll:
    """Turn any exception that escaped the handlers into a 500 in the contract's shape."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except ClientDisconnect:
            return  # the client left: nobody to answer, nothing wrong with the gateway
        except Exception as e:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            with contextlib.suppress(OSError):  # the client may be gone as well
                if started:  # headers are out; all that is left is to end the body
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    return
                message = f"internal error ({type(e).__name__}); the gateway log has the details"
                response = JSONResponse(error_body("internal_error", message), status_code=500)
                await response(scope, receive, send)


__all__ = [
    "KIND_STATUS",
    "STATUS",
    "InvalidField",
    "ModelNotFound",
    "Unauthorized",
    "describe_validation",
    "error_body",
    "error_response",
    "first_field",
    "install",
    "status_for",
]
