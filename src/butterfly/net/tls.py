"""Mutual TLS between nodes: a cluster CA, one certificate per node, and contexts.

Every node presents a certificate the cluster CA signed for `node-<id>` (subject CN and
DNS name), and accepts only peers that do the same: the dialing side checks the name
against the node it meant to reach (TLS hostname checking), the accepting side checks it
against the node id the peer's Hello claims (`cert_node`). So a stolen certificate of one
node cannot speak for another, and a host outside the cluster cannot connect at all.

`butterfly certs` (and `node_configs(tls=True)` for local clusters) write the files with
`make_certs`; keys are P-256 and written readable by their owner only. `butterfly init`
also puts each host's address in its certificate (after the node name, which stays the
name peers check), so ordinary TLS tools pointed at a host accept its certificate too;
`add_node_cert` signs one more node's certificate with an existing CA (a host added later).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from butterfly.types.errors import ConfigError

VALID_DAYS = 3650
NAME_PREFIX = "node-"


def node_name(node: int) -> str:
    return f"{NAME_PREFIX}{node}"


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _san(subject: str, host: str) -> list[x509.GeneralName]:
    """The node name first (what `cert_node` and the dialer check), then the host's address."""
    names: list[x509.GeneralName] = [x509.DNSName(subject)]
    if not host or host == subject:
        return names
    try:
        names.append(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
    except ValueError:
        names.append(x509.DNSName(host))
    return names


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    cluster_id: str,
    host: str = "",
) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, cluster_id),
            x509.NameAttribute(NameOID.COMMON_NAME, subject),
        ]
    )
    issuer_name, signer = issuer if issuer else (name, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(_san(subject, host)), critical=False
        )
    return builder.sign(signer, hashes.SHA256())


def cert_paths(out_dir: Path, node: int) -> tuple[Path, Path]:
    """Where `make_certs` puts node `node`'s certificate and key."""
    return out_dir / f"{node_name(node)}.pem", out_dir / f"{node_name(node)}.key"


def _node_cert(
    out_dir: Path,
    node: int,
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    cluster_id: str,
    host: str,
) -> TlsFiles:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _cert(node_name(node), key, (ca.subject, ca_key), cluster_id, host)
    cert_path, key_path = cert_paths(out_dir, node)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key_path, key)
    return TlsFiles(out_dir / "ca.pem", cert_path, key_path)


def make_certs(
    out_dir: Path, nodes: int, cluster_id: str, hosts: Mapping[int, str] | None = None
) -> dict[int, TlsFiles]:
    """A new cluster CA and a certificate for each of nodes 0..nodes-1 in `out_dir`;
    `hosts`: node -> host name or IP address, added to that node's certificate."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    # a common name holds at most 64 characters, a cluster id as many: the CA's is cut
    ca = _cert(f"{cluster_id[:61]} CA", ca_key, None, cluster_id)
    (out_dir / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    _write_key(out_dir / "ca.key", ca_key)
    return {
        node: _node_cert(out_dir, node, ca, ca_key, cluster_id, (hosts or {}).get(node, ""))
        for node in range(nodes)
    }


def add_node_cert(ca_dir: Path, node: int, cluster_id: str, host: str = "") -> TlsFiles:
    """A certificate for `node` signed by the CA `make_certs` left in `ca_dir`."""
    try:
        ca = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
        ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the cluster CA in {ca_dir}: {e}") from e
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{ca_dir / 'ca.key'} is not the EC key `butterfly init` writes")
    return _node_cert(ca_dir, node, ca, ca_key, cluster_id, host)


@dataclass(frozen=True)
class TlsContexts:
    server: ssl.SSLContext
    client: ssl.SSLContext


def contexts(files: TlsFiles) -> TlsContexts:
    """Both sides require a certificate from the cluster CA; TLS 1.3 only."""
    try:
        server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(files.ca))
        server.verify_mode = ssl.CERT_REQUIRED
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(files.ca))
        for ctx in (server, client):
            ctx.minimum_version = ssl.TLSVersion.TLSv1_3
            ctx.load_cert_chain(str(files.cert), str(files.key))
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load the TLS files {files}: {e}") from e
    return TlsContexts(server, client)


def cert_node(peercert: dict[str, Any] | None) -> int | None:
    """The node id a verified peer certificate was issued for, or None."""
    for kind, value in (peercert or {}).get("subjectAltName", ()):
        number = value.removeprefix(NAME_PREFIX)
        if kind == "DNS" and number != value and number.isdigit():
            return int(number)
    return None
