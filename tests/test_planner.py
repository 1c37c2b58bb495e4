"""The live half of placement: facts as nodes report them, plans decided from them."""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from pathlib import Path

import pytest

from butterfly.config import load_config
from butterfly.control.facts import (
    FactProbe,
    NodeFacts,
    available_memory_bytes,
    capability_of,
    measure_compute,
    measure_link,
    model_layer_step,
)
from butterfly.control.planner import (
    capabilities,
    decide_plan,
    place,
    replan_after,
)
from butterfly.control.rollout import gather_status
from butterfly.metrics.events import MetricsEvent, PartitionComputed
from butterfly.net.framing import Envelope
from butterfly.net.memory import MemoryNetwork
from butterfly.partition.capability import Link
from butterfly.partition.service import PartitionService
from butterfly.runtime.loader import layer_infos
from butterfly.runtime.torch_thread import TorchThread
from butterfly.types.errors import InvalidMessage, NoNodesAvailable
from butterfly.types.ids import NodeId
from butterfly.types.model import LayerInfo, LayerRange, Linear
from butterfly.types.plan import StagePlan
from butterfly.types.wire.control import StatusQuery, StatusReply
from butterfly.types.wire.data import Ping, Pong
from butterfly.types.wire.frames import Message, from_body, to_body
from butterfly.wiring.edges import NetworkEdges

GFLOP = 1e9
GIB = 1 << 30


def layers(n: int, cost: float = 1.0, memory: int = 100) -> list[LayerInfo]:
    return [LayerInfo(i, Linear(8, 8), cost * GFLOP, memory, 8) for i in range(n)]


def reply(
    node: int,
    flops: float = 1000 * GFLOP,
    memory: int = GIB,
    links: dict[int, tuple[float, float]] | None = None,
    overhead_ms: float = 0.0,
) -> StatusReply:
    links = links or {}
    peers = tuple(sorted(links))
    return StatusReply(
        node,
        0,
        (),
        0,
        0,
        flops,
        memory,
        peers,
        tuple(links[p][0] for p in peers),
        tuple(links[p][1] for p in peers),
        overhead_ms,
    )


def spans(plan: StagePlan) -> list[tuple[int, int, int]]:
    return [(n, r.start, r.end) for n, r in plan.stages]


# --- facts as reported ----------------------------------------------------------------


def test_a_status_reply_with_links_survives_the_wire() -> None:
    sent = reply(2, links={0: (0.25, 1e9), 1: (0.5, 2e9)}, overhead_ms=0.125)
    assert from_body(sent.kind, to_body(sent)) == sent


def test_capability_of_turns_a_report_into_the_partitioners_facts() -> None:
    cap = capability_of(NodeId(1), reply(1, 2e12, 5 * GIB, {0: (0.3, 1e9)}, 0.2), [0, 1])
    assert (cap.id, cap.flops_per_s, cap.memory_bytes, cap.layer_overhead_ms) == (
        1,
        2e12,
        5 * GIB,
        0.2,
    )
    assert cap.links == {0: Link(0.3, 1e9)}


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        (reply(1, flops=math.nan), "compute_flops"),
        (reply(1, flops=-1.0), "compute_flops"),
        (reply(1, memory=-5), "memory_bytes"),
        (reply(1, overhead_ms=math.inf), "layer_overhead_ms"),
        (reply(2), "status of node 2"),
        (StatusReply(1, 0, (), 0, 0, 1e9, GIB, (0, 2), (0.1,), (1e9, 1e9)), "unequal"),
    ],
)
def test_an_impossible_report_is_refused_with_the_reason(bad: StatusReply, needle: str) -> None:
    with pytest.raises(InvalidMessage, match=needle):
        capability_of(NodeId(1), bad, [0, 1, 2])


def test_implausible_links_are_dropped_and_the_rest_kept() -> None:
    links = {
        0: (0.2, 1e9),  # fine
        1: (0.1, 1e9),  # itself
        7: (0.1, 1e9),  # not a member
        2: (math.inf, 1e9),  # no latency
        3: (0.1, 0.0),  # no bandwidth
    }
    cap = capability_of(NodeId(1), reply(1, links=links), [0, 1, 2, 3])
    assert dict(cap.links) == {0: Link(0.2, 1e9)}


def test_members_without_facts_are_left_out_and_none_at_all_is_an_error() -> None:
    facts = {NodeId(0): reply(0), NodeId(2): reply(2)}
    assert [c.id for c in capabilities([NodeId(0), NodeId(1), NodeId(2)], facts)] == [0, 2]
    with pytest.raises(NoNodesAvailable):
        capabilities([NodeId(1)], facts)


