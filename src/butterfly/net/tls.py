"""Mutual TLS between nodes: a cluster CA, one certificate per node, and contexts.

Every node presents a certificate the cluster CA signed for `node-<id>` (subject CN and
DNS name), and accepts only peers that do the same: the dialing side checks the name
against the node it meant to reach (TLS hostname checking), the accepting side checks it
against the node id the peer's Hello claims (`cert_node`). So a stolen certificate of one
node cannot speak for another, and a host outside the cluster cannot connect at all.

`butterfly certs` (and `node_configs(tls=True)` for local clusters) write the files with
`make_certs`; keys are P-256 and written readable by their owner only.
"""

from __future__ import annotations

import datetime
import os
import ssl
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


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    cluster_id: str,
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
            x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False
        )
    return builder.sign(signer, hashes.SHA256())


def cert_paths(out_dir: Path, node: int) -> tuple[Path, Path]:
    """Where `make_certs` puts node `node`'s certificate and key."""
    return out_dir / f"{node_name(node)}.pem", out_dir / f"{node_name(node)}.key"


def make_certs(out_dir: Path, nodes: int, cluster_id: str) -> dict[int, TlsFiles]:
    """A new cluster CA and a certificate for each of nodes 0..nodes-1 in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert(f"{cluster_id} CA", ca_key, None, cluster_id)
    ca_path = out_dir / "ca.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    _write_key(out_dir / "ca.key", ca_key)
    files = {}
    for node in range(nodes):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(node_name(node), key, (ca.subject, ca_key), cluster_id)
        cert_path, key_path = cert_paths(out_dir, node)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key_path, key)
        files[node] = TlsFiles(ca_path, cert_path, key_path)
    return files


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
