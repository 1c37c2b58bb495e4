"""What every model family provides: a stage of layers `[start, end)` that runs forward.

A stage is the unit a node holds. The first stage of a pipeline owns the embedding and
takes token ids (or input vectors); the last owns the final norm and head and returns
logits; a stage in the middle takes and returns hidden states. There is one
implementation per model family, so this is a Protocol, not a base class.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from butterfly.runtime.kvcache import KVCache
from butterfly.runtime.linear import EXACT_ROWS
from butterfly.runtime.weights import CheckpointReader
from butterfly.runtime.wire import WireTensor
from butterfly.types.errors import ContextLengthExceeded, InvalidInput
from butterfly.types.model import LayerInfo, LayerRange


class Stage(Protocol):
    layers: LayerRange
    num_layers: int  # layers in the whole model
    max_context: int  # positions the model supports
    input_kind: str  # what the first stage takes: "tokens" or "vectors"

    @property
    def is_first(self) -> bool: ...

    @property
    def is_last(self) -> bool: ...

    def new_cache(self, batch: int = 1) -> KVCache | None:
        """A fresh per-request cache, or None for families that keep no state."""

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None,
        start_pos: int,
        *,
        last_only: bool = False,
        trace: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run this stage's layers on positions `[start_pos, start_pos + T)` of `x`.

        `x` is token ids [B, T] on a first stage, hidden states [B, T, D] otherwise. The
        last stage returns logits (or the final hidden states of an encoder); with
        `last_only` it returns them for the last position only, as generation needs.
        `trace`, when given, gets each layer's output in order, one per layer held: a node
        signs every step it computes with their hashes (dataplane.proving), so a family
        that could not trace could not be verified, and its honest nodes were blamed for
        the records they could not sign.
        """


@dataclass(frozen=True)
class Family:
    """A model family: how to read its config, cost its layers and load a stage."""

    name: str
    parse: Callable[[dict[str, Any]], Any]  # config.json -> the family's args dataclass
    num_layers: Callable[[Any], int]
    layer_infos: Callable[[Any], list[LayerInfo]]
    load_stage: Callable[[CheckpointReader, Any, LayerRange], Stage]
    input_kind: str = "tokens"  # what its first stage takes: "tokens" or "vectors"
    generates: bool = True
    """False for an encoder: its last stage gives hidden states, not next-token logits,
    and sampling a token from them would answer nonsense as if it were text."""


def cannot_generate(model: str) -> str:
    """Why a model whose family does not generate (`Family.generates`) is refused a
    generation, in the words of every place that refuses it (the API's 400s and
    `butterfly generate`), so an operator searching for one finds them all."""
    return (
        f"model {model!r} is an encoder: its last layer gives hidden states, "
        "not next-token logits, so it cannot generate text or score tokens"
    )


def check_positions(start_pos: int, length: int, max_context: int) -> None:
    if start_pos + length > max_context:
        raise ContextLengthExceeded(
            f"{start_pos + length} positions exceed the model's context of {max_context} "
            f"(input of {length} at position {start_pos})"
        )


def check_token_ids(ids: torch.Tensor, vocab_size: int) -> None:
    if ids.dtype not in (torch.int64, torch.int32):
        raise InvalidInput(f"token ids must be integers, got {ids.dtype}")
    if ids.numel():
        check_id_range(int(ids.min()), int(ids.max()), vocab_size)


def check_id_range(low: int, high: int, vocab_size: int) -> None:
    """Token ids from `low` to `high` are all in the vocabulary."""
    if low < 0 or high >= vocab_size:
        raise InvalidInput(f"token ids must lie in [0, {vocab_size}), got {low}..{high}")


def causal_mask(start_pos: int, length: int) -> torch.Tensor | None:
    """Boolean [T, start+T] mask for a chunk after cached positions; None when SDPA's
    own `is_causal` (chunk at 0) or no mask (one query) is exact."""
    if length == 1 or start_pos == 0:
        return None
    q = torch.arange(start_pos, start_pos + length).unsqueeze(1)
    k = torch.arange(start_pos + length).unsqueeze(0)
    return k <= q


