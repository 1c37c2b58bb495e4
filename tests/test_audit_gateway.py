"""The audit re-runs every stage on another holder except the gateway's own, whose kept
outputs it takes as computed (the client trusts the gateway)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch

from butterfly.dataplane.audit import Auditor, Claim, Referee
from butterfly.dataplane.proving import Prover
from butterfly.protocol.proof import Tolerance
from butterfly.protocol.sign import SigningKey
from butterfly.runtime.loader import load_stage
from butterfly.runtime.stage import prefill_outputs
from butterfly.runtime.torch_thread import TorchThread
from butterfly.runtime.wire import decode_tensor, encode_tensor
from butterfly.types.ids import NodeId
from butterfly.types.model import LayerRange
from butterfly.types.plan import StagePlan
from butterfly.types.wire.agreement import Proof, decode
from butterfly.types.wire.data import AuditReply, AuditRequest

FIRST, SECOND = LayerRange(0, 2), LayerRange(2, 4)
KEYS = {NodeId(n): SigningKey.generate() for n in range(4)}
PLAN = StagePlan(
    1, ((NodeId(0), FIRST), (NodeId(1), SECOND)), ((NodeId(2), FIRST), (NodeId(3), SECOND))
)


def test_only_stages_not_run_by_the_gateway_are_re_run(tiny_model: Path) -> None:
    stages = {r: load_stage(tiny_model, r) for r in (FIRST, SECOND)}
    ids = torch.tensor([[5, 9, 2, 7, 1, 8]])
    with torch.inference_mode():
        hidden = prefill_outputs(stages[FIRST], ids, stages[FIRST].new_cache())
        logits = prefill_outputs(stages[SECOND], hidden, stages[SECOND].new_cache())

    def claim(
        node: int, index: int, layers: LayerRange, x: torch.Tensor, out: torch.Tensor, start: int
    ) -> Claim:
        record = Prover(NodeId(node), KEYS[NodeId(node)]).prove(
            epoch=1,
            request_id="r",
            step=0,
            stage=index,
            layers=layers,
            x_in=x,
            out=out,
            layer_outputs=[out] * len(layers),
        )
        proof = decode(record)
        assert isinstance(proof, Proof)
        return Claim(proof, start, out.shape[1])

    last = logits.shape[1] - 1
    claims = {
        0: [claim(0, 0, FIRST, ids, hidden, 0)],
        1: [claim(1, 1, SECOND, hidden, logits[:, last:], last)],
    }
    asked: list[int] = []

    async def ask(node: NodeId, req: AuditRequest, payload: bytes) -> tuple[AuditReply, bytes]:
        asked.append(int(node))
        layers = LayerRange(req.layer_start, req.layer_end)
        x = decode_tensor(payload, 1 << 30)
        with torch.inference_mode():
            out = prefill_outputs(
                stages[layers], x, stages[layers].new_cache(), outputs_from=req.outputs_from
            )
        return AuditReply("r", int(node), ""), encode_tensor(out)

    def auditor(kept: torch.Tensor | None) -> Auditor:
        return Auditor(
            ask=ask,
            keys={n: k.public for n, k in KEYS.items()},
            referee=Referee(tiny_model, TorchThread()),
            tolerance=Tolerance(),
            max_tensor_bytes=1 << 30,
            gateway=NodeId(0),
            own_outputs=lambda rid, layers, length: kept if layers == FIRST else None,
        )

    sequence = ids[0].tolist()
    verdict = asyncio.run(auditor(hidden).audit(PLAN, "r", sequence, claims))
    assert verdict.verified and verdict.checked == 2
    assert asked == [3]  # node 2, the gateway's replica, was not asked
    asked.clear()
    verdict = asyncio.run(auditor(None).audit(PLAN, "r", sequence, claims))
    assert verdict.verified and asked == [2, 3]  # nothing kept: both stages re-run


def test_a_greedy_requests_tokens_are_held_to_the_re_executed_logits() -> None:
    from butterfly.dataplane.audit import Chosen
    from butterfly.types.tasks import SamplingParams

    tol = Tolerance(rtol=1e-3, atol=1e-4)
    logits = torch.tensor([[[0.0, 2.0, 1.0], [3.0, 0.0, 2.9995], [0.0, 0.0, 5.0]]])
    greedy = SamplingParams(temperature=0.0)
    # prompt of 2: positions 1, 2, 3 choose tokens 0, 1, 2; rows from position 1 on
    assert Chosen(greedy, 2, (1, 0, 2)).wrong(logits, 1, tol) == []
    assert Chosen(greedy, 2, (1, 2, 2)).wrong(logits, 1, tol) == []  # a near tie
    assert Chosen(greedy, 2, (2, 0, 1)).wrong(logits, 1, tol) == [1, 3]
    assert Chosen(greedy, 2, (1, 0, 7)).wrong(logits, 1, tol) == [3]  # not a token
    sampled = SamplingParams(temperature=0.8, seed=1)
    assert Chosen(sampled, 2, (2, 0, 1)).wrong(logits, 1, tol) == []  # all drawable
    peaked = torch.tensor([[[0.0, 40.0, 0.0], [0.0, 0.0, 1.0]]])
    assert Chosen(sampled, 1, (0, 1)).wrong(peaked, 0, tol) == [0]  # e^-50: never drawn
    # temperature 1 and top_k 1 decode as greedy does: the best, or nothing
    one = SamplingParams(temperature=1.0, top_k=1, seed=1)
    assert Chosen(one, 1, (1, 1)).wrong(peaked, 0, tol) == [1]
    assert Chosen(one, 1, (1, 2)).wrong(peaked, 0, tol) == []
