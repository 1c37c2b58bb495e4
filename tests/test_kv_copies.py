"""Standbys keep copies of the chain's KV caches, and a promoted standby resumes from them.

Two stage servers in one process, no sockets: the chain node's copies are handed to the
standby as the dispatcher would, and the standby's next step must equal the chain node's.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from butterfly.control.replicas import promote_standbys
from butterfly.dataplane.stage_server import StageServer
from butterfly.net.framing import Envelope
from butterfly.runtime.kvcache import KVCache
from butterfly.runtime.torch_thread import TorchThread
from butterfly.runtime.wire import decode_tensor, encode_tensor
from butterfly.types.errors import WireFormatError
from butterfly.types.ids import NodeId
from butterfly.types.model import LayerRange
from butterfly.types.plan import StagePlan
from butterfly.types.wire.data import CacheQuery, KvAppend, StageStep, StepResult

PROMPT = [5, 9, 2, 7, 1, 3, 8, 4, 6, 11, 12]


def test_rows_written_into_another_cache_reproduce_it() -> None:
    a = KVCache(2, 1, 2, 4, 64)
    for start in (0, 5):
        k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
        for layer in range(2):
            a.update(layer, start, k + layer, v - layer)
        a.advance(start + 5)
    b = KVCache(2, 1, 2, 4, 64)
    b.write(0, a.rows(0, 6))
    b.write(6, a.rows(6, 10))
    assert b.length == 10
    for x, y in zip(a.snapshot().tensors().values(), b.snapshot().tensors().values(), strict=True):
        assert torch.equal(x, y)
    b.write(3, a.rows(3, 4))  # a recomputation overwrites and cuts back
    assert b.length == 4
    with pytest.raises(WireFormatError, match="gap"):
        b.write(7, a.rows(7, 8))
    with pytest.raises(WireFormatError, match="do not fit"):
        b.write(0, torch.zeros(3, 1, 2, 1, 4))


def _step(request: str, step: int, start: int, tokens: list[int]) -> tuple[StageStep, bytes]:
    msg = StageStep((request,), (step,), (start,), (len(tokens),), (), 0, True)
    return msg, encode_tensor(torch.tensor([tokens], dtype=torch.int64))


async def _run(server: StageServer, epoch: int, msg: StageStep, payload: bytes) -> torch.Tensor:
    out = await server.on_step(Envelope(msg, 0, epoch, "c", 0, False, payload))
    assert isinstance(out.msg, StepResult), out.msg
    return decode_tensor(out.payload, 1 << 30)


def test_a_promoted_standby_continues_from_its_copy(tiny_model: Path) -> None:
    async def scenario() -> None:
        everything = LayerRange(0, 4)
        chain, standby = (
            StageServer(
                node=NodeId(n),
                model_dir=tiny_model,
                max_tensor_bytes=1 << 30,
                torch_thread=TorchThread(),
                snapshot_every=4,
            )
            for n in (1, 2)
        )
        plan = StagePlan(1, ((NodeId(1), everything),), ((NodeId(2), everything),))
        for server in (chain, standby):
            ack = await server.apply_plan(plan.to_message("h"))
            assert ack.ok, ack.error
        await _run(chain, 1, *_step("r", 1, 0, PROMPT))
        copies = chain.kv_deltas(("r",))
        assert [(c.peer, type(c.msg)) for c in copies] == [(2, KvAppend)]
        for token, step in ((13, 2), (14, 3), (15, 4)):  # below snapshot_every: no copy yet
            await _run(chain, 1, *_step("r", step, len(PROMPT) + step - 2, [token]))
            assert chain.kv_deltas(("r",)) == []
        for c in copies:
            assert isinstance(c.msg, KvAppend)
            standby.on_kv_append(c.msg, c.payload)
        held = standby.cache_lengths(CacheQuery(("r", "other")))
        assert held.lengths == (len(PROMPT), 0)

        # the chain node dies; the standby takes its stage over, same layers, caches kept
        promoted = promote_standbys(plan, 2, [NodeId(0), NodeId(2)])
        assert promoted is not None and promoted.nodes == (2,)
        assert (await standby.apply_plan(promoted.to_message("h"))).ok
        resume = len(PROMPT)
        replay = [13, 14, 15]
        got = await _run(standby, 2, *_step("r", 5, resume, replay))
        expected = await _run(chain, 1, *_step("r", 5, len(PROMPT) + 3, [16]))
        fresh = await _run(chain, 1, *_step("x", 1, 0, [*PROMPT, *replay]))
        assert torch.allclose(got[:, -1], fresh[:, -1], atol=1e-5)
        assert not torch.allclose(got[:, -1], expected[:, -1], atol=1e-3)  # not just any row
        for server in (chain, standby):
            server.close()

    asyncio.run(scenario())


def test_promotion_keeps_surviving_stages_and_needs_a_live_holder() -> None:
    a, b = LayerRange(0, 2), LayerRange(2, 4)
    plan = StagePlan(3, ((NodeId(0), a), (NodeId(1), b)), ((NodeId(2), a), (NodeId(3), b)))
    moved = promote_standbys(plan, 4, [NodeId(0), NodeId(2), NodeId(3)])
    assert moved == StagePlan(4, ((NodeId(0), a), (NodeId(3), b)), ((NodeId(2), a),))
    assert promote_standbys(plan, 4, [NodeId(0), NodeId(2)]) is None
