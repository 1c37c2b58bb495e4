"""`--url` of the CLI's gateway commands may name a standby gateway: its 307 to the
acting one is followed with the method, body and token (cli.gateways.request), but only
to a gateway the standby lists.

httpx drops `Authorization` on a redirect to another origin, and every gateway serves
its API on its own port, so `infer --url <standby> --token T` and `config show` got 401
from the acting gateway (a review). The stand-ins answer as api/standby.py does (503
`/health` listing the gateways, 307 for every other route) and as the acting gateway's
RequireToken does (401 without the token)."""

from __future__ import annotations

import http.server
import json
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest
from typer.testing import CliRunner

from butterfly.cli import app
from butterfly.cli.gateways import MAX_REDIRECTS
from tests.http_util import serving

TOKEN = "t0ken"
CONFIG = {
    "version": 1, "config_hash": "c" * 64, "cluster_hash": "d" * 64, "seq": 0,
    "in_sync": True, "nodes": [], "changes": [],
    "config": {"cluster": {"members": ["a:1", "b:2"], "public_keys": ["a" * 64, "b" * 64]}},
}  # fmt: skip
RESULT = {"task_id": "x", "status": "completed", "text": " generated", "output_ids": [7]}


class _Json(http.server.BaseHTTPRequestHandler):
    def send(self, code: int, body: object, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(code)
        for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


class Acting(_Json):
    """The acting gateway as these commands see it; records what reached it."""

    seen: ClassVar[list[tuple[str, str, str | None, bytes]]] = []

    def _answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        auth = self.headers.get("Authorization")
        Acting.seen.append((self.command, self.path, auth, body))
        if auth != f"Bearer {TOKEN}":
            message = "this endpoint needs an `Authorization: Bearer <token>` header"
            self.send(401, {"error": {"message": message, "type": "unauthorized"}})
        elif self.path.startswith("/inference"):
            self.send(200, RESULT)
        else:
            self.send(200, CONFIG)

    do_GET = do_POST = _answer


def standby(location: str, listed: list[str]) -> type[http.server.BaseHTTPRequestHandler]:
    """A standby redirecting every route but `/health` to `location`, listing `listed`."""

    class Standby(_Json):
        def _answer(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path == "/health":
                gateways = [{"node": i, "url": u, "acting": i == 0} for i, u in enumerate(listed)]
                self.send(503, {"healthy": False, "nodes": [], "gateways": gateways})
            else:
                self.send(307, None, {"Location": f"{location}{self.path}"})

        do_GET = do_POST = _answer

    return Standby


@pytest.fixture
def acting() -> Iterator[str]:
    Acting.seen = []
    with serving(Acting) as url:
        yield url


def run(*args: str) -> Any:
    return CliRunner().invoke(app, [*args, "--token", TOKEN])


def test_infer_and_config_through_a_standby_keep_the_token_method_and_body(acting: str) -> None:
    with serving(standby(acting, [acting, "http://127.0.0.1:1"])) as url:
        inferred = run("infer", "hi", "--url", url)
        shown = run("config", "show", "--url", url)
        removed = run("cluster", "remove-member", "1", "--url", url)
    assert inferred.exit_code == 0 and "generated" in inferred.stdout, inferred.output
    assert shown.exit_code == 0 and "config_hash cccc" in shown.stdout, shown.output
    assert removed.exit_code == 0, removed.output
    assert {auth for _, _, auth, _ in Acting.seen} == {f"Bearer {TOKEN}"}
    sent = [(method, path.split("?")[0]) for method, path, _, _ in Acting.seen]
    assert sent == [
        ("POST", "/inference"),
        ("GET", "/api/v1/config"),
        ("GET", "/api/v1/config"),  # remove-member reads the roster, then posts the patch
        ("POST", "/api/v1/config"),
    ]
    assert json.loads(Acting.seen[0][3])["prompt"] == "hi"
    assert json.loads(Acting.seen[3][3])["cluster.members"] == ["a:1", ""]


def test_a_redirect_to_an_address_the_standby_does_not_list_is_refused(acting: str) -> None:
    """The token goes only where the redirecting node says the cluster's gateways are."""
    with serving(standby(acting, ["http://127.0.0.1:1"])) as url:
        for command in (["infer", "hi"], ["config", "show"]):
            r = run(*command, "--url", url)
            assert r.exit_code == 2 and "not one of the gateways" in r.output, r.output
            assert "Traceback" not in r.output
    assert Acting.seen == []


def test_a_redirect_loop_is_bounded(acting: str) -> None:
    class Loop(_Json):
        def do_GET(self) -> None:
            me = f"http://127.0.0.1:{self.server.server_address[1]}"
            Loop.hits += 1
            if self.path == "/health":
                self.send(503, {"healthy": False, "nodes": [], "gateways": [{"url": me}]})
            else:
                self.send(307, None, {"Location": f"{me}{self.path}"})

        hits = 0

    with serving(Loop) as url:
        r = run("config", "show", "--url", url)
    assert r.exit_code == 2 and "still redirects" in r.output, r.output
    assert Loop.hits == 1 + 2 * MAX_REDIRECTS  # each hop: its /health, then the request


def test_an_answer_that_is_not_a_success_is_an_error_not_data() -> None:
    class NotModified(_Json):
        def do_GET(self) -> None:
            self.send(304, None)

    with serving(NotModified) as url:
        r = run("config", "show", "--url", url)
    assert r.exit_code == 2 and "error 304" in r.output, r.output