# --- deciding a plan ------------------------------------------------------------------


def test_the_plan_follows_the_reported_compute_rates() -> None:
    facts = {NodeId(0): reply(0, 2000 * GFLOP), NodeId(1): reply(1, 1000 * GFLOP)}
    plan = decide_plan(
        1, [NodeId(0), NodeId(1)], facts, layers=layers(12), strategy="load_balanced"
    )
    assert plan.epoch == 1
    assert spans(plan) == [(0, 0, 8), (1, 8, 12)]  # 8 ms on each


def test_the_plan_follows_the_reported_memory() -> None:
    facts = {NodeId(0): reply(0), NodeId(1): reply(1, memory=300)}  # three 100-byte layers
    plan = decide_plan(
        1, [NodeId(0), NodeId(1)], facts, layers=layers(12), strategy="load_balanced"
    )
    assert spans(plan) == [(0, 0, 9), (1, 9, 12)]


def test_the_configured_strategy_is_used() -> None:
    facts = {NodeId(0): reply(0, 2000 * GFLOP), NodeId(1): reply(1, 1000 * GFLOP)}
    plan = decide_plan(1, [NodeId(0), NodeId(1)], facts, layers=layers(12), strategy="uniform")
    assert spans(plan) == [(0, 0, 6), (1, 6, 12)]


def test_only_the_given_members_are_placed_in_pipeline_order() -> None:
    facts = {NodeId(k): reply(k) for k in range(4)}
    members = [NodeId(3), NodeId(0), NodeId(2)]
    plan = decide_plan(5, members, facts, layers=layers(9), strategy="load_balanced")
    assert spans(plan) == [(0, 0, 3), (2, 3, 6), (3, 6, 9)]
    assert plan.epoch == 5


def test_a_per_layer_overhead_evens_out_layers_of_different_flops() -> None:
    """Three light layers and a heavy last one (the tiny model's head): by FLOPs alone a
    node that measured 40% slower should not take the heavy layer, but when a fixed cost
    per layer dominates, as it does for small layers, one layer per node is still best."""
    model = [LayerInfo(i, Linear(8, 8), (1.36 if i == 3 else 1.0) * 1e5, 10, 8) for i in range(4)]
    rates = [3e9, 3e9, 3e9, 1.8e9]
    facts = {NodeId(k): reply(k, r) for k, r in enumerate(rates)}
    members = [NodeId(k) for k in range(4)]
    by_flops = decide_plan(1, members, facts, layers=model, strategy="load_balanced")
    assert len(by_flops.stages) < 4
    facts = {NodeId(k): reply(k, r, overhead_ms=0.2) for k, r in enumerate(rates)}
    with_overhead = decide_plan(1, members, facts, layers=model, strategy="load_balanced")
    assert spans(with_overhead) == [(0, 0, 1), (1, 1, 2), (2, 2, 3), (3, 3, 4)]


def test_placement_emits_one_event_per_decision_and_the_cache_answers_the_second() -> None:
    events: list[MetricsEvent] = []
    service = PartitionService()
    facts = {NodeId(0): reply(0), NodeId(1): reply(1)}
    for _ in range(2):
        decide_plan(
            1,
            [NodeId(0), NodeId(1)],
            facts,
            layers=layers(6),
            strategy="load_balanced",
            service=service,
            emit=events.append,
        )
    assert [type(e) for e in events] == [PartitionComputed, PartitionComputed]
    assert [e.cache_hit for e in events if isinstance(e, PartitionComputed)] == [False, True]


def test_missing_rates_degrade_to_uniform_and_say_why() -> None:
    facts = {NodeId(0): reply(0, 0.0), NodeId(1): reply(1, 0.0)}
    p = place(1, [NodeId(0), NodeId(1)], facts, layers=layers(4), strategy="load_balanced")
    assert spans(p.stages) == [(0, 0, 2), (1, 2, 4)]
    assert "falling back to uniform" in p.plan.notes[0]


