"""Chat messages to prompt text with the checkpoint's own chat template.

A template is a Jinja program shipped beside the tokenizer as `chat_template.jinja` (which
transformers prefers) or in `tokenizer_config.json`, and checkpoints are downloaded from
strangers: it is rendered in Jinja's immutable sandbox, with the globals transformers
gives it (`raise_exception`, `strftime_now`, a `tojson` that does not HTML-escape, every
named special token the tokenizer declares, `add_generation_prompt`, and `tools` and
`documents` as None: templates test `is not none`, and undefined is not none), so the
same template gives the same text here as under `apply_chat_template` and cannot reach
the process around it. The rendered text already
holds the template's special tokens: it is tokenized without adding them again.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from butterfly.types.errors import InvalidInput, InvalidRequest


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _token_text(value: Any) -> str:
    """`bos_token` and friends are a string or an AddedToken dict with `content`."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return ""


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
"""The named special tokens transformers gives a template (`special_tokens_map`), each
when the tokenizer declares it."""

RESERVED_TEMPLATE_VARIABLES = (
    "messages",
    "add_generation_prompt",
    "tools",
    "documents",
    *SPECIAL_TOKENS,
)
"""What `ChatTemplate.render` gives every template itself: a request's own template
variables (`chat_template_kwargs`) may not set them."""


def _special_tokens(model_dir: Path, config: Mapping[str, Any]) -> dict[str, str]:
    """The named special tokens of `tokenizer_config.json`, those it lacks taken from
    `special_tokens_map.json` when the config has no `added_tokens_decoder` (older
    checkpoints keep them only there; transformers reads that file only then)."""
    declared = {k: _token_text(config.get(k)) for k in SPECIAL_TOKENS}
    legacy_path = Path(model_dir) / "special_tokens_map.json"
    if "added_tokens_decoder" not in config and legacy_path.is_file():
        try:
            legacy = json.loads(legacy_path.read_text())
        except (OSError, ValueError) as e:
            raise InvalidInput(f"{legacy_path} is not valid JSON: {e}") from e
        if isinstance(legacy, dict):
            for k in SPECIAL_TOKENS:
                declared[k] = declared[k] or _token_text(legacy.get(k))
    return {k: v for k, v in declared.items() if v}


@dataclass(frozen=True)
class ChatTemplate:
    """A compiled chat template and the special tokens it may refer to (name -> text;
    one the tokenizer does not declare is undefined in the template, as in transformers)."""

    source: str
    special_tokens: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, model_dir: Path) -> ChatTemplate | None:
        """The checkpoint's default template, or None when it ships none. A list of
        named templates (as some checkpoints have) gives the one named "default"."""
        config_path = Path(model_dir) / "tokenizer_config.json"
        config: dict[str, Any] = {}
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text())
            except (OSError, ValueError) as e:
                raise InvalidInput(f"{config_path} is not valid JSON: {e}") from e
        source = config.get("chat_template")
        if isinstance(source, list):
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        jinja_file = Path(model_dir) / "chat_template.jinja"
        if jinja_file.is_file():  # transformers: the separate file takes priority
            source = jinja_file.read_text()
        if not isinstance(source, str) or not source.strip():
            return None
        template = cls(source, _special_tokens(model_dir, config))
        _ = template.compiled  # a broken template fails at load, not at the first request
        return template

    @functools.cached_property
    def compiled(self) -> jinja2.Template:
        try:
            return _environment().from_string(self.source)
        except jinja2.TemplateError as e:
            raise InvalidInput(f"the checkpoint's chat template does not compile: {e}") from e

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        """The prompt text; a template that refuses the conversation (`raise_exception`,
        e.g. roles out of order) is the client's error and says why."""
        try:
            return self.compiled.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                tools=None,
                documents=None,
                **self.special_tokens,
                **(extra or {}),
            )
        except jinja2.TemplateError as e:
            raise InvalidRequest(f"the model's chat template refused the messages: {e}") from e
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise InvalidRequest(f"the model's chat template could not render them: {e}") from e


__all__ = ["RESERVED_TEMPLATE_VARIABLES", "ChatTemplate"]
