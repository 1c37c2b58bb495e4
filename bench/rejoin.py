"""Rejoin benchmark: how soon a node that comes back is serving again.

Prints one JSON object. Local node processes, n = 4, f = 1 (every range on two nodes),
default failure-detector settings (100 ms heartbeats, failed at phi 12), so a returning
node is taken back after 5 steady heartbeat intervals (`control.policy.rejoin_hold_s`).
Each trial is a fresh cluster (a node's departures in a row lengthen its hold, which is
not what is measured here), in two modes:

- restart: SIGKILL node 1 (a chain node), wait until the gateway's plan leaves it out,
  then start it again from its config (`LocalCluster.restart`);
- thaw: SIGSTOP node 1, wait the same, then SIGCONT.

Times are taken from the gateway's /health, polled every 10 ms: the first heartbeat back
is the poll time less the node's `last_seen_s` on the first poll it is heard from again;
"in the plan" is the first poll whose plan gives it layers; "audited answer" is when the
first request sent after that completes with `verified: "audit"` (only possible once the
node has loaded its range and answers audits, with `byzantine.audit_lone_ranges` off,
as here: otherwise the gateway audits the range its standby alone holds), the reference
tokens checked.

    python bench/rejoin.py [--trials 5] [--size tiny]
"""

from __future__ import annotations

import argparse
import json
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from butterfly.cli.launcher import LocalCluster, free_ports, node_configs
from common import bench_model, machine, summary

VICTIM = 1
NEW = 8
PROMPT = [1, 2, 3, 4, 5, 6, 7, 8]


def start(model: Path, tmp: Path) -> LocalCluster:
    port = free_ports(1)[0]
    # uniform placement: node 1 is then a chain node (measured placement may leave a
    # node without layers, and a node never in a plan cannot be measured coming back)
    # the gateway's own audit of a lone range off: an audited answer needs node 1 again
    settings = {"partition.strategy": "uniform", "byzantine.audit_lone_ranges": False}
    cfgs = node_configs(nodes=4, f=1, model=model, api_port=port, data_dir=tmp, settings=settings)
    cluster = LocalCluster(cfgs, f"http://127.0.0.1:{port}", tmp)
    try:
        cluster.start()
        cluster.wait_ready(300)
    except BaseException:
        cluster.stop()  # every child reaped by PID, even when start-up fails
        raise
    return cluster


def node_view(url: str) -> dict[str, Any]:
    nodes = httpx.get(f"{url}/health", timeout=5).json()["nodes"]
    return next(n for n in nodes if n["id"] == VICTIM)


def infer(url: str) -> dict[str, Any]:
    body = {"input_ids": PROMPT, "max_new_tokens": NEW, "wait": True}
    r = httpx.post(f"{url}/inference", json=body, timeout=300)
    r.raise_for_status()
    return dict(r.json())


def poll(check: Any, what: str, timeout_s: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.01)
    raise TimeoutError(what)


def trial(model: Path, mode: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        cluster = start(model, Path(tmp))
        proc = cluster.procs[VICTIM]
        try:
            expected = infer(cluster.api_url)["output_ids"]
            if mode == "restart":
                cluster.kill(VICTIM)
            else:
                proc.send_signal(signal.SIGSTOP)
            poll(lambda: node_view(cluster.api_url)["layers"] is None, "node out of the plan")
            away = node_view(cluster.api_url)["last_seen_s"]
            if mode == "restart":
                cluster.restart(VICTIM)
            else:
                proc.send_signal(signal.SIGCONT)
            t_back = time.monotonic()

            def heard() -> float | None:
                view = node_view(cluster.api_url)
                seen = view["last_seen_s"]
                if seen is None or view["status"] == "failed" or seen >= away:
                    return None
                return time.monotonic() - seen

            first_beat = poll(heard, "a heartbeat back")
            poll(lambda: node_view(cluster.api_url)["layers"] is not None, "node in the plan")
            in_plan = time.monotonic()
            answer = poll(
                lambda: (r := infer(cluster.api_url))["verified"] == "audit" and r,
                "an audited answer",
            )
            audited = time.monotonic()
            return {
                "process_back_to_first_heartbeat_s": first_beat - t_back,
                "first_heartbeat_to_plan_s": in_plan - first_beat,
                "first_heartbeat_to_audited_answer_s": audited - first_beat,
                "tokens_identical": answer["output_ids"] == expected,
            }
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)  # a stopped process would hold up the stop
            cluster.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--size", choices=["tiny", "small"], default="tiny")
    args = ap.parse_args()
    model = bench_model(args.size)
    out: dict[str, Any] = {"benchmark": "rejoin", "machine": machine(), "model": args.size}
    for mode in ("restart", "thaw"):
        runs = [trial(model, mode) for _ in range(args.trials)]
        out[mode] = {
            key: summary([r[key] for r in runs])
            for key in (
                "process_back_to_first_heartbeat_s",
                "first_heartbeat_to_plan_s",
                "first_heartbeat_to_audited_answer_s",
            )
        } | {"tokens_identical": all(r["tokens_identical"] for r in runs)}
    out["target"] = "serving again within 5 s of the first heartbeat"
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