def test_the_estimate_counts_compute_stage_links_and_the_gateways_hops() -> None:
    """Gateway 0 holds no layer here (it is slow), so it sends the step to node 1 and gets
    the result back from node 2: two gateway hops besides the 1 -> 2 boundary."""
    links = {0: (0.5, 1e9), 1: (0.5, 1e9), 2: (0.5, 1e9)}
    facts = {
        NodeId(0): reply(0, 1 * GFLOP, links={1: links[1], 2: links[2]}),
        NodeId(1): reply(1, 1000 * GFLOP, links={0: links[0], 2: links[2]}, overhead_ms=0.1),
        NodeId(2): reply(2, 1000 * GFLOP, links={0: links[0], 1: links[1]}, overhead_ms=0.1),
    }
    model = layers(4)  # 8 bytes out per layer: 4 * 8 bytes on the wire
    p = place(1, [NodeId(k) for k in range(3)], facts, layers=model, strategy="load_balanced")
    assert spans(p.stages) == [(1, 0, 2), (2, 2, 4)]
    compute = 4 * (1.0 + 0.1)  # 1 GFLOP at 1 TFLOP/s + overhead, per layer
    boundary = 0.5 + 1000 * 32 / 1e9  # node 1 -> node 2, one 8-element float32 row
    to_first = 0.5 + 1000 * 8 / 1e9  # the token id
    back = 0.5 + 1000 * 32 / 1e9  # the last layer's output
    assert p.estimated_per_token_ms == pytest.approx(compute + boundary + to_first + back)
    health = p.to_dict()
    assert health["estimated_per_token_ms"] == pytest.approx(p.estimated_per_token_ms, abs=1e-4)
    assert health["facts"]["1"]["links"]["2"]["latency_ms"] == 0.5  # type: ignore[index]


def test_replan_after_a_node_leaves_moves_only_its_layers() -> None:
    facts = {NodeId(k): reply(k) for k in range(3)}
    old = decide_plan(
        3, [NodeId(0), NodeId(1), NodeId(2)], facts, layers=layers(12), strategy="load_balanced"
    )
    assert spans(old) == [(0, 0, 4), (1, 4, 8), (2, 8, 12)]
    new, moved = replan_after(
        old, [NodeId(0), NodeId(2)], facts, layers=layers(12), strategy="load_balanced"
    )
    assert new.epoch == 4
    assert spans(new) == [(0, 0, 6), (2, 6, 12)]
    assert moved == 4


def test_replan_after_keeps_old_ranges_when_the_optimum_gains_little() -> None:
    old = StagePlan(1, ((NodeId(0), LayerRange(0, 5)), (NodeId(1), LayerRange(5, 10))))
    facts = {NodeId(0): reply(0, 1040 * GFLOP), NodeId(1): reply(1, 1000 * GFLOP)}
    new, moved = replan_after(
        old, [NodeId(0), NodeId(1)], facts, layers=layers(10), strategy="load_balanced"
    )
    assert (spans(new), moved) == ([(0, 0, 5), (1, 5, 10)], 0)


# --- measuring --------------------------------------------------------------------------


def test_local_measurements_are_positive_and_a_limit_is_reported_as_is() -> None:
    compute = measure_compute(0.05)
    assert compute.flops_per_s > 1e6 and 0 <= compute.layer_overhead_ms < 1000
    assert available_memory_bytes(12345) == 12345
    assert available_memory_bytes(0) > 0


def test_a_served_models_layer_is_timed_with_its_own_code(tiny_model: Path) -> None:
    layer = model_layer_step(tiny_model)
    assert layer is not None
    step, flops = layer
    assert flops == layer_infos(tiny_model)[1].compute_cost
    for _ in range(3):  # the same context every time: the cache is cut back after a step
        step()
    compute = measure_compute(0.05, model_dir=tiny_model)
    # a 64-wide layer is microseconds of arithmetic: nearly all of its time is overhead
    assert 0 < compute.layer_overhead_ms < 1000


async def pong(peer: NodeId, env: Envelope) -> tuple[Message, bytes] | None:
    if isinstance(env.msg, Ping):
        return Pong(env.msg.seq, len(env.payload)), b""
    return None


async def test_a_link_is_measured_by_timed_pings() -> None:
    net = MemoryNetwork()
    a, b = net.transport(NodeId(0), lambda e: None), net.transport(NodeId(1), lambda e: None)
    await b.start(pong)
    link = await measure_link(a, NodeId(1))
    assert link.latency_ms > 0 and link.bandwidth_bytes_per_s > 0


async def test_a_peer_that_miscounts_the_padding_is_not_measured() -> None:
    async def liar(peer: NodeId, env: Envelope) -> tuple[Message, bytes] | None:
        assert isinstance(env.msg, Ping)
        return Pong(env.msg.seq, 1), b""

    net = MemoryNetwork()
    a, b = net.transport(NodeId(0), lambda e: None), net.transport(NodeId(1), lambda e: None)
    await b.start(liar)
    with pytest.raises(InvalidMessage, match="ping"):
        await measure_link(a, NodeId(1))


