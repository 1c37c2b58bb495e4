"""`butterfly plan`: preview a placement without starting anything.

    butterfly plan (--model DIR | --layers LAYERS.json) --nodes NODES.json
                   [--strategy S] [--context-tokens N] [--dtype D] [--quantization Q] [--json]

With --model, the layers are costed as a cluster serving DIR costs them: at `--dtype` and
`--quantization` (model.dtype and model.quantization, defaulting as the config does), with
a KV cache for the model's own context (`wiring.parts.max_context`) unless
--context-tokens says otherwise; a preview that budgeted 2048 tokens at float32 refused
placements the cluster makes and showed others it would not.

LAYERS.json: `[{"id", "compute_cost", "memory_bytes", "output_size"}, ...]` (optional
"kv_bytes_per_token", "activation_bytes_per_token"). NODES.json: `[{"id", "flops_per_s",
"memory_bytes", "links": {"<id>": {"latency_ms", "bandwidth_bytes_per_s"}},
"layer_overhead_ms"}, ...]` with "links" and "layer_overhead_ms" optional. Unknown keys are
errors: a misspelt "memory_byte" silently defaulting would produce a plan for a machine
that does not exist.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from butterfly.cli.report import fail
from butterfly.config.schema import ModelConfig
from butterfly.partition.capability import DEFAULT_CONTEXT_TOKENS, Link, NodeCapability, fmt_bytes
from butterfly.partition.quality import Plan
from butterfly.partition.service import PartitionService
from butterfly.types.errors import ButterflyError
from butterfly.types.ids import NodeId
from butterfly.types.model import LayerInfo, Linear

MODEL_DEFAULTS = ModelConfig()  # --dtype and --quantization default as model.* do

LAYER_KEYS = {"id", "compute_cost", "memory_bytes", "output_size"}
LAYER_OPTIONAL = {"kv_bytes_per_token", "activation_bytes_per_token"}
NODE_KEYS = {"id", "flops_per_s", "memory_bytes"}
LINK_KEYS = {"latency_ms", "bandwidth_bytes_per_s"}


class BadFile(Exception):
    """A LAYERS/NODES file the user must fix; the message names file, entry and field."""


def plan(
    nodes: Annotated[Path, typer.Option("--nodes", help="NODES.json: what each node offers.")],
    model: Annotated[
        Path | None, typer.Option("--model", help="Model directory to read layer costs from.")
    ] = None,
    layers: Annotated[
        Path | None, typer.Option("--layers", help="LAYERS.json: per-layer costs.")
    ] = None,
    strategy: Annotated[
        str, typer.Option(help="uniform, load_balanced, topology_aware or hybrid.")
    ] = "load_balanced",
    context_tokens: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="KV cache budget per stage, in tokens of context (default: the model's "
            f"own context, as the cluster plans; {DEFAULT_CONTEXT_TOKENS} with --layers).",
        ),
    ] = None,
    dtype: Annotated[
        str, typer.Option(help="model.dtype the cluster computes in (with --model).")
    ] = MODEL_DEFAULTS.dtype,
    quantization: Annotated[
        str, typer.Option(help="model.quantization of the cluster (with --model).")
    ] = MODEL_DEFAULTS.quantization,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON object.")] = False,
) -> None:
    """Preview where each layer would run, and what the placement is expected to cost."""
    if (model is None) == (layers is None):
        raise fail("give exactly one of --model DIR or --layers LAYERS.json")
    try:
        if model is None:
            infos = read_layers(layers) if layers is not None else []
            context = context_tokens or DEFAULT_CONTEXT_TOKENS
        else:  # torch: only when needed
            from butterfly.runtime.loader import layer_infos
            from butterfly.runtime.precision import Precision
            from butterfly.wiring.parts import max_context

            infos = layer_infos(model, Precision.named(dtype, quantization))
            context = context_tokens or max_context(model)
        caps = read_nodes(nodes)
        service = PartitionService(cache_size=0, context_tokens=context)
        result = service.plan(infos, caps, strategy)
    except (BadFile, ButterflyError) as e:
        raise fail(str(e)) from None
    if json_out:
        typer.echo(json.dumps(result.to_dict()))
    else:
        Console().print(render(result))


def _load(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise BadFile(f"{path}: cannot read: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadFile(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, list) or not all(isinstance(x, dict) for x in data):
        raise BadFile(f"{path}: expected a JSON list of objects")
    return data


def _keys(where: str, entry: dict[str, Any], required: set[str], optional: set[str]) -> None:
    missing = sorted(required - entry.keys())
    unknown = sorted(entry.keys() - required - optional)
    if missing:
        raise BadFile(f"{where}: missing {', '.join(missing)}")
    if unknown:
        allowed = ", ".join(sorted(required | optional))
        raise BadFile(f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {allowed})")


def _int(where: str, key: str, value: object) -> int:
    if isinstance(value, float) and value.is_integer():  # "memory_bytes": 1e9
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadFile(f"{where}: {key} must be a whole number >= 0, got {value!r}")
    return value


def _num(where: str, key: str, value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
        if math.isfinite(number) and number >= 0:
            return number
    raise BadFile(f"{where}: {key} must be a number >= 0, got {value!r}")


def read_layers(path: Path) -> list[LayerInfo]:
    out = []
    for i, entry in enumerate(_load(path)):
        where = f"{path}: layer entry {i}"
        _keys(where, entry, LAYER_KEYS, LAYER_OPTIONAL)
        width = _int(where, "output_size", entry["output_size"])
        out.append(
            LayerInfo(
                id=_int(where, "id", entry["id"]),
                layer_type=Linear(width, width),  # the file carries costs only
                compute_cost=_num(where, "compute_cost", entry["compute_cost"]),
                memory_bytes=_int(where, "memory_bytes", entry["memory_bytes"]),
                output_size=width,
                kv_bytes_per_token=_int(
                    where, "kv_bytes_per_token", entry.get("kv_bytes_per_token", 0)
                ),
                activation_bytes_per_token=_int(
                    where, "activation_bytes_per_token", entry.get("activation_bytes_per_token", 0)
                ),
            )
        )
    return out


def read_nodes(path: Path) -> list[NodeCapability]:
    out = []
    for i, entry in enumerate(_load(path)):
        where = f"{path}: node entry {i}"
        _keys(where, entry, NODE_KEYS, {"links", "layer_overhead_ms"})
        links = entry.get("links", {})
        if not isinstance(links, dict):
            raise BadFile(f"{where}: links must be an object of node id -> link")
        parsed: dict[NodeId, Link] = {}
        for peer, link in links.items():
            if not (isinstance(peer, str) and peer.isdigit()) or not isinstance(link, dict):
                raise BadFile(f"{where}: links[{peer!r}] must map a node id to a link object")
            _keys(f"{where} link {peer}", link, LINK_KEYS, set())
            parsed[NodeId(int(peer))] = Link(
                _num(where, "latency_ms", link["latency_ms"]),
                _num(where, "bandwidth_bytes_per_s", link["bandwidth_bytes_per_s"]),
            )
        out.append(
            NodeCapability(
                NodeId(_int(where, "id", entry["id"])),
                _num(where, "flops_per_s", entry["flops_per_s"]),
                _int(where, "memory_bytes", entry["memory_bytes"]),
                parsed,
                _num(where, "layer_overhead_ms", entry.get("layer_overhead_ms", 0.0)),
            )
        )
    return out


def render(result: Plan) -> Table:
    q = result.quality
    table = Table(title=f"{result.strategy} placement", title_justify="left")
    for column in ("stage", "node", "layers", "count", "est ms/token", "memory"):
        table.add_column(column, justify="right" if column != "layers" else "left")
    for i, (stage, (_, held)) in enumerate(zip(result.stages, q.memory_by_node, strict=True)):
        table.add_row(
            str(i),
            str(stage.node),
            str(stage.layers),
            str(len(stage.layers)),
            _ms(stage.estimated_ms),
            fmt_bytes(held),
        )
    lines = [
        f"bottleneck {_ms(result.bottleneck_ms)} ms -> {q.throughput_tokens_per_s:.1f} tokens/s",
        f"per-token latency {_ms(q.per_token_latency_ms)} ms "
        f"({q.transfer_ms_per_token:.3f} ms of it on links)",
        f"load imbalance {q.imbalance_pct:.1f}%, {q.communication_bytes_per_token} bytes "
        f"per token across {q.stages - 1} boundaries",
    ]
    if q.unused_nodes:
        lines.append(f"unused nodes: {', '.join(map(str, q.unused_nodes))}")
    if q.unmeasured_links:
        lines.append(f"{q.unmeasured_links} boundary link(s) unmeasured, counted as free")
    lines += [f"note: {n}" for n in result.notes]
    table.caption = "\n".join(lines)
    table.caption_justify = "left"
    return table


def _ms(x: float) -> str:
    return f"{x:.3f}" if math.isfinite(x) else "unknown"
