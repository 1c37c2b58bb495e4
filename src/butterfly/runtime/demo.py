"""The demo model: a Llama-architecture causal LM with seeded weights, written locally.

It lets text in and text out work with no download. The same seed writes the same bytes,
so two machines that create it independently hold the same model (and the same hash).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from butterfly.runtime.detok import bytes_to_unicode

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")
VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # every byte, then the special tokens


@dataclass(frozen=True)
class DemoSize:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    max_position_embeddings: int
    shard_bytes: int  # largest safetensors shard; a smaller model is one file


SIZES = {
    # ~0.4M parameters: a token in about a millisecond, for tests.
    "tiny": DemoSize(64, 4, 4, 2, 176, 512, 1 << 40),
    # ~113M parameters, written as sharded files like real checkpoints, for benchmarks.
    "small": DemoSize(768, 12, 12, 12, 3072, 2048, 200 * 1024 * 1024),
}


def build_tokenizer() -> Tokenizer:
    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", 256)]
    )
    return tok


def demo_config(size: str) -> dict[str, object]:
    s = SIZES[size]
    cfg = asdict(s)
    cfg.pop("shard_bytes")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **cfg,
        "vocab_size": VOCAB_SIZE,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "bos_token_id": 256,
        "eos_token_id": 257,
        "pad_token_id": 258,
        "torch_dtype": "float32",
    }


def demo_tensors(size: str, seed: int) -> dict[str, torch.Tensor]:
    s = SIZES[size]
    d, dh = s.hidden_size, s.hidden_size // s.num_attention_heads
    g = torch.Generator().manual_seed(seed)

    def normal(rows: int, cols: int) -> torch.Tensor:
        # fan-in scaling keeps activations O(1), so greedy output depends on the context
        # instead of repeating one token, which would make token-equality tests toothless
        return torch.randn(rows, cols, generator=g).mul_(1.0 / cols**0.5)

    t = {"model.embed_tokens.weight": torch.randn(VOCAB_SIZE, d, generator=g)}
    for n in range(s.num_hidden_layers):
        p = f"model.layers.{n}"
        t[f"{p}.input_layernorm.weight"] = torch.ones(d)
        t[f"{p}.self_attn.q_proj.weight"] = normal(s.num_attention_heads * dh, d)
        t[f"{p}.self_attn.k_proj.weight"] = normal(s.num_key_value_heads * dh, d)
        t[f"{p}.self_attn.v_proj.weight"] = normal(s.num_key_value_heads * dh, d)
        t[f"{p}.self_attn.o_proj.weight"] = normal(d, s.num_attention_heads * dh)
        t[f"{p}.post_attention_layernorm.weight"] = torch.ones(d)
        t[f"{p}.mlp.gate_proj.weight"] = normal(s.intermediate_size, d)
        t[f"{p}.mlp.up_proj.weight"] = normal(s.intermediate_size, d)
        t[f"{p}.mlp.down_proj.weight"] = normal(d, s.intermediate_size)
    t["model.norm.weight"] = torch.ones(d)
    t["lm_head.weight"] = normal(VOCAB_SIZE, d)
    return t


def write_safetensors(tensors: dict[str, torch.Tensor], out: Path, shard_bytes: int) -> None:
    """Write one file, or shards plus `model.safetensors.index.json` as HF does."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], out / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles are system, user and assistant') }}{% endif %}"
    "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
"""A plain-text chat format, so `/v1/chat/completions` works on the demo model (whose
random weights make no sense of it, but the path from messages to tokens is real)."""


CHECKPOINT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
"""Files of a checkpoint directory that change what it computes or how its text is read
(with its `*.safetensors`): an old `model.safetensors` left beside a new sharded index is
the file read, a `generation_config.json` changes the end-of-sequence ids."""


def checkpoint_files(out: Path) -> list[Path]:
    """The checkpoint files `out` already holds (none if it does not exist)."""
    if not out.is_dir():
        return []
    named = [out / name for name in CHECKPOINT_FILES if (out / name).is_file()]
    return [*named, *sorted(out.glob("*.safetensors"))]


def create_demo(
    out: Path,
    size: str = "tiny",
    seed: int = 0,
    shard_bytes: int | None = None,
    *,
    replace: bool = False,
) -> Path:
    """Write the demo model into `out`. A directory already holding a checkpoint is
    refused (FileExistsError), unless `replace`, which first removes its checkpoint
    files: written over, it was neither the old model nor the demo (the old index still
    routed every tensor to the old shards)."""
    if size not in SIZES:
        raise ValueError(f"unknown demo size {size!r}; choose one of {sorted(SIZES)}")
    out = Path(out)
    existing = checkpoint_files(out)
    if existing and not replace:
        names = ", ".join(p.name for p in existing[:4]) + (", ..." if len(existing) > 4 else "")
        raise FileExistsError(
            f"{out} already holds a model ({names}); give another directory, "
            "or --force to replace it"
        )
    for path in existing:
        path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(demo_config(size), indent=2, sort_keys=True) + "\n")
    write_safetensors(demo_tensors(size, seed), out, shard_bytes or SIZES[size].shard_bytes)
    build_tokenizer().save(str(out / "tokenizer.json"))
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|bos|>",
        "eos_token": "<|eos|>",
        "pad_token": "<|pad|>",
        "model_max_length": SIZES[size].max_position_embeddings,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n")
    return out


def demo_at(path: Path, size: str) -> Path:
    """The demo model of `size` at `path`, created on first use: written beside it and
    renamed into place, so an interrupted creation is never taken for a model (the
    config is written first, and a directory holding it was reused without its
    weights). A directory there without a config is such a leftover, and replaced."""
    if (path / "config.json").is_file():
        return path
    tmp = path.with_name(path.name + ".partial")
    create_demo(tmp, size, replace=True)  # what an interrupted creation left
    if path.is_dir():
        shutil.rmtree(path)
    tmp.rename(path)
    return path
