"""A web page in the operator's browser is not a client (a review, twenty-sixth session).

With no `api.tokens` (the default) the API on 127.0.0.1 is open to whatever runs on the
machine, the browser included. A page on any site could POST a `text/plain` body (a CORS
"simple request": no preflight) that every route reads as JSON, and change the cluster's
config or queue work; a page whose own name was rebound to 127.0.0.1 could also read the
answers. Now POST/PUT/PATCH/DELETE a browser marks as cross-site or from a foreign
`Origin` get 403, and an API bound to loopback answers only to loopback `Host` names,
`api.host` and `api.allowed_hosts` (421). Clients that send neither header (curl, SDKs,
the CLI, every other test here) are served as before.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from butterfly.api.guards import authority, is_loopback
from butterfly.api.settings import ApiSettings
from butterfly.api.standby import standby_app
from butterfly.api.switch import RoleSwitch
from butterfly.config.issues import ConfigInvalid
from butterfly.config.loader import load_config
from butterfly.wiring.gateway import port_app
from tests.api_util import Served, assert_error, serving
from tests.test_config_agreement import Cluster, cluster

__all__ = ["cluster"]  # the fixture, used by name below
pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

FROM_A_WEB_PAGE = {
    "content-type": "text/plain;charset=UTF-8",  # a CORS-safelisted type: no preflight
    "origin": "https://evil.example",
    "sec-fetch-site": "cross-site",
    "sec-fetch-mode": "no-cors",
}
STATE_CHANGING = {"POST", "PUT", "PATCH", "DELETE"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def whole(tiny_model: Path, tmp_path: Path, cluster: Cluster) -> AsyncIterator[Served]:
    """The whole app, config routes included, with no token: the default."""
    coordinator = cluster.nodes[0].coordinator
    async with serving(tiny_model, tmp_path / "t.db", config=coordinator) as s:
        yield s


def state_changing(s: Served) -> list[tuple[str, str]]:
    """Every (method, path) of the app that may change something, from its schema (so
    a route added later is covered), path parameters filled in."""
    return [
        (method.upper(), path.replace("{task_id}", "x"))
        for path, operations in s.app.openapi()["paths"].items()
        for method in operations
        if method.upper() in STATE_CHANGING
    ]


async def test_a_cross_site_page_can_change_nothing(whole: Served, cluster: Cluster) -> None:
    manager = cluster.nodes[0].coordinator.replica.manager
    before = manager.current.partition.strategy
    routes = state_changing(whole)
    assert ("POST", "/api/v1/config") in routes and ("POST", "/inference") in routes
    for method, path in routes:
        r = await whole.client.request(
            method, path, content=b'{"partition.strategy": "uniform"}', headers=FROM_A_WEB_PAGE
        )
        assert_error(r, 403, "cross_site_request", "Sec-Fetch-Site: cross-site")
    assert manager.current.partition.strategy == before
    assert whole.scheduler.queue_depth == 0 and whole.scheduler.active == 0


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ({"origin": "https://evil.example"}, "Origin 'https://evil.example'"),  # no Fetch Metadata
        ({"origin": "null"}, "Origin 'null'"),  # a sandboxed frame, a file:// page
        ({"origin": "http://localhost:3000"}, "Origin"),  # another local web app
        ({"sec-fetch-site": "same-site"}, "same-site"),
    ],
)
async def test_a_foreign_origin_alone_is_refused(
    tiny_model: Path, tmp_path: Path, headers: dict[str, str], why: str
) -> None:
    async with serving(tiny_model, tmp_path / "t.db") as s:
        body = b'{"prompt": "x", "max_new_tokens": 500}'
        r = await s.client.post("/inference", content=body, headers=headers)
        assert_error(r, 403, "cross_site_request", why)
        assert s.scheduler.queue_depth == 0


@pytest.mark.parametrize(
    "headers",
    [
        {},  # curl, the SDKs, the CLI
        {"sec-fetch-site": "none"},  # typed by the user
        # the API's own /docs page ("Try it out"), on a port or not
        {"origin": "http://localhost", "sec-fetch-site": "same-origin"},
        {"origin": "http://localhost:80"},
    ],
)
async def test_clients_and_the_apis_own_pages_are_served(
    tiny_model: Path, tmp_path: Path, headers: dict[str, str]
) -> None:
    async with serving(tiny_model, tmp_path / "t.db") as s:
        body = {"prompt": "ok?", "max_new_tokens": 2, "wait": True}
        r = await s.client.post("/inference", json=body, headers=headers)
        assert r.status_code == 200, r.text


async def test_a_page_may_still_read_nothing_changing(tiny_model: Path, tmp_path: Path) -> None:
    """GET changes nothing (and without CORS headers the page cannot read the answer):
    no Origin check, so the load balancer's probe never trips on it."""
    async with serving(tiny_model, tmp_path / "t.db") as s:
        r = await s.client.get("/health", headers=FROM_A_WEB_PAGE)
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_rebound_host_name_is_not_served(
    tiny_model: Path, tmp_path: Path, method: str
) -> None:
    """DNS rebinding: the page's own name now resolves to 127.0.0.1, so its requests are
    same-origin (Origin matches Host) and it could read the answers."""
    async with serving(tiny_model, tmp_path / "t.db") as s:
        r = await s.client.request(
            method,
            "/v1/completions" if method == "POST" else "/result/x",
            json={"model": "tiny", "prompt": "x", "max_tokens": 2},
            headers={"host": "rebind.example:8080", "origin": "http://rebind.example:8080"},
        )
        assert_error(r, 421, "misdirected_request", "'rebind.example:8080'", "api.allowed_hosts")
        assert s.scheduler.queue_depth == 0


