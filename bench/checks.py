"""What the byte checks add to one decoded token, against that token's compute, in one run.

Issue 12's target: identity and byte checks add at most 5% to per-token decode on the
4-node small-model cluster. Identity costs nothing per token (the handshake runs once a
connection; attributing a frame to its peer is a field read). The byte checks run per
token on the critical path of the chain, one after another:

- every stage signs a record of exactly what it received and what it sends
  (`Prover.prove`: sha256 of both, the per-layer Merkle root, the fingerprint, Ed25519);
- stage k checks the k earlier stages' records against the bytes it received
  (`check_records`: k signature checks, the chain of hashes, sha256 of its input);
- the gateway checks the last stage's logits against all the records (`culprit`).

A cluster's per-token time is too noisy on a shared 2-core machine to resolve 5% in a
few runs (docs/PERFORMANCE-LOG.md), so this measures the checks and the compute they guard
in the same process, interleaved round by round: the small model's decode step through
Butterfly's runtime (the 4 stages in one process, as `bench/pipeline.py`'s reference),
and the production check functions on tensors of the same shapes. The ratio of the two
is the checks' share of a token's compute; transport and scheduling, which a cluster
adds, only make it smaller.

    python bench/checks.py [--rounds 7] [--stages 4] [--size small]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch

from butterfly.dataplane.proving import Prover, check_records, culprit, decode_proofs, digest
from butterfly.partition.strategies import uniform_ranges
from butterfly.protocol.sign import SigningKey
from butterfly.runtime.loader import load_stage, num_layers
from butterfly.types.ids import NodeId, RequestId, StageIndex
from butterfly.types.model import LayerRange
from butterfly.types.plan import Epoch
from common import bench_model, machine, summary
from runtime import PROMPT, butterfly_session, one_round

TOKENS = 64


def checks_per_token(hidden: int, vocab: int, ranges: list[LayerRange]) -> float:
    """Seconds of byte checks one decoded token costs along a chain of `ranges`."""
    n = len(ranges)
    keys = [SigningKey.generate() for _ in range(n)]
    public = {NodeId(i): k.public for i, k in enumerate(keys)}
    provers = [Prover(NodeId(i), k, keys=public) for i, k in enumerate(keys)]
    request, epoch = RequestId("bench"), Epoch(1)
    started = time.perf_counter()
    for step in range(1, TOKENS + 1):
        x = torch.randn(1, 1, hidden)
        sent = digest(x)
        records: list[bytes] = []
        for i, r in enumerate(ranges):
            if i:  # the stage checks the earlier records against its input
                check_records(
                    decode_proofs(records),
                    keys=public,
                    request_id=request,
                    step=step,
                    upto=i,
                    received=x,
                    signers=lambda s: (NodeId(s),),
                    epoch=1,
                )
            out = torch.randn(1, 1, vocab if i == n - 1 else hidden)
            layer_outputs = [torch.randn(1, 1, hidden) for _ in range(r.end - r.start)]
            records.append(
                provers[i].prove(
                    epoch=epoch,
                    request_id=request,
                    step=step,
                    stage=StageIndex(i),
                    layers=r,
                    x_in=x,
                    out=out,
                    layer_outputs=layer_outputs,
                )
            )
            x = out
        blamed = culprit(
            decode_proofs(records),
            keys=public,
            request_id=request,
            step=step,
            upto=n,
            received=x,
            signers=lambda s: (NodeId(s),),
            epoch=1,
            peer=NodeId(n - 1),
            sent=sent,
        )
        assert blamed is None, blamed  # honest records: the check must pass
    return (time.perf_counter() - started) / TOKENS


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--size", default="small")
    args = ap.parse_args()
    model = bench_model(args.size)
    total = num_layers(model)
    ranges = uniform_ranges(total, args.stages)
    stages = [load_stage(model, r) for r in ranges]
    cfg = json.loads((model / "config.json").read_text())
    hidden, vocab = int(cfg["hidden_size"]), int(cfg["vocab_size"])
    prompt = torch.randint(5, vocab, (1, PROMPT))
    new = butterfly_session(stages)
    one_round(new, prompt)  # warm-up: first calls pay for allocation and packing
    checks_per_token(hidden, vocab, ranges)
    decode_ms: list[float] = []
    checks_ms: list[float] = []
    ratios: list[float] = []
    for _ in range(args.rounds):
        _, decode, _ = one_round(new, prompt)
        d = sorted(decode)[len(decode) // 2]
        c = checks_per_token(hidden, vocab, ranges) * 1000
        decode_ms.append(d)
        checks_ms.append(c)
        ratios.append(c / d)
    result: dict[str, Any] = {
        "benchmark": "checks",
        "machine": machine(),
        "model": f"demo-{args.size}",
        "stages": args.stages,
        "hidden": hidden,
        "vocab": vocab,
        "decode_ms_per_token": summary(decode_ms),
        "checks_ms_per_token": summary(checks_ms),
        "checks_over_decode": summary(ratios),
        "target_at_most": 0.05,
        "met": sorted(ratios)[len(ratios) // 2] <= 0.05,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
