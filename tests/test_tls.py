"""Mutual TLS between nodes: certificates, who may connect, and a cluster running on it."""

from __future__ import annotations

import socket
import stat
import tomllib
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from butterfly.net.tcp import TcpTransport
from butterfly.net.tls import TlsFiles, cert_node, cert_paths, contexts, make_certs, node_name
from butterfly.types.errors import ConnectionFailed
from butterfly.types.ids import NodeId
from butterfly.types.wire.control import StatusQuery
from tests.cluster_util import running_cluster
from tests.test_net import Events, echo, identity

pytestmark = pytest.mark.timeout(120)


def transport(node: int, files: TlsFiles | None, events: Events) -> TcpTransport:
    ports = {NodeId(0): ("127.0.0.1", 0), NodeId(1): ("127.0.0.1", 0)}
    return TcpTransport(
        identity=identity(node),
        listen=ports[NodeId(node)],
        peers=ports,
        emit=events,
        epoch=lambda: 1,
        tls=contexts(files) if files else None,
    )


async def ask(a: TcpTransport, b: TcpTransport) -> int:
    """Node a asks node b for its status over the data channel; b's answer's node id."""
    await a.start(echo)
    await b.start(echo)
    a.peers[b.identity.node] = b.address
    b.peers[a.identity.node] = a.address
    env = await a.request(b.identity.node, StatusQuery(), timeout=5)
    return int(getattr(env.msg, "node", -1))


def test_certificates_name_their_node_and_keys_are_private(tmp_path: Path) -> None:
    files = make_certs(tmp_path, 2, "prod")
    cert = x509.load_pem_x509_certificate(files[1].cert.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["node-1"]
    for path in (files[0].key, files[1].key, tmp_path / "ca.key"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


async def test_nodes_with_the_cluster_ca_talk(tmp_path: Path) -> None:
    files = make_certs(tmp_path, 2, "c")
    events = Events()
    a, b = transport(0, files[0], events), transport(1, files[1], events)
    try:
        assert await ask(a, b) == 7  # echo's StatusReply
    finally:
        await a.close()
        await b.close()


@pytest.mark.parametrize("intruder", ["plain", "other_ca", "stolen_cert"])
async def test_who_cannot_connect(tmp_path: Path, intruder: str) -> None:
    """Without TLS, with another CA's certificate, or with node 1's certificate while
    claiming to be node 0: node 1 refuses the connection."""
    files = make_certs(tmp_path / "cluster", 2, "c")
    other = make_certs(tmp_path / "other", 2, "c")
    mine = {"plain": None, "other_ca": other[0], "stolen_cert": files[1]}[intruder]
    events = Events()
    a, b = transport(0, mine, events), transport(1, files[1], events)
    try:
        with pytest.raises(ConnectionFailed):
            await ask(a, b)
    finally:
        await a.close()
        await b.close()


def test_a_cluster_runs_on_mutual_tls(tiny_model: Path, tmp_path: Path) -> None:
    """The nodes answer over TLS, and node 1's port speaks TLS with node 1's certificate
    (a node that ignored `security.tls` would answer in plain TCP and fail this)."""
    with running_cluster(tiny_model, 2, tmp_path, tls=True) as cluster:
        body = {"prompt": "Butterfly", "max_new_tokens": 4, "wait": True}
        r = httpx.post(f"{cluster.api_url}/inference", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert [s["node"] for s in r.json()["stages"]] == [0, 1]
        listen = tomllib.loads((tmp_path / "node-1.toml").read_text())["node"]["listen"]
        host, port = listen.rsplit(":", 1)
        files = TlsFiles(tmp_path / "tls" / "ca.pem", *cert_paths(tmp_path / "tls", 0))
        client = contexts(files).client
        with (
            socket.create_connection((host, int(port)), timeout=10) as raw,
            client.wrap_socket(raw, server_hostname=node_name(1)) as tls,
        ):
            assert cert_node(tls.getpeercert()) == 1
