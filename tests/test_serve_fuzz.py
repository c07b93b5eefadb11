"""Fuzzing `tuneloop serve` against its own OpenAPI schema (schemathesis, in-process over ASGI).

Every endpoint of /openapi.json gets generated requests, valid and invalid, sent with a client
key, with the admin token and with no key at all, to an app on a scripted fake model. Each
response must not be a 5xx and must match what the schema declares (status code, content type,
headers, body). Bounded: a few hundred examples per endpoint and credential, well under a minute.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.python.asgi import shutdown_lifespans

from tests.helpers import CONTRACTS, ingest_project, prompt_question, tiny_settings, write_settings
from tuneloop.config import load_project
from tuneloop.models.base import GenerationParams, Message
from tuneloop.serve import create_app

CLIENT_KEY, ADMIN_TOKEN = "fuzz-client-key", "fuzz-admin-token"
CREDENTIALS = {
    "client": {"Authorization": f"Bearer {CLIENT_KEY}"},
    "admin": {"Authorization": f"Bearer {ADMIN_TOKEN}"},
    "no key": {},
}
# Not negative_data_rejection: the credentials are replaced after generation, so a request the fuzzer
# meant to be invalid (no Authorization header) may be sent valid and rightly accepted.
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]
EXAMPLES = 120  # per endpoint and credential (the coverage phase adds its own boundary cases)

pytestmark = pytest.mark.timeout(300)


class EchoModel:
    """Answers at once with the first words of the question (bounded by max_new_tokens)."""

    def __init__(self, name: str):
        self.name = name

    def chat(self, conversations: list[list[Message]], params: GenerationParams) -> list[str]:
        return [" ".join(prompt_question(c).split()[: params.max_new_tokens]) or "ok" for c in conversations]


@pytest.fixture(scope="module")
def fuzzed_app(tmp_path_factory, tiny_model_dir) -> Iterator[object]:
    """An ingested project (limits off, so the fuzzer reaches the handlers) served by a scripted model."""
    root = tmp_path_factory.mktemp("fuzz") / "project"
    root.mkdir()
    shutil.copytree(CONTRACTS, root / "documents")
    settings_dict = tiny_settings(tiny_model_dir)
    settings_dict["serve"] = {"requests_per_minute": 0, "tokens_per_minute": 0, "max_tokens_limit": 64}
    write_settings(root, settings_dict)
    project = load_project(root)
    ingest_project(project)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNELOOP_API_KEYS", f"fuzzer:{CLIENT_KEY}")
        mp.setenv("TUNELOOP_ADMIN_TOKEN", ADMIN_TOKEN)
        app = create_app(project, model_factory=lambda _project, version: EchoModel(version.name))
    yield app
    shutdown_lifespans()  # schemathesis keeps the app's lifespan running until asked


@pytest.fixture(scope="module")
def api_schema(fuzzed_app):
    return schemathesis.openapi.from_asgi("/openapi.json", fuzzed_app)


def test_the_schema_is_public_and_lists_every_endpoint(fuzzed_app):
    from fastapi.testclient import TestClient

    with TestClient(fuzzed_app) as c:
        r = c.get("/openapi.json")
    assert r.status_code == 200
    paths = r.json()["paths"]
    assert set(paths) == {"/v1/models", "/v1/chat/completions", "/v1/feedback", "/v1/interactions/{interaction_id}",
                          "/v1/admin/summary", "/v1/review/queue", "/v1/review/{item_id}"}
    for path, operations in paths.items():
        for op in operations.values():
            assert {"401", "422"} <= set(op["responses"]), (path, op["responses"].keys())
            assert op["responses"]["401"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")


FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])


def fuzz(api_schema, who: str) -> None:
    """Valid and invalid requests to every operation, sent with `who`'s credentials, checked.

    (Hypothesis is driven directly: schemathesis's pytest plugin, `schema.parametrize()`, does not
    run under pytest 9.)
    """
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) == 7
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @FUZZ
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case) -> None:
                # the fuzzer's own Authorization values are replaced by `who`'s (or none)
                case.headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
                case.call_and_validate(headers=CREDENTIALS[who], checks=CHECKS)

            run()


def test_fuzz_with_a_client_key(api_schema):
    fuzz(api_schema, "client")


def test_fuzz_with_the_admin_token(api_schema):
    fuzz(api_schema, "admin")


def test_fuzz_without_a_key(api_schema):
    fuzz(api_schema, "no key")


# Any text, lone surrogates included (JSON "\ud800"; hypothesis leaves them out unless asked).
ANY_TEXT = st.text(st.characters(categories=["Cs", "Lu", "Ll", "Nd", "Zs", "Po", "Cc", "So"]), max_size=40)


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(question=ANY_TEXT, comment=ANY_TEXT, correction=ANY_TEXT)
def test_any_question_or_feedback_text_is_answered_or_refused_with_a_422(fuzzed_app, question, comment, correction):
    from fastapi.testclient import TestClient

    def post(c, path: str, body: dict):
        raw = json.dumps(body).encode()  # ensure_ascii: a surrogate travels as its \u escape
        return c.post(path, content=raw, headers={**CREDENTIALS["client"], "Content-Type": "application/json"})

    with TestClient(fuzzed_app) as c:
        r = post(c, "/v1/chat/completions", {"messages": [{"role": "user", "content": question}]})
        assert r.status_code in (200, 422), r.text
        if r.status_code == 422:
            assert r.json()["error"]["message"].startswith("messages"), r.text
            return
        iid = r.json()["interaction_id"]
        r = post(c, "/v1/feedback", {"interaction_id": iid, "comment": comment, "corrected_answer": correction})
        assert r.status_code in (200, 201, 422), r.text
        if r.status_code == 422:
            assert r.json()["error"]["message"].split(":")[0] in ("comment", "corrected_answer", "feedback"), r.text
        r = c.get(f"/v1/interactions/{iid}", headers=CREDENTIALS["client"])
        # what the server read: JSON joins a high and a low surrogate into one character
        sent = json.loads(json.dumps(question))
        assert r.status_code == 200 and r.json()["question"] == sent.strip()