@pytest.mark.parametrize(
    ("bind", "allowed", "host", "served"),
    [
        ("127.0.0.1", (), "127.0.0.1:8080", True),
        ("127.0.0.1", (), "127.1.2.3", True),
        ("127.0.0.1", (), "[::1]:8080", True),
        ("127.0.0.1", (), "LocalHost.:9", True),
        ("127.0.0.1", (), "evil.example", False),
        ("127.0.0.1", (), "10.0.0.5:8080", False),
        ("127.0.0.1", ("api.example.com",), "api.example.com", True),  # a proxy passes it on
        ("localhost", (), "evil.example", False),
        ("::1", (), "[::1]", True),
        ("::1", ("2001:db8::5",), "[2001:DB8:0:0::0005]:8080", True),  # another spelling
        ("127.0.0.1", ("2001:0db8::5",), "[2001:db8::5]", True),
        ("0.0.0.0", (), "evil.example", True),  # reached from anywhere: any name
        ("10.0.0.5", (), "gw.internal:8080", True),
    ],
)
async def test_which_host_names_a_bind_answers_to(
    tiny_model: Path,
    tmp_path: Path,
    bind: str,
    allowed: tuple[str, ...],
    host: str,
    served: bool,
) -> None:
    settings = ApiSettings(host=bind, allowed_hosts=frozenset(allowed))
    async with serving(tiny_model, tmp_path / "t.db", settings=settings, run=False) as s:
        r = await s.client.get("/health", headers={"host": host})
        assert (r.status_code != 421) == served, r.text


async def test_a_page_of_an_allowed_name_may_post(tiny_model: Path, tmp_path: Path) -> None:
    """Behind a TLS proxy on this machine that passes Host on as 127.0.0.1:8080, the
    page it serves has the proxy's origin: named in api.allowed_hosts, it may post."""
    settings = ApiSettings(allowed_hosts=frozenset({"api.example.com"}))
    async with serving(tiny_model, tmp_path / "t.db", settings=settings) as s:
        body = {"prompt": "ok?", "max_new_tokens": 2, "wait": True}
        headers = {"host": "127.0.0.1:8080", "origin": "https://api.example.com"}
        r = await s.client.post("/inference", json=body, headers=headers)
        assert r.status_code == 200, r.text


