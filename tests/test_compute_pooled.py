"""Steps whose models run on a pool of Ray actors (`compute.engine: ray`, models/pooled.py), on a
local Ray cluster started by the test: the same replies, margins and embeddings as in this
process. The synthetic rows and eval metrics of a whole cycle on Ray: tests/test_compute_cycle.py."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers import RecordingReporter
from tuneloop.config import ComputeSettings
from tuneloop.models.base import GenerationParams
from tuneloop.models.local import LocalChatModel
from tuneloop.progress import SilentReporter, batched_chat, batched_margins

ray = pytest.importorskip("ray")
from tuneloop.models.pooled import PooledChatModel, PooledEmbedder  # noqa: E402

POOL = {"engine": "ray", "workers": 2, "cpus_per_worker": 0.5, "min_items": 1}


@pytest.fixture
def cluster(ray_cluster):
    return ComputeSettings(**POOL)


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
        progress = RecordingReporter()
        assert batched_chat(pooled, convs, params, progress, "answering", 8) == expected  # greedy and seeded
        ((_, total, advances),) = progress.tasks
        assert total == 20 and sorted(advances) == [4, 8, 8]  # one advance per chunk, as it comes back
    assert pooled.jobs == 2 and pooled._local is None  # both calls ran on the pool, none here
    margins = batched_margins(pooled, convs, SilentReporter(), "margins", step=8)
    assert margins == batched_margins(local, convs, SilentReporter(), "margins", step=8)
    assert pooled.jobs == 3


def test_calls_under_min_items_run_in_this_process(cluster, tiny_model_dir):
    from tuneloop.models.ray_vllm import VllmChatModel

    few = ComputeSettings(**{**POOL, "min_items": 20})
    pooled = PooledChatModel(LocalChatModel, (tiny_model_dir, None, 4), str(tiny_model_dir), 8, few)
    vllm = VllmChatModel(tiny_model_dir, None, 4, 8, few)  # its fallback is the transformers model's
    convs, params = conversations(19), GenerationParams(max_new_tokens=4, temperature=0.9, seed=2)
    expected = batched_chat(LocalChatModel(tiny_model_dir, batch_size=4), convs, params, SilentReporter(),
                            "answering", 8)  # seeded: the chunks' seeds must match too
    for model in (pooled, vllm):
        progress = RecordingReporter()
        assert batched_chat(model, convs, params, progress, "answering", 8) == expected
        assert progress.tasks[0][2] == [8, 8, 3]
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


def test_the_vllm_engine_is_configured_as_rays_own_cpu_tests_check_it(cluster, tiny_model_dir, tmp_path, project):
    """ray.data.llm's vLLM processor, built (never run: no vLLM, no GPU here) from a role's settings."""
    from pydantic import ValidationError

    from tuneloop.models.ray_vllm import INDEX, VllmChatModel, _reply, _request
    from tuneloop.models.registry import build_chat_model

    adapter = tmp_path / "adapters" / "sft-c3"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 16}))
    settings = ComputeSettings(engine="ray", workers=3, gpus_per_worker=2, llm_engine="vllm")
    params = GenerationParams(max_new_tokens=7, temperature=0.5, top_p=0.9, seed=4)
    processor = VllmChatModel(tiny_model_dir, adapter, 8, 16, settings).processor(params)
    assert processor.list_stage_names() == ["ChatTemplateStage", "TokenizeStage", "vLLMEngineStage", "DetokenizeStage"]
    stage = processor.get_stage_by_name("vLLMEngineStage")
    kwargs = stage.fn_constructor_kwargs
    assert (kwargs["model"], kwargs["batch_size"], kwargs["dynamic_lora_loading_path"]) == (
        str(tiny_model_dir), 16, str(adapter.parent))  # the base model; LoRA adapters by folder
    engine = kwargs["engine_kwargs"]
    assert (engine["enable_lora"], engine["max_lora_rank"], engine["tensor_parallel_size"]) == (True, 16, 2)
    assert stage.map_batches_kwargs["compute"].max_size == 3  # one engine per worker
    conv = [{"role": "user", "content": "Who may terminate?"}]
    assert _request(params, "sft-c3", {"messages": json.dumps(conv), INDEX: 5}) == {
        "messages": conv, "model": "sft-c3", INDEX: 5,
        "sampling_params": {"max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "seed": 4}}
    assert _reply({"generated_text": " The licensor. ", INDEX: 5, "other": 1}) == {"reply": "The licensor.", INDEX: 5}
    base = VllmChatModel(tiny_model_dir, None, 8, 16, settings).config()
    assert base.engine_kwargs["enable_lora"] is False and base.dynamic_lora_loading_path is None

    p = project(overrides={"compute": {"engine": "ray", "gpus_per_worker": 1, "llm_engine": "vllm"}})
    assert isinstance(build_chat_model(p, p.settings.models.student).wrapped, VllmChatModel)  # under the cache
    with pytest.raises(ValidationError, match="llm_engine: vllm runs on a Ray cluster's GPUs"):
        ComputeSettings(engine="ray", llm_engine="vllm")
