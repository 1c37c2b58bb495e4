"""Start-up benchmark: how soon the CLI answers, a node process has imported its code, and
a 4-node tiny cluster serves.

Prints one JSON object. Each round runs, as separate processes:

- `python -c pass` and `python -c "import torch"`: the interpreter's and torch's own
  start, the references every other figure is held to (measured in the same rounds);
- `python -m butterfly status --help`: a CLI command that needs no model;
- `python -c "import butterfly.node"`: what a node process imports before it starts;
- a 4-node tiny cluster started to ready (`LocalCluster.wait_ready`: the acting
  gateway reports every node healthy with its stage loaded) by a fresh process, as
  `butterfly cluster up` starts one (`cluster_ready_s`: the nodes' fork server starts
  with it, `cli.prefork`), with the CPU seconds each node process had used by then
  (from /proc; a forked node's excludes the imports its server did);
- the same started from this process once its fork server runs (`cluster_ready_warm_s`:
  what a restarted node, or a test's second cluster, waits for).

With `--baseline-src DIR` the same figures are also taken on the code under DIR (another
checkout's `src/`), interleaved round by round, so an A/B is one run on one machine state.

    python bench/startup.py [--rounds 5] [--baseline-src /path/to/other/src]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import bench_model, machine, summary
from hops import cluster


def wall_s(code: list[str], pythonpath: str | None) -> float:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    t0 = time.perf_counter()
    subprocess.run([sys.executable, *code], env=env, check=True, capture_output=True, timeout=120)
    return time.perf_counter() - t0


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_cluster(model: Path, pythonpath: str | None) -> dict[str, Any]:
    """A 4-node cluster started to ready: seconds, and each node's CPU seconds by then."""
    t0 = time.perf_counter()
    with cluster(model, 4, pythonpath=pythonpath) as c:
        ready = time.perf_counter() - t0
        return {"ready_s": ready, "node_cpu_s": [cpu_s(p.pid) for p in c.procs]}


def fresh_cluster(model: Path, pythonpath: str | None) -> dict[str, Any]:
    """`one_cluster` in a fresh process running the code under `pythonpath` (its
    launcher too), as `butterfly cluster up` runs."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    done = subprocess.run(
        [sys.executable, __file__, "--one-cluster", str(model)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    said: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return said


def one_round(model: Path, pythonpath: str | None, out: dict[str, list[float]]) -> None:
    out["cli_s"].append(wall_s(["-m", "butterfly", "status", "--help"], pythonpath))
    out["node_import_s"].append(wall_s(["-c", "import butterfly.node"], pythonpath))
    fresh = fresh_cluster(model, pythonpath)
    out["cluster_ready_s"].append(fresh["ready_s"])
    out["node_cpu_at_ready_s"].extend(fresh["node_cpu_s"])
    out["cluster_ready_warm_s"].append(one_cluster(model, pythonpath)["ready_s"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--baseline-src", default=None, help="also take the figures on the code in this src/"
    )
    ap.add_argument("--one-cluster", default=None, help=argparse.SUPPRESS)  # fresh_cluster's
    args = ap.parse_args()
    if args.one_cluster:
        print(json.dumps(one_cluster(Path(args.one_cluster), None)))
        return
    model = bench_model("tiny")
    # this checkout's own code, whatever the environment's editable install points at
    trees: dict[str, str | None] = {"this": str(Path(__file__).resolve().parents[1] / "src")}
    if args.baseline_src:
        trees["baseline"] = str(Path(args.baseline_src).resolve())
    keys = ("cli_s", "node_import_s", "cluster_ready_s", "node_cpu_at_ready_s")
    keys += ("cluster_ready_warm_s",)
    got: dict[str, dict[str, list[float]]] = {t: {k: [] for k in keys} for t in trees}
    for tree in trees.values():  # each tree's fork server started, for the warm figure
        one_cluster(model, tree)
    ref: dict[str, list[float]] = {"python_s": [], "import_torch_s": []}
    for r in range(args.rounds):
        ref["python_s"].append(wall_s(["-c", "pass"], None))
        ref["import_torch_s"].append(wall_s(["-c", "import torch"], None))
        for name in trees if r % 2 == 0 else reversed(trees):
            one_round(model, trees[name], got[name])
    result: dict[str, Any] = {
        "bench": "startup",
        "machine": machine(),
        "rounds": args.rounds,
        "reference": {k: summary(v) for k, v in ref.items()},
    }
    torch_s = summary(ref["import_torch_s"])["median"]
    for name, figures in got.items():
        result[name] = {k: summary(v) for k, v in figures.items()}
        result[name]["cli_to_import_torch"] = round(
            summary(figures["cli_s"])["median"] / torch_s, 3
        )
        result[name]["node_import_to_import_torch"] = round(
            summary(figures["node_import_s"])["median"] / torch_s, 3
        )
    if "baseline" in got:
        result["this_to_baseline"] = {
            k: round(summary(got["this"][k])["median"] / summary(got["baseline"][k])["median"], 3)
            for k in keys
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
