"""The disk cache of chat replies: only misses reach the model, order is kept, reruns are free."""
from __future__ import annotations

from collections.abc import Sequence

import pytest

from tuneloop.models.base import GenerationParams, Message
from tuneloop.models.cache import CachedChatModel, request_key


class CountingModel:
    """Replies name the conversation and the params; counts what it was sent."""

    def __init__(self, name: str = "counting"):
        self.name = name
        self.batches: list[int] = []  # conversations per chat() call
        self.sent: list[str] = []  # last user message of every conversation sent

    def chat(self, conversations: Sequence[list[Message]], params: GenerationParams) -> list[str]:
        self.batches.append(len(conversations))
        self.sent += [c[-1]["content"] for c in conversations]
        return [f"{c[-1]['content']}|t={params.temperature}|s={params.seed}" for c in conversations]


def conv(text: str) -> list[Message]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]


P = GenerationParams(max_new_tokens=8, temperature=0.0, seed=1)


def test_hits_misses_and_order(tmp_path):
    inner = CountingModel()
    model = CachedChatModel(inner, tmp_path / "replies")
    assert model.name == "counting" and model.wrapped is inner

    first = model.chat([conv(t) for t in "abcd"], P)
    assert first == [f"{t}|t=0.0|s=1" for t in "abcd"]
    assert (model.calls, model.hits, inner.batches) == (4, 0, [4])

    again = model.chat([conv(t) for t in "abcd"], P)
    assert again == first
    assert (model.calls, model.hits, inner.batches) == (4, 4, [4])  # nothing sent

    mixed = model.chat([conv(t) for t in "xbyd"], P)  # two new ones, interleaved with hits
    assert mixed == [f"{t}|t=0.0|s=1" for t in "xbyd"]
    assert inner.batches == [4, 2] and inner.sent[-2:] == ["x", "y"]  # ONE call with only the misses
    assert (model.calls, model.hits) == (6, 6)
    assert model.chat([], P) == [] and inner.batches == [4, 2]


@pytest.mark.parametrize("changed", [
    GenerationParams(max_new_tokens=8, temperature=0.7, seed=1),
    GenerationParams(max_new_tokens=9, temperature=0.0, seed=1),
    GenerationParams(max_new_tokens=8, temperature=0.0, seed=1, top_p=0.9),
])
def test_every_param_is_part_of_the_key(tmp_path, changed):
    inner = CountingModel()
    model = CachedChatModel(inner, tmp_path / "replies")
    model.chat([conv("a")], P)
    model.chat([conv("a")], changed)
    assert model.calls == 2 and model.hits == 0
    assert request_key("m", conv("a"), P) != request_key("m", conv("a"), changed)


def test_seed_is_part_of_the_key_only_when_sampling():
    greedy, sampled = GenerationParams(max_new_tokens=8), GenerationParams(max_new_tokens=8, temperature=0.7)
    seeded = GenerationParams(max_new_tokens=8, seed=5)
    assert request_key("m", conv("a"), greedy) == request_key("m", conv("a"), seeded)
    assert request_key("m", conv("a"), sampled) != request_key(
        "m", conv("a"), GenerationParams(max_new_tokens=8, temperature=0.7, seed=5))


def test_key_covers_model_and_every_message():
    key = request_key("m", conv("a"), P)
    assert key == request_key("m", conv("a"), P)
    assert key != request_key("other", conv("a"), P)
    assert key != request_key("m", [{"role": "system", "content": "Be long."}, conv("a")[1]], P)
    assert key != request_key("m", [{"role": "user", "content": "Be brief."}, conv("a")[1]], P)


