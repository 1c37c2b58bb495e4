"""Text of a growing token sequence, one token at a time, at a constant cost per token.

Re-decoding the whole sequence on every token (what streaming did first) costs O(n) per
token, O(n^2) over a long answer. The tokenizers library's `DecodeStream` keeps only the
few tokens a character or a word-piece boundary still depends on, so each step costs
the same whatever came before: a byte-level token that ends mid UTF-8 character gives
no text until the character is complete, and the deltas concatenate to the text of all
the tokens (`bench/streaming.py` measures it flat from token 1 to token 1024).

A generation continues its prompt, so its text is decoded after the prompt's last few
tokens and cut where theirs ends, as transformers' text-generation pipeline and vLLM
do: decoded alone, a SentencePiece (Metaspace) decoder drops the first token's leading
space as if it began the text ("Hello" + "▁brown" read "Hellobrown").
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from typing import Any

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
"""A SentencePiece byte-fallback token's name for one byte."""


PROMPT_CONTEXT = 6
"""Prompt tokens a continuation is decoded after: enough for a decoder to see the text
is not starting (one word piece would do) and for a character spelled in up to four
byte-fallback tokens; a fixed few, so the cost per request does not grow with the
prompt (vLLM starts its incremental detokenizer from five)."""


def prompt_tail(tokenizer: Tokenizer, prompt: Sequence[int]) -> list[int]:
    """The prompt's last tokens a continuation's text is decoded after; none when they
    end inside a character (a prompt given as ids can), whose completion by the first
    new token would change the prompt's own text rather than add to it."""
    tail = list(prompt[-PROMPT_CONTEXT:])
    if tail and str(tokenizer.decode(tail, skip_special_tokens=True)).endswith("\ufffd"):
        return []
    return tail


def continuation(tokenizer: Tokenizer, prompt: Sequence[int], ids: Sequence[int]) -> str:
    """The whole text `ids` add to `prompt` in one decoding (what `IncrementalText`
    gives piece by piece): the tail and the new tokens decoded together, the tail's own
    text cut off."""
    tail = prompt_tail(tokenizer, prompt)
    whole = str(tokenizer.decode([*tail, *ids], skip_special_tokens=True))
    head = str(tokenizer.decode(tail, skip_special_tokens=True))
    if whole.startswith(head):
        return whole[len(head) :]
    return str(tokenizer.decode(list(ids), skip_special_tokens=True))


class IncrementalText:
    """Text deltas of a token sequence as it grows after `prompt` (see `prompt_tail`);
    special tokens give no text."""

    def __init__(self, tokenizer: Tokenizer, prompt: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        tail = prompt_tail(tokenizer, prompt)
        self._stream = DecodeStream(ids=tail, skip_special_tokens=True)
        self._pending: list[int] = []  # tokens the stream holds back (mid-character)
        self.text = ""  # everything emitted so far

    def push(self, token: int) -> str:
        """The new text this token completes ("" while a character is incomplete)."""
        piece = self._stream.step(self._tokenizer, token)
        if piece is None:
            self._pending.append(token)
            return ""
        self._pending.clear()
        self.text += piece
        return piece

    def flush(self) -> str:
        """Whatever the held-back tokens spell (a replacement character for a broken
        UTF-8 tail), at the end of the sequence."""
        if not self._pending:
            return ""
        tail = str(self._tokenizer.decode(self._pending, skip_special_tokens=True))
        self._pending.clear()
        self.text += tail
        return tail


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for every byte, used by ByteLevel tokenizers
    (bytes that print stand for themselves, the rest from U+0100 up)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


@functools.lru_cache(maxsize=8)
def _decoders(tokenizer: Tokenizer) -> tuple[dict[str, Any], ...]:
    """The tokenizer's decoder and the steps of a decoder sequence. Once per tokenizer:
    it reads its whole definition."""
    decoder = json.loads(tokenizer.to_str()).get("decoder") or {}
    return (decoder, *(decoder.get("decoders") or ()))


@functools.lru_cache(maxsize=8)
def _byte_level(tokenizer: Tokenizer) -> dict[str, int] | None:
    """Each vocabulary character's byte, when the tokenizer decodes byte-level (GPT-2,
    Llama 3, Qwen); None otherwise."""
    if not any(d.get("type") == "ByteLevel" for d in _decoders(tokenizer)):
        return None
    return {c: b for b, c in bytes_to_unicode().items()}


def _space_mark(tokenizer: Tokenizer) -> str | None:
    """The character a SentencePiece tokenizer's pieces write a space as ("▁": Metaspace,
    or Llama 2's Replace("▁", " ")); None otherwise."""
    for d in _decoders(tokenizer):
        if d.get("type") == "Metaspace":
            return str(d.get("replacement", "▁"))
        pattern = (d.get("pattern") or {}).get("String")
        if d.get("type") == "Replace" and d.get("content") == " " and pattern:
            return str(pattern)
    return None


@functools.lru_cache(maxsize=8)
def special_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """The tokens a text decoded with `skip_special_tokens` leaves out (BOS, EOS, pad)."""
    added = tokenizer.get_added_tokens_decoder()
    return frozenset(i for i, token in added.items() if token.special)


def token_bytes(tokenizer: Tokenizer, token: int) -> bytes:
    """The bytes `token` stands for, a part of a character included (its own decoding
    reads such a part as U+FFFD, three other bytes), and a SentencePiece piece's leading
    space (its own decoding drops it as the text's first): the text it adds after others."""
    piece = tokenizer.id_to_token(token)
    table = _byte_level(tokenizer)
    if piece is not None and table is not None and all(c in table for c in piece):
        return bytes(table[c] for c in piece)
    if piece is not None and (byte := BYTE_PIECE.fullmatch(piece)):
        return bytes([int(byte[1], 16)])
    mark = _space_mark(tokenizer)
    if piece is not None and mark and mark in piece and token not in special_ids(tokenizer):
        # decoded alone, the piece's leading space is dropped as the text's first
        return piece.replace(mark, " ").encode()
    return str(tokenizer.decode([token], skip_special_tokens=False)).encode()


def bytes_text(raw: bytes) -> str:
    """A token's text as OpenAI writes it: the characters, or for bytes that are not whole
    characters `bytes:\\xNN...`, so two such tokens never share a name (a dict of top
    logprobs kept one of them)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


__all__ = [
    "IncrementalText",
    "bytes_text",
    "bytes_to_unicode",
    "continuation",
    "prompt_tail",
    "special_ids",
    "token_bytes",
]
