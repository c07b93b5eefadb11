"""Dense embeddings: a local sentence-transformers model, or an OpenAI-compatible endpoint."""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np


class LocalEmbedder:
    """A sentence-transformers model from a local folder."""

    def __init__(self, model_dir: Path, batch_size: int = 32):
        from sentence_transformers import SentenceTransformer

        from tuneloop.models.local import pick_device

        self.name = model_dir.name if model_dir.name != "model" else model_dir.parent.name
        self.model = SentenceTransformer(str(model_dir), device=pick_device())
        self.batch_size = batch_size

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        vecs = self.model.encode(
            list(texts), batch_size=self.batch_size, normalize_embeddings=True, show_progress_bar=False
        )
        return np.asarray(vecs, dtype=np.float32).reshape(len(texts), -1)

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        enc = self.model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return [tuple(o) for o in enc["offset_mapping"]]


class EndpointEmbedder:
    """Embeddings from an OpenAI-compatible /embeddings endpoint, via dspy.Embedder (LiteLLM)."""

    def __init__(self, model: str, base_url: str, key: str, batch_size: int = 32):
        import dspy

        self.name = model
        self.embedder = dspy.Embedder(f"openai/{model}", batch_size=batch_size, api_base=base_url, api_key=key)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        vecs = np.asarray(self.embedder(list(texts)), dtype=np.float32).reshape(len(texts), -1)
        norms = np.linalg.norm(vecs, axis=1, keepdims=True)
        return vecs / np.maximum(norms, 1e-12)

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        # The remote tokenizer is unknown: count whitespace words (about 1.3 model tokens each).
        return [m.span() for m in re.finditer(r"\S+", text)]
