"""`tuneloop serve` answers concurrent requests in shared batches: a real uvicorn server, the real
`openai` client, the tiny random-weight model behind the default model factory."""
from __future__ import annotations

import threading

import httpx
import openai
import pytest
from sqlalchemy import select

from tests.helpers import ingest_project
from tests.test_serve import CLIENT, CLIENT_KEY, add_version, keys, live_server, wait_for  # noqa: F401 - a fixture
from tuneloop.models import batching
from tuneloop.models.batching import BatchingChatModel
from tuneloop.serve import create_app
from tuneloop.store import Interaction, open_store
from tuneloop.versions import ensure_base_version

QUESTIONS = ["Which law governs the supply agreement?", "What notice ends the office lease?",
             "Who pays for delivery of the goods?", "How long does the confidentiality obligation last?",
             "What is the licence fee?", "Where are disputes under the distribution agreement heard?"]
LIMITS = [3, 5, 8, 12, 16, 20]


@pytest.fixture
def app_and_url(project, keys):  # noqa: F811
    proj = project(overrides={"serve": {"batch_wait_ms": 300, "requests_per_minute": 0, "tokens_per_minute": 0},
                              "answer": {"copy_spans": False}}, pairs=False)
    ingest_project(proj)
    app = create_app(proj)
    with live_server(app) as url:
        yield proj, app, url


def ask(client: openai.OpenAI, question: str, limit: int):
    return client.chat.completions.create(model="tuneloop", messages=[{"role": "user", "content": question}],
                                          max_tokens=limit)


def test_concurrent_clients_each_get_their_own_answer_with_their_own_max_tokens(app_and_url, monkeypatch):
    proj, app, url = app_and_url
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=CLIENT_KEY, max_retries=0, timeout=60)
    alone = [ask(client, q, n) for q, n in zip(QUESTIONS, LIMITS)]  # one at a time first

    model = app.state.models.current().champion.model
    assert isinstance(model, BatchingChatModel)
    sizes: list[int] = []
    real = model.model.generate_ids
    monkeypatch.setattr(model.model, "generate_ids", lambda prompts, *a, **k: sizes.append(len(prompts))
                        or real(prompts, *a, **k))
    replies: list = [None] * len(QUESTIONS)
    barrier = threading.Barrier(len(QUESTIONS))

    def one(i: int) -> None:
        own = openai.OpenAI(base_url=f"{url}/v1", api_key=CLIENT_KEY, max_retries=0, timeout=60)
        barrier.wait()
        replies[i] = ask(own, QUESTIONS[i], LIMITS[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(QUESTIONS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)

    assert max(sizes) > 1  # some requests shared a batch
    for first, again, limit in zip(alone, replies, LIMITS):
        assert again.choices[0].message.content == first.choices[0].message.content  # greedy: its own answer
        assert again.usage.completion_tokens <= limit
        assert again.choices[0].finish_reason == ("length" if again.usage.completion_tokens == limit else "stop")
    with open_store(proj.store_url)() as s:
        stored = {i.public_id: (i.question, i.answer) for i in s.scalars(select(Interaction))}
    for question, r in zip(QUESTIONS, replies):
        assert stored[r.model_extra["interaction_id"]] == (question, r.choices[0].message.content)


def test_a_client_that_disconnects_mid_stream_does_not_stall_the_others(app_and_url, monkeypatch):
    _, app, url = app_and_url
    model = app.state.models.current().champion.model
    steps: list[int] = []
    real_call = batching._RowsDone.__call__
    monkeypatch.setattr(batching._RowsDone, "__call__", lambda self, ids, scores, **kw: steps.append(ids.shape[1])
                        or real_call(self, ids, scores, **kw))
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=CLIENT_KEY, max_retries=0, timeout=60)
    got: dict = {}

    def leaver() -> None:
        body = {"messages": [{"role": "user", "content": QUESTIONS[0]}], "stream": True, "max_tokens": 400}
        with httpx.stream("POST", f"{url}/v1/chat/completions", headers=CLIENT, json=body, timeout=60) as r:
            got["first"] = next(r.iter_lines())  # read one event, then hang up

    def stayer() -> None:
        got["other"] = ask(client, QUESTIONS[1], 6)

    threads = [threading.Thread(target=leaver), threading.Thread(target=stayer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got["first"].startswith("data: ") and got["other"].choices[0].message.content
    wait_for(lambda: not model.worker.running, 60)
    assert len(steps) < 200  # the abandoned 400-token row ended soon after its client left
    after = ask(client, QUESTIONS[2], 4)  # the server still answers
    assert after.choices[0].message.content and after.usage.completion_tokens <= 4


def test_ab_answers_from_two_models_share_the_one_model_thread(project, keys, monkeypatch):  # noqa: F811
    """Champion and challenger (here the same weights) answer concurrent A/B requests on the one
    worker; batches never mix the two models, and each arm's answer is its model's own."""
    proj = project(overrides={"serve": {"batch_wait_ms": 300, "requests_per_minute": 0, "tokens_per_minute": 0},
                              "answer": {"copy_spans": False}}, pairs=False)
    ingest_project(proj)
    with open_store(proj.store_url)() as s:
        ensure_base_version(proj, s)
        s.commit()
    add_version(proj, "v1", "candidate")
    app = create_app(proj)
    served = app.state.models.current()
    assert served.challenger is not None and served.champion.model.worker is served.challenger.model.worker
    batches: list[set[int]] = []
    real = batching.BatchingChatModel.answer
    monkeypatch.setattr(batching.BatchingChatModel, "answer",
                        lambda self, batch, between: batches.append({id(self), *(id(r.model) for r in batch)})
                        or real(self, batch, between))
    with live_server(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=CLIENT_KEY, max_retries=0, timeout=60)
        alone = ask(client, QUESTIONS[0], 6).choices[0].message.content
        replies: list = [None] * 3
        barrier = threading.Barrier(3)

        def one(i: int) -> None:
            own = openai.OpenAI(base_url=f"{url}/v1", api_key=CLIENT_KEY, max_retries=0, timeout=60)
            barrier.wait()
            replies[i] = own.chat.completions.create(model="tuneloop", max_tokens=6, extra_body={"ab": True},
                                                     messages=[{"role": "user", "content": QUESTIONS[0]}])

        threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    for r in replies:
        assert [c.message.content for c in r.choices] == [alone, alone]  # both arms, the same weights
        assert r.model_extra["ab_pair"]
    assert batches and all(len(models) == 1 for models in batches)  # one model per batch
    assert set().union(*batches) == {id(served.champion.model), id(served.challenger.model)}  # both answered
