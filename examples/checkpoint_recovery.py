"""Seed 000's "Checkpoint Recovery" example, on the checkpoints a running cluster keeps.

A generation has two kinds of checkpoint in Butterfly (DESIGN.md section 3):
- the canonical one, its token history and sampling RNG, kept by the gateway for every
  token (`dataplane.engine.PipelineEngine`), from which any stage can be recomputed;
- KV-cache snapshots: every `coordination.checkpoint_frequency` positions the node running
  a stage copies the positions its cache gained to the standbys of its layer range
  (`dataplane.stage_server.StageServer.kv_deltas`, a `KvAppend` each), so a standby that
  takes the stage over recomputes only the positions after the latest copy.

Here a tiny demo model runs as one stage on node 1 with node 2 as its standby: two real
`StageServer`s with checkpoint frequency 5. This script plays the gateway: it samples
every token (seeded, so the RNG state matters), hands each `KvAppend` to the standby as
the node's dispatcher would, and after 23 tokens node 1 fails. The plan of the next epoch
puts the stage on node 2, and the request resumes where the gateway's engine resumes it:
at the fewest positions any stage of the new plan still holds (`CacheQuery`), replaying
the token history from there as one step. The tokens after the failure are checked
against the same generation in one process with no failure (`runtime.generate`).

Where it departs from the seed: position 0 has no snapshot (an empty cache has nothing
to copy), so the copies are at 5, 10, 15 and 20; and the stats are the bytes copied to
the standby, not of checkpoint objects.

    .venv/bin/python examples/checkpoint_recovery.py
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import torch

from butterfly.dataplane.stage_server import StageServer
from butterfly.runtime.demo import create_demo
from butterfly.runtime.generate import generate
from butterfly.runtime.loader import load_stage
from butterfly.runtime.sampling import make_generator, sample
from butterfly.runtime.torch_thread import TorchThread
from butterfly.runtime.wire import decode_tensor, encode_tensor
from butterfly.types.ids import NodeId
from butterfly.types.model import LayerRange
from butterfly.types.plan import StagePlan
from butterfly.types.tasks import SamplingParams
from butterfly.types.wire.data import CacheQuery, KvAppend, StageStep

FREQUENCY = 5  # coordination.checkpoint_frequency: copy the KV cache every 5 positions
FAIL_AT = 23
SAMPLING = SamplingParams(temperature=0.8, seed=7)
MAX_BYTES = 1 << 26
REQUEST = "request-1"
PROMPT = [1]  # one token, so KV positions count the generated tokens as the seed does


async def run(model: Path, torch_thread: TorchThread) -> None:
    everything = load_stage(model)
    layers = LayerRange(0, everything.layers.end)
    reference = list(generate([everything], PROMPT, FAIL_AT + 2, SAMPLING))

    def server(node: int) -> StageServer:
        return StageServer(
            node=NodeId(node),
            model_dir=model,
            max_tensor_bytes=MAX_BYTES,
            torch_thread=torch_thread,
            snapshot_every=FREQUENCY,
        )

    chain, standby = server(1), server(2)
    plan = StagePlan(1, ((NodeId(1), layers),), replicas=((NodeId(2), layers),))
    for node in (chain, standby):
        await node.apply_plan(plan.to_message("demo"))

    copies: list[int] = []  # bytes of each KV copy the standby received
    rng = make_generator(SAMPLING)  # the gateway's: part of the canonical checkpoint
    history, step = list(PROMPT), 0

    async def next_token(node: StageServer, start: int) -> int:
        nonlocal step
        step += 1
        x = torch.tensor([history[start:]], dtype=torch.int64)
        msg = StageStep((REQUEST,), (step,), (start,), (x.shape[1],), (), 0, True)
        out, _ = await node.compute(msg, node.epoch, encode_tensor(x))
        for delta in node.kv_deltas((REQUEST,)):  # what the dispatcher sends on
            if isinstance(delta.msg, KvAppend) and delta.peer == standby.node:
                standby.on_kv_append(delta.msg, delta.payload)
                copies.append(len(delta.payload))
                end = standby.cache_lengths(CacheQuery((REQUEST,))).lengths[0]
                print(f"Checkpoint created at token position {end}")
        logits = decode_tensor(out, MAX_BYTES)
        return sample(logits[0, -1], SAMPLING, rng)

    while len(history) - len(PROMPT) < FAIL_AT:
        history.append(await next_token(chain, len(history) - 1 if step else 0))

    print(f"\nFailure at position {FAIL_AT}, recovering...")
    after = StagePlan(2, ((NodeId(2), layers),))  # the next epoch: the standby runs it
    await standby.apply_plan(after.to_message("demo"))
    held = standby.cache_lengths(CacheQuery((REQUEST,))).lengths[0]
    resume = max(0, min(held, len(history) - 1))  # as PipelineEngine._resume_at decides
    print(f"Recovered from checkpoint at position {resume} (epoch {after.epoch})")
    print(f"Recomputing: {resume} -> {FAIL_AT}")
    history.append(await next_token(standby, resume))
    history.append(await next_token(standby, len(history) - 1))

    generated = history[len(PROMPT) :]
    same = generated == reference
    print(f"Tokens {FAIL_AT + 1} and {FAIL_AT + 2}: {generated[FAIL_AT:]}, ", end="")
    print(f"the same as without the failure: {str(same).lower()}")

    print("\nCheckpoint stats:")
    print(f"  Total created: {len(copies)}")
    print(f"  Positions held by the standby: {held}")
    print(f"  Total size: {sum(copies) / 1024:.1f} KB")
    print(f"  Average size: {sum(copies) // max(1, len(copies))} bytes")
    if not same:
        raise SystemExit(f"recovery changed the tokens: {generated} != {reference}")


def main() -> None:
    torch_thread = TorchThread(name="example-torch")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model = create_demo(Path(tmp) / "tiny", "tiny", seed=0)
            asyncio.run(run(model, torch_thread))
    finally:
        torch_thread.close(wait=True)


if __name__ == "__main__":
    main()
