"""Dynamic batching for serving (models/batching.py), on the tiny random-weight model.

Concurrent callers share batches, and each still gets its own reply: its own conversation, its
own max_new_tokens, deadline and sampling settings; a reply is handed back when its row ends, and
a streaming caller that goes away ends its row without stalling the others.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from tuneloop.models import batching
from tuneloop.models.base import GenerationParams
from tuneloop.models.batching import BatchingChatModel, ModelWorker, batched
from tuneloop.models.local import LocalChatModel

WORDS = "supplier shall deliver goods under this agreement within thirty days of order notice".split()


def conv(i: int, n: int = 6) -> list[dict]:
    """Conversation i: n words (so every prompt has the same length: no padding), a different mix each."""
    return [{"role": "user", "content": " ".join(WORDS[(i + k * (i % 3 + 1)) % len(WORDS)] for k in range(n))}]


@pytest.fixture(scope="module")
def local(tiny_model_dir) -> LocalChatModel:
    return LocalChatModel(tiny_model_dir, batch_size=1)


@pytest.fixture
def spy(local, monkeypatch):
    """Records the size of every generate() batch the model runs."""
    sizes: list[int] = []
    real = local.generate_ids

    def recording(prompts, *args, **kwargs):
        sizes.append(len(prompts))
        return real(prompts, *args, **kwargs)

    monkeypatch.setattr(local, "generate_ids", recording)
    return sizes


def together(calls) -> list:
    """Run the callables at the same moment, one thread each; their results in order."""
    results: list = [None] * len(calls)
    barrier = threading.Barrier(len(calls))

    def run(i: int) -> None:
        barrier.wait()
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_concurrent_requests_share_a_batch_and_each_gets_its_own_reply(local, spy):
    limits = [2, 3, 4, 5, 6, 7]
    alone = [local.chat([conv(i)], GenerationParams(max_new_tokens=n))[0] for i, n in enumerate(limits)]
    assert len(set(alone)) > 1  # the conversations differ, so a mixed-up reply would show
    spy.clear()
    model = BatchingChatModel(local, ModelWorker(8, 0.3))
    replies = together([lambda i=i, n=n: model.chat([conv(i)], GenerationParams(max_new_tokens=n))[0]
                        for i, n in enumerate(limits)])
    assert replies == alone
    assert spy == [6]  # one batch for all six
    for reply, n in zip(replies, limits):
        assert len(local.tokenizer(reply, add_special_tokens=False)["input_ids"]) <= n


def test_max_batch_splits_the_waiting_requests(local, spy):
    model = BatchingChatModel(local, ModelWorker(2, 0.3))
    replies = together([lambda i=i: model.chat([conv(i)], GenerationParams(max_new_tokens=3))[0] for i in range(5)])
    assert all(isinstance(r, str) for r in replies)
    assert sorted(spy, reverse=True) == [2, 2, 1]


def test_greedy_and_sampled_requests_go_to_different_batches(local, spy):
    model = BatchingChatModel(local, ModelWorker(8, 0.3))
    greedy, sampled = GenerationParams(max_new_tokens=4), GenerationParams(max_new_tokens=4, temperature=1.5, seed=3)
    out = together([lambda i=i: model.chat([conv(i)], greedy if i % 2 else sampled)[0] for i in range(4)])
    assert sorted(spy) == [2, 2]
    assert out[1] == local.chat([conv(1)], greedy)[0] and out[3] == local.chat([conv(3)], greedy)[0]


def test_a_short_request_is_answered_before_the_long_one_in_its_batch_ends(local, spy):
    long_params = GenerationParams(max_new_tokens=120)
    tokens = local.generate_ids([local.render(conv(1))], long_params, 0)
    assert tokens.shape[1] == 120 and (tokens != local.tokenizer.eos_token_id).all()  # no early end of sequence
    model = BatchingChatModel(local, ModelWorker(8, 0.3))
    finished: dict[str, float] = {}

    def short():
        model.chat([conv(2)], GenerationParams(max_new_tokens=2))
        finished["short"] = time.monotonic()

    def long():
        model.chat([conv(1)], long_params)
        finished["long"] = time.monotonic()

    together([short, long])
    assert spy[-1] == 2  # they shared a batch
    assert finished["short"] < finished["long"]


def test_a_stream_closed_early_ends_its_row_and_the_others_finish(local, monkeypatch):
    steps: list[int] = []
    real_call = batching._RowsDone.__call__
    monkeypatch.setattr(batching._RowsDone, "__call__", lambda self, ids, scores, **kw: steps.append(ids.shape[1])
                        or real_call(self, ids, scores, **kw))
    tokens = local.generate_ids([local.render(conv(1))], GenerationParams(max_new_tokens=200), 0)
    assert tokens.shape[1] == 200 and (tokens != local.tokenizer.eos_token_id).all()
    model = BatchingChatModel(local, ModelWorker(8, 0.3))

    def reader_who_leaves():
        pieces = model.stream(conv(1), GenerationParams(max_new_tokens=200))
        first = next(pieces)
        pieces.close()  # the client disconnected
        return first

    first, other = together([reader_who_leaves, lambda: model.chat([conv(2)], GenerationParams(max_new_tokens=3))[0]])
    assert first and isinstance(other, str)
    deadline = time.monotonic() + 30
    while model.worker.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not model.worker.running  # the worker ended: nothing left running
    assert len(steps) < 50  # the abandoned row stopped long before its 200 tokens


def test_a_stream_concatenates_to_the_reply_chat_gives(local):
    model = BatchingChatModel(local, ModelWorker(4, 0.0))
    params = GenerationParams(max_new_tokens=12)
    pieces = list(model.stream(conv(4), params))
    assert len(pieces) > 1 and "".join(pieces) == model.chat([conv(4)], params)[0] == local.chat([conv(4)], params)[0]


def test_a_request_past_its_deadline_is_cut(local):
    model = BatchingChatModel(local, ModelWorker(4, 0.0))
    full = model.chat([conv(1)], GenerationParams(max_new_tokens=120))[0]
    cut = model.chat([conv(1)], GenerationParams(max_new_tokens=120, max_time=0.05))[0]
    assert len(cut) < len(full) and full.startswith(cut)


def test_yes_no_margins_of_concurrent_callers_match_the_model(local, spy):
    model = BatchingChatModel(local, ModelWorker(8, 0.3))
    expected = [local.yes_no_margins([conv(i)])[0] for i in range(4)]
    got = together([lambda i=i: model.yes_no_margins([conv(i)])[0] for i in range(4)])
    assert np.allclose(got, expected, atol=1e-4)
    assert spy == []  # no generation for a decision


def test_an_error_reaches_every_caller_of_the_batch(local, monkeypatch):
    model = BatchingChatModel(local, ModelWorker(8, 0.3))
    monkeypatch.setattr(local, "generate_ids", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))

    def call(i):
        try:
            model.chat([conv(i)], GenerationParams(max_new_tokens=3))
        except RuntimeError as err:
            return str(err)

    assert together([lambda i=i: call(i) for i in range(3)]) == ["boom"] * 3
    monkeypatch.undo()
    two = GenerationParams(max_new_tokens=2)
    assert model.chat([conv(0)], two)[0] == local.chat([conv(0)], two)[0]  # the worker serves on


def test_batched_wraps_local_models_only(local):
    worker = ModelWorker()
    assert isinstance(batched(local, worker), BatchingChatModel)

    class Endpoint:
        name = "endpoint"

    endpoint = Endpoint()
    assert batched(endpoint, worker) is endpoint


def test_calls_run_on_the_worker_thread_between_generation_steps(local, monkeypatch):
    """A query embedding (`call`) does not wait for a long batch to end, and runs on the thread
    that generates (one OpenMP team in the process)."""
    tokens = local.generate_ids([local.render(conv(1))], GenerationParams(max_new_tokens=150), 0)
    assert (tokens != local.tokenizer.eos_token_id).all()
    worker = ModelWorker(8, 0.0)
    model = BatchingChatModel(local, worker)
    seen: dict = {}
    started = threading.Event()
    real = local.generate_ids
    monkeypatch.setattr(local, "generate_ids", lambda *a, **k: started.set() or real(*a, **k))

    def long():
        model.chat([conv(1)], GenerationParams(max_new_tokens=150))
        seen["long_done"] = time.monotonic()

    def short_call():
        assert started.wait(30)  # the long generation is under way
        seen["thread"] = worker.call(lambda: threading.current_thread().name)
        seen["call_done"] = time.monotonic()

    together([long, short_call])
    assert seen["thread"] == "tuneloop-model-worker"
    assert seen["call_done"] < seen["long_done"]
    with pytest.raises(ZeroDivisionError):
        worker.call(lambda: 1 / 0)
    assert worker.call(lambda x: x + 1, 41) == 42


def test_a_fault_in_the_scheduler_fails_its_callers_and_the_next_request_is_served(local, monkeypatch):
    worker = ModelWorker(8, 0.0)
    model = BatchingChatModel(local, worker)
    monkeypatch.setattr(worker, "_take", lambda: (_ for _ in ()).throw(RuntimeError("scheduler fault")))
    with pytest.raises(RuntimeError, match="scheduler fault"):
        model.chat([conv(0)], GenerationParams(max_new_tokens=2))
    monkeypatch.undo()
    assert not worker.running
    two = GenerationParams(max_new_tokens=2)
    assert model.chat([conv(0)], two)[0] == local.chat([conv(0)], two)[0]
