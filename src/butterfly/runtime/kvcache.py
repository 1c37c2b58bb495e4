"""Per-request key/value cache of one stage, and its snapshot at a token position.

Storage grows in chunks instead of being allocated for the whole context up front: a node
holds a cache per request in flight, and most requests are far shorter than the context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from butterfly.types.errors import WireFormatError

CHUNK = 256


class Storage(NamedTuple):
    """A cache's tensors as one snapshot: every layer's keys and values, their addresses
    (layer 0's key, its value, layer 1's key, ...) and the positions each holds."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    addresses: tuple[int, ...]
    capacity: int


@dataclass(frozen=True)
class KVSnapshot:
    """The first `position` tokens of every layer's keys and values, detached copies."""

    position: int
    keys: tuple[torch.Tensor, ...]  # per layer [B, H_kv, position, D]
    values: tuple[torch.Tensor, ...]

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, (k, v) in enumerate(zip(self.keys, self.values, strict=True)):
            out[f"k{i}"], out[f"v{i}"] = k, v
        return out

    @classmethod
    def from_tensors(cls, position: int, tensors: dict[str, torch.Tensor]) -> KVSnapshot:
        n = len(tensors) // 2
        try:
            keys = tuple(tensors[f"k{i}"] for i in range(n))
            values = tuple(tensors[f"v{i}"] for i in range(n))
        except KeyError as e:
            raise WireFormatError(f"KV snapshot lacks tensor {e}") from e
        if any(
            k.shape[2] != position or v.shape != k.shape for k, v in zip(keys, values, strict=True)
        ):
            raise WireFormatError(f"KV snapshot tensors do not match position {position}")
        return cls(position, keys, values)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


