"""The small interfaces every model role implements.

A *role* (student, teacher, judge, embedder) is reached through one of these protocols, whatever
runs behind it: a model loaded in-process with transformers, or an OpenAI-compatible endpoint.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

Message = dict[str, str]  # {"role": "system"|"user"|"assistant", "content": "..."}


@dataclass(frozen=True)
class GenerationParams:
    """How to sample one batch of completions."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 means greedy decoding
    top_p: float = 1.0
    seed: int = 0
    max_time: float | None = None  # seconds: generation stops then and returns what it has (serving)


class ChatModel(Protocol):
    """Turns chat conversations into assistant replies."""

    name: str

    def chat(self, conversations: Sequence[list[Message]], params: GenerationParams) -> list[str]:
        """Return one reply per conversation, in order."""
        ...


class Embedder(Protocol):
    """Turns texts into L2-normalised dense vectors."""

    name: str

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Return a float32 array of shape (len(texts), dim), each row of unit length."""
        ...

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        """Character spans of the embedder's tokens in `text` (used to size chunks in tokens)."""
        ...