def test_host_headers_are_read_as_browsers_write_them() -> None:
    assert authority("[::1]:8080") == ("::1", 8080)
    assert authority("::1") == ("::1", None)
    assert authority("Example.COM.:443") == ("example.com", 443)
    assert authority("localhost") == ("localhost", None)
    assert authority("[0:0::0001]:80") == ("::1", 80)
    assert authority("h:x") == ("h", None)
    assert authority("h:\u00b2") == ("h", None)  # a latin-1 digit int() refuses
    assert all(map(is_loopback, ["localhost", "a.localhost", "127.9.9.9", "[::1]", "::1"]))
    assert not any(map(is_loopback, ["0.0.0.0", "localhost.example", "10.0.0.1", "::"]))


def test_allowed_hosts_are_names_without_port_or_scheme() -> None:
    names = ["API.example.com", "[::1]", "10.0.0.5", "2001:0DB8::0005"]
    cfg = load_config(overrides={"api.allowed_hosts": names})
    assert cfg.api.allowed_hosts == ("api.example.com", "::1", "10.0.0.5", "2001:db8::5")
    for bad in ("https://api.example.com", "api.example.com:443", "", "a b"):
        with pytest.raises(ConfigInvalid, match="host name"):
            load_config(overrides={"api.allowed_hosts": [bad]})


def _health() -> dict[str, object]:
    return {"acting_gateway": 0, "gateways": [{"id": 1, "url": "http://127.0.0.1:8081"}]}


@pytest.mark.parametrize("role", ["standby", "between roles"])
async def test_a_standby_port_and_one_between_roles_answer_no_rebound_page(role: str) -> None:
    """The node's API port (`wiring.gateway.port_app`) guards whatever role's app it
    serves: a standby's redirects and the 503 between roles held `/health`, the acting
    gateway and every gateway's URL, for a page rebound to 127.0.0.1 (a review)."""
    front = RoleSwitch(1, health=_health)
    if role == "standby":
        acting = standby_app(
            acting=lambda: 0, acting_url=lambda: "http://127.0.0.1:8080", health=_health
        )
        front.use(acting)
    app = port_app(front, "127.0.0.1", ())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        rebound = {"host": "rebind.example:8080"}
        for path in ("/health", "/inference"):
            assert_error(await client.get(path, headers=rebound), 421, "misdirected_request")
        served = await client.get("/health")  # the same request from a client
        assert served.status_code in (200, 307, 503) and served.status_code != 421


@pytest.mark.parametrize("site", ["same-site", "cross-site"])
async def test_a_page_of_an_allowed_name_may_post_from_any_browser(
    tiny_model: Path, tmp_path: Path, site: str
) -> None:
    """`api.allowed_hosts` names pages that may post, whatever `Sec-Fetch-Site` a
    browser adds (every current one does: they were refused, a review); a page of
    another name is still refused."""
    allowed = frozenset({"api.example.com", "ui.example.com", "dashboard.internal"})
    page = "https://ui.example.com" if site == "same-site" else "https://dashboard.internal"
    body = {"prompt": "ok?", "max_new_tokens": 2, "wait": True}
    async with serving(
        tiny_model, tmp_path / "t.db", settings=ApiSettings(allowed_hosts=allowed)
    ) as s:
        for origin in (page, None):
            headers = {"host": "api.example.com", "sec-fetch-site": site, "sec-fetch-mode": "cors"}
            if origin is not None:
                headers["origin"] = origin
            r = await s.client.post("/inference", json=body, headers=headers)
            if origin is None:  # a cross-site mark with no allowed origin to vouch for it
                assert_error(r, 403, "cross_site_request")
            else:
                assert r.status_code == 200, r.text
        foreign = {
            "host": "api.example.com",
            "origin": "https://evil.example",
            "sec-fetch-site": site,
        }
        assert_error(
            await s.client.post("/inference", json=body, headers=foreign), 403, "cross_site_request"
        )


@pytest.mark.parametrize("method", ["DELETE", "PUT", "PATCH"])
async def test_a_405_on_the_config_lists_every_method_it_takes(whole: Served, method: str) -> None:
    """The config's GET and POST are two routes on one path: a 405 said `Allow: GET`
    only, as if the config could not be changed (a review)."""
    r = await whole.client.request(method, "/api/v1/config", json={})
    assert_error(r, 405, "method_not_allowed")
    assert {"GET", "POST"} <= set(r.headers["allow"].split(", "))
