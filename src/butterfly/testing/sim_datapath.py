"""Seeded simulation of the data path: requests through a plan of stages, some nodes lying.

A seed fixes a cluster (n in [4, 10], f in [0, 3], n >= 3f + 1), a model of 4 to 12
layers, the verification mode (audit or replicate), up to f liars among the members
other than the gateway (which the client trusts), each with a random strategy
(`sim_liars`), and a few greedy requests. Everything that decides is production code,
driven in one process without sockets:

- each node is a `dataplane.stage_server.StageServer` (liars: a subclass), signing every
  step with its `dataplane.proving.Prover`; steps travel the chain as `StageStep`s, the
  last node's `StepResult` goes to the gateway's `dataplane.engine.PipelineEngine`
  (`on_result`), as the transport would deliver them;
- the engine runs the request and its check: `dataplane.audit.Auditor` (audits asked of
  the other holders' `StageServer.audit`) or `dataplane.replicate.Replicator`;
- a liar named by the check is evicted as `control.policy` decides (`to_evict`), and the
  next plan is `control.policy.next_plan` over the members left, applied to every node.

Only the arithmetic is a stand-in (`sim_stage.SimStage`, exact integer arithmetic).
Checked per schedule: no wrong answer marked verified, no honest node evicted; measured:
requests from each liar's first lie to its eviction, liars never caught.

    from butterfly.testing.sim_datapath import replay; replay(1234)
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from butterfly.control.policy import Placing, alive, next_plan, to_evict
from butterfly.dataplane.audit import Auditor
from butterfly.dataplane.engine import Mode, PipelineEngine
from butterfly.dataplane.lanes import lanes_of
from butterfly.dataplane.proving import Prover
from butterfly.dataplane.replicate import Replicator
from butterfly.net.framing import Envelope
from butterfly.protocol.proof import Tolerance
from butterfly.protocol.sign import SigningKey
from butterfly.schedule.engine import ClusterHealth
from butterfly.testing.sim_liars import SERVERS, STRATEGIES, Clock, SimServer
from butterfly.testing.sim_stage import (
    MAX_CONTEXT,
    VOCAB,
    SimReferee,
    SimStage,
    reference_tokens,
)
from butterfly.types.errors import ButterflyError
from butterfly.types.ids import GATEWAY, Epoch, NodeId, RequestId
from butterfly.types.model import LayerInfo, Linear
from butterfly.types.plan import StagePlan
from butterfly.types.tasks import InferenceTask
from butterfly.types.wire.control import StatusReply
from butterfly.types.wire.data import (
    AuditReply,
    AuditRequest,
    InputsHeld,
    InputsQuery,
    Release,
    StageStep,
)
from butterfly.types.wire.frames import Message

GIB = 1 << 30


@dataclass(frozen=True)
class DataScenario:
    seed: int
    n: int
    f: int
    layers: int
    mode: Mode
    liars: tuple[tuple[NodeId, str], ...]
    flops: tuple[float, ...]  # per node: varies where the planner puts the ranges
    requests: tuple[tuple[tuple[int, ...], int], ...]  # (prompt, new tokens)

    def describe(self) -> str:
        liars = ", ".join(f"{n}:{s}" for n, s in self.liars) or "none"
        return (
            f"n={self.n} f={self.f} layers={self.layers} mode={self.mode} liars=[{liars}] "
            f"requests={len(self.requests)}"
        )


def scenario_for(seed: int, *, strategies: Sequence[str] = STRATEGIES) -> DataScenario:
    """The schedule a seed stands for; `strategies` narrows what the liars may do.

    Most often the liars are drawn from the nodes the first plan puts to work (the chain,
    the first auditor of each range, replicate mode's lanes): a liar that only stands by
    never gets to lie. Two or more liars, one of them colluding, all collude."""
    rng = random.Random(seed)
    f = rng.randint(0, 3)
    n = rng.randint(max(4, 3 * f + 1), 10)
    layers = max(rng.randint(4, 12), n // (f + 1))
    mode: Mode = "audit" if rng.random() < 0.5 else "replicate"
    flops = tuple(rng.choice((1.0, 2.0, 4.0)) * 1e12 for _ in range(n))
    plan = first_plan(n, f, layers, flops)
    busy = set(plan.nodes)
    if mode == "audit":
        busy.update(h[1] for _, r in plan.stages if len(h := plan.holders(r)) > 1)
    else:
        busy.update(n for lane in lanes_of(plan)[: f + 1] for n in lane)
    pool = sorted(busy - {GATEWAY}) if rng.random() < 0.7 else list(range(1, n))
    chosen = rng.sample(pool, min(len(pool), rng.randint(0, f)))
    picked = [rng.choice(list(strategies)) for _ in chosen]
    if len(picked) > 1 and "collude" in picked:
        picked = ["collude"] * len(picked)
    return DataScenario(
        seed=seed,
        n=n,
        f=f,
        layers=layers,
        mode=mode,
        liars=tuple(sorted((NodeId(i), s) for i, s in zip(chosen, picked, strict=True))),
        flops=flops,
        requests=tuple(
            (
                tuple(rng.randrange(VOCAB) for _ in range(rng.randint(1, 6))),
                rng.randint(2, 5),
            )
            for _ in range(rng.randint(3, 5))
        ),
    )


def _facts(flops: Sequence[float]) -> dict[NodeId, StatusReply]:
    return {
        NodeId(i): StatusReply(NodeId(i), Epoch(0), (), 0, 0, x, GIB) for i, x in enumerate(flops)
    }


def _placing(f: int, layers: int) -> Placing:
    infos = tuple(LayerInfo(i, Linear(8, 8), 1e9, 1 << 20, 8) for i in range(layers))
    return Placing(infos, "load_balanced", f + 1)


def first_plan(n: int, f: int, layers: int, flops: Sequence[float]) -> StagePlan:
    """The plan of epoch 1, as `control.policy.next_plan` decides it over every member."""
    members = [NodeId(i) for i in range(n)]
    return next_plan(None, members, (), _facts(flops), _placing(f, layers)).plan


@dataclass(frozen=True)
class LiarOutcome:
    node: NodeId
    strategy: str
    first_lie: int | None  # the request (0-based) in which it first lied
    evicted_at: int | None  # the request during which it was evicted

    @property
    def latency(self) -> int | None:
        """Requests from its first lie to its eviction, both counted (1: the same one)."""
        if self.first_lie is None or self.evicted_at is None:
            return None
        return self.evicted_at - self.first_lie + 1


@dataclass
class DataResult:
    scenario: DataScenario
    verified: int = 0  # requests answered as verified
    wrong_verified: list[int] = field(default_factory=list)  # requests: wrong, yet verified
    wrong_unverified: int = 0  # wrong answers returned as unverified (allowed)
    failed: list[str] = field(default_factory=list)  # requests that raised, and why
    honest_evicted: list[NodeId] = field(default_factory=list)
    liars: list[LiarOutcome] = field(default_factory=list)
    disputes: int = 0  # the gateway's re-executions

    def violations(self) -> list[str]:
        """Broken invariants, each naming the seed and how to replay it."""
        sc = self.scenario
        where = f"seed={sc.seed} ({sc.describe()}); replay: sim_datapath.replay({sc.seed})"
        out = [f"request {r}: wrong answer marked verified; {where}" for r in self.wrong_verified]
        out += [f"honest node {n} evicted; {where}" for n in self.honest_evicted]
        out += [
            f"liar {liar.node} ({liar.strategy}) evicted before it lied; {where}"
            for liar in self.liars
            if liar.evicted_at is not None
            and (liar.first_lie is None or liar.first_lie > liar.evicted_at)
        ]
        return out


def sim_key(node: int) -> SigningKey:
    return SigningKey.from_seed(hashlib.sha256(f"data-{node}".encode()).digest())


KEYS = {NodeId(i): sim_key(i) for i in range(10)}
PUBLIC = {n: k.public for n, k in KEYS.items()}


class _Cluster:
    """The nodes, the gateway's engine, and the gateway's eviction and re-planning."""

    def __init__(self, sc: DataScenario, clock: Clock) -> None:
        self.sc, self.clock = sc, clock
        liars = dict(sc.liars)
        colluders = sorted(n for n, s in sc.liars if s == "collude")
        self.servers: dict[NodeId, SimServer] = {}
        for i in range(sc.n):
            node = NodeId(i)
            server = SERVERS[liars.get(node, "honest")](
                node=node,
                # as wiring.parts.stage_server: the members' keys check each step's input
                prover=Prover(node, KEYS[node], keys=PUBLIC),
                clock=clock,
                seed=sc.seed * 31 + i,
                keep_outputs=node == GATEWAY and sc.mode == "audit",
            )
            if node in colluders:
                server.column = int(colluders[0])  # the pact: every colluder bends one column
            self.servers[node] = server
        self.members = [NodeId(i) for i in range(sc.n)]
        self.facts, self.placing = _facts(sc.flops), _placing(sc.f, sc.layers)
        self.evicted: dict[NodeId, int] = {}  # node -> the request during which it left
        self.plan = first_plan(sc.n, sc.f, sc.layers, sc.flops)
        self._apply()
        self.referee = SimReferee(sc.layers)
        tol = Tolerance()
        self.engine = PipelineEngine(
            node=GATEWAY,
            deliver=self._deliver,
            plan=lambda: self.plan,
            health=lambda: ClusterHealth(True, self.plan.epoch),
            max_context=MAX_CONTEXT,
            input_kind="tokens",
            eos_ids=frozenset(),
            step_timeout_s=30.0,
            max_tensor_bytes=1 << 24,
            recovery_wait_s=0.01,
            auditor=Auditor(
                ask=self._ask_audit,
                inputs=self._ask_inputs,
                keys=PUBLIC,
                referee=self.referee,
                tolerance=tol,
                max_tensor_bytes=1 << 24,
                gateway=GATEWAY,
                own_outputs=self.servers[GATEWAY].outputs_of,
            ),
            audit_fraction=1.0,
            audit_draw=lambda: 0.0,
            on_liars=self._on_liars,
            replicator=Replicator(
                plan=lambda: self.plan,
                f=sc.f,
                keys=PUBLIC,
                referee=self.referee,
                tolerance=tol,
                on_liars=self._on_liars,
            ),
            verification=sc.mode,
            keys=PUBLIC,  # as wiring.parts.engine: every result checked against its records
        )

    def _apply(self) -> None:
        """Every node takes the plan, as `StageServer.apply_plan` would (without loading
        weights: the sim model has none)."""
        for server in self.servers.values():
            layers = self.plan.layers_of(server.node)
            if server.stage is None or layers is None or server.stage.layers != layers:
                server.table.drop_all(f"the plan of epoch {self.plan.epoch} moved its layers")
                server.stage = SimStage(layers, self.sc.layers) if layers is not None else None
            server.plan = self.plan

    async def _on_liars(self, liars: tuple[NodeId, ...], reason: str) -> None:
        """The gateway's eviction: agreed at once here (the agreement has its own sim)."""
        new = to_evict(liars, self.evicted.keys())
        if not new:
            return
        for node in new:
            self.evicted[node] = self.clock.request
        live = alive(self.members, lambda n: "healthy", self.evicted.keys())
        self.plan = next_plan(self.plan, live, self.evicted.keys(), self.facts, self.placing).plan
        self._apply()
        self.engine.plan_changed()

    async def _ask_audit(
        self, node: NodeId, req: AuditRequest, payload: bytes
    ) -> tuple[AuditReply, bytes]:
        return await self.servers[node].audit(req, payload)

    async def _ask_inputs(self, node: NodeId, query: InputsQuery) -> tuple[InputsHeld, bytes]:
        return self.servers[node].inputs_held(query)

    async def _deliver(self, node: NodeId, msg: Message, payload: bytes) -> None:
        if isinstance(msg, Release):
            for rid in msg.request_ids:
                self.servers[node].release(rid)
        elif isinstance(msg, StageStep):
            await self._hop(node, Envelope(msg, GATEWAY, self.plan.epoch, "sim", payload=payload))

    async def _hop(self, node: NodeId, env: Envelope) -> None:
        """One node's step, then on along the route; the last answers the gateway."""
        out = await self.servers[node].on_step(env)
        sent = Envelope(out.msg, node, self.servers[node].epoch, "sim", payload=out.payload)
        if isinstance(out.msg, StageStep):
            await self._hop(out.peer, sent)
        else:
            await self.engine.on_result(node, sent)


async def _run(sc: DataScenario) -> DataResult:
    clock = Clock()
    cluster = _Cluster(sc, clock)
    result = DataResult(sc)
    batches = asyncio.get_running_loop().create_task(cluster.engine.serve_batches())
    try:
        for r, (prompt, new) in enumerate(sc.requests):
            clock.request = r
            task = InferenceTask(RequestId(f"r{r}"), input_ids=prompt, max_new_tokens=new)
            try:
                answer = await cluster.engine.run(task, lambda token: None)
            except ButterflyError as e:
                result.failed.append(f"request {r}: {e.kind}: {e}")
                continue
            right = list(answer.output_ids) == reference_tokens(prompt, new, sc.layers)
            if answer.verified != "none":
                result.verified += 1
                if not right:
                    result.wrong_verified.append(r)
            elif not right:
                result.wrong_unverified += 1
    finally:
        batches.cancel()
        await asyncio.gather(batches, return_exceptions=True)
    liars = dict(sc.liars)
    result.honest_evicted = sorted(n for n in cluster.evicted if n not in liars)
    result.liars = [
        LiarOutcome(
            node,
            strategy,
            cluster.servers[node].lies[0] if cluster.servers[node].lies else None,
            cluster.evicted.get(node),
        )
        for node, strategy in sc.liars
    ]
    result.disputes = cluster.referee.runs
    return result


def run_data_schedule(seed: int, *, strategies: Sequence[str] = STRATEGIES) -> DataResult:
    """Run one seeded schedule and return what happened (`violations()` lists what broke)."""
    return asyncio.run(_run(scenario_for(seed, strategies=strategies)))


def replay(seed: int, *, strategies: Sequence[str] = STRATEGIES) -> DataResult:
    """Re-run a schedule and print its scenario and outcome, to debug a reported seed."""
    result = run_data_schedule(seed, strategies=strategies)
    print(f"seed={seed}: {result.scenario.describe()}")
    for line in result.violations() or ["no violation"]:
        print(" ", line)
    for liar in result.liars:
        print(" ", liar, "latency", liar.latency)
    for failure in result.failed:
        print("  failed:", failure)
    return result
