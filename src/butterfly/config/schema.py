"""The one description of every option: type, default, range, mutability and scope.

Loader, validator, template, diff and hot reload all read this module (through
`field_specs`), so an option added here is loadable, documented and classified for hot
reload without touching anything else. Models are frozen and forbid unknown keys: a node
must never run with a setting it silently ignored.

Seed 001/003 duplicates are merged: `coordination.node_id` is `node.id`,
`coordination.cluster_size` is the length of `cluster.members`,
`coordination.max_byzantine` is `byzantine.f`, `api.bind_address` is `api.host`/`api.port`,
seed 003's `metrics` section holds what seed 002 calls observability metrics.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator


class Mutability(enum.StrEnum):
    """Seed 002's matrix: whether a running node may change the option, and how."""

    STATIC_CRITICAL = "static-critical"
    STATIC_LOCAL = "static-local"
    DYNAMIC_CONSENSUS = "dynamic-consensus"
    DYNAMIC_LOCAL = "dynamic-local"

    @property
    def requires_restart(self) -> bool:
        return self in (Mutability.STATIC_CRITICAL, Mutability.STATIC_LOCAL)


class Scope(enum.StrEnum):
    """Cluster options must be equal on every node; node options are each node's own."""

    CLUSTER = "cluster"
    NODE = "node"


SC, SL = Mutability.STATIC_CRITICAL, Mutability.STATIC_LOCAL
DC, DL = Mutability.DYNAMIC_CONSENSUS, Mutability.DYNAMIC_LOCAL
CLUSTER, NODE = Scope.CLUSTER, Scope.NODE

_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


def _host_port(value: str) -> str:
    """Addresses are checked at load time so a typo fails `validate`, not the first dial."""
    m = _HOST_PORT.match(value)
    if m is None or int(m.group(2)) > 65535:
        raise ValueError(f"expected host:port (e.g. 127.0.0.1:9000), got {value!r}")
    return value


def _cluster_id(value: str) -> str:
    """The id travels in every handshake; keep it short and printable."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value):
        raise ValueError(f"expected 1-64 letters, digits, '.', '_' or '-', got {value!r}")
    return value


def _public_key_hex(value: str) -> str:
    """A node's vote key; a typo would make every vote it signs look forged."""
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ValueError(f"expected 64 lowercase hex characters (Ed25519 key), got {value!r}")
    return value


def _public_key_hex_or_empty(value: str) -> str:
    """A member's key, or "" for a removed member (config.roster)."""
    return value and _public_key_hex(value)


def _served_name(value: str) -> str:
    """Clients send it back as `model` in every request, and it lands in URLs and logs:
    printable, no whitespace (an empty value means the model directory's name)."""
    if value and not re.fullmatch(r"[A-Za-z0-9_.:/@+-]{1,128}", value):
        raise ValueError(
            f"expected 1-128 letters, digits or '._:/@+-' (e.g. org/model-7b), got {value!r}"
        )
    return value


def _bearer_token(value: str) -> str:
    """What a client can present in `Authorization: Bearer` (RFC 6750's b64token): a
    token with spaces, non-ASCII or nothing at all was accepted and matched no request,
    locking every caller out of the API, config routes included (a review). Not echoed:
    it is a secret."""
    if not re.fullmatch(r"[A-Za-z0-9._~+/-]+=*", value) or len(value) > 4096:
        raise ValueError(
            f"a bearer token of {len(value)} characters that no client can send: use 1-4096"
            " ASCII letters, digits and '-._~+/' (then '=' padding), as RFC 6750 allows"
        )
    return value


