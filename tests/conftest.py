"""Fixtures: a tiny random-weight chat model, a project factory and a scripted teacher."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported anywhere
os.environ.setdefault("OMP_NUM_THREADS", "1")

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import (
    CONTRACTS,
    FakeTeacher,
    build_tiny_model,
    deep_merge,
    import_sample_pairs,
    tiny_settings,
    write_settings,
)
from tuneloop.config import Project, load_project
from tuneloop.models.base import GenerationParams


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A ChatML word-level tokenizer and a 2-layer random Llama, checked to generate."""
    path = build_tiny_model(tmp_path_factory.mktemp("tiny-model"))
    from tuneloop.models.local import LocalChatModel

    model = LocalChatModel(path, batch_size=2)
    conv = [{"role": "user", "content": "What law governs the agreement?"}]
    replies = model.chat([conv, conv], GenerationParams(max_new_tokens=5))
    assert len(replies) == 2 and all(isinstance(r, str) and r for r in replies)
    assert replies[0] == replies[1]  # greedy: same prompt, same reply
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """No test touches ~/.cache."""
    monkeypatch.setenv("TUNELOOP_CACHE", str(tmp_path / "tuneloop-cache"))


@pytest.fixture
def project(tmp_path, tiny_model_dir) -> Callable[..., Project]:
    """Factory: `project(overrides=None, pairs=True, name=None)` -> a fresh project on the tiny model.

    The sample contracts are copied to `documents/`; with `pairs`, the sample seeds (split train)
    and held-out questions (split eval) are imported. Nothing is ingested yet.
    """
    counter = {"n": 0}

    def make(overrides: dict | None = None, pairs: bool = True, name: str | None = None) -> Project:
        counter["n"] += 1
        root = tmp_path / (name or f"project{counter['n']}")
        root.mkdir()
        shutil.copytree(CONTRACTS, root / "documents")
        write_settings(root, deep_merge(tiny_settings(tiny_model_dir), overrides or {}))
        proj = load_project(root)
        if pairs:
            import_sample_pairs(proj)
        return proj

    return make


@pytest.fixture
def fake_teacher() -> FakeTeacher:
    return FakeTeacher()


@pytest.fixture(scope="session")
def real_embedder(tmp_path_factory):
    """The real default embedder (all-MiniLM-L6-v2, shipped in a pip package; loads in seconds)."""
    from tuneloop.models.defaults import resolve_model_path
    from tuneloop.models.embed import LocalEmbedder

    return LocalEmbedder(resolve_model_path("builtin:all-minilm-l6-v2", tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole test session, started as tuneloop starts it (`compute.connect`:
    `ray.init(num_cpus=2, include_dashboard=False)`, never local_mode); every step's own connect
    then finds it running. Skips the test when the `ray` extra is not installed."""
    ray = pytest.importorskip("ray")
    from tuneloop.compute import ray_engine
    from tuneloop.config import ComputeSettings

    ray_engine.connect(ComputeSettings(engine="ray", workers=2, cpus_per_worker=1))
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def postgres_server():
    """One throwaway PostgreSQL server for the session (tests/postgres.py), started on first use."""
    from tests.postgres import PostgresServer

    server = PostgresServer()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    """A fresh, empty store URL: a SQLite file, then a database of its own on the PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db.sqlite'}"
    return request.getfixturevalue("postgres_server").new_database()
