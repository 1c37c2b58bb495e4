"""Reads named tensors from a local Hugging Face model directory.

A stage asks only for its own layers' tensors, and only the shards holding them are
opened. Each tensor is copied out of the safetensors memory map into ordinary memory:
decoding from the private map was measured 1.33-1.37x slower (MEASUREMENTS.md).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from butterfly.runtime.progress import Report, quiet
from butterfly.types.errors import MissingTensor, TensorShapeMismatch, UnknownArchitecture

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Floating dtypes a weight may be stored in: float8 ones come with per-block scales
# (a quantized checkpoint), which a plain conversion would drop
STORED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def read_config(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise UnknownArchitecture(f"{model_dir} has no config.json; is it a model directory?")
    try:
        config: dict[str, Any] = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UnknownArchitecture(f"{path} is not valid JSON: {e}") from e
    return config


def config_count(cfg: dict[str, Any], key: str, default: int | None = None) -> int:
    """A size the config states: a positive whole number, else refused by name (a
    `"num_hidden_layers": "four"` was a ValueError's traceback, a 0 a division by zero).
    Absent or null: `default`, or KeyError (the family's loader names the field) when
    there is none."""
    value = cfg.get(key) if default is not None else cfg[key]
    if value is None:
        if default is None:
            raise KeyError(key)
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise UnknownArchitecture(f"config field {key}={value!r} is not a whole number")
    if value < 1:
        raise UnknownArchitecture(f"config field {key}={value!r} must be at least 1")
    return int(value)


def declared_eos_ids(model_dir: Path) -> frozenset[int]:
    """End-of-sequence ids the checkpoint declares: `eos_token_id` (one id or a list) of
    `generation_config.json`, else of `config.json`, the order transformers' `generate`
    reads them in. Instruct checkpoints list their turn-end token there (Llama 3's
    `<|eot_id|>`, Qwen2's `<|im_end|>`); empty when neither file declares any."""
    for name in ("generation_config.json", "config.json"):
        path = Path(model_dir) / name
        if not path.is_file():
            continue
        try:
            declared = json.loads(path.read_text()).get("eos_token_id")
        except (json.JSONDecodeError, AttributeError) as e:
            raise UnknownArchitecture(f"{path} is not a JSON object: {e}") from e
        ids = declared if isinstance(declared, list) else [declared]
        found = frozenset(i for i in ids if isinstance(i, int) and not isinstance(i, bool))
        if found:
            return found
    return frozenset()


def declared_vocab(model_dir: Path) -> int:
    """`vocab_size` of the checkpoint's `config.json` (its logits' width), 0 if none."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return 0
    value = read_config(model_dir).get("vocab_size")
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def weights_file(model_dir: Path) -> str:
    """The file transformers 5 loads a local directory's weights from
    (`modeling_utils._get_resolved_checkpoint_files`): the config's `transformers_weights`
    when stated, else `model.safetensors`, else the sharded index. A directory holding
    both a single file and a stale index (a sharded save re-saved unsharded, or a new
    single-file release downloaded beside the old shards) is read from the single file,
    as transformers reads it."""
    explicit = (
        read_config(model_dir).get("transformers_weights")
        if (model_dir / "config.json").is_file()
        else None
    )
    if explicit is not None:
        if not isinstance(explicit, str) or not explicit.endswith(
            (".safetensors", ".safetensors.index.json")
        ):
            raise MissingTensor(
                f"config field transformers_weights={explicit!r} of {model_dir} names no "
                "safetensors file or index; Butterfly loads safetensors checkpoints only"
            )
        inside_dir(model_dir, explicit, "config field transformers_weights")
        if not (model_dir / explicit).is_file():
            raise MissingTensor(f"{model_dir} has no {explicit} (its transformers_weights)")
        return explicit
    for name in (SINGLE_FILE, INDEX_FILE):
        if (model_dir / name).is_file():
            return name
    raise MissingTensor(
        f"{model_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}; "
        "Butterfly loads safetensors checkpoints only"
    )


def inside_dir(model_dir: Path, name: str, named_by: str) -> None:
    """Refuse a file name that leads out of the model directory (`../x`, `/etc/x`): a
    checkpoint names files inside itself. Checked on the name, not the resolved path, as
    a Hugging Face cache's files are symlinks to blobs elsewhere."""
    parts = Path(name).parts
    if not parts or Path(name).is_absolute() or ".." in parts:
        raise MissingTensor(
            f"{named_by} names {name!r}, a file outside the model directory {model_dir}"
        )


@dataclass
class CheckpointReader:
    """Tensor lookup over `model.safetensors` or a sharded index, recording what it read."""

    model_dir: Path
    dtype: torch.dtype | None = None  # convert floating tensors to this dtype when set
    names_read: list[str] = field(default_factory=list)
    bytes_read: int = 0
    progress: Report = quiet  # told of every tensor read (phase "read"), and by the
    # families' loaders of every layer packed (phase "pack")
    _weight_map: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.model_dir = Path(self.model_dir)
        chosen = weights_file(self.model_dir)
        if chosen.endswith(".index.json"):
            self._weight_map = read_index(self.model_dir / chosen)
            return
        try:
            with safe_open(self.model_dir / chosen, framework="pt") as f:
                self._weight_map = {name: chosen for name in f.keys()}  # noqa: SIM118
        except SafetensorError as e:
            raise unreadable(self.model_dir / chosen, e) from e

    def has(self, name: str) -> bool:
        return name in self._weight_map

    def names(self) -> set[str]:
        return set(self._weight_map)

    def files(self) -> list[str]:
        """The files the tensors are read from, each once, in name order."""
        return sorted(set(self._weight_map.values()))

    def read_many(
        self, wanted: Iterable[tuple[str, tuple[int, ...] | None]]
    ) -> dict[str, torch.Tensor]:
        """Read `(name, expected_shape)` pairs, opening each needed shard once."""
        by_file: dict[str, list[tuple[str, tuple[int, ...] | None]]] = {}
        total = 0
        for name, shape in wanted:
            total += 1
            if name not in self._weight_map:
                raise MissingTensor(f"checkpoint {self.model_dir} has no tensor '{name}'")
            by_file.setdefault(self._weight_map[name], []).append((name, shape))
        out: dict[str, torch.Tensor] = {}
        for file, items in by_file.items():
            path = self.model_dir / file
            if not path.is_file():
                raise MissingTensor(
                    f"shard {file} (holding '{items[0][0]}') is missing from {self.model_dir}"
                )
            try:
                self._read_shard(path, items, out, total)
            except SafetensorError as e:
                raise unreadable(path, e) from e
        return out

    def _read_shard(
        self,
        path: Path,
        items: list[tuple[str, tuple[int, ...] | None]],
        out: dict[str, torch.Tensor],
        total: int,
    ) -> None:
        with safe_open(path, framework="pt") as f:
            for name, shape in items:
                if name not in f.keys():  # noqa: SIM118
                    raise MissingTensor(f"shard {path} has no tensor '{name}'")
                t = f.get_tensor(name)
                if shape is not None and tuple(t.shape) != shape:
                    raise TensorShapeMismatch(
                        f"tensor '{name}' in {path} has shape {tuple(t.shape)}, "
                        f"the config implies {shape}"
                    )
                if t.is_floating_point() and t.dtype not in STORED_DTYPES:
                    raise UnknownArchitecture(
                        f"tensor '{name}' in {path} is stored in {t.dtype}, a quantized "
                        "format whose scales Butterfly does not apply; it loads "
                        "float32, bfloat16 and float16 checkpoints"
                    )
                if self.dtype is not None and t.is_floating_point() and t.dtype != self.dtype:
                    t = t.to(self.dtype).contiguous()  # a fresh tensor: no second copy
                else:
                    t = t.clone().contiguous()
                out[name] = t
                self.names_read.append(name)
                self.bytes_read += t.numel() * t.element_size()
                self.progress("read", len(out), total)


def read_index(path: Path) -> dict[str, str]:
    """The tensor -> shard map of a sharded checkpoint's index, or MissingTensor naming
    the file when it is not the JSON object with a `weight_map` that transformers writes
    (a truncated download, a hand-edited file)."""
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MissingTensor(f"{path} is not valid JSON ({e}); download the checkpoint again") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise MissingTensor(
            f"{path} has no 'weight_map' object naming each tensor's shard; "
            "download the checkpoint again"
        )
    for shard in set(weight_map.values()):
        inside_dir(path.parent, shard, f"{path.name}'s weight_map")
    return {str(k): v for k, v in weight_map.items()}


def unreadable(path: Path, e: Exception) -> MissingTensor:
    """A safetensors file its library cannot read (truncated, empty, not safetensors)."""
    return MissingTensor(
        f"{path} is not a readable safetensors file ({e}); download the checkpoint again"
    )


def check_readable(model_dir: Path) -> None:
    """Every file this directory's weights are read from (`weights_file`, each shard its
    index names) is there and opens as safetensors (headers only, no tensor is read):
    a node whose own copy is missing or truncated is refused as it starts, naming the
    file. Found only when a plan gave it layers, the node stayed up with a checkpoint it
    could never serve (one node alone answered 503 for ever: `/health`'s `unserved`)."""
    reader = CheckpointReader(model_dir)
    for file in reader.files():
        path = reader.model_dir / file
        if not path.is_file():
            raise MissingTensor(f"shard {file} is missing from {reader.model_dir}")
        try:
            with safe_open(path, framework="pt"):
                pass
        except SafetensorError as e:
            raise unreadable(path, e) from e


def model_hash(model_dir: Path) -> str:
    """Identity of a checkpoint, checked in every peer handshake.

    sha256 over config.json and, per safetensors file, its name, size and header (tensor
    names, dtypes, shapes, offsets). Reading only headers keeps start-up fast; two
    checkpoints differing only in weight values of equal layout are told apart by the
    verification layer, not here.
    """
    digest = hashlib.sha256()
    model_dir = Path(model_dir)
    digest.update((model_dir / "config.json").read_bytes())
    for path in sorted(model_dir.glob("*.safetensors")):
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:  # its header's length is the file's first 8 bytes
                raise unreadable(path, ValueError(f"{len(head)} bytes long"))
            (n,) = struct.unpack("<Q", head)
            digest.update(path.name.encode() + path.stat().st_size.to_bytes(8, "little"))
            digest.update(f.read(min(n, 100 * 1024 * 1024)))
    return digest.hexdigest()
