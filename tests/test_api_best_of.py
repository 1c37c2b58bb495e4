"""OpenAI's `best_of` (completions): that many candidates per prompt, the `n` with the
highest log-probability per token returned, best first; every candidate's tokens in
`usage`, as OpenAI bills them. It was accepted and ignored."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from butterfly.types.tasks import InferenceTask
from tests.api_util import assert_error, serving

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def complete(client: Any, **body: Any) -> dict[str, Any]:
    r = await client.post("/v1/completions", json={"model": "tiny", **body})
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    return answer


def mean(choice: dict[str, Any]) -> float:
    values = choice["logprobs"]["token_logprobs"]
    return sum(values) / len(values)


async def test_the_likeliest_candidates_per_token_are_returned(
    tiny_model: Path, tmp_path: Path
) -> None:
    """The candidates are the choices `n = best_of` gives with the same seed (candidate i
    samples with seed + i): the answer is the best of them by mean logprob, best first."""
    base = {"prompt": ["Once", "A"], "max_tokens": 6, "temperature": 1.0, "seed": 11}
    async with serving(tiny_model, tmp_path / "t.db") as s:
        every = await complete(s.client, n=4, logprobs=0, **base)
        best = await complete(s.client, n=2, best_of=4, logprobs=0, **base)
        quiet = await complete(s.client, n=2, best_of=4, **base)
    candidates = sorted(every["choices"], key=lambda c: c["index"])
    for p in range(2):  # each prompt's four candidates, its two best
        group = candidates[4 * p : 4 * p + 4]
        assert len({c["text"] for c in group}) > 1  # they differ: the choice means something
        ranked = sorted(group, key=lambda c: -mean(c))[:2]
        got = best["choices"][2 * p : 2 * p + 2]
        assert [c["index"] for c in got] == [2 * p, 2 * p + 1]
        assert [c["text"] for c in got] == [c["text"] for c in ranked]
        assert [mean(c) for c in got] == pytest.approx([mean(c) for c in ranked])
    # logprobs scored the candidates but are returned only when asked
    assert [c["text"] for c in quiet["choices"]] == [c["text"] for c in best["choices"]]
    assert all(c["logprobs"] is None for c in quiet["choices"])
    tokens = every["usage"]["completion_tokens"]
    assert best["usage"]["completion_tokens"] == quiet["usage"]["completion_tokens"] == tokens
    assert best["usage"]["prompt_tokens"] == every["usage"]["prompt_tokens"]


@pytest.mark.parametrize(
    "alike",
    [
        {"temperature": 0.0},
        {"temperature": 1.0, "top_k": 1, "seed": 3},
        {"temperature": 1.0, "max_tokens": 0, "echo": True, "logprobs": 1},
    ],
    ids=["greedy", "top_k-1", "scored-prompt"],
)
async def test_candidates_that_are_all_alike_are_not_computed(
    tiny_model: Path, tmp_path: Path, alike: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Greedy candidates (top_k 1 is greedy too) and a prompt scored with no new token
    are all alike: n are returned and no more computed (nor billed)."""
    base = {"prompt": "Once", "max_tokens": 6, **alike}
    async with serving(tiny_model, tmp_path / "t.db") as s:
        submitted: list[InferenceTask] = []
        submit = s.scheduler.submit

        async def counted(task: InferenceTask) -> Any:
            submitted.append(task)
            return await submit(task)

        monkeypatch.setattr(s.scheduler, "submit", counted)
        plain = await complete(s.client, **base)
        best = await complete(s.client, best_of=5, **base)
    assert best["choices"] == plain["choices"]
    assert best["usage"] == plain["usage"]
    assert len(submitted) == 2  # one candidate each: only one ran


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"best_of": 3, "stream": True}, ["best_of", "stream"]),
        ({"best_of": 1, "n": 2}, ["best_of", "at least n"]),
        ({"best_of": 21}, ["best_of", "20"]),
        ({"best_of": 20, "prompt": ["a", "b", "c", "d"]}, ["best_of=20", "80", "at most 64"]),
    ],
)
async def test_a_best_of_that_cannot_be_served_is_a_400_naming_it(
    tiny_model: Path, tmp_path: Path, body: dict[str, Any], words: list[str]
) -> None:
    sampled = {"model": "tiny", "prompt": "hi", "temperature": 1.0, **body}
    async with serving(tiny_model, tmp_path / "t.db") as s:
        r = await s.client.post("/v1/completions", json=sampled)
        assert_error(r, 400, "invalid_request", *words)
        assert r.json()["error"]["param"] == "best_of"
