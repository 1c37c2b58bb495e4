"""A model cheap enough to run ten thousand seeded data-path schedules in minutes.

The data-path simulation (`sim_datapath`) is about who checks what and who is evicted,
not about the numbers a transformer produces, so its stages compute integer arithmetic on
tiny tensors (`SimStage`): exact, so a prefill and a run of decode steps give identical
outputs and an honest node never drifts. Everything around the computation is the
production code: the stage server (`dataplane.stage_server.StageServer`, signing with its
`Prover`), the gateway's engine, auditor and replicator. `SimReferee` is the gateway's
re-execution on this model, and `InlineTorch` runs "torch work" on the caller's thread
(the simulation has no event loop latency to protect).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import TypeVar

import torch

from butterfly.dataplane.referee import Referee
from butterfly.runtime.kvcache import KVCache
from butterfly.runtime.stage import prefill_outputs
from butterfly.runtime.torch_thread import TorchThread
from butterfly.types.model import LayerRange

T = TypeVar("T")

VOCAB = 16
WIDTH = 8
HIDDEN_MOD = 31.0  # hidden values are integers in [0, 31): sums stay exact in float32
LOGIT_MOD = 97.0
MAX_CONTEXT = 64


def _table(seed: int, *shape: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 4, shape, generator=g).to(torch.float32)


EMBED = _table(1, VOCAB, WIDTH)
HEAD = _table(2, WIDTH, VOCAB)
_WEIGHTS: dict[int, torch.Tensor] = {}


def _weight(layer: int) -> torch.Tensor:
    w = _WEIGHTS.get(layer)
    if w is None:
        w = _WEIGHTS[layer] = _table(100 + layer, WIDTH, WIDTH)
    return w


class SimStage:
    """Layers [start, end) of a `num_layers` model over a 16-token vocabulary.

    Position-wise (it keeps no cache, like a family without state): layer l maps a row h
    at position p to (h @ W_l + p + l) mod 31; the first stage embeds token ids, the last
    projects to logits (h @ H) mod 97. Every value is a small integer held in float32.
    """

    max_context = MAX_CONTEXT
    input_kind = "tokens"

    def __init__(self, layers: LayerRange, num_layers: int) -> None:
        self.layers, self.num_layers = layers, num_layers

    @property
    def is_first(self) -> bool:
        return self.layers.start == 0

    @property
    def is_last(self) -> bool:
        return self.layers.end == self.num_layers

    def new_cache(self, batch: int = 1) -> KVCache | None:
        return None

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None,
        start_pos: int,
        *,
        last_only: bool = False,
        trace: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        return self.forward_rows(x, [cache], [start_pos], last_only=last_only, trace=trace)

    def forward_rows(
        self,
        x: torch.Tensor,
        caches: Sequence[KVCache | None],
        starts: Sequence[int],
        *,
        last_only: bool = False,
        trace: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Rows of `x` are requests at positions `starts[b]`, `starts[b] + 1`, ..."""
        h = EMBED[x.long().clamp(0, VOCAB - 1)] if self.is_first else x.to(torch.float32)
        positions = torch.tensor(starts, dtype=torch.float32).reshape(-1, 1, 1) + torch.arange(
            h.shape[1], dtype=torch.float32
        ).reshape(1, -1, 1)
        for layer in range(self.layers.start, self.layers.end):
            h = torch.remainder(h @ _weight(layer) + positions + layer, HIDDEN_MOD)
            if trace is not None:
                trace.append(h)
        if self.is_last:
            h = torch.remainder(h @ HEAD, LOGIT_MOD)
            if last_only:
                h = h[:, -1:]
        return h


def reference_tokens(prompt: Sequence[int], new_tokens: int, num_layers: int) -> list[int]:
    """Greedy generation on one whole-model stage: what every verified answer must equal."""
    stage = SimStage(LayerRange(0, num_layers), num_layers)
    ids = list(prompt)
    out: list[int] = []
    for _ in range(new_tokens):
        logits = stage.forward(torch.tensor([ids]), None, 0, last_only=True)
        token = int(torch.argmax(logits[0, -1]).item())
        out.append(token)
        ids.append(token)
    return out


class InlineTorch(TorchThread):
    """Runs each job on the calling thread: no worker thread, no hand-off."""

    def __init__(self) -> None:
        pass

    async def run(self, fn: Callable[[], T], kind: Hashable = None) -> T:
        return fn()

    def close(self, *, wait: bool = False) -> None:
        pass


class SimReferee(Referee):
    """The gateway's own re-execution of a stage of the sim model."""

    def __init__(self, num_layers: int) -> None:
        super().__init__(Path("sim-model"), InlineTorch())
        self._layers = num_layers
        self.runs = 0  # re-executions asked for: disputes the gateway had to settle

    async def run(
        self, layers: LayerRange, x: torch.Tensor, *, outputs_from: int = 0
    ) -> torch.Tensor:
        self.runs += 1
        stage = SimStage(layers, self._layers)
        return prefill_outputs(stage, x, None, outputs_from=outputs_from)
