"""A local model role served by a pool of Ray actors (`compute.engine: ray`).

`PooledChatModel` and `PooledEmbedder` are the `ChatModel` and `Embedder` of a step whose model
runs on the cluster: a call with many items becomes one Ray Data job (`compute/ray_engine.map_with_actors`)
in which each actor loads the model once and answers whole chunks. The chunks are the ones an
in-process run makes (`progress.batched_chat`: `step` conversations, seed + chunk start), and
each actor runs the same `LocalChatModel` on them, so greedy and seeded replies are the ones of an
in-process run. A call with fewer than `compute.min_items` items (a DSPy optimiser's single
prompts, a reward during training) runs on a model loaded in this process instead: a Ray job
costs seconds of actor start and model load.

Results come back to the driver, which alone writes the store.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from tuneloop.compute import ray_engine
from tuneloop.config import ComputeSettings
from tuneloop.models.base import ChatModel, GenerationParams, Message

Advance = Callable[[int], None]
EMBED_CHUNK = 256  # texts per actor call at ingest


def _threads(settings: ComputeSettings) -> int:
    return max(1, int(settings.cpus_per_worker))


class _ChatActor:
    """One actor of the pool: the model built once (`factory(*args)`), answering chunks."""

    def __init__(self, factory: Callable[..., ChatModel], args: tuple, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.model = factory(*args)

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        out = []
        for kind, convs, params in zip(batch["kind"], batch["conversations"], batch["params"]):
            conversations = json.loads(convs)
            if kind == "margins":
                margins = self.model.yes_no_margins(conversations)  # type: ignore[attr-defined]
                out.append(json.dumps([float(m) for m in margins]))
            else:
                out.append(json.dumps(self.model.chat(conversations, GenerationParams(**json.loads(params)))))
        return {"out": out}


class PooledChatModel:
    """A `ChatModel` (with `yes_no_margins` when the model has them) whose large calls run on a pool
    of Ray actors, each holding `factory(*args)` (for a local role: `LocalChatModel(folder, adapter,
    batch_size)`); `name` is the model's own, so reply-cache keys do not change with the engine."""

    pooled = True  # callers hand it a whole step's conversations at once (progress.batched_chat)

    def __init__(self, factory: Callable[..., ChatModel], args: tuple, name: str, step: int,
                 settings: ComputeSettings) -> None:
        self.factory, self.args, self.name = factory, args, name
        self.step, self.settings = step, settings
        self._local: ChatModel | None = None  # the in-process model for calls under compute.min_items
        self.jobs = 0  # Ray jobs run (tests and benches read it)

    def chat(self, conversations: Sequence[list[Message]], params: GenerationParams, step: int | None = None,
             advance: Advance | None = None) -> list[str]:
        """One reply per conversation, in chunks of `step` (default: the role's) with the seed of an
        in-process run (seed + chunk start)."""
        step = step or self.step
        if len(conversations) >= self.settings.min_items:
            return self._on_pool("chat", conversations, params, step, advance)
        return chat_in_chunks(self.local(), conversations, params, step, advance)

    def yes_no_margins(self, conversations: Sequence[list[Message]], step: int | None = None,
                       advance: Advance | None = None) -> list[float]:
        """`LocalChatModel.yes_no_margins` of each conversation (the factory's model must have them)."""
        step = step or self.step
        if len(conversations) >= self.settings.min_items:
            return self._on_pool("margins", conversations, GenerationParams(max_new_tokens=1), step, advance)
        margins = self.local().yes_no_margins(conversations)  # type: ignore[attr-defined]
        if advance is not None:
            advance(len(conversations))
        return margins

    def local(self) -> ChatModel:
        """The model built in this process (on first use)."""
        if self._local is None:
            self._local = self.factory(*self.args)
        return self._local

    def _on_pool(self, kind: str, conversations: Sequence[list[Message]], params: GenerationParams, step: int,
                 advance: Advance | None) -> list:
        items = [{"kind": kind, "conversations": json.dumps(list(conversations[start:start + step])),
                  "params": json.dumps(asdict(replace(params, seed=params.seed + start))),
                  "size": len(conversations[start:start + step])}
                 for start in range(0, len(conversations), step)]
        on_row = (lambda row: advance(int(row["size"]))) if advance is not None else None
        rows = ray_engine.map_with_actors(items, _ChatActor, (self.factory, self.args, _threads(self.settings)),
                                          self.settings, batch_size=1, on_row=on_row)
        self.jobs += 1
        return [value for row in rows for value in json.loads(row["out"])]


def chat_in_chunks(model: ChatModel, conversations: Sequence[list[Message]], params: GenerationParams, step: int,
                   advance: Advance | None) -> list[str]:
    """`model`'s replies in this process, in the chunks and seeds a pool would use (seed + chunk start)."""
    replies: list[str] = []
    for start in range(0, len(conversations), step):
        part = list(conversations[start:start + step])
        replies.extend(model.chat(part, replace(params, seed=params.seed + start)))
        if advance is not None:
            advance(len(part))
    return replies


class _EmbedActor:
    def __init__(self, model_dir: str, batch_size: int, threads: int) -> None:
        import torch

        from tuneloop.models.embed import LocalEmbedder

        torch.set_num_threads(threads)
        self.embedder = LocalEmbedder(Path(model_dir), batch_size)

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        return {"vectors": [json.dumps(self.embedder.embed(json.loads(t)).tolist()) for t in batch["texts"]]}


class PooledEmbedder:
    """An `Embedder` whose large calls (a corpus at ingest) run on a pool of Ray actors; queries and
    token offsets use the embedder loaded in this process."""

    def __init__(self, model_dir: Path, batch_size: int, settings: ComputeSettings) -> None:
        from tuneloop.models.embed import LocalEmbedder

        self.local = LocalEmbedder(model_dir, batch_size)
        self.name, self.model_dir, self.batch_size, self.settings = self.local.name, model_dir, batch_size, settings
        self.jobs = 0

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if len(texts) < max(self.settings.min_items, EMBED_CHUNK):
            return self.local.embed(texts)
        items = [{"texts": json.dumps(list(texts[start:start + EMBED_CHUNK]))}
                 for start in range(0, len(texts), EMBED_CHUNK)]
        rows = ray_engine.map_with_actors(items, _EmbedActor, (str(self.model_dir), self.batch_size,
                                                               _threads(self.settings)), self.settings, batch_size=1)
        self.jobs += 1
        vectors = [np.asarray(json.loads(row["vectors"]), dtype=np.float32) for row in rows]
        return np.concatenate(vectors).reshape(len(texts), -1)

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        return self.local.token_offsets(text)
