"""Steps whose models run on a pool of Ray actors (`compute.engine: ray`, models/pooled.py), on a
local Ray cluster started by the test: the same replies, margins, synthetic rows and eval metrics
as in this process, the store written by the driver alone."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import FakeTeacher, ingest_project
from tuneloop.artifacts import read_jsonl
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


def synth_rows(project, teacher):
    from tuneloop.stages.synth import SynthModels, synthesize
    from tuneloop.store import Example, open_store

    retriever = ingest_project(project)
    sessions = open_store(project.store_url)
    with sessions() as s:
        r = synthesize(project, s, SynthModels(teacher=teacher), retriever, SilentReporter(), name="synth-ray-test")
        s.commit()
        rows = [(e.question, e.answer, e.document, e.split, json.dumps(e.meta["scores"], sort_keys=True))
                for e in s.query(Example).filter(Example.kind == "synthetic").order_by(Example.id)]
    return r, rows


def test_synth_through_the_pool_stores_the_rows_of_an_in_process_run(cluster, project):
    local_result, local_rows = synth_rows(project(), FakeTeacher())
    pooled = PooledChatModel(FakeTeacher, (), "fake-teacher", 8, cluster)
    ray_result, ray_rows = synth_rows(project(), pooled)
    assert pooled.jobs > 0  # the question, answer, judge and round-trip passes went to the actors
    assert ray_rows == local_rows and len(ray_rows) == local_result.kept >= 4
    assert (ray_result.generated, ray_result.kept) == (local_result.generated, local_result.kept)


def test_eval_through_the_pool_gives_the_metrics_of_an_in_process_run(cluster, project):
    from tuneloop.stages.eval import evaluate_version
    from tuneloop.store import open_store
    from tuneloop.versions import ensure_base_version

    runs = []
    for overrides in ({}, {"compute": POOL}):
        p = project(overrides=overrides)
        retriever = ingest_project(p)
        with open_store(p.store_url)() as s:
            run = evaluate_version(p, s, ensure_base_version(p, s), retriever, SilentReporter())
            s.commit()
            runs.append((run.metrics, read_jsonl(Path(run.artifact_path) / "predictions.jsonl")))
    assert runs[0] == runs[1] and len(runs[0][1]) == 6
