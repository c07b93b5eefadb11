"""Builders that turn a role's settings into a model object (the only place that picks a backend)."""
from __future__ import annotations

from pathlib import Path

from tuneloop.config import Project, RoleSettings
from tuneloop.models.base import ChatModel, Embedder, GenerationParams
from tuneloop.models.defaults import resolve_model_path
from tuneloop.progress import AUTO_BATCH


def generation_params(role: RoleSettings, seed: int = 0, temperature: float | None = None) -> GenerationParams:
    return GenerationParams(
        max_new_tokens=role.max_new_tokens,
        temperature=role.temperature if temperature is None else temperature,
        seed=seed,
    )


def build_chat_model(project: Project, role: RoleSettings, adapter: Path | None = None,
                     engine: str | None = None) -> ChatModel:
    """A chat model for a role; `adapter` (a LoRA folder) applies to local models only.

    A local model with `compute.engine: ray` (`engine` None: the project's) runs its large calls
    on a pool of Ray actors (`models/pooled.py`); `tuneloop serve` passes "local".

    With `role.cache` the model answers from `<project>/cache/replies` first (keyed by the full
    request), so a rerun after a crash costs no model calls. Adapter models are never cached: a
    student adapter can be retrained in place.
    """
    model: ChatModel
    if role.backend == "openai":
        from tuneloop.models.remote import EndpointChatModel

        concurrency = role.batch_size if isinstance(role.batch_size, int) else 8
        model = EndpointChatModel(role.model, role.base_url or "", role.api_key_env, concurrency=concurrency,
                                  max_retries=role.max_retries)
    elif (engine or project.settings.compute.engine) == "ray":
        from tuneloop.models.local import LocalChatModel
        from tuneloop.models.pooled import PooledChatModel

        folder = resolve_model_path(role.model, project.cache)
        step = AUTO_BATCH if role.batch_size == "auto" else int(role.batch_size)
        if project.settings.compute.llm_engine == "vllm":
            from tuneloop.models.ray_vllm import VllmChatModel

            model = VllmChatModel(folder, adapter, role.batch_size, step, project.settings.compute)
        else:
            model = PooledChatModel(LocalChatModel, (folder, adapter, role.batch_size), str(adapter or folder), step,
                                    project.settings.compute)
    else:
        from tuneloop.models.local import LocalChatModel

        model = LocalChatModel(resolve_model_path(role.model, project.cache), adapter, batch_size=role.batch_size)
    if role.cache and adapter is None:
        from tuneloop.models.cache import CachedChatModel

        model = CachedChatModel(model, reply_cache_dir(project))
    return model


def reply_cache_dir(project: Project) -> Path:
    """Where cached chat replies live (delete it to force fresh generations)."""
    return project.root / "cache" / "replies"


def build_embedder(project: Project, engine: str | None = None) -> Embedder | None:
    """The embedder role, or None when the index is BM25-only; with `compute.engine: ray` (`engine`
    None: the project's) a large embedding call (a corpus at ingest) runs on a pool of Ray actors."""
    if not project.settings.ingest.dense:
        return None
    role = project.settings.models.embedder
    if role.backend == "openai":
        from tuneloop.models.embed import EndpointEmbedder
        from tuneloop.models.remote import api_key

        return EndpointEmbedder(role.model, role.base_url or "", api_key(role.api_key_env), role.batch_size)
    if (engine or project.settings.compute.engine) == "ray":
        from tuneloop.models.pooled import PooledEmbedder

        return PooledEmbedder(resolve_model_path(role.model, project.cache), role.batch_size,
                              project.settings.compute)
    from tuneloop.models.embed import LocalEmbedder

    return LocalEmbedder(resolve_model_path(role.model, project.cache), batch_size=role.batch_size)