class KVCache:
    """Keys and values for `num_layers` consecutive layers; `length` tokens are valid."""

    def __init__(
        self,
        num_layers: int,
        batch: int,
        kv_heads: int,
        head_dim: int,
        max_length: int,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.num_layers, self.batch, self.kv_heads, self.head_dim = (
            num_layers,
            batch,
            kv_heads,
            head_dim,
        )
        self.max_length = max_length
        self.dtype = dtype
        self.length = 0
        # one object, replaced whole: a compiled writer on the torch thread reads it while
        # the event loop may grow the cache (a standby's copy being extended), and parts
        # assigned one by one could pair new tensors with the old ones' addresses
        self._storage = Storage([], [], (), 0)

    @property
    def _k(self) -> list[torch.Tensor]:
        return self._storage.keys

    @property
    def _v(self) -> list[torch.Tensor]:
        return self._storage.values

    @property
    def _capacity(self) -> int:
        return self._storage.capacity

    def _grow(self, needed: int) -> None:
        capacity = min(self.max_length, max(needed, self._capacity * 2, CHUNK))
        shape = (self.batch, self.kv_heads, capacity, self.head_dim)
        new_k = [torch.empty(shape, dtype=self.dtype) for _ in range(self.num_layers)]
        new_v = [torch.empty(shape, dtype=self.dtype) for _ in range(self.num_layers)]
        for old, new in ((self._k, new_k), (self._v, new_v)):
            for o, n in zip(old, new, strict=False):
                n[:, :, : self.length] = o[:, :, : self.length]
        addresses = tuple(t.data_ptr() for pair in zip(new_k, new_v, strict=True) for t in pair)
        self._storage = Storage(new_k, new_v, addresses, capacity)

    def update(
        self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, H_kv, T, D] at positions [start, start+T); return all keys so far."""
        end = start + k.shape[2]
        self.reserve(end)
        self._k[layer][:, :, start:end] = k
        self._v[layer][:, :, start:end] = v
        return self._k[layer][:, :, :end], self._v[layer][:, :, :end]

    def reserve(self, end: int) -> None:
        """Storage for positions up to `end`, for a writer that fills them in place
        (runtime/fused_layers.py)."""
        if end > self._capacity:
            self._grow(end)

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def storage(self) -> Storage:
        """Every layer's key and value storage with their addresses (layer 0's key, its
        value, layer 1's key, ...) and the positions they hold, as one snapshot. A
        compiled writer holds it until it returns: growing replaces it (a standby's copy
        extended from the event loop meanwhile) and would free the tensors it writes.
        Read per step, so the addresses are kept from the last growth, not asked of each
        tensor again: with the call's other preparation, 24 µs of a tiny-model layer's
        68 µs step (AMD EPYC)."""
        return self._storage

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s whole key and value storage, [B, H_kv, capacity, D] each."""
        return self._k[layer], self._v[layer]

    def advance(self, end: int) -> None:
        """Mark positions up to `end` valid, once every layer has written them."""
        self.length = end

    def truncate(self, position: int) -> None:
        self.length = min(self.length, position)

    def snapshot(self, position: int | None = None) -> KVSnapshot:
        pos = self.length if position is None else position
        if not 0 <= pos <= self.length:
            raise ValueError(f"cannot snapshot at {pos}: the cache holds {self.length} tokens")
        keys = tuple(k[:, :, :pos].clone() for k in self._k) if pos else self._empty()
        values = tuple(v[:, :, :pos].clone() for v in self._v) if pos else self._empty()
        return KVSnapshot(pos, keys, values)

    def rows(self, start: int, end: int) -> torch.Tensor:
        """Positions [start, end) of every layer as one tensor [2 * layers, B, H_kv, T, D]
        (keys then values per layer): what a standby needs to extend its copy."""
        if not 0 <= start <= end <= self.length:
            raise ValueError(f"rows [{start}, {end}) outside the {self.length} cached")
        return torch.stack(
            [t[:, :, start:end] for pair in zip(self._k, self._v, strict=True) for t in pair]
        )

    def write(self, start: int, rows: torch.Tensor) -> None:
        """Extend (or overwrite from `start`) with `rows` as made by `rows()`; positions
        past `start` that were cached before are dropped."""
        expected = (2 * self.num_layers, self.batch, self.kv_heads)
        if rows.ndim != 5 or tuple(rows.shape[:3]) != expected or rows.shape[4] != self.head_dim:
            raise WireFormatError(
                f"KV rows of shape {tuple(rows.shape)} do not fit this cache "
                f"([{2 * self.num_layers}, {self.batch}, {self.kv_heads}, T, {self.head_dim}])"
            )
        if not 0 <= start <= self.length:
            raise WireFormatError(f"KV rows at {start} leave a gap after {self.length} cached")
        end = start + rows.shape[3]
        if end > self.max_length:
            raise WireFormatError(f"KV rows end at {end}, past the context of {self.max_length}")
        if end > self._capacity:
            self._grow(end)
        for i in range(self.num_layers):
            self._k[i][:, :, start:end] = rows[2 * i]
            self._v[i][:, :, start:end] = rows[2 * i + 1]
        self.length = end

    def _empty(self) -> tuple[torch.Tensor, ...]:
        shape = (self.batch, self.kv_heads, 0, self.head_dim)
        return tuple(torch.empty(shape, dtype=self.dtype) for _ in range(self.num_layers))

    def restore(self, snap: KVSnapshot) -> None:
        if len(snap.keys) != self.num_layers:
            raise WireFormatError(
                f"snapshot holds {len(snap.keys)} layers, this stage has {self.num_layers}"
            )
        expected = (self.batch, self.kv_heads, snap.position, self.head_dim)
        if any(tuple(k.shape) != expected for k in (*snap.keys, *snap.values)):
            raise WireFormatError(f"snapshot tensors do not have shape {expected}")
        self.length = 0
        if snap.position > self._capacity:
            self._grow(snap.position)
        for i in range(self.num_layers):
            self._k[i][:, :, : snap.position] = snap.keys[i]
            self._v[i][:, :, : snap.position] = snap.values[i]
        self.length = snap.position

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self._k, *self._v))