def _host_name(value: str) -> str:
    """A name the API is reached by (`api.allowed_hosts`), as a `Host` header or an
    origin spells its host part: a DNS name or an IP address, with no port or scheme
    (which a name compared to the header's host part would never match)."""
    name = value.strip("[]").lower()
    try:
        name = ipaddress.ip_address(name).compressed  # one spelling (`api.guards`)
    except ValueError:
        if not re.fullmatch(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?", name):
            raise ValueError(
                f"expected a host name or IP address without port or scheme (e.g. "
                f"api.example.com), got {value!r}"
            ) from None
    return name


def _host_port_or_empty(value: str) -> str:
    return value and _host_port(value)


HostPort = Annotated[str, AfterValidator(_host_port)]
OptionalHostPort = Annotated[str, AfterValidator(_host_port_or_empty)]
ClusterId = Annotated[str, AfterValidator(_cluster_id)]
PublicKeyHex = Annotated[str, AfterValidator(_public_key_hex)]
OptionalPublicKeyHex = Annotated[str, AfterValidator(_public_key_hex_or_empty)]
ServedName = Annotated[str, AfterValidator(_served_name)]
BearerToken = Annotated[str, AfterValidator(_bearer_token)]
HostName = Annotated[str, AfterValidator(_host_name)]


def option(
    default: Any,
    description: str,
    mutability: Mutability,
    scope: Scope,
    *,
    ge: float | None = None,
    le: float | None = None,
    path: bool = False,
) -> Any:
    """A field with the metadata every consumer needs; `path` marks file-relative paths."""
    extra: dict[str, Any] = {"mutability": mutability.value, "scope": scope.value}
    if path:
        extra["path"] = True
    return Field(default=default, description=description, ge=ge, le=le, json_schema_extra=extra)


class Section(BaseModel):
    """Frozen and closed: a typo is an error, and nobody mutates a running config."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """TOML's `true` is a Python bool, which pydantic takes for the number 1: `node.id =
        true` would start node 1."""
        field = cls.model_fields[info.field_name or ""]
        if isinstance(value, bool) and field.annotation in (int, float):
            raise ValueError("expected a number, not a boolean")
        return value


def section(model: type[Section], description: str) -> Any:
    return Field(default_factory=model, description=description)


class MetadataConfig(Section):
    schema_version: int = option(
        1, "Schema version the file was written for.", SC, CLUSTER, ge=1, le=1
    )
    environment: Literal["development", "staging", "production"] = option(
        "development", "Deployment kind, stamped on every log line at start.", SL, NODE
    )
    description: str = option(
        "", "Free text for operators, shown by `config show`; not interpreted.", DL, NODE
    )


class ClusterConfig(Section):
    id: ClusterId = option("butterfly", "Cluster id checked in every peer handshake.", SC, CLUSTER)
    members: tuple[OptionalHostPort, ...] = option(
        (),
        "host:port of node 0..n-1; empty = a one-node cluster. Changed with public_keys, "
        'through the agreement: a new member is appended, a removed one is "" (its id '
        "is never reused; config.roster).",
        DC,
        CLUSTER,
    )
    public_keys: tuple[OptionalPublicKeyHex, ...] = option(
        (),
        'Ed25519 public key (hex) of node 0..n-1; empty = one node, own key. "" for a '
        "removed member, as in cluster.members.",
        DC,
        CLUSTER,
    )
    gateways: tuple[int, ...] = option(
        (),
        "Nodes that may act as gateway, in takeover order (the first acts at start); "
        "empty = the first max(2, f + 1) members.",
        SC,
        CLUSTER,
    )


class NodeConfig(Section):
    id: int = option(0, "This node's index in cluster.members.", SL, NODE, ge=0, le=1023)
    name: str = option(
        "", "Label for operators, shown by `config show`; not interpreted.", DL, NODE
    )
    listen: HostPort = option("127.0.0.1:9000", "Address peers connect to.", SL, NODE)
    data_dir: str = option(
        "", "History, keys, checkpoints; empty = $BUTTERFLY_DATA_DIR.", SL, NODE, path=True
    )


class NetworkConfig(Section):
    backend: Literal["tcp", "memory"] = option("tcp", "Transport between nodes.", SC, CLUSTER)
    max_connections: int = option(
        100,
        "Incoming connections awaiting their handshake at most; one more closes the oldest. "
        "Members' proven connections are not counted.",
        SL,
        NODE,
        ge=1,
        le=10000,
    )
    max_frame_bytes: int = option(
        256 * 2**20,
        "Largest peer frame; larger messages travel as several frames.",
        SC,
        CLUSTER,
        ge=2**16,
        le=2**32 - 1,
    )
    max_message_bytes: int = option(
        2**30,
        "Largest peer message (chunked above max_frame_bytes); larger ones are refused "
        "by their sender, naming this option. 1 GiB holds the audit reply of a "
        "4096-token generation on the small model several times over.",
        SC,
        CLUSTER,
        ge=2**16,
        le=2**40,
    )
    connect_timeout_ms: int = option(
        2000, "Give up dialing a peer after this.", SL, NODE, ge=1, le=600_000
    )
    send_timeout_ms: int = option(
        1000, "Close a connection whose peer takes no data this long.", SL, NODE, ge=1, le=600_000
    )
    step_timeout_ms: int = option(
        60_000,
        "Give up waiting for one pipeline step (a long prefill included).",
        DL,
        NODE,
        ge=1,
        le=3_600_000,
    )
    retry_attempts: int = option(
        3, "Resends before a peer counts as unreachable.", SL, NODE, ge=0, le=100
    )
    retry_backoff_ms: int = option(
        100, "First retry delay, doubled each time.", SL, NODE, ge=1, le=60_000
    )
    retry_max_backoff_ms: int = option(5000, "Cap on the retry delay.", SL, NODE, ge=1, le=600_000)
    compression: Literal["none", "lz4"] = option(
        "none", "Activation compression on the wire.", SC, CLUSTER
    )
    compression_min_bytes: int = option(
        4096, "Frames smaller than this are sent uncompressed.", SC, CLUSTER, ge=0, le=2**30
    )


class ByzantineConfig(Section):
    f: int = option(
        0, "Lying nodes tolerated (max_faulty); needs n >= 3f+1.", SC, CLUSTER, ge=0, le=100
    )
    verification: Literal["audit", "replicate", "none"] = option(
        "audit", "How results from untrusted nodes are checked.", DC, CLUSTER
    )
    audit_fraction: float = option(
        1.0, "Share of requests audited in audit mode.", DC, CLUSTER, ge=0.0, le=1.0
    )
    audit_lone_ranges: bool = option(
        True,
        "Audit mode: where failures leave a layer range one holder, the gateway "
        "re-executes it to audit it (if it has the memory to load it); false: answers "
        "through such a range come back unverified.",
        DC,
        CLUSTER,
    )
    rtol: float = option(
        1e-3, "Relative tolerance comparing activations.", DC, CLUSTER, ge=0.0, le=1.0
    )
    atol: float = option(
        1e-4, "Absolute tolerance comparing activations.", DC, CLUSTER, ge=0.0, le=1.0
    )
    fingerprint_top_k: int = option(
        8, "Top-k values per chunk in fingerprints.", DC, CLUSTER, ge=1, le=1024
    )
    fingerprint_chunk: int = option(
        1,
        "Positions per fingerprint chunk; 1 checks every position on its own.",
        DC,
        CLUSTER,
        ge=1,
        le=65536,
    )
    max_step_timeouts: int = option(
        3,
        "Steps or audits among its last 32 that a heartbeating node may leave "
        "unanswered within network.step_timeout_ms before the gateway evicts it as "
        "silent, withholding or slow.",
        DC,
        CLUSTER,
        ge=1,
        le=1000,
    )


class CoordinationConfig(Section):
    heartbeat_interval_ms: int = option(
        100, "Heartbeat period; must be below phase_timeout_ms.", SC, CLUSTER, ge=10, le=60_000
    )
    phi_suspect: float = option(
        8.0, "Phi above which a peer is suspected.", DL, NODE, ge=0.5, le=100.0
    )
    phi_failed: float = option(
        12.0, "Phi above which a peer is declared failed.", DL, NODE, ge=0.5, le=100.0
    )
    min_std_ms: float = option(
        50.0, "Floor on the heartbeat jitter estimate.", DL, NODE, ge=1.0, le=60_000.0
    )
    acceptable_pause_ms: float = option(
        80.0, "Pause (GC, busy CPU) not held against a peer.", DL, NODE, ge=0.0, le=600_000.0
    )
    phase_timeout_ms: int = option(
        5000, "Agreement phase timeout.", DC, CLUSTER, ge=10, le=3_600_000
    )
    view_change_timeout_ms: int = option(
        10_000, "Wait before suspecting the primary.", DC, CLUSTER, ge=10, le=3_600_000
    )
    config_update_timeout_ms: int = option(
        5000, "A config update not committed by then rolls back.", DC, CLUSTER, ge=10, le=3_600_000
    )
    checkpoint_frequency: int = option(
        10, "Tokens between KV-cache snapshots.", DC, CLUSTER, ge=1, le=100_000
    )
    max_checkpoints: int = option(10, "Snapshots kept per request.", DL, NODE, ge=1, le=10_000)
    pbft_checkpoint_interval: int = option(
        128,
        "Agreement sequence numbers between stable checkpoints.",
        SC,
        CLUSTER,
        ge=1,
        le=1_000_000,
    )
    pbft_window: int = option(
        256, "Water-mark window; above pbft_checkpoint_interval.", SC, CLUSTER, ge=2, le=10_000_000
    )
    never_heard_s: float = option(
        30.0,
        "A member never heard from counts as failed for the gateway role after this "
        "long: a first gateway that never comes up is replaced, one started this much "
        "later than the others is too.",
        SC,
        CLUSTER,
        ge=1.0,
        le=86_400.0,
    )
    pbft_history: int = option(
        1024,
        "Agreed entries kept below the stable checkpoint for peers that lag; "
        "one further behind catches up from a state snapshot.",
        SC,
        CLUSTER,
        ge=0,
        le=10_000_000,
    )


class PartitionConfig(Section):
    strategy: Literal["uniform", "load_balanced", "topology_aware", "hybrid"] = option(
        "load_balanced", "How layers are split into stages.", DC, CLUSTER
    )
    replication: int = option(
        0, "Holders per layer range; 0 = f+1 if verifying, else 1.", SC, CLUSTER, ge=0, le=64
    )
    recompute_threshold: float = option(
        0.1, "Load imbalance that triggers a new plan.", DC, CLUSTER, ge=0.0, le=1.0
    )
    rebalance: bool = option(False, "Re-plan when load drifts.", DC, CLUSTER)
    rebalance_interval_s: int = option(
        60, "Seconds between re-plan checks.", DC, CLUSTER, ge=1, le=86_400
    )
    cache_size: int = option(100, "Plans cached by this node.", SL, NODE, ge=0, le=100_000)
    compute_probe_s: float = option(
        0.5,
        "Seconds this node times its compute rate and per-layer overhead for the planner, "
        "when first asked, at least 5 trials (shorter: the cluster is ready sooner; longer: "
        "steadier figures). Within the 60 s a node has to measure everything and answer.",
        SL,
        NODE,
        ge=0.01,
        le=20.0,
    )


class SchedulingConfig(Section):
    policy: Literal["fifo", "priority"] = option("fifo", "Queue discipline.", DC, CLUSTER)
    max_queue: int = option(1000, "Waiting tasks before QueueFull.", DL, NODE, ge=1, le=1_000_000)
    max_new_tokens_limit: int = option(
        4096, "Largest max_new_tokens a request may ask for.", DL, NODE, ge=1, le=1_000_000
    )
    default_max_new_tokens: int = option(
        64, "max_new_tokens when a request names none.", DL, NODE, ge=1, le=1_000_000
    )
    dispatch_batch_size: int = option(
        10,
        "Tasks running at once (their steps share each stage's forward); more wait in the "
        "queue. Raise it to the concurrency clients bring.",
        DL,
        NODE,
        ge=1,
        le=1024,
    )
    micro_batches: int = option(
        1, "Requests in flight through the pipeline.", DC, CLUSTER, ge=1, le=256
    )
    straggler_factor: float = option(
        3.0, "Step slower than this times the median is a straggler.", DL, NODE, ge=1.0, le=100.0
    )
    result_ttl_s: int = option(3600, "Finished results kept this long.", SL, NODE, ge=1, le=604_800)


class SpeculativeConfig(Section):
    mode: Literal["off", "ngram", "draft"] = option(
        "off",
        "Speculative decoding on the gateway: 'ngram' drafts tokens from the request's own "
        "text (prompt lookup), 'draft' from a small model (draft_model), and one traversal "
        "of the pipeline verifies them; greedy output is unchanged. Requests checked by "
        "audit or replicate decode plainly.",
        DL,
        NODE,
    )
    k: int = option(4, "Draft tokens verified per traversal at most.", DL, NODE, ge=1, le=32)
    draft_model: str = option(
        "",
        "Directory of a small local checkpoint with the served model's vocabulary, which "
        "the gateway loads to draft in mode 'draft'; empty = none (that mode is refused).",
        SL,
        NODE,
        path=True,
    )


class GenerationConfig(Section):
    speculative: SpeculativeConfig = section(
        SpeculativeConfig, "Fewer traversals of the pipeline per token."
    )
    prefill_chunk: int = option(
        0,
        "Send a prompt (or a replay) in steps of at most this many positions, so the decode "
        "steps of running requests wait one chunk instead of the whole prompt; fewer while "
        "requests decode and this machine's measured cost of a position would add more "
        "than half their decode step to their gap (at least 8); 0 = in one step.",
        DL,
        NODE,
        ge=0,
        le=1_000_000,
    )


class ResourcesConfig(Section):
    memory_limit_bytes: int = option(
        0, "Memory for weights and caches; 0 = no limit.", SL, NODE, ge=0, le=2**50
    )
    threads: int = option(
        0, "Threads for the node's torch work; 0 = one per physical core.", SL, NODE, ge=0, le=1024
    )
    device: Literal["cpu", "cuda", "mps"] = option("cpu", "Where stages run.", SL, NODE)
    gpu_device_ids: tuple[int, ...] = option((), "GPUs this node may use.", SL, NODE)
    disk_limit_bytes: int = option(
        0, "Disk for checkpoints; 0 = no limit.", SL, NODE, ge=0, le=2**53
    )
    max_kv_caches: int = option(
        1024,
        "KV caches (one per request) a node holds at most; beyond, the least recently "
        "used goes and its request replays. Keep it above the requests in flight.",
        SL,
        NODE,
        ge=1,
        le=1_000_000,
    )
    kv_cache_ttl_s: int = option(
        600,
        "A KV cache unused this long is dropped (a lost release, a vanished gateway).",
        SL,
        NODE,
        ge=1,
        le=604_800,
    )


class ModelConfig(Section):
    path: str = option("", "Hugging Face model directory; empty = demo model.", SL, NODE, path=True)
    dtype: Literal["float32", "bfloat16", "float16"] = option(
        "float32", "Compute dtype; equal everywhere so results compare.", SC, CLUSTER
    )
    quantization: Literal["none", "int8"] = option(
        "none",
        "int8: projection matrices as int8 with a scale per output channel (weight-only).",
        SC,
        CLUSTER,
    )
    expected_sha256: str = option("", "Model hash peers must match; empty = node 0's.", SC, CLUSTER)
    served_name: ServedName = option(
        "",
        "The model's name on the OpenAI API (/v1/models, `model` in requests and "
        "responses); empty = the model directory's name.",
        SC,
        CLUSTER,
    )


class ApiConfig(Section):
    host: str = option("127.0.0.1", "HTTP bind host.", SL, NODE)
    allowed_hosts: tuple[HostName, ...] = option(
        (),
        "More names (no port) the API is reached by, e.g. a TLS reverse proxy's on this "
        "machine: bound to a loopback address it answers only to localhost, loopback "
        "addresses, api.host and these, and web pages of these names may send it "
        "POST/PUT/PATCH/DELETE.",
        SL,
        NODE,
    )
    port: int = option(8080, "HTTP port; 0 = any free port.", SL, NODE, ge=0, le=65535)
    max_request_bytes: int = option(
        10 * 2**20, "Larger bodies get 413.", SL, NODE, ge=1024, le=2**30
    )
    request_timeout_s: float = option(
        30.0, "Per-request time limit.", DL, NODE, ge=0.1, le=86_400.0
    )
    rate_limit: float = option(
        100.0, "Requests/second per client; 0 = off.", DL, NODE, ge=0.0, le=1e6
    )
    rate_limit_burst: int = option(
        200, "Requests a client may burst.", DL, NODE, ge=1, le=10_000_000
    )
    tokens: tuple[BearerToken, ...] = option(
        (),
        "Bearer tokens (ASCII letters, digits, '-._~+/', then '=' padding); when set, "
        "every route but /health needs one.",
        DL,
        NODE,
    )
    metrics_public: bool = option(
        False, "With api.tokens set, serve GET /metrics without a token.", DL, NODE
    )
    max_prompt_bytes: int = option(
        0,
        "Prompt text over this many UTF-8 bytes gets 413 before it is tokenized; "
        "0 = the context length times the tokenizer's longest token.",
        DL,
        NODE,
        ge=0,
        le=2**30,
    )
    stream_verified_only: bool = option(
        False, "Streams send text only once the result passed its check.", DL, NODE
    )


class MetricsConfig(Section):
    enabled: bool = option(True, "Serve GET /metrics.", SL, NODE)
    listen: OptionalHostPort = option(
        "",
        "host:port serving this node's GET /metrics (any node, no token; bind it to a "
        "private address); empty = none (the gateway's API serves its own).",
        SL,
        NODE,
    )
    collector: Literal["prometheus", "in_memory"] = option("prometheus", "Metrics sink.", SL, NODE)
    export_interval_s: int = option(0, "Push interval; 0 = pull only.", DL, NODE, ge=0, le=86_400)
    retention_s: int = option(3600, "In-memory history kept.", DL, NODE, ge=0, le=2_592_000)
    channel_capacity: int = option(10_000, "Event bus buffer.", SL, NODE, ge=1, le=10_000_000)


class ObservabilityConfig(Section):
    log_level: Literal["debug", "info", "warning", "error"] = option(
        "info", "Log threshold.", DL, NODE
    )
    log_format: Literal["text", "json"] = option("text", "Log line format.", SL, NODE)
    log_file: str = option("", "Log file; empty = stderr.", SL, NODE, path=True)
    tracing: bool = option(
        False, "Record request traces (OpenTelemetry): the gateway starts them.", DL, NODE
    )
    trace_sample_rate: float = option(
        0.01, "Share of requests the gateway traces, when tracing.", DL, NODE, ge=0.0, le=1.0
    )
    otlp_endpoint: str = option(
        "",
        "OTLP/HTTP traces endpoint, e.g. http://collector:4318/v1/traces; "
        "empty = spans go nowhere.",
        SL,
        NODE,
    )
    profiling: bool = option(False, "Record per-stage profiles.", DL, NODE)


class TlsConfig(Section):
    enabled: bool = option(False, "Mutual TLS between nodes.", SC, CLUSTER)
    ca: str = option("", "Cluster CA certificate (PEM).", SL, NODE, path=True)
    cert: str = option("", "This node's certificate (PEM).", SL, NODE, path=True)
    key: str = option("", "This node's private key (PEM).", SL, NODE, path=True)


class SecurityConfig(Section):
    tls: TlsConfig = section(TlsConfig, "Transport security between nodes.")
    signing_key: str = option("", "Ed25519 key; empty = <data_dir>/node.key.", SL, NODE, path=True)
    require_signatures: bool = option(True, "Drop unsigned peer messages.", SC, CLUSTER)


class AdvancedConfig(Section):
    experimental: tuple[str, ...] = option((), "Experimental feature flags.", SL, NODE)
    deterministic: bool = option(True, "Deterministic kernels, so replicas agree.", SC, CLUSTER)
    debug_dump_activations: bool = option(False, "Write activations for debugging.", DL, NODE)


class ButterflyConfig(Section):
    """The whole, frozen configuration of one node."""

    metadata: MetadataConfig = section(MetadataConfig, "What this file is.")
    cluster: ClusterConfig = section(ClusterConfig, "Who is in the cluster.")
    node: NodeConfig = section(NodeConfig, "This node's identity and files.")
    network: NetworkConfig = section(NetworkConfig, "Peer connections.")
    byzantine: ByzantineConfig = section(ByzantineConfig, "Fault tolerance and verification.")
    coordination: CoordinationConfig = section(
        CoordinationConfig, "Failure detection, agreement, checkpoints."
    )
    partition: PartitionConfig = section(PartitionConfig, "Splitting the model into stages.")
    scheduling: SchedulingConfig = section(SchedulingConfig, "Queues and dispatch.")
    generation: GenerationConfig = section(
        GenerationConfig, "How the gateway drives a generation through the pipeline."
    )
    resources: ResourcesConfig = section(ResourcesConfig, "What this node may use.")
    model: ModelConfig = section(ModelConfig, "The model being served.")
    api: ApiConfig = section(ApiConfig, "HTTP API of the gateway.")
    metrics: MetricsConfig = section(MetricsConfig, "Metrics collection.")
    observability: ObservabilityConfig = section(ObservabilityConfig, "Logs, traces, profiles.")
    security: SecurityConfig = section(SecurityConfig, "TLS, signing.")
    advanced: AdvancedConfig = section(AdvancedConfig, "Experimental settings.")
