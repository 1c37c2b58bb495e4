"""Text of a growing token sequence, one token at a time, at a constant cost per token.

Re-decoding the whole sequence on every token (what streaming did first) costs O(n) per
token, O(n^2) over a long answer. The tokenizers library's `DecodeStream` keeps only the
few tokens a character or a word-piece boundary still depends on, so each step costs
the same whatever came before: a byte-level token that ends mid UTF-8 character gives
no text until the character is complete, and the deltas concatenate to the text of all
the tokens (`bench/streaming.py` measures it flat from token 1 to token 1024).
"""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class IncrementalText:
    """Text deltas of a token sequence as it grows; special tokens give no text."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
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


__all__ = ["IncrementalText"]
