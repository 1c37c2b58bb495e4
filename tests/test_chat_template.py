"""A checkpoint's chat template gives the same prompt text here as transformers'
`apply_chat_template(..., tokenize=False)` on the same directory: the prompt is what the
model was trained to continue, and a stray block or a missing token changes its answers
without an error anywhere."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError
from transformers import AutoTokenizer

from butterfly.api.openai_schema import ChatCompletionRequest
from butterfly.runtime.chat import SPECIAL_TOKENS, ChatTemplate

MESSAGES = [{"role": "user", "content": "hi"}]


def _checkpoint(
    src: Path, dst: Path, template: str | None, jinja: str | None, legacy: bool
) -> Path:
    dst.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(src / name, dst / name)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    if template is not None:
        cfg["chat_template"] = template
    cfg["unk_token"] = "<|unk|>"
    if legacy:  # the pad token only in the older file
        (dst / "special_tokens_map.json").write_text(
            json.dumps({"pad_token": cfg.pop("pad_token")})
        )
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    if jinja is not None:
        (dst / "chat_template.jinja").write_text(jinja)
    return dst


CASES = {
    # transformers: "independent chat template file(s) ... take priority"; Butterfly
    # rendered the tokenizer_config entry ('OLD:hi')
    "jinja_file_takes_priority": (
        "OLD:{{ messages[0].content }}",
        "NEW:{{ messages[0].content }}",
        False,
    ),
    # undefined is not none: every prompt got the tool block ('[TOOLS][DOCS]hi')
    "tools_and_documents_are_none": (
        "{% if tools is not none %}[TOOLS]{% endif %}"
        "{% if documents is not none %}[DOCS]{% endif %}{{ messages[0].content }}",
        None,
        False,
    ),
    # only bos/eos were given: '||hi'
    "every_special_token": (
        "{{ unk_token }}|{{ pad_token }}|{{ messages[0].content }}",
        None,
        False,
    ),
    "special_tokens_map_json": (
        "{{ unk_token }}|{{ pad_token }}|{{ messages[0].content }}",
        None,
        True,
    ),
    "an_undeclared_token_is_undefined": (
        "{{ 'sep' if sep_token is defined else 'none' }}|{{ messages[0].content }}",
        None,
        False,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_chat_template_renders_as_transformers_renders_it(
    name: str, tiny_model: Path, tmp_path: Path
) -> None:
    template, jinja, legacy = CASES[name]
    d = _checkpoint(tiny_model, tmp_path / name, template, jinja, legacy)
    want = AutoTokenizer.from_pretrained(d).apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True
    )
    chat = ChatTemplate.load(d)
    assert chat is not None
    assert chat.render(MESSAGES, add_generation_prompt=True) == want


@pytest.mark.parametrize("name", ["tools", "documents", *SPECIAL_TOKENS])
def test_a_request_may_not_set_what_the_template_is_given(name: str) -> None:
    """chat_template_kwargs naming one of them failed the render with Python's own
    "multiple values" words (or overrode a token the model was trained with)."""
    with pytest.raises(ValidationError, match=f"{name} cannot be set"):
        ChatCompletionRequest(model="m", messages=MESSAGES, chat_template_kwargs={name: 1})  # type: ignore[arg-type]
