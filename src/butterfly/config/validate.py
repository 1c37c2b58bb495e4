"""Rules that span options, run after the per-field checks of the schema.

The per-field ranges live in the schema; what cannot be said about one field alone lives
here. Each rule returns issues rather than raising, so one `validate` run reports every
problem, and the loader then attaches the file and line of the offending key.

Deviation from the specification, on purpose: seed 002 asks for n >= 2f+1 and shows 5
nodes with f = 2. Cluster decisions here use PBFT, which needs n >= 3f+1 (two quorums of
2f+1 must overlap in an honest node), so 5 nodes tolerate at most f = 1.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from butterfly.config.gateways import api_port, check_gateways, gateway_nodes
from butterfly.config.issues import ConfigIssue
from butterfly.config.roster import TOMBSTONE, check_roster, live_count
from butterfly.config.schema import ButterflyConfig
from butterfly.types.ids import NodeId

Rule = Callable[[ButterflyConfig], Iterator[ConfigIssue]]

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def cluster_size(cfg: ButterflyConfig) -> int:
    """n: the members listed, or 1 for a node running alone."""
    return max(1, len(cfg.cluster.members))


def largest_safe_f(n: int) -> int:
    return (n - 1) // 3


def replication_factor(cfg: ButterflyConfig) -> int:
    """Holders per layer range: explicit, else f+1. Not from `byzantine.verification`,
    which changes at run time and is restored from the agreed history at a restart: a node
    restarted after the cluster agreed "none" built one holder per range and no checker,
    refused "audit" from then on, and a whole-cluster restart could not undo it."""
    if cfg.partition.replication:
        return cfg.partition.replication
    return cfg.byzantine.f + 1


def quorum_message(n: int, f: int) -> str | None:
    """Why `n` nodes cannot tolerate `f` liars, or None when they can."""
    if n >= 3 * f + 1:
        return None
    return (
        f"{n} node{'s' if n != 1 else ''} tolerate at most f={largest_safe_f(n)} "
        f"(n >= 3f+1); f={f} needs {3 * f + 1} nodes. Lower byzantine.f or add "
        "cluster.members."
    )


def _bft_quorum(cfg: ButterflyConfig) -> Iterator[ConfigIssue]:
    unsafe = quorum_message(live_count(cfg), cfg.byzantine.f)  # removed members vote not
    if unsafe is not None:
        yield ConfigIssue("byzantine.f", "n >= 3f+1", unsafe, related=("cluster.members",))


def _membership(cfg: ButterflyConfig) -> Iterator[ConfigIssue]:
    members = cfg.cluster.members
    if members and cfg.node.id >= len(members):
        yield ConfigIssue(
            "node.id",
            "node-in-cluster",
            f"node.id={cfg.node.id} but cluster.members lists {len(members)} nodes "
            f"(ids 0..{len(members) - 1})",
            related=("cluster.members",),
        )
    dupes = sorted({m for m in members if m != TOMBSTONE and members.count(m) > 1})
    if dupes:
        yield ConfigIssue("cluster.members", "unique-members", f"listed twice: {dupes}")
    keys = cfg.cluster.public_keys
    if keys and len(keys) != cluster_size(cfg):
        yield ConfigIssue(
            "cluster.public_keys",
            "one-key-per-member",
            f"{len(keys)} public keys for {cluster_size(cfg)} members; list one per member, "
            "in node id order",
            related=("cluster.members",),
        )
    listed = [k for k in keys if k != TOMBSTONE]
    if len(set(listed)) != len(listed):
        yield ConfigIssue(
            "cluster.public_keys",
            "unique-keys",
            "a key is listed twice: one vote would count twice",
        )


def _timing(cfg: ButterflyConfig) -> Iterator[ConfigIssue]:
    c = cfg.coordination
    if c.heartbeat_interval_ms >= c.phase_timeout_ms:
        yield ConfigIssue(
            "coordination.heartbeat_interval_ms",
            "heartbeat < phase timeout",
            f"heartbeat every {c.heartbeat_interval_ms} ms is not below "
            f"coordination.phase_timeout_ms={c.phase_timeout_ms}; a phase would time out "
            "before a single heartbeat could arrive",
            related=("coordination.phase_timeout_ms",),
        )
    if c.phi_suspect >= c.phi_failed:
        yield ConfigIssue(
            "coordination.phi_suspect",
            "phi_suspect < phi_failed",
            f"phi_suspect={c.phi_suspect} must be below phi_failed={c.phi_failed}",
            related=("coordination.phi_failed",),
        )
    if c.pbft_window <= c.pbft_checkpoint_interval:
        yield ConfigIssue(
            "coordination.pbft_window",
            "window > checkpoint interval",
            f"pbft_window={c.pbft_window} must exceed "
            f"pbft_checkpoint_interval={c.pbft_checkpoint_interval} or agreement stalls",
            related=("coordination.pbft_checkpoint_interval",),
        )
    n = cfg.network
    if n.retry_backoff_ms > n.retry_max_backoff_ms:
        yield ConfigIssue(
            "network.retry_backoff_ms",
            "backoff <= max backoff",
            f"retry_backoff_ms={n.retry_backoff_ms} exceeds "
            f"retry_max_backoff_ms={n.retry_max_backoff_ms}",
            related=("network.retry_max_backoff_ms",),
        )


def _limits(cfg: ButterflyConfig) -> Iterator[ConfigIssue]:
    s = cfg.scheduling
    if s.default_max_new_tokens > s.max_new_tokens_limit:
        yield ConfigIssue(
            "scheduling.default_max_new_tokens",
            "default <= limit",
            f"default_max_new_tokens={s.default_max_new_tokens} exceeds "
            f"max_new_tokens_limit={s.max_new_tokens_limit}",
            related=("scheduling.max_new_tokens_limit",),
        )
    listen_port = int(cfg.node.listen.rsplit(":", 1)[1])
    own = api_port(cfg, NodeId(cfg.node.id))  # api.port, or after it for a later gateway
    if own != 0 and own == listen_port:
        yield ConfigIssue(
            "api.port",
            "distinct ports",
            f"this node's API port {own} is also node.listen's port; pick another api.port",
            related=("node.listen",),
        )
    if cfg.metrics.listen:
        metrics_port = int(cfg.metrics.listen.rsplit(":", 1)[1])
        taken = {listen_port: "node.listen", **({own: "api.port"} if own else {})}
        if metrics_port in taken:
            yield ConfigIssue(
                "metrics.listen",
                "distinct ports",
                f"metrics.listen's port {metrics_port} is also {taken[metrics_port]}'s; "
                "the node could not start",
                related=(taken[metrics_port],),
            )


def _replication(cfg: ButterflyConfig) -> Iterator[ConfigIssue]:
    r, n, f = cfg.partition.replication, live_count(cfg), cfg.byzantine.f
    if r > n:
        yield ConfigIssue(
            "partition.replication",
            "replication <= n",
            f"replication={r} needs {r} distinct holders but the cluster has {n} nodes",
            related=("cluster.members",),
        )
    if r and cfg.byzantine.verification != "none" and r < f + 1:
        yield ConfigIssue(
            "partition.replication",
            "replication >= f+1",
            f"verification={cfg.byzantine.verification!r} needs every layer range on "
            f"f+1={f + 1} nodes, replication is {r}; set 0 for the default",
            related=("byzantine.f",),
        )


def estimate_model_bytes(model_dir: Path, dtype: str, quantization: str = "none") -> int:
    """Parameter bytes from config.json alone, so validation never opens the weights:
    what a loaded stage holds (runtime.llama_args.layer_infos counts the same), with the
    projection matrices at one byte per weight plus one scale per row under int8."""
    c = json.loads((model_dir / "config.json").read_text())
    h, layers, vocab = int(c["hidden_size"]), int(c["num_hidden_layers"]), int(c["vocab_size"])
    inter = int(c.get("intermediate_size") or 4 * h)
    heads = int(c.get("num_attention_heads") or 1)
    kv = int(c.get("num_key_value_heads") or heads)
    head_dim = int(c.get("head_dim") or h // heads)
    tied = bool(c.get("tie_word_embeddings", False))
    esize = DTYPE_BYTES[dtype]
    matrices = layers * (2 * h * heads * head_dim + 2 * h * kv * head_dim + 3 * h * inter)
    rows = layers * (heads * head_dim + 2 * kv * head_dim + h + 2 * inter + h)
    if not tied:  # the output head is a projection too
        matrices, rows = matrices + vocab * h, rows + vocab
    dense = vocab * h + layers * 2 * h + h  # embedding and norms
    if quantization == "int8":
        return matrices + (rows + dense) * esize
    return (matrices + dense) * esize


def _model_memory(cfg: ButterflyConfig) -> Iterator[ConfigIssue]:
    if not cfg.model.path:
        return
    path = Path(cfg.model.path)
    if not (path / "config.json").is_file():
        yield ConfigIssue("model.path", "model-exists", f"no config.json in {path}")
        return
    limit = cfg.resources.memory_limit_bytes
    if not limit:
        return
    try:
        total = estimate_model_bytes(path, cfg.model.dtype, cfg.model.quantization)
    except (ValueError, KeyError, TypeError, ArithmeticError) as e:  # 1e400 overflows
        yield ConfigIssue("model.path", "model-config", f"cannot size {path}/config.json: {e}")
        return
    r, n = replication_factor(cfg), live_count(cfg)
    share = -(-total * r // n)
    if share > limit:
        yield ConfigIssue(
            "resources.memory_limit_bytes",
            "model fits memory",
            f"the model needs ~{total / GIB:.2f} GiB; with replication {r} over {n} nodes "
            f"each node holds ~{share / GIB:.2f} GiB, above the limit of "
            f"{limit / GIB:.2f} GiB. Raise the limit, add nodes or lower partition.replication",
            related=("model.path",),
        )


def _drafting(cfg: ButterflyConfig) -> Iterator[ConfigIssue]:
    spec = cfg.generation.speculative
    key = "generation.speculative.draft_model"
    if spec.mode == "draft" and not spec.draft_model:
        yield ConfigIssue(
            "generation.speculative.mode",
            "draft needs a draft model",
            "mode 'draft' drafts with a small model: set generation.speculative.draft_model "
            "to its checkpoint directory (read at start), or use mode 'ngram'",
            related=(key,),
        )
    if spec.draft_model and not (Path(spec.draft_model) / "config.json").is_file():
        yield ConfigIssue(key, "model-exists", f"no config.json in {spec.draft_model}")
        return
    limit = cfg.resources.memory_limit_bytes
    if not spec.draft_model or not limit or NodeId(cfg.node.id) not in gateway_nodes(cfg):
        return  # only a gateway-capable node loads it (wiring.edges.draft_model_bytes)
    try:
        held = estimate_model_bytes(Path(spec.draft_model), cfg.model.dtype, cfg.model.quantization)
    except (ValueError, KeyError, TypeError, ArithmeticError):
        return  # a family this estimate does not read (GPT-2's keys): sized at start instead
    if held >= limit:  # a gateway would have no room left for layers
        yield ConfigIssue(
            "resources.memory_limit_bytes",
            "draft model fits memory",
            f"the draft model needs ~{held / GIB:.2f} GiB on every gateway-capable node, "
            f"which is all of the limit of {limit / GIB:.2f} GiB. Raise the limit or draft "
            "with a smaller model",
            related=(key,),
        )


def _tls_files(cfg: ButterflyConfig) -> Iterator[ConfigIssue]:
    tls = cfg.security.tls
    if not tls.enabled:
        return
    for name in ("ca", "cert", "key"):
        value: str = getattr(tls, name)
        key = f"security.tls.{name}"
        if not value:
            yield ConfigIssue(key, "tls-files", "required when security.tls.enabled = true")
        elif not os.path.isfile(value):
            yield ConfigIssue(key, "tls-files", f"file not found: {value}")


# Options of the specification's schema that this build cannot honour yet, with why. A
# node refuses any other value rather than run with a setting it would ignore.
UNSUPPORTED: dict[str, str] = {
    "network.backend": "nodes talk over TCP; the in-memory transport is for tests",
    "coordination.max_checkpoints": "a standby keeps one KV copy per request, extended "
    "in place every coordination.checkpoint_frequency tokens",
    "partition.rebalance": "plans change on membership changes and evictions only",
    "partition.recompute_threshold": "plans change on membership changes and evictions only",
    "partition.rebalance_interval_s": "plans change on membership changes and evictions only",
    "scheduling.micro_batches": "the steps of concurrent requests are split into "
    "micro-batches by their count (at most one per stage, at least 4 rows each); one "
    "request is not split",
    "scheduling.straggler_factor": "slow nodes are handled by network.step_timeout_ms and "
    "byzantine.max_step_timeouts",
    "resources.device": "this build runs stages on the CPU only",
    "resources.gpu_device_ids": "this build runs stages on the CPU only",
    "resources.disk_limit_bytes": "nothing large is written to disk (KV copies go to peers)",
    "api.request_timeout_s": "a request runs until it finishes or is cancelled "
    "(DELETE /tasks/{id}); `wait` bounds how long a call waits for it",
    "metrics.collector": "metrics are Prometheus collectors, served at GET /metrics",
    "metrics.export_interval_s": "metrics are pulled from GET /metrics, never pushed",
    "metrics.retention_s": "Prometheus keeps the history; the node keeps current values",
    "metrics.channel_capacity": "events update the collectors as they happen, unbuffered",
    "observability.profiling": "per-stage profiling is not built yet",
    "security.require_signatures": "votes, plans and proofs are always signed and checked",
    "advanced.experimental": "this build has no experimental features",
    "advanced.debug_dump_activations": "activation dumps are not built yet",
}


def _unsupported(cfg: ButterflyConfig) -> Iterator[ConfigIssue]:
    default = ButterflyConfig()
    for key, why in UNSUPPORTED.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value != getattr(getattr(default, section), name):
            yield ConfigIssue(
                key,
                "supported",
                f"{value!r} is not supported (only the default "
                f"{getattr(getattr(default, section), name)!r}): {why}",
            )


RULES: tuple[Rule, ...] = (
    _bft_quorum,
    _membership,
    check_roster,
    check_gateways,
    _timing,
    _limits,
    _replication,
    _unsupported,
)
# rules that read files this machine holds: a config sent to a remote cluster
# (`config update --file F --url U`) names paths on its nodes, checked there
MACHINE_RULES: tuple[Rule, ...] = (_model_memory, _drafting, _tls_files)


def cross_check(cfg: ButterflyConfig, *, on_this_machine: bool = True) -> list[ConfigIssue]:
    """Every cross-section problem of an otherwise well-typed config; with
    `on_this_machine`, also what its paths name here."""
    rules = RULES + MACHINE_RULES if on_this_machine else RULES
    return [issue for rule in rules for issue in rule(cfg)]
