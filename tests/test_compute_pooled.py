"""Steps whose models run on a pool of Ray actors (`compute.engine: ray`, models/pooled.py), on a
local Ray cluster started by the test: the same replies, margins and embeddings as in this
process. The synthetic rows and eval metrics of a whole cycle on Ray: tests/test_compute_cycle.py."""
from __future__ import annotations

import numpy as np
import pytest

from tuneloop.config import ComputeSettings
from tuneloop.models.base import GenerationParams
from tuneloop.models.local import LocalChatModel
from tuneloop.progress import SilentReporter, batched_chat, batched_margins

ray = pytest.importorskip("ray")
from tuneloop.compute import ray_engine  # noqa: E402 - after the skip when Ray is missing
from tuneloop.models.pooled import PooledChatModel, PooledEmbedder  # noqa: E402

POOL = {"engine": "ray", "workers": 2, "cpus_per_worker": 0.5, "min_items": 1}


@pytest.fixture(scope="module")
def cluster():
    settings = ComputeSettings(**POOL)
    ray_engine.connect(settings)
    yield settings
    ray.shutdown()


class Advances:
    def __init__(self) -> None:
        self.steps: list[int] = []

    def task(self, description, total):
        from contextlib import contextmanager

        @contextmanager
        def run():
            yield self.steps.append

        return run()

    def log(self, message) -> None:
        pass


def conversations(n: int) -> list[list[dict]]:
    words = ["term", "party", "notice", "law", "fee", "renewal", "audit", "license"]
    questions = [f"Does clause {i} mention {words[i % 8]} or {words[(i * 3) % 8]}? " * (1 + i % 3) for i in range(n)]
    return [[{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": q}] for q in questions]


def test_a_pooled_model_replies_as_the_model_in_this_process(cluster, tiny_model_dir):
    convs = conversations(20)
    local = LocalChatModel(tiny_model_dir, batch_size=4)
    pooled = PooledChatModel(LocalChatModel, (tiny_model_dir, None, 4), str(tiny_model_dir), 8, cluster)
    for params in (GenerationParams(max_new_tokens=6), GenerationParams(max_new_tokens=6, temperature=0.9, seed=3)):
        expected = batched_chat(local, convs, params, SilentReporter(), "answering", 8)
        progress = Advances()
        assert batched_chat(pooled, convs, params, progress, "answering", 8) == expected  # greedy and seeded
        assert sum(progress.steps) == 20 and len(progress.steps) == 3  # one advance per chunk of 8
    assert pooled.jobs == 2 and pooled._local is None  # both calls ran on the pool, none here
    margins = batched_margins(pooled, convs, SilentReporter(), "margins", step=8)
    assert margins == batched_margins(local, convs, SilentReporter(), "margins", step=8)
    assert pooled.jobs == 3


def test_calls_under_min_items_run_in_this_process(cluster, tiny_model_dir):
    few = ComputeSettings(**{**POOL, "min_items": 10})
    pooled = PooledChatModel(LocalChatModel, (tiny_model_dir, None, 4), str(tiny_model_dir), 8, few)
    convs, params = conversations(9), GenerationParams(max_new_tokens=4)
    assert pooled.chat(convs, params) == batched_chat(LocalChatModel(tiny_model_dir, batch_size=4), convs, params,
                                                      SilentReporter(), "answering", 8)
    assert pooled.jobs == 0 and pooled._local is not None


def test_a_corpus_is_embedded_on_the_pool_like_in_this_process(cluster, real_embedder):
    from tuneloop.models.pooled import EMBED_CHUNK

    texts = [f"Section {i}. The licensee shall pay {i} dollars within {i % 30} days of notice." for i in
             range(EMBED_CHUNK + 40)]
    from tuneloop.models.defaults import embedder_dir

    pooled = PooledEmbedder(embedder_dir(), 32, cluster)
    vectors = pooled.embed(texts)
    assert pooled.jobs == 1 and vectors.shape == (len(texts), 384)
    np.testing.assert_allclose(vectors, real_embedder.embed(texts), atol=1e-5)
    assert pooled.embed(texts[:3]).shape == (3, 384) and pooled.jobs == 1  # a query: embedded here
