"""Trust benchmark: seeded data-path schedules with lying nodes (`butterfly.testing.sim_datapath`).

Prints one JSON object: the machine, how many schedules ran (n in [4, 10], f in [0, 3],
up to f liars with random strategies, audit or replicate mode), wrong answers marked
verified and honest nodes evicted (both must be 0), requests from each liar's first lie
to its eviction (median, p90, max; the target is at most 3), and per strategy and mode
how many liars lied, were evicted, or were never caught. A schedule that breaks an
invariant is named by its seed (`sim_datapath.replay(seed)` re-runs it), and so is each
liar that lied and was not evicted within 3 requests (`unevicted_examples`: evicted later,
or never with 3 or more requests left after its first lie).

    python bench/trust.py [--schedules 10000] [--seed 0] [--strategies corrupt,omit]
                          [--mode replicate] [--with-liar collude] [--seeds 3595,4269]
                          [--cpu-rounds 5]

`--mode` and `--with-liar` run only the schedules, among the same seeds, of that mode or
with a liar of that strategy (a schedule's draw does not change: the full run's misses
are found in a fraction of its time); `--seeds` runs exactly the seeds listed.

`--cpu-rounds N` (default 0: skipped) also measures the cost of the audit on a running
4-node cluster of the small demo model (f = 1, every range on 2 nodes): CPU of all node
processes per 64-token request with `byzantine.verification` audit against none, N
requests each after a warm-up, as bench/faults.py does (target: at most 1.15x).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from collections import Counter, defaultdict
from typing import Any

from butterfly.testing.sim_datapath import DataResult, LiarOutcome, run_data_schedule, scenario_for
from butterfly.testing.sim_liars import STRATEGIES
from common import machine, summary


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _missed(liar: LiarOutcome, requests: int) -> bool:
    """Lied and not evicted within 3 requests: evicted later, or not at all though 3 or
    more requests followed its first lie (fewer left is not yet a miss)."""
    if liar.first_lie is None:
        return False
    if liar.latency is not None:
        return liar.latency > 3
    return requests - liar.first_lie >= 3


def selected(
    first: int,
    count: int,
    strategies: tuple[str, ...],
    mode: str | None,
    with_liar: str | None,
) -> list[int]:
    """The seeds of [first, first + count) whose schedule has that mode and such a liar
    (drawing a scenario costs well under a millisecond; running one, tens)."""
    seeds = []
    for seed in range(first, first + count):
        if mode is None and with_liar is None:
            seeds.append(seed)
            continue
        sc = scenario_for(seed, strategies=strategies)
        if (mode is None or sc.mode == mode) and (
            with_liar is None or any(s == with_liar for _, s in sc.liars)
        ):
            seeds.append(seed)
    return seeds


def aggregate(results: list[DataResult], wall_s: float, per_ms: list[float]) -> dict[str, Any]:
    latencies: list[float] = []
    strategies: dict[str, Counter[str]] = defaultdict(Counter)
    strategy_latency: dict[str, list[float]] = defaultdict(list)
    modes: dict[str, Counter[str]] = defaultdict(Counter)
    violations: list[str] = []
    unevicted: list[dict[str, Any]] = []  # liars that missed the target, to replay
    # broken schedules by the strategies of the liars that lied in them, with a few seeds
    broken: dict[str, dict[str, Any]] = {}
    totals: Counter[str] = Counter()
    for r in results:
        sc = r.scenario
        mode = modes[sc.mode]
        mode["schedules"] += 1
        mode["wrong_verified_answers"] += len(r.wrong_verified)
        mode["honest_evictions"] += len(r.honest_evicted)
        mode["schedules_with_liars"] += bool(sc.liars)
        totals["requests"] += len(sc.requests)
        totals["verified_requests"] += r.verified
        totals["wrong_verified_answers"] += len(r.wrong_verified)
        totals["wrong_unverified_answers"] += r.wrong_unverified
        totals["failed_requests"] += len(r.failed)
        totals["honest_evictions"] += len(r.honest_evicted)
        totals["disputes_re_executed"] += r.disputes
        violations.extend(r.violations())
        lied_here = {liar.strategy for liar in r.liars if liar.first_lie is not None}
        if r.violations():
            key = f"{sc.mode}: " + ("+".join(sorted(lied_here)) or "no liar lied")
            entry = broken.setdefault(key, {"schedules": 0, "wrong_verified": 0, "seeds": []})
            entry["schedules"] += 1
            entry["wrong_verified"] += len(r.wrong_verified)
            entry["honest_evicted"] = entry.get("honest_evicted", 0) + len(r.honest_evicted)
            if len(entry["seeds"]) < 5:
                entry["seeds"].append(sc.seed)
        for s in lied_here:
            strategies[s]["schedules_with_wrong_verified"] += bool(r.wrong_verified)
            strategies[s]["schedules_with_honest_eviction"] += bool(r.honest_evicted)
        for liar in r.liars:
            if _missed(liar, len(sc.requests)):
                unevicted.append(
                    {
                        "seed": sc.seed,
                        "node": int(liar.node),
                        "strategy": liar.strategy,
                        "scenario": sc.describe(),
                        "first_lie": liar.first_lie,
                        "evicted_at": liar.evicted_at,
                    }
                )
            c = strategies[liar.strategy]
            c["liars"] += 1
            c[f"in_{sc.mode}"] += 1
            if liar.first_lie is None:
                c["never_lied"] += 1
                c["evicted_without_a_lie"] += liar.evicted_at is not None
                continue
            c["lied"] += 1
            if liar.latency is not None:
                c["evicted"] += 1
                c["evicted_within_3"] += liar.latency <= 3
                latencies.append(liar.latency)
                strategy_latency[liar.strategy].append(liar.latency)
            else:
                c["lied_never_evicted"] += 1
                c[f"lied_never_evicted_in_{sc.mode}"] += 1
                # fewer than 3 requests left after the first lie: not yet a miss of the target
                c["lied_never_evicted_3_requests_after"] += len(sc.requests) - liar.first_lie >= 3
    lied = sum(c["lied"] for c in strategies.values())
    evicted = sum(c["evicted"] for c in strategies.values())
    within = sum(c["evicted_within_3"] for c in strategies.values())
    missed = sum(c["lied_never_evicted_3_requests_after"] for c in strategies.values())
    return {
        "machine": {**machine(), "cpu_model": cpu_model()},
        "schedules": len(results),
        **dict(totals),
        "liars": sum(c["liars"] for c in strategies.values()),
        "liars_that_lied": lied,
        "liars_evicted": evicted,
        "eviction_latency_requests": summary(latencies) if latencies else None,
        "liars_evicted_within_3_requests": within,
        "liars_lied_not_evicted_within_3_requests": (evicted - within) + missed,
        "per_strategy": {
            s: {
                **dict(sorted(strategies[s].items())),
                "latency": summary(strategy_latency[s]) if strategy_latency[s] else None,
            }
            for s in STRATEGIES
            if s in strategies
        },
        "per_mode": {m: dict(c) for m, c in sorted(modes.items())},
        "targets": {
            "no_wrong_verified_answer": totals["wrong_verified_answers"] == 0,
            "no_honest_eviction": totals["honest_evictions"] == 0,
            "every_liar_evicted_within_3_requests": (evicted - within) + missed == 0,
        },
        "violations": len(violations),
        "broken_schedules_by_lying_strategies": dict(
            sorted(broken.items(), key=lambda kv: -int(kv[1]["schedules"]))
        ),
        "violation_examples": violations[:12],
        "unevicted": len(unevicted),
        "unevicted_examples": unevicted[:20],
        "wall_s": round(wall_s, 1),
        "per_schedule_ms": summary(per_ms) if per_ms else None,
    }


def audit_cpu(rounds: int) -> dict[str, Any]:
    """Audit against none on local node processes; every child is reaped by `stop()`."""
    import tempfile
    from pathlib import Path

    from common import bench_model
    from faults import cpu_seconds, generate, start

    model, prompt = bench_model("small"), list(range(1, 129))
    out: dict[str, Any] = {}
    for mode in ("none", "audit"):
        with tempfile.TemporaryDirectory() as tmp:
            cluster = start(
                model, 4, Path(tmp), f=1, partition__replication=2, byzantine__verification=mode
            )
            try:
                generate(cluster.api_url, prompt)  # warm-up
                pids = [p.pid for p in cluster.procs]
                cpu, per_token, verified = [], [], []
                for _ in range(rounds):
                    c0 = cpu_seconds(pids)
                    res = generate(cluster.api_url, prompt)
                    cpu.append(cpu_seconds(pids) - c0)
                    per_token.append(res["timings"]["time_per_output_token_s"] * 1000)
                    verified.append(res["verified"])
            finally:
                cluster.stop()
        out[mode] = {
            "cpu_s_per_request": summary(cpu),
            "decode_ms_per_token": summary(per_token),
            "verified": {v: verified.count(v) for v in sorted(set(verified))},
        }
    out["audit_vs_none_cpu"] = round(
        out["audit"]["cpu_s_per_request"]["median"] / out["none"]["cpu_s_per_request"]["median"], 3
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--schedules", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0, help="the first schedule's seed")
    parser.add_argument(
        "--strategies",
        default=",".join(STRATEGIES),
        help="comma-separated liar strategies to draw from (default: all)",
    )
    parser.add_argument(
        "--mode",
        choices=("audit", "replicate"),
        help="run only the schedules of this verification mode",
    )
    parser.add_argument("--with-liar", help="run only the schedules with a liar of this strategy")
    parser.add_argument(
        "--seeds", help="comma-separated seeds to run (instead of --seed/--schedules)"
    )
    parser.add_argument(
        "--cpu-rounds",
        type=int,
        default=0,
        help="also measure audit vs none CPU on a 4-node cluster, this many requests each",
    )
    args = parser.parse_args()
    strategies = tuple(s for s in args.strategies.split(",") if s)
    unknown = set(strategies) - set(STRATEGIES)
    if unknown:
        parser.error(f"unknown strategies {sorted(unknown)}; known: {', '.join(STRATEGIES)}")
    if args.with_liar is not None and args.with_liar not in strategies:
        parser.error(f"--with-liar {args.with_liar} is not among the strategies drawn")
    if args.seeds:
        seeds = [int(x) for x in args.seeds.split(",") if x]
    else:
        seeds = selected(args.seed, args.schedules, strategies, args.mode, args.with_liar)
    logging.disable(logging.CRITICAL)  # the parts log every dispute; the summary is the output
    results, per_ms = [], []
    started = time.perf_counter()
    for seed in seeds:
        t0 = time.perf_counter()
        results.append(run_data_schedule(seed, strategies=strategies))
        per_ms.append((time.perf_counter() - t0) * 1000)
    report = aggregate(results, time.perf_counter() - started, per_ms)
    report["seed"] = args.seed
    if args.seeds or args.mode or args.with_liar:
        report["selection"] = {
            "seeds": args.seeds or f"{args.seed}..{args.seed + args.schedules - 1}",
            "mode": args.mode,
            "with_liar": args.with_liar,
        }
    report["strategies"] = list(strategies)
    if args.cpu_rounds > 0:
        logging.disable(logging.NOTSET)
        report["audit_cpu_small_model"] = audit_cpu(args.cpu_rounds)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
