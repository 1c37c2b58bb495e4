"""Ed25519 keys, signatures over canonical bytes, and a memo of verified signatures.

Nodes cannot forge each other's signatures (DESIGN.md section 3), so every protocol
message is signed by its author and may be relayed by anyone. Verification is a pure
function of (public key, signature, bytes); a relayed or duplicated message is therefore
verified once per process and remembered, which matters because a broadcast reaches every
replica and relays repeat it.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import replace
from typing import TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from butterfly.types.wire.agreement import Message, signing_bytes

PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64


class SigningKey:
    """A node's private key; `public` is what peers put in their key tables."""

    __slots__ = ("_key", "public")

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public: bytes = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> SigningKey:
        """Deterministic key from 32 bytes: simulations replay the same keys from a seed."""
        if len(seed) != 32:
            raise ValueError(f"an Ed25519 seed is 32 bytes, got {len(seed)}")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    def sign(self, data: bytes) -> bytes:
        """Ed25519 is deterministic, so the same bytes always give the same signature."""
        return self._key.sign(data)

    def __repr__(self) -> str:
        return f"SigningKey(public={self.public.hex()[:16]}...)"


@functools.lru_cache(maxsize=256)
def _public_key(raw: bytes) -> Ed25519PublicKey | None:
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        return None


# Both caches below hold what they remember (the signed bytes, the message): at 16384
# and 8192 entries they filled for 30 minutes or more under steady load, one proof
# record per stage and token and ~10 agreement messages a second, and showed in a node's
# memory as ~1 MB/min of growth (bench/soak.py). Re-checks come soon after the first
# check (the parts of one step, a view change quoting recent votes), so a few seconds'
# worth is enough; a miss costs one Ed25519 verification (~60 us).
VERIFIED_CACHE = 2048


@functools.lru_cache(maxsize=VERIFIED_CACHE)
def verify_bytes(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """True when `signature` is `public_key`'s Ed25519 signature over `data`.

    Cached: votes and proof records are checked again by several parts of a node.
    """
    return verify_once(public_key, signature, data)


def verify_once(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """`verify_bytes` without the cache, for data seen once (heartbeats).

    Never raises on peer input: a malformed key or signature is simply not valid.
    """
    if len(public_key) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        return False
    key = _public_key(public_key)
    if key is None:
        return False
    try:
        key.verify(signature, data)
    except InvalidSignature:
        return False
    return True


M = TypeVar("M", bound=Message)


def sign_message(message: M, key: SigningKey) -> M:
    """`message` with its signature over every other field (`signing_bytes`)."""
    return replace(message, signature=key.sign(signing_bytes(message)))


_CHECKED: OrderedDict[int, tuple[Message, bytes, bool]] = OrderedDict()
_CHECKED_MAX = VERIFIED_CACHE


def verify_message(message: Message, public_key: bytes) -> bool:
    """True when `message` is signed by the holder of `public_key`; unsigned is invalid.

    The same message object is checked again and again (a view change is re-validated
    inside every new-view that quotes it), so results are remembered per object; the
    entry holds the object itself, so its id cannot be reused while remembered.
    """
    if not message.signature:
        return False
    hit = _CHECKED.get(id(message))
    if hit is not None and hit[0] is message and hit[1] == public_key:
        return hit[2]
    ok = verify_bytes(public_key, message.signature, signing_bytes(message))
    _CHECKED[id(message)] = (message, public_key, ok)
    if len(_CHECKED) > _CHECKED_MAX:
        _CHECKED.popitem(last=False)
    return ok


def forget_verifications() -> None:
    """Drop remembered signature checks, so an in-process benchmark of several replicas
    pays for every verification as separate processes would.
    """
    _CHECKED.clear()
    verify_bytes.cache_clear()
