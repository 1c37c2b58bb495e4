"""A request as the scheduler holds it, and the result it returns."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from butterfly.types.errors import InvalidInput
from butterfly.types.ids import NodeId, RequestId
from butterfly.types.model import LayerRange

SEED_SPAN = 1 << 63
"""Seeds run from 0 below this: torch.Generator.manual_seed takes a 64-bit seed."""


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen from logits; temperature 0 means greedy."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 1.0  # 1.0 = no nucleus cut
    seed: int | None = None  # None: fresh per run; `Scheduler.submit` draws one to store
    # OpenAI's penalties, subtracted from the logits of tokens already generated (greedy
    # included): presence once per token that occurred, frequency once per occurrence
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None = none; k = the chosen token's and the k likeliest
    # None = none; k = each prompt token's (from the second) and the k likeliest there: the
    # prefill's last stage then answers every position's logits, not the last one's only
    prompt_logprobs: int | None = None
    # OpenAI's logit bias: (token id, value) pairs, ids increasing, each value added to its
    # token's logit before every choice (greedy included); -100 all but bans a token
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        """Every way in (the HTTP APIs, the CLI, a checkpoint) gets the same checks, and
        a value torch would only fail on mid-request (a NaN temperature, a top_p of 0:
        'probability tensor contains nan') is refused up front, naming itself."""
        if not 0.0 <= self.temperature < math.inf:
            raise InvalidInput(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidInput(f"top_k must be >= 0 (0: no cut), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidInput(f"top_p must be in (0, 1] (1: no cut), got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < SEED_SPAN:
            raise InvalidInput(f"seed must be in [0, 2**63), got {self.seed}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -math.inf < value < math.inf:
                raise InvalidInput(f"{name} must be a finite number, got {value}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise InvalidInput(f"{name} must be >= 0, got {value}")
        ids = [token for token, _ in self.logit_bias]
        if any(b <= a for a, b in itertools.pairwise(ids)) or (ids and ids[0] < 0):
            raise InvalidInput(f"logit_bias must name distinct token ids >= 0 in order, got {ids}")
        for token, value in self.logit_bias:
            if not -math.inf < value < math.inf:
                raise InvalidInput(f"logit_bias of token {token} must be finite, got {value}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass(frozen=True)
class Sampled:
    """A sampled token with its log-probability under the model's distribution (the
    log-softmax of the logits, before temperature, cuts and penalties, as vLLM reports
    it) and the `k` likeliest alternatives, for requests that ask for logprobs."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class InferenceTask:
    """One accepted request. Exactly one of `input_ids` and `input_vector` is set."""

    task_id: RequestId
    input_ids: tuple[int, ...] = ()
    input_vector: tuple[float, ...] = ()
    max_new_tokens: int = 16
    # generation ends at the token whose text completes one of these (as at end of
    # sequence): the engine detokenizes as it goes, so no work is spent past a stop
    stop: tuple[str, ...] = ()
    sampling: SamplingParams = SamplingParams()
    priority: int = 0
    created_at: float = 0.0


@dataclass(frozen=True)
class StageRecord:
    """Which node computed which layers of a result."""

    node: NodeId
    layers: LayerRange


@dataclass(frozen=True)
class InferenceResult:
    task_id: RequestId
    output_ids: tuple[int, ...] = ()
    output_vector: tuple[float, ...] = ()
    text: str = ""
    verified: str = "none"  # which check the result passed: "none", "audit", "replicate"
    stages: tuple[StageRecord, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)
    # the signed record of every stage step that produced the output (encoded `Proof`s of
    # butterfly.protocol), kept with the result so a client can check who computed what
    proofs: tuple[bytes, ...] = ()
    # per output token when the request asked for logprobs (tokens a gateway resumed
    # from a dead one's checkpoint have none, so it may be shorter than output_ids)
    logprobs: tuple[Sampled, ...] = ()
    # positions 1..T-1 of the prompt when the request asked (`prompt_logprobs`): each
    # prompt token's logprob given the tokens before it (position 0 has none)
    prompt_logprobs: tuple[Sampled, ...] = ()
    # `text` ends before the stop string that ended the generation, as the completion's
    # text does: the scheduler keeps it rather than decoding `output_ids` over it
    cut_at_stop: bool = False
