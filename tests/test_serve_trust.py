"""`tuneloop serve` between clients who do not trust each other: ownership, roles, unguessable ids,
one verdict per key, idempotent feedback, rate and token limits, the generation deadline,
`--no-auth` on loopback only, and text that is not valid Unicode.

The app runs in-process (FastAPI's TestClient) on a scripted fake model, as in test_serve.py.
"""
from __future__ import annotations

import threading
import time

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from tests.helpers import ingest_project, prompt_question
from tests.test_serve import (
    ADMIN,
    ADMIN_TOKEN,
    CLIENT,
    CLIENT_KEY,
    OTHER_KEY,
    QUESTION,
    FakeFactory,
    _one_error_line,
    add_version,
    ask,
    count,
    error_of,
    live_server,
    rows,
)
from tuneloop.models.base import GenerationParams, Message
from tuneloop.serve import create_app
from tuneloop.serve.auth import Caller
from tuneloop.serve.limits import KeyLimits
from tuneloop.store import Feedback, IdempotencyKey, Interaction

BOB = {"Authorization": f"Bearer {OTHER_KEY}"}  # the bare key: client "client-2"
REVIEWER_KEY = "reviewer-key-321"
REVIEWER = {"Authorization": f"Bearer {REVIEWER_KEY}"}
KEYED = {**CLIENT, "Idempotency-Key": "k-1"}


@pytest.fixture
def keys(monkeypatch):
    monkeypatch.setenv("TUNELOOP_API_KEYS", f"alice:{CLIENT_KEY}, {OTHER_KEY}")
    monkeypatch.setenv("TUNELOOP_ADMIN_TOKEN", ADMIN_TOKEN)
    monkeypatch.setenv("TUNELOOP_REVIEWER_KEYS", f"rita:{REVIEWER_KEY}")


@pytest.fixture
def make(project, keys):
    """`make(**serve_settings)` -> an ingested project with those serve settings (limits off by default)."""

    def build(**serve) -> object:
        # the fake models' replies are asserted verbatim: not turned into passage spans (programs/copy.py)
        proj = project(overrides={"serve": {"requests_per_minute": 0, "tokens_per_minute": 0, **serve},
                                  "answer": {"copy_spans": False}}, pairs=False)
        ingest_project(proj)
        return proj

    return build


def asked(c: TestClient, headers=CLIENT, **extra) -> str:
    r = c.post("/v1/chat/completions", headers=headers, json=ask(**extra))
    assert r.status_code == 200, r.text
    return r.json()["interaction_id"]


# --------------------------------------------------------------------------- ownership and roles


def test_a_client_cannot_read_or_rate_another_clients_interaction_but_a_reviewer_can(make):
    proj = make()
    with TestClient(create_app(proj, model_factory=FakeFactory())) as c:
        alices = asked(c)
        missing = c.get("/v1/interactions/does-not-exist", headers=BOB)
        for r in (c.get(f"/v1/interactions/{alices}", headers=BOB),
                  c.post("/v1/feedback", headers=BOB, json={"interaction_id": alices, "thumbs": "down"}),
                  c.post("/v1/feedback", headers=BOB, json={"interaction_id": alices,
                                                            "corrected_answer": "Bob's version"})):
            err = error_of(r, 404)  # the same answer as for an id that does not exist
            assert err["code"] == error_of(missing, 404)["code"] == "interaction_not_found"
            assert "Which law" not in r.text
        assert count(proj, Feedback) == 0

        assert c.get(f"/v1/interactions/{alices}", headers=CLIENT).json()["question"] == QUESTION
        got = c.get(f"/v1/interactions/{alices}", headers=REVIEWER)
        assert got.status_code == 200 and got.json()["answer"] == f"base: {QUESTION}"
        assert c.get(f"/v1/interactions/{alices}", headers=ADMIN).status_code == 200
        r = c.post("/v1/feedback", headers=REVIEWER, json={"interaction_id": alices, "corrected_answer": "NSW law"})
        assert r.status_code == 201, r.text
        bobs = asked(c, BOB)
        error_of(c.get(f"/v1/interactions/{bobs}", headers=CLIENT), 404)
    [fb] = rows(proj, Feedback)
    assert (fb.client, fb.corrected_answer) == ("rita", "NSW law")