async def test_a_probe_measures_once_however_many_ask() -> None:
    net = MemoryNetwork()
    a, b = net.transport(NodeId(0), lambda e: None), net.transport(NodeId(1), lambda e: None)
    await b.start(pong)
    probe = FactProbe(
        node=NodeId(0),
        peers=[NodeId(0), NodeId(1), NodeId(2)],  # node 2 is down: its link is skipped
        transport=a,
        memory_limit_bytes=GIB,
        torch_thread=TorchThread(),
        compute_seconds=0.02,
    )
    first, second = await asyncio.gather(probe.facts(), probe.facts())
    assert first is second is probe.measured
    assert first.memory_bytes == GIB and first.flops_per_s > 0
    assert set(first.links) == {1}


async def test_a_node_probes_its_compute_for_as_long_as_its_config_says(
    tiny_model: Path, tmp_path: Path
) -> None:
    """partition.compute_probe_s reaches the probe a node builds: the longer setting runs
    at least that long and more trials; the short one stops after the fewest trials."""
    net = MemoryNetwork()
    took, trials = {}, {}
    for seconds in (0.01, 0.3):
        cfg = load_config(
            overrides={
                "node.data_dir": str(tmp_path),
                "model.path": str(tiny_model),
                "partition.compute_probe_s": seconds,
            }
        )
        torch_thread = TorchThread()
        transport = net.transport(NodeId(0), lambda e: None)
        probe = NetworkEdges(cfg, tiny_model).probe(NodeId(0), [NodeId(0)], transport, torch_thread)
        assert isinstance(probe, FactProbe)
        started = time.perf_counter()
        await probe.facts()
        took[seconds] = time.perf_counter() - started
        torch_thread.close()
        assert probe.compute is not None
        trials[seconds] = probe.compute.trials
    assert took[0.3] >= 0.3 and trials[0.01] < trials[0.3]
    assert trials[0.01] >= 5  # the fewest a rate is taken from


@pytest.mark.parametrize(("reserved", "reported"), [(GIB // 4, GIB - GIB // 4), (2 * GIB, 0)])
async def test_a_probe_reports_its_memory_less_what_the_node_keeps(
    reserved: int, reported: int
) -> None:
    """A gateway's draft model (wiring.edges.draft_model_bytes) is no room for layers."""
    net = MemoryNetwork()
    probe = FactProbe(
        node=NodeId(0),
        peers=[NodeId(0)],
        transport=net.transport(NodeId(0), lambda e: None),
        memory_limit_bytes=GIB,
        torch_thread=TorchThread(),
        compute_seconds=0.02,
        reserved_bytes=reserved,
    )
    assert (await probe.facts()).memory_bytes == reported


async def test_status_is_gathered_one_node_at_a_time_after_all_are_up() -> None:
    """Each node 'measures' for 50 ms when first asked; no two measurements overlap."""
    net = MemoryNetwork()
    spans_s: dict[int, tuple[float, float]] = {}

    def handler(node: int):
        async def handle(peer: NodeId, env: Envelope) -> tuple[Message, bytes] | None:
            if isinstance(env.msg, Ping):
                return Pong(env.msg.seq, len(env.payload)), b""
            if isinstance(env.msg, StatusQuery):
                started = time.monotonic()
                await asyncio.sleep(0.05)
                spans_s[node] = (started, time.monotonic())
                return reply(node), b""
            return None

        return handle

    gateway = net.transport(NodeId(0), lambda e: None)
    for k in (1, 2, 3):
        await net.transport(NodeId(k), lambda e: None).start(handler(k))

    async def local() -> StatusReply:
        started = time.monotonic()
        await asyncio.sleep(0.05)
        spans_s[0] = (started, time.monotonic())
        return reply(0)

    facts = await gather_status(
        gateway, [NodeId(1), NodeId(2), NodeId(3)], 10.0, local=(NodeId(0), local)
    )
    assert sorted(facts) == [0, 1, 2, 3]
    ordered = sorted(spans_s.values())
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(ordered))


def test_node_facts_travel_as_parallel_tuples_sorted_by_peer() -> None:
    facts = NodeFacts(1e9, GIB, {NodeId(3): Link(0.3, 3e9), NodeId(1): Link(0.1, 1e9)})
    assert facts.link_fields() == ((1, 3), (0.1, 0.3), (1e9, 3e9))
