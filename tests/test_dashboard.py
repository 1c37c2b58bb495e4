"""The Grafana dashboard queries only metrics that running nodes export.

A renamed metric would leave a panel silently empty. So every PromQL expression of
deploy/grafana/butterfly.json is parsed for its metric names, and each must be a sample
name that the nodes of an in-process cluster actually export after serving a request:
the gateway's registry and a stage node's (stage and hop figures live on every node).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from butterfly.runtime.tokenizer import TextCodec
from butterfly.testing.inprocess import InProcessCluster
from butterfly.types.ids import RequestId
from butterfly.types.tasks import InferenceTask

pytestmark = pytest.mark.timeout(120)
DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "butterfly.json"
NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
# sample names each family type exposes (the parser strips `_total` from counters)
SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gauge": ("",),
    "stateset": ("",),
    "summary": ("", "_sum", "_count"),
}
# what an operator sizing a cluster looks for first (issue 15): on the dashboard
REQUIRED = {
    "butterfly_prompt_tokens_total",
    "butterfly_generated_tokens_total",
    "butterfly_kv_cache_bytes",
    "butterfly_stage_step_seconds_bucket",
    "butterfly_hop_seconds_bucket",
    "butterfly_time_to_first_token_seconds_bucket",
    "butterfly_time_per_output_token_seconds_bucket",
}


def expressions() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in board["panels"] for t in p.get("targets", ())]


def queried(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers outside strings, label matchers
    and `by (...)` lists, and not functions or keywords. Ours all start `butterfly_`."""
    bare = re.sub(r'"[^"]*"', "", expr)  # label values, legend text
    bare = re.sub(r"\{[^}]*\}", "", bare)  # label matchers
    bare = re.sub(r"\b(by|without)\s*\([^)]*\)", "", bare)  # grouping labels
    return {n for n in NAME.findall(bare) if n.startswith("butterfly_")}


def exported(text: str) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + s for s in SUFFIXES[family.type])
    return names


def test_the_parser_finds_names_and_skips_labels() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, butterfly_x) (rate(butterfly_a_bucket{node="'
        'butterfly_b"}[5m]))) / butterfly_c_total'
    )
    assert queried(expr) == {"butterfly_a_bucket", "butterfly_c_total"}


async def test_every_metric_the_dashboard_queries_is_exported(
    tiny_model: Path, tmp_path: Path
) -> None:
    ids = tuple(TextCodec.load(tiny_model).encode("Once upon a time"))
    # every node serves its registry (metrics.listen; port 0: any free one)
    settings = {"coordination.heartbeat_interval_ms": 10, "metrics.listen": "127.0.0.1:0"}
    async with InProcessCluster(tiny_model, 4, tmp_path, f=1, settings=settings) as c:
        await c.first_plan()
        task = InferenceTask(RequestId("scraped"), input_ids=ids, max_new_tokens=4)
        await c.gateway.engine.run(task, lambda token: None)
        plan = c.gateway.stage_server.plan
        assert plan is not None
        texts = []
        for node in (c.gateway, c.nodes[plan.nodes[-1]]):  # the gateway and the last stage
            assert node.scrape is not None
            async with httpx.AsyncClient() as client:
                r = await client.get(f"http://127.0.0.1:{node.scrape.port}/metrics")
            assert r.status_code == 200
            texts.append(r.text)
    last = {f.name: f for f in text_string_to_metric_families(texts[1])}
    steps = [s for s in last["butterfly_stage_step_seconds"].samples if s.name.endswith("_count")]
    assert [(s.labels["stage"], s.value) for s in steps] == [(str(len(plan.stages) - 1), 4.0)]
    available = set().union(*(exported(t) for t in texts))
    wanted = set().union(*(queried(e) for e in expressions()))
    assert wanted, "the dashboard has no queries"
    assert wanted <= available, f"queried but not exported: {sorted(wanted - available)}"
    assert wanted >= REQUIRED, f"not on the dashboard: {sorted(REQUIRED - wanted)}"
