"""Streaming cost per token against output length: is token 1000 as cheap as token 10?

What a streamed token costs the gateway beyond the model: its text (incremental
detokenization), the stop-string scan and the SSE chunk (a completion object as JSON).
This script pushes a 1024-token output through exactly the code a stream runs
(`api.openai_choices.ChoiceText` and `api.openai.CompletionChunks`) and times each token,
`--runs` times over; it reports the per-token cost over tokens 1-32 and 993-1024 and
their ratio (flat = 1.0). The reference, in the same run, is what streaming did before
(decode the whole sequence again on every token: O(n) per token).

    python bench/streaming.py [--tokens 1024] [--runs 30]

Prints one JSON object; times in microseconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

from tokenizers import Tokenizer

from butterfly.api.openai import CompletionChunks
from butterfly.api.openai_choices import ChoiceText, StopScanner
from butterfly.api.openai_run import Run, sse
from butterfly.api.openai_schema import CompletionRequest
from butterfly.runtime.tokenizer import TextCodec
from butterfly.types.ids import RequestId
from butterfly.types.tasks import InferenceTask
from common import bench_model, machine, summary

TEXT = (
    "The butterfly rests on a warm stone, its wings folded, while the river carries "
    "leaves past the old mill. Ünïcödé, 日本語 and emoji 🦋 keep the decoder honest. "
)
WINDOW = 32


class _Names:
    """What `CompletionChunks` reads from the gateway."""

    model_name = "bench"


def tokens(codec: TextCodec, n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids += codec.tokenizer.encode(TEXT, add_special_tokens=False).ids
    return ids[:n]


def streamed(codec: TextCodec, ids: list[int], stops: tuple[str, ...]) -> list[float]:
    """Microseconds per token through the stream's own code (text, stop scan, chunk)."""
    task = InferenceTask(task_id=RequestId("bench"))
    choice = ChoiceText(0, codec.tokenizer, StopScanner(stops), frozenset())
    run = Run(gw=None, tasks=[task], choices=[choice], prompt=[])  # type: ignore[arg-type]
    chunks = CompletionChunks(_Names(), 0, CompletionRequest(model="bench", prompt="x"))  # type: ignore[arg-type]
    out = []
    for token in ids:
        t0 = time.perf_counter_ns()
        if text := choice.push(token):
            sse(chunks.delta(run, choice, text))
        out.append((time.perf_counter_ns() - t0) / 1e3)
    return out


def redecoded(tokenizer: Tokenizer, ids: list[int]) -> list[float]:
    """The reference: the whole sequence decoded again for every token."""
    out, sent, seen = [], "", []
    for token in ids:
        t0 = time.perf_counter_ns()
        seen.append(token)
        text = tokenizer.decode(seen, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            delta, sent = text[len(sent) :], text
            sse({"choices": [{"text": delta}]})
        out.append((time.perf_counter_ns() - t0) / 1e3)
    return out


def windows(runs: list[list[float]], n: int) -> dict[str, Any]:
    """Per-token cost (each token's median over runs) over the first and last WINDOW."""
    per_token = [statistics.median(r[i] for r in runs) for i in range(n)]
    first, last = per_token[:WINDOW], per_token[n - WINDOW :]
    return {
        f"tokens_1_{WINDOW}_us": summary(first),
        f"tokens_{n - WINDOW + 1}_{n}_us": summary(last),
        "last_over_first": round(statistics.median(last) / statistics.median(first), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    codec = TextCodec.load(bench_model("small"))
    ids = tokens(codec, args.tokens)
    stops = ("\n\nUser:", "###")
    new = [streamed(codec, ids, stops) for _ in range(args.runs)]
    old = [redecoded(codec.tokenizer, ids) for _ in range(args.runs)]
    print(
        json.dumps(
            {
                "benchmark": "streaming_cost_per_token",
                "machine": machine(),
                "tokens": args.tokens,
                "runs": args.runs,
                "stop_strings": len(stops),
                "incremental": windows(new, args.tokens),
                "reference_redecode": windows(old, args.tokens),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