def test_a_client_cannot_choose_in_another_clients_ab_pair(make):
    proj = make()
    add_version(proj, "cand", "candidate")
    with TestClient(create_app(proj, model_factory=FakeFactory())) as c:
        body = c.post("/v1/chat/completions", headers=CLIENT, json=ask(ab=True)).json()
        choice = {"ab_pair": body["ab_pair"], "preferred_interaction_id": body["interaction_ids"][1]}
        assert error_of(c.post("/v1/feedback", headers=BOB, json=choice), 404)["code"] == "ab_pair_not_found"
        assert c.post("/v1/feedback", headers=CLIENT, json=choice).status_code == 201
    assert count(proj, Feedback) == 1


def test_interaction_ids_are_random_not_row_numbers(make):
    proj = make()
    with TestClient(create_app(proj, model_factory=FakeFactory())) as c:
        r = c.post("/v1/chat/completions", headers=CLIENT, json=ask())
        first, second = r.json()["interaction_id"], asked(c)
        assert r.json()["id"] == f"chatcmpl-{first}" and r.headers["X-Interaction-Id"] == first
        for public in (first, second):
            assert isinstance(public, str) and len(public) >= 20 and not public.isdigit()
        assert first != second
        row_ids = [i.id for i in rows(proj, Interaction)]
        assert row_ids == [1, 2]
        error_of(c.get("/v1/interactions/1", headers=CLIENT), 404)  # the row id is not an address
        error_of(c.post("/v1/feedback", headers=CLIENT, json={"interaction_id": "1", "thumbs": "up"}), 404)


def test_no_auth_clients_are_anonymous_but_a_reviewer_key_still_counts(make, monkeypatch):
    proj = make()
    monkeypatch.delenv("TUNELOOP_API_KEYS")
    with TestClient(create_app(proj, model_factory=FakeFactory(), auth=False)) as c:
        iid = asked(c, {})
        assert c.get(f"/v1/interactions/{iid}").status_code == 200
        r = c.post("/v1/feedback", headers=REVIEWER, json={"interaction_id": iid, "thumbs": "up"})
        assert r.status_code == 201
    assert rows(proj, Feedback)[0].client == "rita"


# --------------------------------------------------------------------------- one verdict per key


def test_repeated_votes_keep_one_row_per_client_and_answer(make):
    proj = make()
    with TestClient(create_app(proj, model_factory=FakeFactory())) as c:
        iid = asked(c)
        statuses = [c.post("/v1/feedback", headers=CLIENT, json={"interaction_id": iid, "thumbs": t}).status_code
                    for t in ["up", "down"] * 10]
        assert statuses == [201] + [200] * 19
        rating = {"interaction_id": iid, "rating": 2}
        correction = {"interaction_id": iid, "corrected_answer": "NSW"}
        ids = {c.post("/v1/feedback", headers=CLIENT, json=rating).json()["id"],
               c.post("/v1/feedback", headers=CLIENT, json=correction).json()["id"]}
        assert c.post("/v1/feedback", headers=REVIEWER, json={"interaction_id": iid, "thumbs": "up"}).status_code == 201
    alice, rita = rows(proj, Feedback)
    assert ids == {alice.id}  # updates answer with the id of the verdict they changed
    assert (alice.client, alice.thumbs, alice.rating, alice.corrected_answer) == ("alice", -1, 2, "NSW")
    assert (rita.client, rita.thumbs) == ("rita", 1)


