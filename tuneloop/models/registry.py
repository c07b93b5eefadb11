"""Builders that turn a role's settings into a model object (the only place that picks a backend)."""
from __future__ import annotations

from pathlib import Path

from tuneloop.config import Project, RoleSettings
from tuneloop.models.base import ChatModel, Embedder, GenerationParams
from tuneloop.models.defaults import resolve_model_path


def generation_params(role: RoleSettings, seed: int = 0, temperature: float | None = None) -> GenerationParams:
    return GenerationParams(
        max_new_tokens=role.max_new_tokens,
        temperature=role.temperature if temperature is None else temperature,
        seed=seed,
    )


def build_chat_model(project: Project, role: RoleSettings, adapter: Path | None = None) -> ChatModel:
    """A chat model for a role; `adapter` (a LoRA folder) applies to local models only."""
    if role.backend == "openai":
        from tuneloop.models.remote import EndpointChatModel

        return EndpointChatModel(role.model, role.base_url or "", role.api_key_env, concurrency=role.batch_size)
    from tuneloop.models.local import LocalChatModel

    return LocalChatModel(resolve_model_path(role.model, project.cache), adapter, batch_size=role.batch_size)


def build_embedder(project: Project) -> Embedder | None:
    """The embedder role, or None when the index is BM25-only."""
    if not project.settings.ingest.dense:
        return None
    role = project.settings.models.embedder
    if role.backend == "openai":
        from tuneloop.models.embed import EndpointEmbedder
        from tuneloop.models.remote import api_key

        return EndpointEmbedder(role.model, role.base_url or "", api_key(role.api_key_env), role.batch_size)
    from tuneloop.models.embed import LocalEmbedder

    return LocalEmbedder(resolve_model_path(role.model, project.cache), batch_size=role.batch_size)
