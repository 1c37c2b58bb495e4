"""Fault benchmark: detection, false suspicions under load, recovery, cost of audits.

Prints one JSON object. All on local node processes with the default failure-detector
settings (100 ms heartbeats, suspect at phi 8, failed at phi 12):

- detection: SIGKILL a stage node of an idle cluster; time until the gateway's /health
  shows it suspected and failed (polled every 5 ms), over `--trials` kills;
- false suspicions: an idle 4-node cluster for `--load-seconds` with both cores kept busy
  by two spinning processes; `butterfly_suspicions_total` on the gateway;
- recovery: a 64-token generation on the small model, a chain node killed at token 16;
  from the kill to the next token produced, and whether the tokens equal an undisturbed run,
  with standbys (f = 1) and without (f = 0), `--recovery-trials` fresh clusters each;
- verification cost: per-token latency and total CPU (all node processes) of 64-token
  generations with `byzantine.verification` audit and replicate (f = 1: every range on 2
  nodes; replicate runs every step on both) vs none;
- a lone range's audit (`--only lone`): with a chain node killed, its standby alone holds
  its range, which the gateway re-executes to audit (`byzantine.audit_lone_ranges`) or
  not, alternating (`lone_range_cost`).

    python bench/faults.py [--trials 5] [--load-seconds 300] [--only verification|lone]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from butterfly.cli.launcher import LocalCluster, free_ports, node_configs
from common import bench_model, machine, rotated, summary

NEW = 64


def start(model: Path, nodes: int, tmp: Path, **settings: Any) -> LocalCluster:
    port = free_ports(1)[0]
    f = int(settings.pop("f", 0))
    cfgs = node_configs(
        nodes=nodes,
        f=f,
        model=model,
        api_port=port,
        data_dir=tmp,
        settings={k.replace("__", "."): v for k, v in settings.items()},
    )
    cluster = LocalCluster(cfgs, f"http://127.0.0.1:{port}", tmp)
    try:
        cluster.start()
        cluster.wait_ready(300)
    except BaseException:
        cluster.stop()  # every child reaped by PID, even when start-up fails
        raise
    return cluster


def statuses(url: str) -> dict[int, str]:
    nodes = httpx.get(f"{url}/health", timeout=5).json()["nodes"]
    return {n["id"]: n["status"] for n in nodes}


def detection(model: Path, trials: int) -> dict[str, Any]:
    suspected, failed = [], []
    for _ in range(trials):
        with tempfile.TemporaryDirectory() as tmp:
            cluster = start(model, 4, Path(tmp))
            try:
                time.sleep(2.0)  # a window of regular heartbeats
                t0 = time.perf_counter()
                cluster.kill(3)
                s = f = None
                while f is None and time.perf_counter() - t0 < 10:
                    st = statuses(cluster.api_url).get(3)
                    now = time.perf_counter() - t0
                    if s is None and st in ("suspected", "failed"):
                        s = now
                    if st == "failed":
                        f = now
                    time.sleep(0.005)
                if s is not None and f is not None:
                    suspected.append(s * 1000)
                    failed.append(f * 1000)
            finally:
                cluster.stop()
    return {"kill_to_suspected_ms": summary(suspected), "kill_to_failed_ms": summary(failed)}


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    x = 0
    while time.perf_counter() < end:
        x += 1


def metric_sum(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == name
    )


def false_suspicions(model: Path, seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        cluster = start(model, 4, Path(tmp))
        try:
            burners = [multiprocessing.Process(target=_spin, args=(seconds,)) for _ in range(2)]
            for b in burners:
                b.start()
            for b in burners:
                b.join(seconds + 30)
            count = metric_sum(cluster.api_url, "butterfly_suspicions_total")
            return {
                "seconds": seconds,
                "busy_processes": 2,
                "suspicions": count,
                "healthy_after": httpx.get(f"{cluster.api_url}/health").json()["healthy"],
            }
        finally:
            cluster.stop()


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / 100.0  # utime + stime, clock ticks
    return total


def generate(url: str, prompt: list[int]) -> dict[str, Any]:
    body = {"input_ids": prompt, "max_new_tokens": NEW, "wait": True}
    r = httpx.post(f"{url}/inference", json=body, timeout=600)
    r.raise_for_status()
    return dict(r.json())


def tokens_so_far(url: str, task: str) -> int:
    return int(httpx.get(f"{url}/status/{task}").json().get("tokens_generated", 0))


def recovery_trial(model: Path, prompt: list[int], victim: int, **settings: Any) -> dict[str, Any]:
    """One kill of `victim` at token 16 of a 64-token generation on a fresh cluster."""
    with tempfile.TemporaryDirectory() as tmp:
        cluster = start(model, 4, Path(tmp), **settings)
        try:
            expected = generate(cluster.api_url, prompt)["output_ids"]
            body = {"input_ids": prompt, "max_new_tokens": NEW}
            task = httpx.post(f"{cluster.api_url}/inference", json=body).json()["task_id"]
            deadline = time.monotonic() + 300
            while tokens_so_far(cluster.api_url, task) < 16 and time.monotonic() < deadline:
                time.sleep(0.002)
            t0 = time.perf_counter()
            cluster.kill(victim)
            while tokens_so_far(cluster.api_url, task) < 17 and time.monotonic() < deadline:
                time.sleep(0.002)
            resumed = time.perf_counter() - t0
            r = httpx.get(f"{cluster.api_url}/result/{task}", params={"wait": 300}, timeout=400)
            result = r.json()
            return {
                "kill_to_next_token_ms": resumed * 1000,
                "resumed_at": result["timings"].get("resumed_at", 0.0),
                "tokens_identical": result["output_ids"] == expected,
            }
        finally:
            cluster.stop()


def recovery(model: Path, prompt: list[int], trials: int) -> dict[str, Any]:
    """Two deployments: with standbys (f = 1: every range on two nodes, the chain's
    copies of its KV caches on the other holder; node 1 is also the agreement's primary,
    so its death costs a view change too), and without (f = 0: the survivors take the
    dead node's layers over, load them, and replay the request from token 0)."""
    out: dict[str, Any] = {}
    for name, victim, settings in (
        ("standby_f1_kill_primary_chain_node", 1, {"f": 1}),
        ("no_standby_f0", 2, {"f": 0}),
    ):
        runs = [recovery_trial(model, prompt, victim, **settings) for _ in range(trials)]
        out[name] = {
            "kill_to_next_token_ms": summary([r["kill_to_next_token_ms"] for r in runs]),
            "resumed_at_position": sorted({r["resumed_at"] for r in runs}),
            "tokens_identical": all(r["tokens_identical"] for r in runs),
        }
    return out


def audit_cost(model: Path, prompt: list[int], rounds: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # one placement for all (f = 1, every range on 2 nodes: a 2-stage chain and its
    # standbys), so the figures differ by the check alone, not by the depth of the chain;
    # audit_half samples half the requests (byzantine.audit_fraction = 0.5), over twice
    # the rounds, and its CPU is the mean (the audited ones cost more)
    modes = {
        "none": {"byzantine__verification": "none"},
        "audit": {"byzantine__verification": "audit"},
        "audit_half": {"byzantine__verification": "audit", "byzantine__audit_fraction": 0.5},
        "replicate": {"byzantine__verification": "replicate"},
    }
    for mode, settings in modes.items():
        n = rounds * 2 if mode == "audit_half" else rounds
        with tempfile.TemporaryDirectory() as tmp:
            cluster = start(model, 4, Path(tmp), f=1, partition__replication=2, **settings)
            try:
                generate(cluster.api_url, prompt)  # warm-up
                pids = [p.pid for p in cluster.procs]
                per_token, cpu, verified = [], [], []
                for _ in range(n):
                    c0 = cpu_seconds(pids)
                    res = generate(cluster.api_url, prompt)
                    cpu.append(cpu_seconds(pids) - c0)
                    per_token.append(res["timings"]["time_per_output_token_s"] * 1000)
                    verified.append(res["verified"])
                out[mode] = {
                    "decode_ms_per_token": summary(per_token),
                    "cpu_s_per_request": summary(cpu),
                    "cpu_s_per_request_mean": round(sum(cpu) / len(cpu), 3),
                    "verified": {v: verified.count(v) for v in sorted(set(verified))},
                }
            finally:
                cluster.stop()
    none = out["none"]
    for mode in ("audit", "audit_half", "replicate"):
        m = out[mode]
        out[f"{mode}_vs_none"] = {
            "cpu": round(m["cpu_s_per_request"]["median"] / none["cpu_s_per_request"]["median"], 3),
            "cpu_mean": round(m["cpu_s_per_request_mean"] / none["cpu_s_per_request_mean"], 3),
            "per_token": round(
                m["decode_ms_per_token"]["median"] / none["decode_ms_per_token"]["median"], 3
            ),
        }
    return out


def lone_range_cost(model: Path, prompt: list[int], rounds: int) -> dict[str, Any]:
    """n = 4, f = 1 (two stages, each on two nodes), chain node 1 killed: its standby
    alone holds its range. Requests with `byzantine.audit_lone_ranges` on (the gateway
    re-executes that range to audit them) and off (they come back unverified), the
    option changed live between requests in one cluster, in an order that rotates."""
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cluster = start(model, 4, Path(tmp), f=1, partition__strategy="uniform")
        url = cluster.api_url
        try:
            generate(url, prompt)  # warm-up, node 1 in the chain
            cluster.kill(1)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                nodes = httpx.get(f"{url}/health", timeout=10).json()["nodes"]
                if not [n for n in nodes if n["id"] == 1 and n["layers"] is not None]:
                    break
                time.sleep(0.1)
            else:
                raise SystemExit("node 1 never left the plan")
            generate(url, prompt)  # the gateway loads the lone range
            pids = [p.pid for i, p in enumerate(cluster.procs) if i != 1]
            samples: dict[str, dict[str, list[Any]]] = {
                k: {"per_token": [], "cpu": [], "verified": []} for k in ("on", "off")
            }
            now = "on"  # the default; an update that changes nothing is refused (409)
            for r in range(rounds):
                for mode in rotated(("on", "off"), r):
                    if mode != now:
                        body = {"byzantine.audit_lone_ranges": mode == "on"}
                        resp = httpx.post(f"{url}/api/v1/config", json=body, timeout=60)
                        if resp.status_code != 200:
                            why = f"{resp.status_code} {resp.text}"
                            raise SystemExit(f"config update refused: {why}")
                        now = mode
                    c0 = cpu_seconds(pids)
                    res = generate(url, prompt)
                    samples[mode]["cpu"].append(cpu_seconds(pids) - c0)
                    per_token = res["timings"]["time_per_output_token_s"] * 1000
                    samples[mode]["per_token"].append(per_token)
                    samples[mode]["verified"].append(res["verified"])
            for mode, got in samples.items():
                out[mode] = {
                    "decode_ms_per_token": summary(got["per_token"]),
                    "cpu_s_per_request": summary(got["cpu"]),
                    "verified": {v: got["verified"].count(v) for v in set(got["verified"])},
                }
            out["on_vs_off"] = {
                "cpu": round(
                    out["on"]["cpu_s_per_request"]["median"]
                    / out["off"]["cpu_s_per_request"]["median"],
                    3,
                ),
                "per_token": round(
                    out["on"]["decode_ms_per_token"]["median"]
                    / out["off"]["decode_ms_per_token"]["median"],
                    3,
                ),
            }
        finally:
            cluster.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--load-seconds", type=float, default=300.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--recovery-trials", type=int, default=3)
    ap.add_argument(
        "--only", choices=["verification", "recovery", "lone"], help="run only this part"
    )
    args = ap.parse_args()
    tiny, small = bench_model("tiny"), bench_model("small")
    prompt = list(range(1, 129))
    if args.only == "recovery":
        rec = recovery(small, prompt, args.recovery_trials)
        print(json.dumps({"benchmark": "faults", "machine": machine(), "recovery": rec}, indent=2))
        return
    if args.only == "lone":
        lone = lone_range_cost(small, prompt, args.rounds)
        print(json.dumps({"benchmark": "faults", "machine": machine(), "lone_range": lone}))
        return
    if args.only == "verification":
        cost = audit_cost(small, prompt, args.rounds)
        print(json.dumps({"benchmark": "faults", "machine": machine(), **cost}, indent=2))
        return
    print(
        json.dumps(
            {
                "benchmark": "faults",
                "machine": machine(),
                "detection": detection(tiny, args.trials),
                "false_suspicions_under_load": false_suspicions(tiny, args.load_seconds),
                "recovery_small_model": recovery(small, prompt, args.recovery_trials),
                "verification_cost_small_model": audit_cost(small, prompt, args.rounds),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
