"""Digests and Merkle roots shared by agreement and proofs.

Every digest is SHA-256 with a one-byte domain tag, so a leaf can never be passed off as
an inner node of a Merkle tree and a request digest never collides with a log digest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

DIGEST_SIZE = 32
NULL_DIGEST = bytes(DIGEST_SIZE)
"""Digest of the null request a new primary proposes for a sequence number nobody prepared."""

_LEAF = b"\x00"
_NODE = b"\x01"
_CHAIN = b"\x02"
_DATA = b"\x03"


def sha256(data: bytes) -> bytes:
    """Digest of application data (tensors, token lists): tagged so it is never a tree node."""
    return hashlib.sha256(_DATA + data).digest()


def sha256_parts(*parts: bytes | memoryview) -> bytes:
    """`sha256(b"".join(parts))` without joining: a large tensor is hashed in place."""
    h = hashlib.sha256(_DATA)
    for part in parts:
        h.update(part)
    return h.digest()


def chain(previous: bytes, seq: int, request_digest: bytes) -> bytes:
    """Digest of an agreement log after appending one entry.

    Hashing the previous digest makes two logs that differ anywhere in their history
    differ at every later sequence number, so comparing one digest compares the history.
    """
    return hashlib.sha256(_CHAIN + previous + seq.to_bytes(8, "big") + request_digest).digest()


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """Root over already-hashed leaves, odd nodes promoted unchanged.

    An empty list has the null digest as root, so a zero-layer step is still well defined.
    """
    if not leaves:
        return NULL_DIGEST
    level = [hashlib.sha256(_LEAF + leaf).digest() for leaf in leaves]
    while len(level) > 1:
        nxt = [
            hashlib.sha256(_NODE + level[i] + level[i + 1]).digest()
            for i in range(0, len(level) - 1, 2)
        ]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def merkle_path(leaves: Sequence[bytes], index: int) -> tuple[tuple[bool, bytes], ...]:
    """Sibling hashes from leaf `index` to the root; `True` means the sibling is on the left.

    With it a verifier that re-ran one layer checks that layer's hash against a signed root
    without seeing the other layers' hashes.
    """
    if not 0 <= index < len(leaves):
        raise IndexError(f"leaf {index} is outside a tree of {len(leaves)} leaves")
    level = [hashlib.sha256(_LEAF + leaf).digest() for leaf in leaves]
    path: list[tuple[bool, bytes]] = []
    while len(level) > 1:
        sibling = index ^ 1
        if sibling < len(level):
            path.append((sibling < index, level[sibling]))
        nxt = [
            hashlib.sha256(_NODE + level[i] + level[i + 1]).digest()
            for i in range(0, len(level) - 1, 2)
        ]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
        index //= 2
    return tuple(path)


def verify_merkle_path(leaf: bytes, path: Sequence[tuple[bool, bytes]], root: bytes) -> bool:
    """True when `leaf` with `path` hashes up to `root`."""
    node = hashlib.sha256(_LEAF + leaf).digest()
    for left, sibling in path:
        pair = sibling + node if left else node + sibling
        node = hashlib.sha256(_NODE + pair).digest()
    return node == root