def test_a_changed_ab_choice_replaces_the_first(make):
    proj = make()
    add_version(proj, "cand", "candidate")
    with TestClient(create_app(proj, model_factory=FakeFactory())) as c:
        body = c.post("/v1/chat/completions", headers=CLIENT, json=ask(ab=True)).json()
        for pick in body["interaction_ids"] * 3:
            choice = {"ab_pair": body["ab_pair"], "preferred_interaction_id": pick}
            r = c.post("/v1/feedback", headers=CLIENT, json=choice)
            assert r.status_code in (200, 201) and r.json()["interaction_id"] == pick
    [fb] = rows(proj, Feedback)
    chosen = next(i for i in rows(proj, Interaction) if i.public_id == body["interaction_ids"][1])
    assert fb.preferred_interaction_id == chosen.id


def test_concurrent_votes_of_one_key_still_leave_one_row(make):
    """Two servers on one store (no shared in-process lock): the unique verdict key settles the race."""
    proj = make()
    with live_server(create_app(proj, model_factory=FakeFactory())) as one, \
            live_server(create_app(proj, model_factory=FakeFactory())) as two:
        iid = httpx.post(f"{one}/v1/chat/completions", headers=CLIENT, json=ask()).json()["interaction_id"]
        statuses: list[int] = []
        threads = [threading.Thread(target=lambda url=url: statuses.append(httpx.post(
            f"{url}/v1/feedback", headers=CLIENT, json={"interaction_id": iid, "thumbs": "up"},
            timeout=60).status_code)) for url in [one, two] * 6]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert sorted(statuses) == [200] * 11 + [201]
    assert count(proj, Feedback) == 1


# --------------------------------------------------------------------------- idempotency


def test_an_idempotent_retry_stores_once_even_after_a_restart(make):
    proj = make()
    body = {"thumbs": "down", "comment": "wrong law"}
    with TestClient(create_app(proj, model_factory=FakeFactory())) as c:
        iid = asked(c)
        first = c.post("/v1/feedback", headers=KEYED, json={"interaction_id": iid, **body})
        again = c.post("/v1/feedback", headers=KEYED, json={"interaction_id": iid, **body})
        assert first.status_code == again.status_code == 201 and first.json() == again.json()
    stored = rows(proj, Feedback)
    with TestClient(create_app(proj, model_factory=FakeFactory())) as c:  # a new server on the same store
        later = c.post("/v1/feedback", headers=KEYED, json={"interaction_id": iid, **body})
        assert (later.status_code, later.json()) == (201, first.json())
        other = c.post("/v1/feedback", headers={**CLIENT, "Idempotency-Key": "k-1"},
                       json={"interaction_id": iid, "thumbs": "up"})
        err = error_of(other, 422)
        assert err["code"] == "idempotency_key_reused" and "Idempotency-Key" in err["message"]
    assert [(f.id, f.thumbs, f.created_at) for f in rows(proj, Feedback)] == [
        (f.id, f.thumbs, f.created_at) for f in stored]  # nothing new, nothing changed
    assert count(proj, IdempotencyKey) == 1


# --------------------------------------------------------------------------- limits


def test_requests_over_the_per_minute_limit_get_429_with_retry_after(make):
    proj = make(requests_per_minute=3)
    with TestClient(create_app(proj, model_factory=FakeFactory())) as c:
        assert [c.get("/v1/models", headers=CLIENT).status_code for _ in range(3)] == [200] * 3
        r = c.get("/v1/models", headers=CLIENT)
        err = error_of(r, 429)
        assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded"
        assert 1 <= int(r.headers["Retry-After"]) <= 20
        error_of(c.post("/v1/feedback", headers=CLIENT, json={"interaction_id": "x", "thumbs": "up"}), 429)
        assert c.get("/v1/models", headers=BOB).status_code == 200  # every key has its own budget
        assert all(c.get("/v1/models", headers=ADMIN).status_code == 200 for _ in range(5))  # the admin is exempt


