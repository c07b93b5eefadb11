"""A disk cache of chat replies, keyed by the full request, so a rerun after a crash costs no calls.

The key of one conversation is the SHA-256 of a canonical JSON of everything that decides the
reply: the model's name, the messages and the generation parameters (max_new_tokens,
temperature, top_p, seed). Storage is `diskcache` (SQLite underneath: safe across threads and
processes). Replies are written as soon as the wrapped model returns them, so every batch that
finished before a crash is kept.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from tuneloop.models.base import ChatModel, GenerationParams, Message


def request_key(model_name: str, conversation: list[Message], params: GenerationParams) -> str:
    """The cache key of one conversation sent to `model_name` with `params`."""
    payload = {
        "model": model_name,
        "messages": [{"role": m["role"], "content": m["content"]} for m in conversation],
        "max_new_tokens": params.max_new_tokens,
        "temperature": float(params.temperature),
        "top_p": float(params.top_p),
        # greedy decoding ignores the seed, so it is not part of the key (a rerun with another
        # batch size, which shifts per-batch seeds, still hits the cache)
        "seed": params.seed if params.temperature > 0 else None,
    }
    canonical = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class CachedChatModel:
    """A ChatModel that answers from a disk cache and sends only the misses to the wrapped model."""

    def __init__(self, model: ChatModel, cache_dir: Path):
        import diskcache

        self.wrapped = model
        self.name = model.name
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.store = diskcache.Cache(str(self.cache_dir))
        self.calls = 0  # conversations sent to the wrapped model
        self.hits = 0  # conversations answered from the cache

    @property
    def pooled(self) -> bool:
        """Whether the wrapped model takes a whole step's items at once (`progress.batched_chat`)."""
        return getattr(self.wrapped, "pooled", False)

    def chat(self, conversations: Sequence[list[Message]], params: GenerationParams, **pool) -> list[str]:
        """`pool` (step, advance) goes to a pooled wrapped model; cache hits advance at once."""
        keys = [request_key(self.name, conv, params) for conv in conversations]
        return self._through_cache(keys, conversations, lambda convs: self.wrapped.chat(convs, params, **pool), pool)

    def yes_no_margins(self, conversations: Sequence[list[Message]], **pool) -> list[float]:
        """The wrapped model's first-token Yes/No margins (`programs/decide.py`), cached like replies."""
        keys = ["yes-no:" + request_key(self.name, conv, GenerationParams(max_new_tokens=1)) for conv in conversations]
        return self._through_cache(keys, conversations,
                                   lambda convs: [float(m) for m in self.wrapped.yes_no_margins(convs, **pool)],  # type: ignore[attr-defined]
                                   pool)

    def _through_cache(self, keys: list[str], conversations: Sequence[list[Message]], compute, pool: dict) -> list:
        """The cached value of each key; the misses computed by `compute(conversations)` in one call
        and written in one transaction before anything else can fail."""
        values: list = [self.store.get(k) for k in keys]
        missing = [i for i, v in enumerate(values) if v is None]
        self.hits += len(conversations) - len(missing)
        if pool.get("advance") is not None and len(missing) < len(conversations):
            pool["advance"](len(conversations) - len(missing))
        if missing:
            fresh = compute([conversations[i] for i in missing])
            if len(fresh) != len(missing):
                raise RuntimeError(f"{self.name} returned {len(fresh)} results for {len(missing)} conversations")
            self.calls += len(missing)
            with self.store.transact():
                for i, value in zip(missing, fresh):
                    self.store.set(keys[i], value)
            for i, value in zip(missing, fresh):
                values[i] = value
        return values

    def close(self) -> None:
        self.store.close()

    def __repr__(self) -> str:
        return f"CachedChatModel({self.wrapped!r}, {str(self.cache_dir)!r})"
