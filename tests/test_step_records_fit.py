"""A step's signed records travel in frame headers (at most 64 KiB): the gateway never
sends a step that gathers more (dataplane.sending.RecordSize).

Before, six 250-token prompts submitted together at f = 1 went down as one step whose
records took 66 KB, and five of them failed with 'stage_step header of 66353 bytes is
over 65536' (400 to the client); after a whole-cluster restart the running tasks, replayed
together, failed alike, so interrupted tasks did not resume.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from butterfly.dataplane.inflight import InFlight
from butterfly.dataplane.proving import Prover
from butterfly.dataplane.sending import HEADER_ROOM, RecordSize, StepSender
from butterfly.net.framing import Envelope, encode_frame
from butterfly.protocol.sign import SigningKey
from butterfly.types.errors import WireFormatError
from butterfly.types.ids import Epoch, NodeId, RequestId, StageIndex
from butterfly.types.model import LayerRange
from butterfly.types.plan import StagePlan
from butterfly.types.wire.data import StageStep, StepResult
from butterfly.types.wire.frames import Message

WIDTH = 64  # the tiny demo model's hidden size
PROVER = Prover(NodeId(1), SigningKey.from_seed(b"\x05" * 32), k=8, chunk=1)


def records(lengths: list[int], *, last_rows: bool) -> tuple[bytes, ...]:
    """Each entry's records as a 2-stage chain signs them: the first stage fingerprints
    every position it outputs; the last one its last position (`last_rows`) or all."""
    out = []
    for i, n in enumerate(lengths):
        for stage, rows in ((0, n), (1, 1 if last_rows else n)):
            x = torch.randn(1, rows, WIDTH)
            out.append(
                PROVER.prove(
                    epoch=Epoch(1),
                    request_id=RequestId(f"{i:032x}"),
                    step=10_000 + i,
                    stage=StageIndex(stage),
                    layers=LayerRange(0, 2),
                    x_in=x,
                    out=x,
                    layer_outputs=[x, x],
                )
            )
    return tuple(out)


def result_frame(lengths: list[int], *, last_rows: bool) -> bytes:
    """The last stage's answer to a batch: it carries both stages' records of every entry."""
    ids = tuple(RequestId(f"{i:032x}~1.2") for i in range(len(lengths)))
    msg = StepResult(
        ids, tuple(range(len(lengths))), NodeId(2), records(lengths, last_rows=last_rows)
    )
    return encode_frame(Envelope(msg, NodeId(2), Epoch(1), "c" * 64, corr_id=1))


pytestmark = pytest.mark.timeout(180)


def test_every_run_of_a_split_fits_and_nothing_is_left_out() -> None:
    size = RecordSize(top_k=8, chunk=1)
    lengths = [250, 1, 1, 120, 300, 1, 439, 5]
    runs = size.split(lengths, stages=2)
    assert [i for r in runs for i in r] == list(range(len(lengths)))
    assert all(size.cost(lengths[r.start : r.stop], 2) <= HEADER_ROOM for r in runs)
    assert size.cost([size.max_positions(2)], 2) <= HEADER_ROOM
    assert size.cost([size.max_positions(2) + 1], 2) > HEADER_ROOM
    assert size.max_positions(0) == 0  # no stage signs: no limit (and no endless search)
    coarse = RecordSize(top_k=8, chunk=32)  # a coarser fingerprint lets a step carry more
    assert coarse.max_positions(2) > 10 * size.max_positions(2)


def test_a_batch_the_split_keeps_together_really_encodes_within_the_header() -> None:
    """The estimate bounds the true bytes: every run `split` keeps, and the longest
    single entry, encodes; the batch it splits up did not (the limit is real)."""
    size = RecordSize(top_k=8, chunk=1)
    lengths = [250] * 6
    with pytest.raises(WireFormatError, match="over 65536"):
        result_frame(lengths, last_rows=True)
    for last_rows in (True, False):
        for run in size.split(lengths + [1] * 20 + [100, 80, 60], stages=2):
            result_frame(
                (lengths + [1] * 20 + [100, 80, 60])[run.start : run.stop], last_rows=last_rows
            )
        result_frame([size.max_positions(2)], last_rows=last_rows)


async def test_the_sender_sends_a_batch_in_runs_that_fit() -> None:
    plan = StagePlan(Epoch(1), ((NodeId(1), LayerRange(0, 2)), (NodeId(2), LayerRange(2, 4))), ())
    sent: list[StageStep] = []

    async def deliver(node: NodeId, msg: Message, payload: bytes) -> None:
        assert isinstance(msg, StageStep)
        sent.append(msg)

    def sender(size: RecordSize | None) -> StepSender:
        return StepSender(
            node=NodeId(0), deliver=deliver, plan=lambda: plan, flight=InFlight(), keys=None,
            timeout=0.2, on_liars=lambda liars, why: None, records=size,
        )  # fmt: skip

    for size, batches in ((None, 1), (RecordSize(8, 1), 6)):
        sent.clear()
        s = sender(size)
        loop = asyncio.create_task(s.serve_batches())
        steps = [
            asyncio.create_task(
                s.step(RequestId(f"r{i}"), 1, 0, torch.zeros(1, 250, dtype=torch.int64))
            )
            for i in range(6)
        ]
        await asyncio.wait(steps)  # no stage answers: each times out
        loop.cancel()
        await asyncio.gather(loop, *steps, return_exceptions=True)
        # each step then times out, and is re-run one node at a time (`isolate`): those
        # hops, each to one node answering the gateway, have no route onward
        batched = [m for m in sent if m.route]
        assert len(batched) == batches
        assert sorted(r for m in batched for r in m.request_ids) == [f"r{i}" for i in range(6)]


async def test_an_answer_in_by_the_time_the_loop_looks_is_taken_not_judged_late() -> None:
    """A step's timer fell due while the gateway's loop was busy, with the answer already
    in its socket: the step was judged timed out and the node that answered was charged
    (a review). An answer that lands within `LATE_S` of the timeout is the step's."""
    from butterfly.dataplane.sending import LATE_S

    plan = StagePlan(Epoch(1), ((NodeId(1), LayerRange(0, 2)),), ())
    flight = InFlight()
    answer = torch.ones(1, 1, 4)

    async def deliver(node: NodeId, msg: Message, payload: bytes) -> None:
        key = (msg.request_ids[0], msg.steps[0])  # type: ignore[union-attr]
        loop = asyncio.get_running_loop()
        loop.call_later(0.2 + LATE_S / 4, lambda: flight.waiting[key].set_result(answer))

    sender = StepSender(
        node=NodeId(0), deliver=deliver, plan=lambda: plan, flight=flight, keys=None,
        timeout=0.2, on_liars=lambda liars, why: None, records=None,
    )  # fmt: skip
    loop = asyncio.create_task(sender.serve_batches())
    try:
        out = await sender.step(RequestId("r"), 1, 0, torch.zeros(1, 1, dtype=torch.int64))
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
    assert out is answer
