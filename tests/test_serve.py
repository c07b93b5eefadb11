"""`tuneloop serve`: the OpenAI-compatible API, feedback, errors, hot swap and A/B mode.

Most tests drive the app in-process (FastAPI's TestClient) with a scripted fake model built by
`model_factory`; the end-to-end tests run a real uvicorn server on a free port and talk to it
with the `openai` package and httpx, on the tiny random-weight model.
"""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from typer.testing import CliRunner

from tests.helpers import ingest_project, prompt_question
from tuneloop.models.base import GenerationParams, Message
from tuneloop.serve import create_app
from tuneloop.store import Feedback, Interaction, ModelVersion, open_store

CLIENT_KEY, OTHER_KEY, ADMIN_TOKEN = "alice-key-123", "bare-key-456", "admin-token-789"
CLIENT = {"Authorization": f"Bearer {CLIENT_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
QUESTION = "Which law governs the supply agreement?"


def ask(question: str = QUESTION, **extra) -> dict:
    return {"messages": [{"role": "user", "content": question}], **extra}


class FakeModel:
    """Answers '<version>: <question>'; optionally waits for `gate`, or fails with a secret message."""

    def __init__(self, name: str, fail: bool = False, gate: threading.Event | None = None):
        self.name, self.fail, self.gate = name, fail, gate
        self.entered = threading.Event()

    def chat(self, conversations: list[list[Message]], params: GenerationParams) -> list[str]:
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(20), "test gate never opened"
        if self.fail:
            raise RuntimeError("secret model failure at /srv/models/weights.bin")
        return [f"{self.name}: {prompt_question(c)}" for c in conversations]


class FakeFactory:
    """model_factory(project, version) -> FakeModel; remembers what it built."""

    def __init__(self, failing: tuple[str, ...] = (), gated: dict[str, threading.Event] | None = None,
                 unloadable: tuple[str, ...] = ()):
        self.failing, self.gated, self.unloadable = failing, gated or {}, unloadable
        self.built: dict[str, FakeModel] = {}

    def __call__(self, project, version: ModelVersion) -> FakeModel:
        if version.name in self.unloadable:
            raise OSError(f"cannot load {version.name}")
        model = FakeModel(version.name, version.name in self.failing, self.gated.get(version.name))
        self.built[version.name] = model
        return model


@pytest.fixture
def keys(monkeypatch):
    monkeypatch.setenv("TUNELOOP_API_KEYS", f"alice:{CLIENT_KEY}, {OTHER_KEY}")
    monkeypatch.setenv("TUNELOOP_ADMIN_TOKEN", ADMIN_TOKEN)


@pytest.fixture
def served(project, keys):
    """A project on the tiny model, documents ingested (BM25), checking for a new champion often."""
    # the fake models' replies are asserted verbatim: not turned into passage spans (programs/copy.py)
    proj = project(overrides={"serve": {"reload_seconds": 0.05}, "answer": {"copy_spans": False}}, pairs=False)
    ingest_project(proj)
    return proj


def count(proj, model) -> int:
    with open_store(proj.store_url)() as s:
        return s.scalar(select(func.count()).select_from(model))


def rows(proj, model) -> list:
    with open_store(proj.store_url)() as s:
        return list(s.scalars(select(model).order_by(model.id)))


def add_version(proj, name: str, status: str, retire_champion: bool = False) -> int:
    """Register a version the way the gate does (the old champion retired in the same commit)."""
    with open_store(proj.store_url)() as s:
        if retire_champion:
            for v in s.scalars(select(ModelVersion).where(ModelVersion.status == "champion")):
                v.status = "retired"
        v = ModelVersion(name=name, base_model="tiny", method="sft", status=status)
        s.add(v)
        s.commit()
        return v.id


def error_of(response: httpx.Response, status: int) -> dict:
    """The contract's error JSON, and nothing that looks like a stack trace."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert "Traceback" not in response.text and 'File "' not in response.text
    return body["error"]


@contextmanager
def live_server(app) -> Iterator[str]:
    """Run `app` with uvicorn on a free local port in a thread; yields the base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def wait_for(predicate, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


# --------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("copy_spans", [False, True])
def test_openai_client_answers_streams_and_feedback_sticks(project, keys, copy_spans):
    """The real openai package against a real uvicorn server on the tiny model. Copying extraction
    answers from the passages (answer.copy_spans) needs the whole reply: it streams as one piece."""
    import openai

    served = project(overrides={"serve": {"reload_seconds": 0.05}, "answer": {"copy_spans": copy_spans}}, pairs=False)
    ingest_project(served)

    app = create_app(served)  # the default factory: the student role (tiny model)
    with live_server(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=CLIENT_KEY, max_retries=0)
        assert [(m.id, m.model_extra["role"]) for m in client.models.list()] == [("base", "champion")]

        resp = client.chat.completions.create(model="tuneloop", messages=[{"role": "user", "content": QUESTION}])
        extra = resp.model_extra
        interaction_id = extra["interaction_id"]
        assert resp.id == f"chatcmpl-{interaction_id}" and resp.model == "base"
        answer = resp.choices[0].message.content
        assert isinstance(answer, str) and answer and resp.choices[0].finish_reason in ("stop", "length")
        assert resp.usage.completion_tokens > 0 and resp.usage.prompt_tokens > 0
        assert extra["citations"] and all(c["document"].endswith(".md") for c in extra["citations"])

        r = httpx.post(f"{url}/v1/feedback", headers=CLIENT, json={
            "interaction_id": interaction_id, "thumbs": "down", "rating": 2, "comment": "wrong law",
            "corrected_answer": "New South Wales"})
        assert r.status_code == 201, r.text
        fb = rows(served, Feedback)[-1]  # committed before the 201
        assert r.json() == {"id": fb.id, "interaction_id": interaction_id}
        assert (fb.thumbs, fb.rating, fb.comment, fb.corrected_answer, fb.client, fb.source) == (
            -1, 2, "wrong law", "New South Wales", "alice", "human")

        deltas, finals = [], []
        for chunk in client.chat.completions.create(messages=[{"role": "user", "content": QUESTION}],
                                                    model="tuneloop", stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                deltas.append(chunk.choices[0].delta.content)
            if chunk.choices and chunk.choices[0].finish_reason in ("stop", "length"):
                finals.append(chunk.model_extra)
        assert len(deltas) == 1 if copy_spans else len(deltas) > 1  # else real token streaming, not one blob
        assert len(finals) == 1 and finals[0]["citations"] == extra["citations"]
        stored = next(i for i in rows(served, Interaction) if i.public_id == finals[0]["interaction_id"])
        assert stored.answer == "".join(deltas) == answer  # greedy: streamed text == the plain answer


def test_interaction_row_records_question_answer_chunks_version_latency_client(served):
    factory = FakeFactory()
    with TestClient(create_app(served, model_factory=factory)) as c:
        r = c.post("/v1/chat/completions", headers=CLIENT, json=ask(document="05-supply-agreement.md"))
        assert r.status_code == 200, r.text
        body = r.json()
    row = rows(served, Interaction)[-1]
    base = next(v for v in rows(served, ModelVersion) if v.name == "base")
    assert r.headers["X-Interaction-Id"] == row.public_id == body["interaction_id"]
    assert body["id"].endswith(row.public_id)
    assert (row.question, row.answer) == (QUESTION, f"base: {QUESTION}")
    assert body["choices"][0]["message"]["content"] == row.answer
    assert row.chunk_ids == [c["chunk_id"] for c in body["citations"]] and row.chunk_ids
    assert {c["document"] for c in body["citations"]} == {"05-supply-agreement.md"}
    assert row.model_version_id == base.id and row.latency_ms > 0
    assert (row.client, row.document, row.ab_pair) == ("alice", "05-supply-agreement.md", None)

    with TestClient(create_app(served, model_factory=factory)) as c:
        got = c.get(f"/v1/interactions/{row.public_id}", headers=CLIENT).json()
    assert got["answer"] == row.answer and got["model"] == "base" and got["feedback_count"] == 0
    assert [x["chunk_id"] for x in got["citations"]] == row.chunk_ids


def test_feedback_is_not_blocked_behind_a_generation(served):
    gate = threading.Event()
    factory = FakeFactory(gated={"base": gate})
    with TestClient(create_app(served, model_factory=FakeFactory())) as c:
        first = c.post("/v1/chat/completions", headers=CLIENT, json=ask()).json()["interaction_id"]
    statuses: list[int] = []
    with live_server(create_app(served, model_factory=factory)) as url:
        # more waiting chat requests than FastAPI's shared thread pool has threads (40)
        slow = [threading.Thread(target=lambda: statuses.append(httpx.post(
            f"{url}/v1/chat/completions", headers=CLIENT, json=ask(), timeout=60).status_code)) for _ in range(45)]
        for t in slow:
            t.start()
        assert factory.built["base"].entered.wait(10)  # the model is busy generating now
        time.sleep(0.5)  # let the other requests pile up behind it
        started = time.monotonic()
        r = httpx.post(f"{url}/v1/feedback", headers=CLIENT, json={"interaction_id": first, "thumbs": "up"})
        assert r.status_code == 201 and time.monotonic() - started < 3
        gate.set()
        for t in slow:
            t.join(30)
    assert statuses == [200] * 45


# --------------------------------------------------------------------------- validation and auth


BAD_REQUESTS = [
    # (label, method, path, headers, request kwargs, status, error type, needle in the message)
    ("missing key", "post", "/v1/chat/completions", {}, {"json": ask()}, 401, "authentication_error", "key"),
    ("wrong key", "post", "/v1/feedback", {"Authorization": "Bearer nope"},
     {"json": {"interaction_id": "IID", "thumbs": "up"}}, 401, "authentication_error", "invalid"),
    ("client key on admin", "get", "/v1/admin/summary", CLIENT, {}, 403, "permission_error", "admin"),
    ("oversized body", "post", "/v1/feedback", CLIENT,
     {"json": {"interaction_id": "IID", "comment": "x" * 70_000}}, 413, "request_too_large", "larger"),
    ("oversized chunked body", "post", "/v1/feedback", CLIENT,
     {"content": iter([b'{"comment": "', b"x" * 70_000, b'"}'])}, 413, "request_too_large", "larger"),
    ("unknown interaction", "post", "/v1/feedback", CLIENT, {"json": {"interaction_id": "no-999999", "thumbs": "up"}},
     404, "not_found_error", "999999"),
    ("interaction id a number", "post", "/v1/feedback", CLIENT, {"json": {"interaction_id": 1, "thumbs": "up"}},
     422, "invalid_request_error", "interaction_id"),
    ("malformed JSON", "post", "/v1/feedback", CLIENT,
     {"content": b'{"interaction_id": 1,', "headers": {"Content-Type": "application/json"}}, 400,
     "invalid_request_error", "JSON"),
    ("rating 7", "post", "/v1/feedback", CLIENT, {"json": {"interaction_id": "IID", "rating": 7}}, 422,
     "invalid_request_error", "rating"),
    ("rating as text", "post", "/v1/feedback", CLIENT, {"json": {"interaction_id": "IID", "rating": "3"}}, 422,
     "invalid_request_error", "rating"),
    ("thumbs sideways", "post", "/v1/feedback", CLIENT, {"json": {"interaction_id": "IID", "thumbs": "sideways"}},
     422, "invalid_request_error", "thumbs"),
    ("empty feedback", "post", "/v1/feedback", CLIENT, {"json": {"interaction_id": "IID", "comment": "  "}}, 422,
     "invalid_request_error", "at least one"),
    ("no interaction id", "post", "/v1/feedback", CLIENT, {"json": {"thumbs": "up"}}, 422,
     "invalid_request_error", "interaction_id"),
    ("unknown field", "post", "/v1/feedback", CLIENT, {"json": {"interaction_id": "IID", "stars": 5}}, 422,
     "invalid_request_error", "stars"),
    ("comment too long", "post", "/v1/feedback", CLIENT, {"json": {"interaction_id": "IID", "comment": "y" * 5000}},
     422, "invalid_request_error", "comment"),
    ("unknown ab pair", "post", "/v1/feedback", CLIENT, {"json": {"ab_pair": "nope", "preferred_interaction_id": "x1"}},
     404, "not_found_error", "ab_pair"),
    ("unknown model", "post", "/v1/chat/completions", CLIENT, {"json": ask(model="gpt-4")}, 404,
     "not_found_error", "gpt-4"),
    ("no challenger", "post", "/v1/chat/completions", CLIENT, {"json": ask(model="challenger")}, 404,
     "not_found_error", "challenger"),
    ("unknown document", "post", "/v1/chat/completions", CLIENT, {"json": ask(document="nope.md")}, 404,
     "not_found_error", "nope.md"),
    ("no messages", "post", "/v1/chat/completions", CLIENT, {"json": {"messages": []}}, 422,
     "invalid_request_error", "messages"),
    ("no user message", "post", "/v1/chat/completions", CLIENT,
     {"json": {"messages": [{"role": "system", "content": "hi"}]}}, 422, "invalid_request_error", "user"),
    ("bad role", "post", "/v1/chat/completions", CLIENT,
     {"json": {"messages": [{"role": "wizard", "content": "hi"}]}}, 422, "invalid_request_error", "role"),
    ("question too long", "post", "/v1/chat/completions", CLIENT, {"json": ask("q" * 4001)}, 422,
     "invalid_request_error", "4000"),
    ("max_tokens too big", "post", "/v1/chat/completions", CLIENT, {"json": ask(max_tokens=5000)}, 422,
     "invalid_request_error", "max_tokens"),
    ("stream not a bool", "post", "/v1/chat/completions", CLIENT, {"json": ask(stream="yes")}, 422,
     "invalid_request_error", "stream"),
    ("interaction id not an id", "get", "/v1/interactions/a.b", CLIENT, {}, 422, "invalid_request_error",
     "interaction_id"),
    ("unknown interaction (GET)", "get", "/v1/interactions/424242", CLIENT, {}, 404, "not_found_error", "424242"),
    ("unknown endpoint", "get", "/v1/nothing", CLIENT, {}, 404, "not_found_error", "endpoint"),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_a_clear_4xx_and_store_nothing(served, case):
    label, method, path, headers, kwargs, status, kind, needle = case
    with TestClient(create_app(served, model_factory=FakeFactory())) as c:
        iid = c.post("/v1/chat/completions", headers=CLIENT, json=ask()).json()["interaction_id"]
        if "json" in kwargs and kwargs["json"].get("interaction_id") == "IID":
            kwargs = {**kwargs, "json": {**kwargs["json"], "interaction_id": iid}}
        before = (count(served, Feedback), count(served, Interaction))
        extra_headers = kwargs.pop("headers", {}) if "headers" in kwargs else {}
        r = getattr(c, method)(path, headers={**headers, **extra_headers}, **kwargs)
        err = error_of(r, status)
        assert err["type"] == kind and needle.lower() in err["message"].lower(), err
        if label == "malformed JSON":
            assert err["code"] == "invalid_json"
        assert (count(served, Feedback), count(served, Interaction)) == before  # nothing stored


def test_admin_token_works_everywhere_and_summary_counts(served):
    with TestClient(create_app(served, model_factory=FakeFactory())) as c:
        iid = c.post("/v1/chat/completions", headers=ADMIN, json=ask()).json()["interaction_id"]
        statuses = [c.post("/v1/feedback", headers=ADMIN, json={"interaction_id": iid, **fb}).status_code
                    for fb in ({"thumbs": "up", "rating": 4}, {"thumbs": "down", "comment": "meh"},
                               {"corrected_answer": "NSW"})]
        assert statuses == [201, 200, 200]  # one verdict per key and answer, updated
        r = c.get("/v1/admin/summary", headers=ADMIN)
        assert r.status_code == 200, r.text
        summary = r.json()
        error_of(c.get("/v1/admin/summary", headers={"Authorization": "Bearer wrong"}), 401)
        error_of(c.get("/v1/admin/summary"), 401)
    assert rows(served, Interaction)[-1].client == "admin"
    assert summary["interactions"] == 1
    [day] = summary["feedback_per_day"]
    assert (day["up"], day["down"], day["ratings"], day["rating_avg"], day["comments"], day["corrections"],
            day["ab_choices"]) == (0, 1, 1, 4.0, 1, 1, 0)
    assert [(v["name"], v["status"], v["parent"]) for v in summary["versions"]] == [("base", "champion", None)]
    assert summary["cycles"] == []


def test_no_auth_mode_records_anonymous_but_admin_still_needs_the_token(served, monkeypatch):
    monkeypatch.delenv("TUNELOOP_API_KEYS")
    with TestClient(create_app(served, model_factory=FakeFactory(), auth=False)) as c:
        assert c.post("/v1/chat/completions", json=ask()).status_code == 200
        error_of(c.get("/v1/admin/summary"), 401)
        assert c.get("/v1/admin/summary", headers=ADMIN).status_code == 200
    assert rows(served, Interaction)[-1].client == "anonymous"


def test_pages_are_served_without_a_key_and_missing_pages_are_json_404(served, tmp_path):
    static = tmp_path / "static"
    static.mkdir()
    (static / "index.html").write_text("<html><body><input id='api-key'></body></html>")
    with TestClient(create_app(served, model_factory=FakeFactory(), static_dir=static)) as c:
        r = c.get("/")
        assert r.status_code == 200 and "text/html" in r.headers["content-type"] and "api-key" in r.text
        error_of(c.get("/admin"), 404)
        error_of(c.get("/static/..%2Ftuneloop.yaml"), 404)


# --------------------------------------------------------------------------- hot swap, A/B, failures


def test_new_champion_is_served_without_restart_and_in_flight_requests_finish_on_the_old(served):
    gate = threading.Event()
    factory = FakeFactory(gated={"base": gate})
    app = create_app(served, model_factory=factory)
    with live_server(app) as url:
        result: dict = {}
        slow = threading.Thread(target=lambda: result.update(httpx.post(
            f"{url}/v1/chat/completions", headers=CLIENT, json=ask(), timeout=30).json()))
        slow.start()
        assert factory.built["base"].entered.wait(10)  # a request is in flight on the old champion

        v2 = add_version(served, "v2", "champion", retire_champion=True)
        wait_for(lambda: httpx.get(f"{url}/v1/models", headers=CLIENT).json()["data"][0]["id"] == "v2")
        gate.set()
        slow.join(20)
        assert result["model"] == "base" and result["choices"][0]["message"]["content"] == f"base: {QUESTION}"

        r = httpx.post(f"{url}/v1/chat/completions", headers=CLIENT, json=ask())
        assert r.json()["model"] == "v2" and r.json()["choices"][0]["message"]["content"] == f"v2: {QUESTION}"
    assert rows(served, Interaction)[-1].model_version_id == v2
    assert list(factory.built) == ["base", "v2"]  # loaded once each, same server process throughout


def test_ab_mode_answers_with_both_and_records_the_choice(served):
    add_version(served, "cand", "candidate")
    factory = FakeFactory()
    with TestClient(create_app(served, model_factory=factory)) as c:
        models = c.get("/v1/models", headers=CLIENT).json()["data"]
        assert [(m["id"], m["role"]) for m in models] == [("base", "champion"), ("cand", "challenger")]
        r = c.post("/v1/chat/completions", headers=CLIENT, json=ask(ab=True))
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["choices"]) == 2 and body["model"] == "tuneloop"  # the arms are not revealed
        ids, pair = body["interaction_ids"], body["ab_pair"]
        assert body["interaction_id"] == ids[0] and len(set(ids)) == 2

        by_id = {i.public_id: i for i in rows(served, Interaction)}
        assert {by_id[i].arm for i in ids} == {"champion", "challenger"}
        assert all(by_id[i].ab_pair == pair for i in ids)
        names = {v.id: v.name for v in rows(served, ModelVersion)}
        for i, choice in zip(ids, body["choices"]):
            assert choice["message"]["content"] == f"{names[by_id[i].model_version_id]}: {QUESTION}"

        before = count(served, Feedback)
        other = c.post("/v1/chat/completions", headers=CLIENT, json=ask()).json()["interaction_id"]
        wrong = {"ab_pair": pair, "preferred_interaction_id": other}
        err = error_of(c.post("/v1/feedback", headers=CLIENT, json=wrong), 422)
        assert "preferred_interaction_id" in err["message"] and count(served, Feedback) == before

        chosen = next(i for i in ids if by_id[i].arm == "challenger")
        r = c.post("/v1/feedback", headers=CLIENT, json={"ab_pair": pair, "preferred_interaction_id": chosen,
                                                          "comment": "clearer"})
        assert r.status_code == 201, r.text
        single = c.post("/v1/chat/completions", headers=CLIENT, json=ask(model="cand")).json()
        assert len(single["choices"]) == 1 and single["model"] == "cand"
    fb = rows(served, Feedback)[-1]
    assert (fb.preferred_interaction_id, fb.interaction_id, fb.comment) == (by_id[chosen].id, by_id[chosen].id,
                                                                             "clearer")


def test_ab_stream_sends_both_answers(served):
    add_version(served, "cand", "candidate")
    served.settings.serve.ab_mode = True  # the server's default: A/B for every plain request
    with TestClient(create_app(served, model_factory=FakeFactory())) as c, \
            c.stream("POST", "/v1/chat/completions", headers=CLIENT, json=ask(stream=True)) as r:
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    texts = {0: "", 1: ""}
    for ch in chunks:
        for choice in ch["choices"]:
            texts[choice["index"]] += choice["delta"].get("content") or ""
    final = chunks[-1]
    assert len(final["interaction_ids"]) == 2 and final["ab_pair"]
    stored = {i.public_id: i.answer for i in rows(served, Interaction)}
    assert [stored[i] for i in final["interaction_ids"]] == [texts[0], texts[1]]
    assert sorted(texts.values()) == sorted([f"base: {QUESTION}", f"cand: {QUESTION}"])


def test_model_failure_is_a_generic_500_without_details(served):
    factory = FakeFactory(failing=("base",))
    with TestClient(create_app(served, model_factory=factory)) as c:
        err = error_of(c.post("/v1/chat/completions", headers=CLIENT, json=ask()), 500)
        assert err["type"] == "server_error" and "secret" not in err["message"]
        with c.stream("POST", "/v1/chat/completions", headers=CLIENT, json=ask(stream=True)) as r:
            text = "".join(r.iter_text())
        assert r.status_code == 200 and '"server_error"' in text
        assert "secret" not in text and "Traceback" not in text and "[DONE]" not in text
    assert count(served, Interaction) == 0


def test_a_broken_challenger_is_skipped_and_the_champion_serves(served):
    add_version(served, "cand", "candidate")
    with TestClient(create_app(served, model_factory=FakeFactory(unloadable=("cand",)))) as c:
        assert [m["id"] for m in c.get("/v1/models", headers=CLIENT).json()["data"]] == ["base"]
        r = c.post("/v1/chat/completions", headers=CLIENT, json=ask(ab=True))
        assert r.status_code == 200 and len(r.json()["choices"]) == 1 and r.json()["model"] == "base"


def test_a_broken_new_champion_keeps_the_old_one_serving(served):
    app = create_app(served, model_factory=FakeFactory(unloadable=("v2",)))
    add_version(served, "v2", "champion", retire_champion=True)
    with TestClient(app) as c:
        with pytest.raises(OSError):
            app.state.models.check()  # the load fails (the background checker logs it) ...
        assert app.state.models.current().champion.name == "base"  # ... and the old snapshot stays
        app.state.models.check()  # not retried (nor logged) on every check
        r = c.post("/v1/chat/completions", headers=CLIENT, json=ask())
        assert r.status_code == 200 and r.json()["model"] == "base"


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def runner(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    return CliRunner()


def _one_error_line(result) -> str:
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.output, result.output
    return lines[0]


def test_cli_serve_refuses_to_start_without_client_keys(project, runner, monkeypatch):
    from tuneloop.cli import app as cli

    monkeypatch.delenv("TUNELOOP_API_KEYS", raising=False)
    proj = project(pairs=False)
    line = _one_error_line(runner.invoke(cli, ["serve", "-p", str(proj.root)]))
    assert "TUNELOOP_API_KEYS" in line and "--no-auth" in line


def test_cli_serve_needs_an_index(project, runner, monkeypatch):
    from tuneloop.cli import app as cli

    proj = project(pairs=False)
    line = _one_error_line(runner.invoke(cli, ["serve", "--no-auth", "-p", str(proj.root)]))
    assert "tuneloop ingest" in line


def test_cli_serve_runs_uvicorn_with_the_options(served, runner, monkeypatch):
    from tuneloop.cli import app as cli

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    result = runner.invoke(cli, ["serve", "--host", "0.0.0.0", "--port", "8123", "--ab", "-p", str(served.root)])
    assert result.exit_code == 0, (result.output, result.exception)
    [(app, kw)] = calls
    assert (kw["host"], kw["port"]) == ("0.0.0.0", 8123) and "tuneloop" in kw["log_config"]["loggers"]
    assert app.state.project.settings.serve.ab_mode is True
    assert "base" in result.output


# --------------------------------------------------------------------------- units


@pytest.mark.parametrize("pieces", [["  Yes", " it", " is ", " ", "\n"], ["\n", " ", "A"], [" ", ""], ["a b ", "c"]])
def test_streamed_pieces_concatenate_to_the_stripped_reply(pieces):
    from tuneloop.models.local import stripped

    out = list(stripped(iter(pieces)))
    assert "".join(out) == "".join(pieces).strip() and all(out)


def test_client_keys_parse_named_and_bare_entries():
    from tuneloop.serve.auth import parse_keys

    assert parse_keys(" alice:k1 ,, k2, bob : k3 ") == {"k1": "alice", "k2": "client-2", "k3": "bob"}
    assert parse_keys("") == {}


def test_dspy_through_litellm_uses_the_server_unchanged(served, monkeypatch):
    """DSPy's LM (tuneloop's own endpoint backend) pointed at `tuneloop serve` gets the champion's answer."""
    from tuneloop.models.remote import EndpointChatModel

    app = create_app(served, model_factory=FakeFactory())
    monkeypatch.setenv("SERVE_KEY", CLIENT_KEY)
    with live_server(app) as url:
        lm = EndpointChatModel("tuneloop", f"{url}/v1", "SERVE_KEY", concurrency=2, max_retries=0)
        replies = lm.chat([[{"role": "user", "content": QUESTION}]] * 2, GenerationParams(max_new_tokens=16))
    assert replies == [f"base: {QUESTION}"] * 2
    stored = rows(served, Interaction)
    assert len(stored) == 2 and all(i.client == "alice" and i.question == QUESTION for i in stored)
