"""Tokenizers used to build prompts of exact lengths and to count streamed tokens.

``words`` is a dependency-free tokenizer (one token per whitespace-separated word) used
by the simulated engine and the tests. ``hf:<folder>`` loads the target model's
``tokenizer.json`` with the ``tokenizers`` library, so prompts hit the requested
lengths for that model.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from loadtest.sim.words import WORDS

__all__ = ["WORDS", "HFTokenizer", "Tokenizer", "WordTokenizer", "load_tokenizer", "text_of_length"]


class Tokenizer(Protocol):
    """What the load generator needs from a tokenizer."""

    name: str

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class WordTokenizer:
    """One token per whitespace-separated word; ids are stable hashes of the words."""

    name = "words"

    def __init__(self) -> None:
        self._vocab: dict[int, str] = {}

    def encode(self, text: str) -> list[int]:
        ids = []
        for word in text.split():
            i = zlib.crc32(word.encode()) & 0x7FFFFFFF
            self._vocab[i] = word
            ids.append(i)
        return ids

    def decode(self, ids: list[int]) -> str:
        return " ".join(self._vocab.get(i, "x") for i in ids)


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (``tokenizers`` library), without special tokens."""

    def __init__(self, path: str | Path) -> None:
        try:
            from tokenizers import Tokenizer as _Tok
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise RuntimeError("the 'tokenizers' package is needed for hf: tokenizers") from exc
        folder = Path(path).expanduser()
        file = folder / "tokenizer.json" if folder.is_dir() else folder
        if not file.exists():
            raise FileNotFoundError(f"no tokenizer.json at {file}")
        self._tok: Any = _Tok.from_file(str(file))
        self.name = f"hf:{folder}"

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=True))


def load_tokenizer(spec: str) -> Tokenizer:
    """``words`` or ``hf:<folder or tokenizer.json>``."""
    if spec == "words":
        return WordTokenizer()
    if spec.startswith("hf:"):
        return HFTokenizer(spec.removeprefix("hf:"))
    raise ValueError(f"unknown tokenizer {spec!r}; use 'words' or 'hf:<folder>'")


def text_of_length(tokenizer: Tokenizer, n_tokens: int, rng: np.random.Generator) -> str:
    """Random text that ``tokenizer`` encodes to exactly ``n_tokens`` tokens when it can
    (BPE merges at the edges may leave it one or two off; callers record the real count)."""
    if n_tokens <= 0:
        return ""
    words = rng.choice(np.asarray(WORDS), size=n_tokens + 8)
    ids = tokenizer.encode(" " + " ".join(str(w) for w in words))
    k = n_tokens
    text = tokenizer.decode(ids[:k])
    for _ in range(6):
        count = len(tokenizer.encode(text))
        if count == n_tokens:
            break
        k = max(1, k + n_tokens - count)
        text = tokenizer.decode(ids[:k])
    return text