def test_generated_tokens_over_the_per_minute_cap_get_429(make):
    proj = make(tokens_per_minute=10)  # the fake answer "base: <question>" is 7 tokens (words)
    with TestClient(create_app(proj, model_factory=FakeFactory())) as c:
        assert asked(c) and asked(c)  # 10 -> 3 -> -4: the second may start, its tokens go into debt
        r = c.post("/v1/chat/completions", headers=CLIENT, json=ask())
        err = error_of(r, 429)
        assert err["code"] == "token_limit_exceeded" and int(r.headers["Retry-After"]) >= 1
        assert asked(c, BOB) and asked(c, ADMIN)
    assert count(proj, Interaction) == 4


def test_token_buckets_refill_with_time():
    now = [0.0]
    limits = KeyLimits(requests_per_minute=2, tokens_per_minute=60, clock=lambda: now[0])
    alice = Caller("alice")
    assert limits.take_request(alice) is None and limits.take_request(alice) is None
    assert limits.take_request(alice) == 30  # one request back after 30 s
    limits.charge_tokens(alice, 120)  # 60 -> -60: one token per second comes back
    assert limits.tokens_wait(alice) == 61
    now[0] = 30.0
    assert limits.take_request(alice) is None and limits.tokens_wait(alice) == 31
    now[0] = 61.5
    assert limits.tokens_wait(alice) is None


def test_max_tokens_over_the_configured_limit_is_422(make):
    proj = make(max_tokens_limit=8)
    with TestClient(create_app(proj, model_factory=FakeFactory())) as c:
        err = error_of(c.post("/v1/chat/completions", headers=CLIENT, json=ask(max_tokens=9)), 422)
        assert "max_tokens" in err["message"] and "8" in err["message"]
        assert c.post("/v1/chat/completions", headers=CLIENT, json=ask(max_tokens=8)).status_code == 200


class SlowModel:
    """Writes one word every 50 ms, up to max_new_tokens, and stops at `params.max_time` like transformers."""

    def __init__(self, name: str, fail_late: bool = False):
        self.name, self.fail_late = name, fail_late

    def chat(self, conversations: list[list[Message]], params: GenerationParams) -> list[str]:
        start, words = time.monotonic(), []
        if self.fail_late:  # an endpoint that times out without a reply
            time.sleep(params.max_time or 0)
            raise TimeoutError("read timed out")
        while len(words) < params.max_new_tokens:
            if params.max_time is not None and time.monotonic() - start >= params.max_time:
                break
            time.sleep(0.05)
            words.append(f"w{len(words)}")
        return [" ".join(words) or prompt_question(conversations[0])]


def test_the_deadline_cuts_a_slow_generation_and_the_next_request_gets_its_turn(make):
    proj = make(generation_timeout_seconds=0.5, max_tokens_limit=1000)
    app = create_app(proj, model_factory=lambda project, version: SlowModel(version.name))
    with live_server(app) as url:
        long: dict = {}
        started = time.monotonic()
        worker = threading.Thread(target=lambda: long.update(httpx.post(
            f"{url}/v1/chat/completions", headers=CLIENT, json=ask(max_tokens=1000), timeout=30).json()))
        worker.start()
        time.sleep(0.1)
        short = httpx.post(f"{url}/v1/chat/completions", headers=BOB, json=ask(max_tokens=2), timeout=30).json()
        short_done = time.monotonic() - started
        worker.join(30)
    [choice] = long["choices"]
    assert choice["finish_reason"] == "length" and 3 <= len(choice["message"]["content"].split()) < 30
    assert short["choices"][0]["message"]["content"] == "w0 w1" and short["choices"][0]["finish_reason"] == "length"
    assert short_done < 3.0  # waited for the long one's deadline (0.5 s), not its 1000 words (50 s)


