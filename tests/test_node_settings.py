"""Settings the composition root applies: the expected model hash, JSON logs, /metrics
switched off, and options this build refuses rather than ignore."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from butterfly.api.settings import ApiSettings
from butterfly.config import ButterflyConfig, load_config
from butterfly.config.issues import ConfigInvalid
from butterfly.node import build_node
from butterfly.runtime.torch_thread import TorchThread
from butterfly.runtime.weights import model_hash
from butterfly.types.errors import ConfigError
from butterfly.wiring.edges import NetworkEdges
from butterfly.wiring.logs import JsonLines
from tests.api_util import serving


def node_config(tmp_path: Path, model: Path, **overrides: object) -> ButterflyConfig:
    return load_config(
        overrides={"node.data_dir": str(tmp_path), "model.path": str(model), **overrides}
    )


def test_a_model_other_than_the_expected_one_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    cfg = node_config(tmp_path / "a", tiny_model, **{"model.expected_sha256": "ab" * 32})
    torch_thread = TorchThread(1)
    with pytest.raises(ConfigError, match="expected_sha256"):
        build_node(cfg, tiny_model, edges=NetworkEdges(cfg, tiny_model), torch_thread=torch_thread)
    good = node_config(
        tmp_path / "b", tiny_model, **{"model.expected_sha256": model_hash(tiny_model)}
    )
    node = build_node(
        good, tiny_model, edges=NetworkEdges(good, tiny_model), torch_thread=torch_thread
    )
    node.config.history.close()
    node.stage_server.close()


def test_json_log_lines_carry_the_node_and_environment() -> None:
    record = logging.LogRecord("butterfly.node", logging.WARNING, __file__, 1, "a %s", ("b",), None)
    line = json.loads(JsonLines("production", 3).format(record))
    assert line["message"] == "a b" and line["level"] == "warning"
    assert line["node"] == 3 and line["environment"] == "production"


async def test_metrics_disabled_means_no_metrics_endpoint(tiny_model: Path, tmp_path: Path) -> None:
    settings = ApiSettings(serve_metrics=False)
    async with serving(tiny_model, tmp_path / "t.db", settings=settings) as s:
        assert (await s.client.get("/metrics")).status_code == 404
        assert (await s.client.get("/health")).status_code in (200, 503)


@pytest.mark.parametrize(
    ("key", "value", "why"),
    [
        ("resources.device", "cuda", "CPU only"),
        ("security.require_signatures", False, "always signed"),
        ("scheduling.micro_batches", 4, "micro-batches"),
    ],
)
def test_options_this_build_cannot_honour_are_refused(key: str, value: object, why: str) -> None:
    with pytest.raises(ConfigInvalid, match=why) as e:
        load_config(overrides={key: value})
    assert e.value.issues[0].key == key


def test_local_replicate_lanes_share_the_cores(tiny_model: Path, tmp_path: Path) -> None:
    """f + 1 lanes compute at once on one machine: each node gets its share of the cores,
    unless the settings say otherwise; a chain (one node computing at a time) gets all."""
    import os

    from butterfly.cli.launcher import node_configs

    def threads(sub: str, **settings: object) -> int:
        paths = node_configs(
            nodes=4, f=1, model=tiny_model, api_port=1, data_dir=tmp_path / sub, settings=settings
        )
        return load_config([paths[2]], env={}).resources.threads

    share = max(1, len(os.sched_getaffinity(0)) // 2)
    assert threads("r", **{"byzantine.verification": "replicate"}) == share
    assert threads("a", **{"byzantine.verification": "audit"}) == 0
    assert threads("o", **{"byzantine.verification": "replicate", "resources.threads": 3}) == 3


async def test_model_dtype_and_quantization_reach_the_loaded_stage(
    tiny_model: Path, tmp_path: Path
) -> None:
    """The setting is what the node's stage holds, not only what validation reports."""
    import torch

    from butterfly.runtime.linear import Int8Weight
    from butterfly.runtime.native import BlockedWeight
    from butterfly.types.ids import Epoch
    from butterfly.types.wire.control import PlanAssign

    cfg = node_config(
        tmp_path, tiny_model, **{"model.dtype": "bfloat16", "model.quantization": "int8"}
    )
    torch_thread = TorchThread(1)
    node = build_node(
        cfg, tiny_model, edges=NetworkEdges(cfg, tiny_model), torch_thread=torch_thread
    )
    try:
        await node.stage_server.apply_plan(PlanAssign(Epoch(1), (0, 0, 4), model_hash(tiny_model)))
        stage = node.stage_server.stage
        assert stage is not None
        blk = stage.blocks[0]  # type: ignore[attr-defined]
        # int8 on whichever kernel was measured fastest: its own, or the blocked layout
        int8 = (
            blk.wqkv.dtype == torch.int8
            if isinstance(blk.wqkv, BlockedWeight)
            else isinstance(blk.wqkv, Int8Weight)
        )
        assert int8 and str(blk.attn_norm.dtype) == "torch.bfloat16"
    finally:
        node.config.history.close()
        node.stage_server.close()
