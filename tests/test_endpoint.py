"""The teacher on an OpenAI-compatible endpoint: a fake server on loopback, no internet.

Covers replies in order, retries with backoff on 5xx, bounded concurrency, the reply cache
(a rerun sends nothing) and a clear one-line error when the endpoint cannot be reached.
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.helpers import free_port
from tuneloop.errors import InputError
from tuneloop.models.base import GenerationParams
from tuneloop.models.cache import CachedChatModel
from tuneloop.models.registry import build_chat_model


class FakeServer:
    """POST /v1/chat/completions -> a chat.completion whose text echoes the last user message."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: list[dict] = []  # every request body, failed ones included
        self.fail_first = 0  # answer the first N requests with `fail_status`
        self.fail_status = 500
        self.delay = 0.0  # seconds each request takes
        self.in_flight = 0
        self.max_in_flight = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with server.lock:
                    server.requests.append(body)
                    n = len(server.requests)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    time.sleep(server.delay)
                    if self.path != "/v1/chat/completions":
                        return self._send(404, {"error": {"message": f"no route {self.path}"}})
                    if n <= server.fail_first:
                        error = {"error": {"message": "try again", "type": "server_error"}}
                        return self._send(server.fail_status, error)
                    text = "re: " + body["messages"][-1]["content"]
                    self._send(200, {
                        "id": f"chatcmpl-{n}", "object": "chat.completion", "created": int(time.time()),
                        "model": body.get("model", "fake"),
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                     "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
                    })
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def __enter__(self) -> FakeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    with FakeServer() as s:
        yield s


def teacher_on(project, url: str, **role):
    proj = project({"models": {"teacher": {"backend": "openai", "base_url": url, "model": "fake",
                                           "max_retries": 2, **role}}}, pairs=False)
    return proj, build_chat_model(proj, proj.settings.models.teacher)


def convs(n: int) -> list[list[dict]]:
    return [[{"role": "system", "content": "Write questions."}, {"role": "user", "content": f"passage {i}"}]
            for i in range(n)]


PARAMS = GenerationParams(max_new_tokens=16, temperature=0.0, seed=7)


def test_replies_in_order_and_request_fields(project, server):
    _, teacher = teacher_on(project, server.url)
    assert isinstance(teacher, CachedChatModel) and teacher.name == f"fake@{server.url}"
    assert teacher.chat(convs(5), PARAMS) == [f"re: passage {i}" for i in range(5)]
    assert len(server.requests) == 5
    body = next(b for b in server.requests if b["messages"][-1]["content"] == "passage 3")
    assert body["model"] == "fake"
    assert body["messages"] == [{"role": "system", "content": "Write questions."},
                                {"role": "user", "content": "passage 3"}]
    assert body["temperature"] == 0.0 and body["seed"] == 7
    # both names of the limit: servers that know only `max_tokens` (llama.cpp) otherwise fill their context
    assert body["max_tokens"] == body["max_completion_tokens"] == 16


def test_server_errors_are_retried_with_backoff(project, server):
    server.fail_first = 2
    _, teacher = teacher_on(project, server.url, max_retries=3, batch_size=1)
    start = time.monotonic()
    assert teacher.chat(convs(1), PARAMS) == ["re: passage 0"]
    waited = time.monotonic() - start
    assert len(server.requests) == 3  # two 500s, then the answer
    assert 2.5 < waited < 10  # backed off 1 s, then 2 s


def test_client_errors_are_not_retried(project, server):
    server.fail_first, server.fail_status = 100, 400
    _, teacher = teacher_on(project, server.url, max_retries=3)
    with pytest.raises(InputError) as err:
        teacher.chat(convs(1), PARAMS)
    assert len(server.requests) == 1
    assert server.url in str(err.value) and "\n" not in str(err.value)


def test_concurrency_is_bounded(project, server):
    server.delay = 0.2
    _, teacher = teacher_on(project, server.url, batch_size=3)
    assert teacher.chat(convs(9), PARAMS) == [f"re: passage {i}" for i in range(9)]
    assert 1 < server.max_in_flight <= 3


def test_rerun_through_the_cache_sends_nothing(project, server):
    proj, teacher = teacher_on(project, server.url)
    first = teacher.chat(convs(4), PARAMS)
    assert len(server.requests) == 4
    teacher.close()

    rerun = build_chat_model(proj, proj.settings.models.teacher)  # as a new process would
    assert rerun.chat(convs(4), PARAMS) == first
    assert len(server.requests) == 4 and (rerun.calls, rerun.hits) == (0, 4)
    rerun.chat(convs(5), PARAMS)  # one new conversation: one request
    assert len(server.requests) == 5


def test_unreachable_endpoint_is_a_clear_input_error(project):
    port = free_port()  # nothing listens there
    url = f"http://127.0.0.1:{port}/v1"
    _, teacher = teacher_on(project, url, max_retries=1, cache=False)
    start = time.monotonic()
    with pytest.raises(InputError) as err:
        teacher.chat(convs(3), PARAMS)
    assert time.monotonic() - start < 6
    message = str(err.value)
    assert url in message and "\n" not in message
    assert "reach" in message and ("refused" in message.lower() or "connect" in message.lower())


def test_max_time_gives_up_on_a_slow_endpoint_without_retries(project, server):
    """Serving's deadline reaches the endpoint: a request that takes longer fails at max_time, once."""
    server.delay = 3.0
    _, teacher = teacher_on(project, server.url, cache=False)
    start = time.monotonic()
    with pytest.raises(InputError):
        teacher.chat(convs(1), GenerationParams(max_new_tokens=16, max_time=0.5))
    assert time.monotonic() - start < 2.5 and len(server.requests) == 1


def test_openais_own_api_gets_only_its_own_name_of_the_token_limit():
    from tuneloop.models.remote import EndpointChatModel, _request

    assert EndpointChatModel("gpt-4o-mini", "https://api.openai.com/v1", None).compatible is False
    assert EndpointChatModel("m", "http://127.0.0.1:8080/v1", None).compatible is True
    conv = [{"role": "user", "content": "hi"}]
    assert _request("openai/m", conv, PARAMS).config.extensions is None
    assert _request("openai/m", conv, PARAMS, max_tokens_too=True).config.extensions == {"max_tokens": 16}
