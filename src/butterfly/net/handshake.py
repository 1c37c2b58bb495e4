"""The handshake's proof of identity: each end signs both nonces with its node key.

    acceptor -> dialer   Hello(acceptor, cluster, model, "", nonce_a)
    dialer -> acceptor   Hello(dialer, cluster, model, channel, nonce_d, sig_d)
    acceptor -> dialer   HelloAck(acceptor, accepted, reason, sig_a)

`sig_d` and `sig_a` are Ed25519 signatures over `proof_bytes` (cluster, model, channel,
both node ids, both nonces, and which end signs). Each nonce is fresh, so a recorded
handshake cannot be replayed; each signature names both ends, so a member that is dialed
cannot relay the dialer's proof to a third node; the direction keeps an acceptor's proof
from passing as a dialer's. Keys come from configuration (`cluster.public_keys`), never
from the peer, so a process that holds no member's key never gets past the acceptor.

What it does not give without TLS: secrecy, and integrity of the stream after the
handshake against someone on the network path (SECURITY.md, "Identity between nodes").

The checks are pure functions here; `net.tcp` does the I/O. The Ed25519 primitives are
those of `protocol.sign`, which sits above `net`; verification is repeated here in a few
lines (cryptography's own) rather than moving the key types down.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, Protocol

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from butterfly.types.ids import NodeId
from butterfly.types.wire.control import Hello

NONCE_BYTES = 32
MAX_HANDSHAKE_FRAME = 4096
"""Largest frame read before a peer has proven its key: a Hello is ~200 bytes, so an
outsider cannot make a node allocate (or read) more than this."""
DOMAIN = "butterfly-handshake-2"
Direction = Literal["dial", "accept"]


class Signer(Protocol):
    """A node's private key (`protocol.sign.SigningKey` satisfies it)."""

    @property
    def public(self) -> bytes: ...

    def sign(self, data: bytes) -> bytes: ...


def proof_bytes(
    *,
    cluster_id: str,
    model_hash: str,
    channel: str,
    dialer: NodeId,
    acceptor: NodeId,
    dialer_nonce: bytes,
    acceptor_nonce: bytes,
    direction: Direction,
) -> bytes:
    """What each end signs: everything the handshake agreed, canonically encoded."""
    fields = [DOMAIN, cluster_id, model_hash, channel, dialer, acceptor]
    return bytes(msgpack.packb([*fields, dialer_nonce, acceptor_nonce, direction]))


def verify(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """True when `signature` is `public_key`'s over `data`; never raises on peer input."""
    if len(public_key) != 32 or len(signature) != 64:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


def dialer_refusal(
    hello: Hello,
    *,
    acceptor: NodeId,
    acceptor_nonce: bytes,
    cluster_id: str,
    model_hash: str,
    keys: Mapping[NodeId, bytes],
) -> str:
    """Why the acceptor refuses the dialer's Hello, or "" when its key is proven."""
    if hello.cluster_id != cluster_id:
        return f"cluster id {hello.cluster_id!r} is not {cluster_id!r}"
    if hello.model_hash != model_hash:
        return f"model hash {hello.model_hash[:12]} differs from {model_hash[:12]}"
    key = keys.get(hello.node)
    if key is None:
        return f"node {hello.node} is not a member of this cluster (cluster.public_keys)"
    if len(hello.nonce) != NONCE_BYTES:
        return f"its nonce is {len(hello.nonce)} bytes, not {NONCE_BYTES}"
    data = proof_bytes(
        cluster_id=cluster_id,
        model_hash=model_hash,
        channel=hello.channel,
        dialer=hello.node,
        acceptor=acceptor,
        dialer_nonce=hello.nonce,
        acceptor_nonce=acceptor_nonce,
        direction="dial",
    )
    if not verify(key, hello.signature, data):
        return f"its signature does not prove node {hello.node}'s key"
    return ""


def opening_refusal(opening: Hello, *, peer: NodeId, cluster_id: str, model_hash: str) -> str:
    """Why the dialer refuses the acceptor's opening Hello, or "" to answer it."""
    if opening.node != peer:
        return f"the node at node {peer}'s address says it is node {opening.node}"
    if opening.cluster_id != cluster_id:
        return f"it is in cluster {opening.cluster_id!r}, not {cluster_id!r}"
    if opening.model_hash != model_hash:
        return f"its model hash {opening.model_hash[:12]} differs from {model_hash[:12]}"
    if len(opening.nonce) != NONCE_BYTES:
        return f"its nonce is {len(opening.nonce)} bytes, not {NONCE_BYTES}"
    return ""


__all__ = [
    "MAX_HANDSHAKE_FRAME",
    "NONCE_BYTES",
    "Direction",
    "Signer",
    "dialer_refusal",
    "opening_refusal",
    "proof_bytes",
    "verify",
]
