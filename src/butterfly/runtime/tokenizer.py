"""Text to token ids and back, with the checkpoint's own `tokenizer.json`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from butterfly.runtime.chat import ChatTemplate
from butterfly.runtime.detok import continuation
from butterfly.runtime.weights import declared_eos_ids, declared_vocab
from butterfly.types.errors import InvalidInput

# Consulted only when the checkpoint declares no `eos_token_id` (runtime.weights).
FALLBACK_EOS_TOKENS = ("<|eos|>", "</s>", "<|endoftext|>", "<|end_of_text|>")


@dataclass(frozen=True)
class TextCodec:
    tokenizer: Tokenizer
    eos_ids: frozenset[int]
    chat: ChatTemplate | None = None  # the checkpoint's chat template, if it ships one
    # the model's own vocabulary (config.json's vocab_size), 0 if it declares none: a
    # tokenizer may know more ids than the model has rows for (a pad token added without
    # resizing the embeddings), and such an id failed the task at its first step
    model_vocab: int = 0

    @property
    def vocab(self) -> int:
        """The ids a request may name: those both the tokenizer and the model know."""
        known = self.tokenizer.get_vocab_size(with_added_tokens=True)
        return min(known, self.model_vocab) if self.model_vocab > 0 else known

    @classmethod
    def load(cls, model_dir: Path) -> TextCodec:
        path = Path(model_dir) / "tokenizer.json"
        if not path.is_file():
            raise InvalidInput(
                f"{model_dir} has no tokenizer.json, which turns text into the model's "
                "token ids; copy it from where the checkpoint came from"
            )
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for any parse error
            raise InvalidInput(f"{path} does not load as a tokenizer: {e}") from e
        # A tokenizer.json records the padding and truncation it was last used with
        # (transformers saves its backend's state; sentence-transformers ships Fixed 128):
        # encoding with them padded a prompt with pad tokens and cut a long one at
        # max_length, silently. transformers turns both off for every default call; so
        # does Butterfly, and the context check refuses an overlong prompt instead.
        tok.no_padding()
        tok.no_truncation()
        chat = ChatTemplate.load(model_dir)
        width = declared_vocab(model_dir)
        declared = declared_eos_ids(model_dir)
        if declared:
            return cls(tok, declared, chat, width)
        eos = {tok.token_to_id(t) for t in FALLBACK_EOS_TOKENS}
        return cls(tok, frozenset(i for i in eos if i is not None), chat, width)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def continuation(self, prompt: Sequence[int], ids: Sequence[int]) -> str:
        """The text `ids` add after `prompt`, which a client appends to the prompt's:
        `decode(ids)` alone loses a SentencePiece first token's leading space."""
        return continuation(self.tokenizer, prompt, ids)