def test_rerun_after_a_crash_reuses_finished_batches(tmp_path):
    class Crashing(CountingModel):
        def chat(self, conversations, params):
            if any(c[-1]["content"] == "boom" for c in conversations):
                raise RuntimeError("killed")
            return super().chat(conversations, params)

    crashing = Crashing()
    first = CachedChatModel(crashing, tmp_path / "replies")
    assert first.chat([conv("a"), conv("b")], P) == ["a|t=0.0|s=1", "b|t=0.0|s=1"]  # batch 1 done
    with pytest.raises(RuntimeError):
        first.chat([conv("boom")], P)  # the "crash" in batch 2
    first.close()

    inner = CountingModel()  # a new process: a fresh model and cache object on the same folder
    rerun = CachedChatModel(inner, tmp_path / "replies")
    assert rerun.chat([conv("a"), conv("b"), conv("c")], P) == ["a|t=0.0|s=1", "b|t=0.0|s=1", "c|t=0.0|s=1"]
    assert inner.sent == ["c"] and (rerun.calls, rerun.hits) == (1, 2)


def test_build_chat_model_caches_base_models_only(project, tiny_model_dir, tmp_path):
    from tuneloop.models.local import LocalChatModel
    from tuneloop.models.registry import build_chat_model

    proj = project()
    teacher = build_chat_model(proj, proj.settings.models.teacher)
    assert isinstance(teacher, CachedChatModel) and isinstance(teacher.wrapped, LocalChatModel)
    assert teacher.cache_dir == proj.root / "cache" / "replies"
    replies = teacher.chat([conv("What law governs the agreement?")], GenerationParams(max_new_tokens=4))
    assert teacher.chat([conv("What law governs the agreement?")], GenerationParams(max_new_tokens=4)) == replies
    assert (teacher.calls, teacher.hits) == (1, 1)

    uncached = project({"models": {"teacher": {"cache": False}}})
    assert isinstance(build_chat_model(uncached, uncached.settings.models.teacher), LocalChatModel)


def test_adapter_models_are_never_cached(project, monkeypatch, tmp_path):
    import tuneloop.models.local
    from tuneloop.models.registry import build_chat_model

    class Stub(CountingModel):
        def __init__(self, model_dir, adapter_dir=None, batch_size=8):
            super().__init__(str(adapter_dir or model_dir))

    monkeypatch.setattr(tuneloop.models.local, "LocalChatModel", Stub)
    proj = project(pairs=False)
    assert isinstance(build_chat_model(proj, proj.settings.models.student, tmp_path / "adapter"), Stub)
    assert isinstance(build_chat_model(proj, proj.settings.models.student), CachedChatModel)


class _Pool:
    """A stand-in pooled model (compute.engine: ray): takes whole lists, advances per chunk itself."""

    name, pooled = "pool", True

    def __init__(self) -> None:
        self.calls: list[int] = []

    def chat(self, conversations, params, step=None, advance=None):
        self.calls.append(len(conversations))
        for start in range(0, len(conversations), step):
            advance(len(conversations[start:start + step]))
        return [c[-1]["content"].upper() for c in conversations]


def test_a_cached_pooled_model_gets_only_the_misses_in_one_call_and_the_bar_counts_every_item(tmp_path):
    from tests.helpers import RecordingReporter
    from tuneloop.progress import batched_chat

    pool = _Pool()
    model = CachedChatModel(pool, tmp_path / "cache")
    convs = [[{"role": "user", "content": f"q{i}"}] for i in range(10)]
    params = GenerationParams(max_new_tokens=4)
    assert model.pooled and batched_chat(model, convs[:4], params, RecordingReporter(), "a", 3) == \
        ["Q0", "Q1", "Q2", "Q3"]
    reporter = RecordingReporter()
    assert batched_chat(model, convs, params, reporter, "answering", 3) == [f"Q{i}" for i in range(10)]
    assert pool.calls == [4, 6]  # one call per step, the second with the 6 misses only
    ((description, total, advances),) = reporter.tasks
    assert (description, total, sum(advances)) == ("answering", 10, 10)  # 4 cache hits at once + the pool's chunks
    assert advances == [4, 3, 3]
