"""Every family is verified as Llama is: its nodes sign a record of every step.

Only Llama stages traced their layers (`forward_rows`), and the stage server signed a
step only when the stage could trace it. A GPT-2, BERT or sequential node signed
nothing, the gateway's own first stage included, while the gateway still checked each
answer's records: under `audit` or `replicate` it took "no signed record of stage 0" for
a lie of the honest node that delivered the answer, evicted it, then blamed itself on
every replay, and the request never finished (a review). Now every family's `forward`
takes `trace`, so honest clusters of every family answer right and verified, and a liar
among GPT-2 nodes is convicted as among Llama ones.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
import transformers

from butterfly.dataplane.stage_server import StageServer
from butterfly.runtime.generate import generate
from butterfly.runtime.loader import load_stage
from butterfly.runtime.sequential import create_sequential
from butterfly.runtime.stage import Stage, forward_rows
from butterfly.testing.inprocess import InProcessCluster
from butterfly.testing.liars import CorruptStageServer, OmitRecordsStageServer
from butterfly.types.ids import NodeId, RequestId
from butterfly.types.model import LayerRange
from butterfly.types.tasks import InferenceResult, InferenceTask

pytestmark = pytest.mark.timeout(200)
NEW = 12
PROMPT = tuple(range(5, 25))
SEQUENTIAL = [
    {"type": "linear", "input_dim": 3, "output_dim": 16},
    {"type": "activation", "kind": "relu"},
    {"type": "transformer_block", "hidden_dim": 16, "num_heads": 2, "ff_dim": 32},
    {"type": "linear", "input_dim": 16, "output_dim": 5},
]


def gpt2_checkpoint(out: Path) -> Path:
    torch.manual_seed(1234)
    config = transformers.GPT2Config(
        n_layer=4, n_embd=64, n_head=4, vocab_size=512, n_positions=128,
        initializer_range=0.2, bos_token_id=None, eos_token_id=None,
        attn_implementation="eager",
    )  # fmt: skip
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(out, safe_serialization=True)
    return out


def bert_checkpoint(out: Path) -> Path:
    torch.manual_seed(1234)
    config = transformers.BertConfig(
        num_hidden_layers=4, hidden_size=64, num_attention_heads=4, intermediate_size=128,
        vocab_size=512, max_position_embeddings=128, attn_implementation="eager",
    )  # fmt: skip
    transformers.BertModel(config).eval().save_pretrained(out, safe_serialization=True)
    return out


def _model(tmp_path: Path, family: str) -> Path:
    if family == "gpt2":
        return gpt2_checkpoint(tmp_path / family)
    if family == "bert":
        return bert_checkpoint(tmp_path / family)
    return create_sequential(tmp_path / family, SEQUENTIAL, input_dim=3, seed=11)


def _run(stage: Stage, x: torch.Tensor, trace: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Two rows at once, each from position 0 on a fresh cache: the generic row-by-row
    path of `forward_rows`, the only one these families have."""
    caches = [stage.new_cache(), stage.new_cache()]
    return forward_rows(stage, x, caches, [0, 0], trace=trace)


@pytest.mark.parametrize("family", ["gpt2", "bert", "sequential"])
@pytest.mark.parametrize("layers", [(0, 2), (1, 4)])
def test_every_family_traces_one_output_per_layer_it_holds(
    tmp_path: Path, family: str, layers: tuple[int, int]
) -> None:
    """What a record's per-layer hashes need, on a first and on a last stage: one
    [B, T, ...] per layer held, and the output as without a trace."""
    model = _model(tmp_path, family)
    if family == "sequential":
        x = torch.randn(2, 3, 3, generator=torch.Generator().manual_seed(0))
    else:
        x = torch.tensor([PROMPT[:6], PROMPT[6:12]])
    if layers[0]:
        x = _run(load_stage(model, LayerRange(0, layers[0])), x)
    stage = load_stage(model, LayerRange(*layers))
    trace: list[torch.Tensor] = []
    traced = _run(stage, x, trace)
    assert torch.equal(traced, _run(stage, x))
    assert len(trace) == layers[1] - layers[0]
    assert all(t.shape[:2] == x.shape[:2] for t in trace)