def forward_rows(
    stage: Stage,
    x: torch.Tensor,
    caches: Sequence[KVCache | None],
    starts: Sequence[int],
    *,
    last_only: bool = False,
    trace: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Rows of `x` are separate requests; batched where the family can, else row by row.

    `trace`, when given, collects each layer's output [B, T, ...], for the per-layer
    hashes of a proof.
    """
    batched = getattr(stage, "forward_rows", None)
    if batched is not None:
        kwargs = {"trace": trace} if trace is not None else {}
        out: torch.Tensor = batched(x, caches, starts, last_only=last_only, **kwargs)
        return out
    traces: list[list[torch.Tensor]] = [[] for _ in starts]
    rows = [
        stage.forward(
            x[b : b + 1],
            caches[b],
            starts[b],
            last_only=last_only,
            trace=traces[b] if trace is not None else None,
        )
        for b in range(len(starts))
    ]
    if trace is not None:  # each layer's rows side by side, as a batched family gives them
        layers = zip(*traces, strict=True)
        trace.extend(layer[0] if len(layer) == 1 else torch.cat(layer) for layer in layers)
    return rows[0] if len(rows) == 1 else torch.cat(rows)


def packs(stage: Stage, request_ids: Sequence[object], lengths: Sequence[int]) -> bool:
    """Whether a step's entries run as one packed sequence (`forward_packed`): when they
    differ in length (a prompt's chunk beside decode steps, prompts of several lengths)
    and the family can. Entries of one length already share every product as rows of
    one batch; a request named twice (a replay beside a stale entry) runs entry by entry,
    each on the cache the one before it left."""
    return (
        hasattr(stage, "forward_packed")
        and len(set(lengths)) > 1
        and len(set(request_ids)) == len(request_ids)
    )


def forward_packed(
    stage: Stage,
    x: torch.Tensor,
    caches: Sequence[KVCache | None],
    starts: Sequence[int],
    lengths: Sequence[int],
    *,
    last_only: bool = False,
    trace: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Entries of different lengths side by side in `x` [1, N, ...], every product run
    once over all N rows (for a stage that `packs`); [1, N, ...] out, or each entry's
    last row with `last_only`."""
    packed = getattr(stage, "forward_packed", None)
    if packed is None or any(c is None for c in caches):
        raise ValueError("this stage does not run packed steps (runtime.stage.packs)")
    kwargs = {"trace": trace} if trace is not None else {}
    out: torch.Tensor = packed(x, caches, starts, lengths, last_only=last_only, **kwargs)
    return out


def forward_floats(
    stage: Stage, x: WireTensor, caches: Sequence[KVCache | None], starts: Sequence[int]
) -> bytes | None:
    """Decode rows on the wire's bytes, answered as bytes (a family's `forward_floats`),
    or None where the family or the step does not run that way: `forward_rows` then."""
    floats = getattr(stage, "forward_floats", None)
    if floats is None or any(c is None for c in caches):
        return None
    out: bytes | None = floats(x, caches, starts)
    return out


def prefill_outputs(
    stage: Stage,
    x: torch.Tensor,
    cache: KVCache | None,
    *,
    outputs_from: int = 0,
) -> torch.Tensor:
    """One sequence as a prefill from position 0, with outputs for positions
    [outputs_from, T) only. On a last stage the output layer is the costliest part of a
    prefill (a 32k vocabulary is worth two decoder layers per position), and an audit needs
    it only where tokens were sampled, not over the prompt.

    The sequence is cut where both parts have more than `EXACT_ROWS` rows (the tail may
    start a little before `outputs_from`; its extra rows are dropped), or not at all: a
    part of at most `EXACT_ROWS` rows runs its products in a shape of its own
    (runtime.linear.row_chunks), and oneDNN keeps a JIT-compiled kernel per shape and
    thread count (the audit runs on one thread). Cut at `outputs_from`, an auditor of the
    last stage met a new shape with most generation lengths up to 16 and grew by ~0.5 MB
    of kernel code each time, 6.7 MB/min in bench/soak.py."""
    length = x.shape[1]
    if outputs_from <= 0 or not stage.is_last:
        return forward_rows(stage, x, [cache], [0], last_only=False)
    if outputs_from >= length:
        raise ValueError(f"outputs from {outputs_from} of a {length}-position sequence")
    cut = min(outputs_from, length - EXACT_ROWS - 1)
    if cut <= EXACT_ROWS:
        out = forward_rows(stage, x, [cache], [0], last_only=False)
        return out[:, outputs_from:]
    forward_rows(stage, x[:, :cut], [cache], [0], last_only=True)
    out = forward_rows(stage, x[:, cut:], [cache], [cut], last_only=False)
    return out[:, outputs_from - cut :]
