"""The acting gateway killed with SIGKILL mid-generation, in a live cluster: node 1
takes over and every accepted task ends with the unsplit model's tokens.

Four real node processes, f = 1, gateways 0 and 1 (node 1 serves its API on the port
after node 0's). Tasks are accepted by node 0 (copied to node 1 before each 202);
node 0 is killed once the first has produced tokens past a checkpoint; node 1's
detector sees it fail, its takeover is agreed, and it serves the tasks from its own
store, resuming each from its checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from butterfly.cli import app
from butterfly.cli.launcher import LocalCluster, free_port_block, node_configs
from butterfly.runtime.generate import generate
from butterfly.runtime.loader import load_stage
from butterfly.runtime.tokenizer import TextCodec
from butterfly.testing.latency import delay_cluster
from butterfly.types.tasks import SamplingParams
from tests.cluster_util import QUICK_PROBE, running_cluster

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]
NEW = 120
SHORT = 6
PROMPTS = ["Butterfly", "Once upon a time", "a b c"]
SAMPLED = SamplingParams(temperature=0.8, seed=5)
TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def references(model: Path) -> list[list[int]]:
    codec, stage = TextCodec.load(model), load_stage(model)
    out = []
    for i, prompt in enumerate(PROMPTS):
        sampling = SAMPLED if i == 1 else SamplingParams()
        ids = codec.encode(prompt)
        out.append(list(generate([stage], ids, NEW, sampling=sampling, stop_ids=codec.eos_ids)))
    return out


def test_the_acting_gateway_killed_mid_generation_loses_nothing(
    tiny_model: Path, tmp_path: Path
) -> None:
    expected = references(tiny_model)
    settings = {"coordination.checkpoint_frequency": 8, "cluster.gateways": [0, 1]}
    with running_cluster(tiny_model, 4, tmp_path, f=1, settings=settings) as cluster:
        port = int(cluster.api_url.rsplit(":", 1)[1])
        successor = f"http://127.0.0.1:{port + 1}"
        standby = httpx.get(f"{successor}/health", timeout=10)
        assert standby.status_code == 503 and standby.json()["acting_gateway"] == 0
        gateways = httpx.get(f"{cluster.api_url}/health", timeout=10).json()["gateways"]
        assert [(g["node"], g["url"], g["acting"]) for g in gateways] == [
            (0, cluster.api_url, True),
            (1, successor, False),
        ]
        # a client of the standby is led to the acting gateway (307, followed)
        assert infer([successor]) == expected[0][:SHORT]
        ids = []
        for i, prompt in enumerate(PROMPTS):
            body: dict[str, object] = {"prompt": prompt, "max_new_tokens": NEW}
            if i == 1:
                body |= {"temperature": SAMPLED.temperature, "seed": SAMPLED.seed}
            r = httpx.post(f"{cluster.api_url}/inference", json=body, timeout=30)
            assert r.status_code == 202, r.text
            ids.append(r.json()["task_id"])
        # a token required through the API holds on the standby too, once it takes over
        # (it served with its own file's values: none)
        r = httpx.post(f"{cluster.api_url}/api/v1/config", json={"api.tokens": [TOKEN]}, timeout=60)
        assert r.status_code == 200 and r.json()["nodes"] == {"0": "applied", "1": "applied"}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            url = f"{cluster.api_url}/status/{ids[0]}"
            status = httpx.get(url, headers=AUTH, timeout=10).json()
            if status.get("tokens_generated", 0) >= 12:
                break
            time.sleep(0.005)
        assert status["status"] == "computing", status  # killed mid-generation
        cluster.kill(0)
        deadline = time.monotonic() + 60
        healthy, refused = False, 0
        while time.monotonic() < deadline and not healthy:
            time.sleep(0.05)
            try:
                healthy = httpx.get(f"{successor}/health", timeout=2).json().get("healthy", False)
            except httpx.ConnectError:
                refused += 1  # nothing listened on node 1's API port
            except httpx.HTTPError:
                continue
        assert healthy, "node 1 did not take over"
        # its port answered throughout: a redirect, then 503 while it planned (api.switch)
        assert refused == 0, f"node 1's API refused {refused} connection(s) while taking over"
        body = {"prompt": PROMPTS[0], "max_new_tokens": 1}
        assert httpx.post(f"{successor}/inference", json=body, timeout=30).status_code == 401
        for task_id, tokens in zip(ids, expected, strict=True):
            url = f"{successor}/result/{task_id}"
            r = httpx.get(url, params={"wait": 120}, headers=AUTH, timeout=180)
            assert r.status_code == 200, r.text
            result = r.json()
            assert result["output_ids"] == tokens, task_id
            assert 0 not in {s["node"] for s in result["stages"]}
        first = httpx.get(f"{successor}/result/{ids[0]}", headers=AUTH, timeout=10).json()
        assert first["timings"].get("resumed_from_checkpoint", 0) >= 8
        # `butterfly infer --url A,B`: node 0 is dead, the next address answers
        assert infer([cluster.api_url, successor], "--token", TOKEN) == expected[0][:SHORT]


def infer(urls: list[str], *extra: str) -> list[int]:
    args = ["infer", "--url", ",".join(urls), PROMPTS[0], "--max-tokens", str(SHORT), "--json"]
    args += extra
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    output_ids: list[int] = json.loads(result.stdout)["output_ids"]
    return output_ids


def test_with_f_0_a_standby_that_alone_loses_the_gateways_heartbeats_does_not_take_over(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Real processes, f = 0, a proxy (no delay) in front of every node: node 0's
    heartbeats to node 1 are lost for 3 s, everything else flows. Node 1 sees node 0
    fail; nodes 2 and 3 do not, so no takeover may be agreed. With one vote deciding
    (the quorum at f = 0 once was 1) node 1 ordered its own and served as a second
    gateway (tests/test_inprocess_gateway_failover.py has the same in one process)."""
    expected = references(tiny_model)[0][:SHORT]
    port = free_port_block(2)
    cfgs = node_configs(
        nodes=4, f=0, model=tiny_model, api_port=port, data_dir=tmp_path, settings=QUICK_PROBE
    )
    with delay_cluster(cfgs, 0.0) as proxies:
        docs = [tomllib.loads(p.read_text()) for p in cfgs]
        member_port = int(docs[1]["cluster"]["members"][1].rsplit(":", 1)[1])
        gateway_port = int(docs[0]["node"]["listen"].rsplit(":", 1)[1])  # node 0's UDP too
        cluster = LocalCluster(cfgs, f"http://127.0.0.1:{port}", tmp_path)
        try:
            cluster.start()
            cluster.wait_ready(120)
            urls = [cluster.api_url, f"http://127.0.0.1:{port + 1}"]
            assert infer(urls) == expected
            proxies.drop_datagrams(member_port, gateway_port)
            time.sleep(3.0)
            proxies.drop_datagrams(member_port, gateway_port, dropped=False)
            time.sleep(1.0)
            log = (tmp_path / "node-1.log").read_text()
            assert "taking over" in log  # node 1 did see node 0 fail, and proposed
            assert "acts as the gateway" not in log  # but was never agreed
            for url in urls:
                gateways = httpx.get(f"{url}/health", timeout=10).json()["gateways"]
                assert [(g["node"], g["acting"]) for g in gateways] == [(0, True), (1, False)]
            # and node 1 behaves as a standby: it sends a client on to node 0, serving none
            body = {"prompt": PROMPTS[0], "max_new_tokens": SHORT}
            led = httpx.post(f"{urls[1]}/inference", json=body, timeout=10)
            assert led.status_code == 307 and led.headers["location"].startswith(urls[0])
            assert infer(urls) == expected
        finally:
            cluster.stop()


