"""Coordination protocol costs: PBFT commit latency and failure detection time.

Prints one JSON object.

- `pbft_commit_ms`: 4 replicas (f = 1) in one process, pure reducers, Ed25519 signing
  and verification included. One request at a time, from the client's request to the
  moment 2f+1 replicas executed it (`at_quorum_*`) or all four did (`at_all_*`).
  `*_one_core`: wall time with the four replicas' work serialized on one core.
  `at_quorum_core_per_replica`: the same steps replayed on a virtual clock where each
  replica has its own core and the network is instant (what 4 local processes would
  see, minus their socket round trips). Signature checks are not shared between
  replicas (`forget_verifications` before every step), as in separate processes. The
  reference measured in the same run is the Ed25519 work one commit needs
  (`crypto_floor_ms`: signatures made and checked x their measured cost).
- `detection_ms`: default detector (100 ms heartbeats, suspect 8, failed 12) on a
  simulated clock; heartbeats jitter by N(0, 5 ms); the node dies at a random moment and
  the time from death to suspected and failed is measured, over many seeded trials.
- `false_suspicions`: 5 simulated minutes of heartbeats jittering +-60 ms with 5 % of
  them delayed to 250 ms (GC pauses, busy CPU): how often phi reached 8.
- `pbft_commit_4_processes_ms`: the live path, 4 replica processes on 127.0.0.1 (f = 1),
  each an `AgreementDriver` over `TcpTransport` (`bench/agreement_node.py`); one command
  at a time from replica 0's `propose` to its own execution (2f+1 commits), sockets,
  codecs and Ed25519 included. On a 2-core machine the 4 processes share the cores, so
  `load_average_1m` matters: other work there shows up directly in these figures.

    .venv/bin/python bench/protocol.py [--requests 300] [--trials 500]
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from butterfly.cli.launcher import free_ports
from butterfly.protocol import pbft
from butterfly.protocol.failure_detector import PhiAccrualFailureDetector
from butterfly.protocol.pbft_state import PbftConfig, ReplicaState
from butterfly.protocol.sign import SigningKey, forget_verifications, sign_message, verify_bytes
from butterfly.types.ids import Epoch, NodeId
from butterfly.types.wire.agreement import Message, PrePrepare, Request
from common import machine

N, F = 4, 1
CLIENT = NodeId(100)
TARGETS = {"pbft_commit_p50_ms": 10.0, "detection_median_ms": 1000.0}


def summary(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)

    def pct(p: float) -> float:
        return round(s[min(len(s) - 1, round(p * (len(s) - 1)))], 4)

    return {"median": round(statistics.median(s), 4), "p10": pct(0.1), "p90": pct(0.9)}


def ed25519_cost(repeats: int = 300) -> tuple[float, float]:
    key = SigningKey.generate()
    data = b"x" * 200
    t0 = time.perf_counter()
    sigs = [key.sign(data + bytes([i % 256])) for i in range(repeats)]
    t1 = time.perf_counter()
    for i, sig in enumerate(sigs):
        verify_bytes.__wrapped__(key.public, sig, data + bytes([i % 256]))
    t2 = time.perf_counter()
    return (t1 - t0) / repeats * 1000, (t2 - t1) / repeats * 1000


def pbft_latency(requests: int) -> dict[str, Any]:
    keys = [SigningKey.from_seed(bytes([i + 1]) * 32) for i in range(N)]
    client = SigningKey.from_seed(b"c" * 32)
    states: list[ReplicaState] = [
        pbft.new_replica(
            PbftConfig(
                replica=NodeId(i),
                keys=tuple(k.public for k in keys),
                f=F,
                clients={CLIENT: client.public},
            ),
            keys[i],
        )
        for i in range(N)
    ]
    quorum_ms, all_ms, parallel_ms, signs, verifies = [], [], [], [], []
    for t in range(1, requests + 1):
        request = sign_message(
            Request(sender=CLIENT, epoch=Epoch(0), timestamp=t, operation=b"op%d" % t),
            client,
        )
        # (ready_at, order, replica, message): ready_at is a virtual clock in which each
        # replica has its own core and the network is instant, for the parallel figure
        queue: list[tuple[float, int, int, Message]] = [(0.0, i, i, request) for i in range(N)]
        heapq.heapify(queue)
        order = N
        busy_until = [0.0] * N
        signed: set[int] = set()
        checked = 0
        start = time.perf_counter()
        quorum_at = parallel_at = None
        while queue:
            ready_at, _, dst, message = heapq.heappop(queue)
            if not isinstance(message, pbft.Input.__args__):
                continue
            forget_verifications()  # each replica checks every signature itself
            checked += 2 if isinstance(message, PrePrepare) else 1  # + the request inside
            began = time.perf_counter()
            states[dst], sends = pbft.step(states[dst], message, 0.0)
            finished = max(busy_until[dst], ready_at) + (time.perf_counter() - began)
            busy_until[dst] = finished
            for s in sends:
                signed.add(id(s.message))
                targets = [s.to] if s.to is not None else [j for j in range(N) if j != dst]
                for j in targets:
                    if j < N:
                        order += 1
                        heapq.heappush(queue, (finished, order, j, s.message))
            done = sum(1 for st in states if st.last_executed >= t)
            if quorum_at is None and done >= 2 * F + 1:
                quorum_at = time.perf_counter()
            if parallel_at is None and done >= 2 * F + 1:
                parallel_at = max(
                    busy_until[k] for k, st in enumerate(states) if st.last_executed >= t
                )
        end = time.perf_counter()
        if quorum_at is None or parallel_at is None or any(st.last_executed < t for st in states):
            raise SystemExit(f"request {t} did not commit")
        quorum_ms.append((quorum_at - start) * 1000)
        all_ms.append((end - start) * 1000)
        parallel_ms.append(parallel_at * 1000)
        signs.append(len(signed))
        verifies.append(checked)
    sign_ms, verify_ms = ed25519_cost()
    floor = statistics.median(signs) * sign_ms + statistics.median(verifies) * verify_ms
    return {
        "at_quorum_one_core": summary(quorum_ms),
        "at_all_one_core": summary(all_ms),
        "at_quorum_core_per_replica": summary(parallel_ms),
        "requests": requests,
        "replicas": N,
        "f": F,
        "ed25519_per_commit": {  # counted from the messages made and delivered
            "signed": statistics.median(signs),
            "verified": statistics.median(verifies),
        },
        "ed25519_ms": {"sign": round(sign_ms, 4), "verify": round(verify_ms, 4)},
        "crypto_floor_ms": round(floor, 4),
        "ratio_one_core_at_all_to_crypto_floor": round(statistics.median(all_ms) / floor, 3),
    }


def detection(trials: int, seed: int = 7) -> dict[str, Any]:
    rng = random.Random(seed)
    suspected, failed = [], []
    for _ in range(trials):
        detector = PhiAccrualFailureDetector()
        node = NodeId(1)
        t = 0.0
        for _ in range(300):  # 30 s of history
            detector.record_heartbeat(node, t)
            t += max(0.001, 0.1 + rng.gauss(0.0, 0.005))
        last = t - 0.1
        death = last + rng.uniform(0.0, 0.1)  # dies before sending its next heartbeat
        s_at = detector.crossing_time(node, detector.suspect_threshold)
        f_at = detector.crossing_time(node, detector.failed_threshold)
        if s_at is None or f_at is None or not detector.is_failed(node, f_at):
            raise SystemExit("detector did not cross its thresholds")
        suspected.append((s_at - death) * 1000)
        failed.append((f_at - death) * 1000)
    return {
        "suspected": summary(suspected),
        "failed": summary(failed),
        "trials": trials,
        "settings": {
            "interval_ms": 100,
            "suspect": 8.0,
            "failed": 12.0,
            "min_std_ms": 50,
            "acceptable_pause_ms": 80,
        },
    }


def false_suspicions(seed: int = 11, minutes: float = 5.0) -> dict[str, Any]:
    rng = random.Random(seed)
    detector = PhiAccrualFailureDetector()
    node = NodeId(1)
    t, worst, count, beats = 0.0, 0.0, 0, 0
    detector.record_heartbeat(node, t)
    while t < minutes * 60:
        gap = 0.25 if rng.random() < 0.05 else rng.uniform(0.04, 0.16)
        phi = detector.phi(node, t + gap) or 0.0  # the worst moment: just before arrival
        worst = max(worst, phi)
        count += phi >= detector.suspect_threshold
        t += gap
        detector.record_heartbeat(node, t)
        beats += 1
    return {"heartbeats": beats, "suspicions": count, "max_phi": round(worst, 3)}


def pbft_processes(requests: int) -> dict[str, Any]:
    """Spawn the 4 replica processes, collect replica 0's figures, reap every child by PID."""
    ports = free_ports(N)
    script = Path(__file__).resolve().parent / "agreement_node.py"
    base = [sys.executable, str(script), "--ports", ",".join(map(str, ports))]
    others = [subprocess.Popen([*base, "--replica", str(i)]) for i in range(1, N)]
    client = subprocess.Popen(
        [*base, "--replica", "0", "--requests", str(requests)], stdout=subprocess.PIPE
    )
    try:
        out, _ = client.communicate(timeout=600)
    finally:
        for p in [client, *others]:
            if p.poll() is None:
                p.terminate()
        for p in [client, *others]:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
    if client.returncode != 0:
        raise SystemExit(f"replica 0 failed with exit code {client.returncode}")
    figures: dict[str, Any] = json.loads(out)
    return {**figures["commit_ms"], "requests": figures["requests"], "replicas": N, "f": F}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--trials", type=int, default=500)
    parser.add_argument("--process-requests", type=int, default=200)
    args = parser.parse_args()
    result = {
        "benchmark": "protocol",
        "pbft_commit_ms": pbft_latency(args.requests),
        "detection_ms": detection(args.trials),
        "false_suspicions": false_suspicions(),
        "pbft_commit_4_processes_ms": pbft_processes(args.process_requests),
        "targets": TARGETS,
        "machine": machine(),  # the CPU, and the load: other work skews the figures
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