def test_a_model_that_fails_after_the_deadline_is_a_504(make):
    proj = make(generation_timeout_seconds=0.2)
    app = create_app(proj, model_factory=lambda project, version: SlowModel(version.name, fail_late=True))
    with TestClient(app) as c:
        err = error_of(c.post("/v1/chat/completions", headers=CLIENT, json=ask()), 504)
        assert err["code"] == "generation_timeout" and "generation_timeout_seconds" in err["message"]
    assert count(proj, Interaction) == 0


# --------------------------------------------------------------------------- invalid Unicode


SURROGATE_BODIES = [
    ("question", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "Which law? \\ud800"}]}',
     "messages[0].content"),
    ("question part", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff law"}]}]}', "messages[0].content"),
    ("model", "/v1/chat/completions", b'{"model": "\\ud800", "messages": [{"role": "user", "content": "q?"}]}',
     "model"),
    ("document", "/v1/chat/completions",
     b'{"document": "a\\ud800.md", "messages": [{"role": "user", "content": "q?"}]}', "document"),
    ("comment", "/v1/feedback", b'{"interaction_id": "IID", "comment": "bad \\ud800"}', "comment"),
    ("corrected answer", "/v1/feedback", b'{"interaction_id": "IID", "corrected_answer": "\\ud83d"}',
     "corrected_answer"),
    ("ab pair", "/v1/feedback", b'{"ab_pair": "\\ud800", "preferred_interaction_id": "IID"}', "ab_pair"),
    ("unknown field name", "/v1/feedback", b'{"interaction_id": "IID", "\\ud800": 1}', "body"),
]


@pytest.mark.parametrize("case", SURROGATE_BODIES, ids=[c[0] for c in SURROGATE_BODIES])
def test_a_lone_surrogate_is_a_422_naming_the_field(make, case):
    _label, path, raw, field = case
    proj = make()
    with TestClient(create_app(proj, model_factory=FakeFactory())) as c:
        iid = asked(c)
        before = (count(proj, Feedback), count(proj, Interaction))
        r = c.post(path, headers={**CLIENT, "Content-Type": "application/json"},
                   content=raw.replace(b"IID", iid.encode()))
        err = error_of(r, 422)
        assert err["message"].startswith(field), err
    assert (count(proj, Feedback), count(proj, Interaction)) == before


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def runner(monkeypatch):
    from typer.testing import CliRunner

    monkeypatch.setenv("COLUMNS", "200")
    return CliRunner()


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "::", "example.com"])
def test_cli_no_auth_refuses_a_non_loopback_host(make, runner, monkeypatch, host):
    from tuneloop.cli import app as cli

    proj = make()
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    line = _one_error_line(runner.invoke(cli, ["serve", "--no-auth", "--host", host, "-p", str(proj.root)]))
    assert "--no-auth" in line and "loopback" in line and host in line
    assert calls == []


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.1.2.3"])
def test_cli_no_auth_on_loopback_serves_with_a_warning(make, runner, monkeypatch, host):
    from tuneloop.cli import app as cli

    proj = make()
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    result = runner.invoke(cli, ["serve", "--no-auth", "--host", host, "-p", str(proj.root)])
    assert result.exit_code == 0, (result.output, result.exception)
    assert [kw["host"] for kw in calls] == [host]
    assert "WARNING: --no-auth" in result.stderr and "WARNING" not in result.stdout


def test_a_local_model_stops_at_max_time(tiny_model_dir):
    """The deadline reaches transformers' generate (max_time): the tiny model stops long before max_new_tokens."""
    from tuneloop.models.local import LocalChatModel

    model = LocalChatModel(tiny_model_dir, batch_size=1)
    prompt = [model.render([{"role": "user", "content": "Which law governs the supply agreement?"}])]
    full = model.generate_ids(prompt, GenerationParams(max_new_tokens=64), seed=0)
    cut = model.generate_ids(prompt, GenerationParams(max_new_tokens=64, max_time=1e-6), seed=0)
    assert full.shape[1] == 64 and cut.shape[1] <= 2