def test_a_cluster_whose_first_gateway_never_comes_up_is_served_by_the_next(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Node 0, the first gateway, dies as it starts, before it is ever heard. Never
    heard, it read as "starting", not failed, and no node took over: the cluster never
    served. Now the others count it failed after `coordination.never_heard_s` of
    silence (5 s here); node 1 takes over, plans over the three and answers
    `butterfly infer --url A,B`."""
    expected = references(tiny_model)[0][:SHORT]
    port = free_port_block(2)
    grace_s = 5.0
    settings = {
        "coordination.acceptable_pause_ms": 400.0,
        "coordination.never_heard_s": grace_s,
        **QUICK_PROBE,
    }
    cfgs = node_configs(
        nodes=4, f=1, model=tiny_model, api_port=port, data_dir=tmp_path, settings=settings
    )
    cluster = LocalCluster(cfgs, f"http://127.0.0.1:{port}", tmp_path)
    successor = f"http://127.0.0.1:{port + 1}"
    try:
        cluster.start()
        cluster.kill(0)  # long before it has imported its code, let alone sent a heartbeat
        deadline = time.monotonic() + grace_s + 90
        healthy = False
        while not healthy and time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                healthy = httpx.get(f"{successor}/health", timeout=2).status_code == 200
            time.sleep(0.5)
        assert healthy, "node 1 never served"
        assert "listening" not in (tmp_path / "node-0.log").read_text()  # never up
        gateways = httpx.get(f"{successor}/health", timeout=10).json()["gateways"]
        assert [(g["node"], g["acting"]) for g in gateways] == [(0, False), (1, True)]
        assert infer([cluster.api_url, successor]) == expected
    finally:
        cluster.stop()


def poll(check: Callable[[], bool], what: str, limit_s: float = 90.0) -> float:
    """Seconds until `check()` holds (polled every 50 ms), or AssertionError naming it."""
    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, TypeError):
            if check():
                return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {limit_s:.0f} s")


@contextlib.contextmanager
def two_gateways(
    model: Path, tmp_path: Path, never_heard_s: float = 30.0
) -> Iterator[tuple[LocalCluster, list[str], list[int]]]:
    """4 nodes, f = 1, gateways 0 and 1: the cluster, the gateways' API URLs, and the
    tokens 16 new ones after "Butterfly" must be. `never_heard_s`: how long a restarted
    standby waits for an acting gateway it never heard before taking over."""
    codec = TextCodec.load(model)
    ref = list(generate([load_stage(model)], codec.encode("Butterfly"), 16, stop_ids=codec.eos_ids))
    settings = {
        "coordination.checkpoint_frequency": 8,
        "cluster.gateways": [0, 1],
        "coordination.never_heard_s": never_heard_s,
    }
    with running_cluster(model, 4, tmp_path, f=1, settings=settings) as cluster:
        port = int(cluster.api_url.rsplit(":", 1)[1])
        yield cluster, [f"http://127.0.0.1:{port + k}" for k in range(2)], ref


def test_tasks_accepted_while_the_old_gateway_was_away_survive_the_new_ones_death(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Node 0 (acting) killed, node 1 takes over and accepts tasks while node 0 is down
    and restarting; node 0 comes back as a standby, node 1 gives it what it missed
    (`holds_every_task` in node 1's /health), then node 1 is killed: node 0 holds every
    task node 1 answered 202 for. node 1's circuit to node 0, open from the dials that
    failed while it was dead, held the catch-up back about 1.5 s, and a review that
    killed node 1 in that window lost up to 100 of them. The catch-up is waited for (20 s
    at most), not timed: a bound of 5 s failed CI at 5.16 s on a slow machine, and the
    window is what `keep_standbys` and `_copy` bound, not what one run happens to take."""
    with two_gateways(tiny_model, tmp_path) as (cluster, urls, ref):
        cluster.kill(0)
        poll(lambda: httpx.get(f"{urls[1]}/health", timeout=2).json()["healthy"], "node 1")
        accepted: list[str] = []

        def submit(count: int) -> None:
            for _ in range(count):
                r = httpx.post(
                    f"{urls[1]}/inference",
                    json={"prompt": "Butterfly", "max_new_tokens": 16},
                    timeout=30,
                )
                assert r.status_code == 202, r.text
                accepted.append(r.json()["task_id"])

        submit(20)  # node 0 down: no standby to copy to
        cluster.restart(0)
        submit(10)  # node 0 starting

        def node0() -> dict[str, object]:
            gateways = httpx.get(f"{urls[1]}/health", timeout=2).json()["gateways"]
            return next(g for g in gateways if g["node"] == 0)

        poll(lambda: node0()["status"] == "healthy", "node 0 heard again")
        poll(lambda: node0()["holds_every_task"], "node 0 given what it missed", 20)
        submit(5)  # copied before each 202
        cluster.kill(1)
        poll(lambda: httpx.get(f"{urls[0]}/health", timeout=2).json()["healthy"], "node 0")
        lost = []
        for tid in accepted:
            r = httpx.get(f"{urls[0]}/result/{tid}", params={"wait": 60}, timeout=90)
            if r.status_code != 200 or r.json()["output_ids"] != ref:
                lost.append(f"{tid}: {r.status_code} {r.text[:120]}")
        assert not lost, f"{len(lost)} of {len(accepted)} 202s lost:\n" + "\n".join(lost)


def test_tasks_only_a_dead_gateway_held_are_served_once_it_comes_back(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Node 1 (the standby) killed, node 0 accepts tasks it cannot copy there, then dies
    too; node 1 comes back and acts without them (node 0 is down when it takes over), and
    node 0 comes back as its standby. The tasks live in node 0's store only: node 1 takes
    them from it when it gives node 0 what it missed, and serves them. Before, they stayed
    in node 0's store unfinished and unknown to the acting gateway (404) for as long as
    node 0 did not act again. Node 1 restarts while node 0 is down, so it takes over
    only once it has never heard node 0 for `coordination.never_heard_s` (15 s here, not
    the default 30, which took the test 40 s)."""
    with two_gateways(tiny_model, tmp_path, never_heard_s=15.0) as (cluster, urls, ref):
        cluster.kill(1)
        poll(lambda: httpx.get(f"{urls[0]}/health", timeout=2).json()["healthy"], "node 0")
        accepted = []
        for _ in range(12):  # queued behind each other: most unfinished when node 0 dies
            body = {"prompt": "Butterfly", "max_new_tokens": 16}
            r = httpx.post(f"{urls[0]}/inference", json=body, timeout=30)
            assert r.status_code == 202, r.text
            accepted.append(r.json()["task_id"])
        cluster.kill(0)
        cluster.restart(1)
        poll(lambda: httpx.get(f"{urls[1]}/health", timeout=2).json()["healthy"], "node 1 acts")
        cluster.restart(0)
        for tid in accepted:
            poll(
                lambda tid=tid: httpx.get(f"{urls[1]}/result/{tid}", timeout=5).status_code == 200,
                f"task {tid} served by node 1",
                60,
            )
            r = httpx.get(f"{urls[1]}/result/{tid}", timeout=5)
            assert r.json()["output_ids"] == ref, r.text