async def _generate(c: InProcessCluster, task: InferenceTask, beats: int = 1500) -> InferenceResult:
    """`task` on the gateway, beating until it is done and any eviction under way agreed."""
    run = asyncio.create_task(c.gateway.engine.run(task, lambda t: None))
    await c.until(run.done, "the request to finish", beats=beats)
    for _ in range(50):  # time for a wrongful eviction to show, were one under way
        c.hub.tick(0.1)
        await asyncio.sleep(0.005)
    return run.result()


@pytest.mark.parametrize("mode", ["audit", "replicate"])
async def test_an_honest_gpt2_cluster_evicts_nobody_and_answers_verified(
    tmp_path: Path, mode: str
) -> None:
    model = gpt2_checkpoint(tmp_path / "gpt2")
    plain = list(generate([load_stage(model)], PROMPT, NEW))
    settings = {"coordination.heartbeat_interval_ms": 10, "byzantine.verification": mode}
    async with InProcessCluster(model, 4, tmp_path / "data", f=1, settings=settings) as c:
        await c.first_plan()
        task = InferenceTask(RequestId("g"), input_ids=PROMPT, max_new_tokens=NEW)
        result = await _generate(c, task)
        assert not any(node.plans.evicted for node in c.nodes), "an honest node evicted"
        assert list(result.output_ids) == plain
        assert result.verified == mode


@pytest.mark.parametrize("mode", ["audit", "replicate"])
async def test_an_honest_sequential_cluster_evicts_nobody_and_answers(
    tmp_path: Path, mode: str
) -> None:
    """A vector input is one step: `replicate` verifies it, `audit` leaves it unverified
    (engine._run) but must not take its honest nodes for liars either."""
    model = create_sequential(tmp_path / "seq", SEQUENTIAL, input_dim=3, seed=11)
    plain = load_stage(model).forward(torch.tensor([1.0, 2.0, 3.0]), None, 0)
    settings = {"coordination.heartbeat_interval_ms": 10, "byzantine.verification": mode}
    async with InProcessCluster(model, 4, tmp_path / "data", f=1, settings=settings) as c:
        await c.first_plan()
        task = InferenceTask(RequestId("v"), input_vector=(1.0, 2.0, 3.0))
        result = await _generate(c, task, beats=600)
        assert not any(node.plans.evicted for node in c.nodes), "an honest node evicted"
        assert torch.allclose(torch.tensor(result.output_vector), plain.flatten(), atol=1e-5)
        if mode == "replicate":
            assert result.verified == "replicate"


LAST = 1  # n = 4, f = 1: the chain is 0 (the gateway) -> 1, standbys 2 and 3


@pytest.mark.parametrize("liar", [CorruptStageServer, OmitRecordsStageServer])
async def test_a_lying_gpt2_stage_is_evicted_and_the_answer_is_right(
    tmp_path: Path, liar: type[StageServer]
) -> None:
    """GPT-2 is verified, not only spared: a last stage that lies, or omits its records,
    is convicted and evicted as a Llama one is, and nobody else."""
    model = gpt2_checkpoint(tmp_path / "gpt2")
    plain = list(generate([load_stage(model)], PROMPT, NEW))
    settings = {"coordination.heartbeat_interval_ms": 10, "byzantine.verification": "audit"}
    async with InProcessCluster(
        model, 4, tmp_path / "data", f=1, settings=settings, stage_servers={LAST: liar}
    ) as c:
        assert NodeId(LAST) in (await c.first_plan()).nodes
        task = InferenceTask(RequestId("g"), input_ids=PROMPT, max_new_tokens=NEW)
        result = await _generate(c, task)
        assert list(result.output_ids) == plain
        await c.until(
            lambda: all(set(node.plans.evicted) == {NodeId(LAST)} for node in c.nodes),
            "the liar's agreed eviction",
        )
