"""Any OpenAI-compatible endpoint (vLLM, Ollama, llama.cpp server, hosted APIs) through DSPy's LM.

Retries: DSPy's LM owns them (dspy/clients/execution.py `execute`): a request that fails with a
rate limit (429), a server error (5xx), a timeout or a transport error (connection refused,
reset, DNS) is retried up to `num_retries` times, sleeping `Retry-After` when the server sends
one and otherwise 1, 2, 4, ... seconds (exponential, capped at 60). Client errors (400, 401,
404, ...) are not retried. So we pass `num_retries` and add no retry loop of our own.

Caching: DSPy's own response cache is off (`cache=False`): `tuneloop.models.cache` keeps
replies on disk in the project, keyed by the full request.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

# DSPy (like LiteLLM) fetches a model price map from GitHub on first use; tuneloop never
# reaches the internet on its own, and the bundled snapshot is all we need.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy  # noqa: E402

from tuneloop.errors import ConfigError, InputError  # noqa: E402
from tuneloop.models.base import GenerationParams, Message  # noqa: E402


class EndpointError(InputError):
    """The endpoint could not be reached, or kept failing after the retries."""


def api_key(env_name: str | None) -> str:
    if not env_name:
        return "not-needed"  # local servers usually accept any key
    key = os.environ.get(env_name)
    if not key:
        raise ConfigError(f"environment variable {env_name} (api_key_env) is not set")
    return key


def _request(model: str, conversation: list[Message], params: GenerationParams, max_tokens_too: bool = False):
    """A DSPy (lm15) request: system messages become the system prompt, the rest the turns.

    lm15 sends the token limit as `max_completion_tokens` (OpenAI's current name); servers that
    only know `max_tokens` (llama.cpp's, llama-cpp-python's) ignore it and generate until their
    context is full. `max_tokens_too` also sends `max_tokens` (every OpenAI-compatible server
    reads one of the two; OpenAI's own API is left with its own field)."""
    from dspy.lm15 import Config, Request
    from dspy.lm15 import Message as LMMessage

    system = "\n\n".join(m["content"] for m in conversation if m["role"] == "system") or None
    turns = []
    for m in conversation:
        if m["role"] == "user":
            turns.append(LMMessage.user(m["content"]))
        elif m["role"] == "assistant":
            turns.append(LMMessage.assistant(m["content"]))
        elif m["role"] != "system":
            raise ValueError(f"unsupported message role: {m['role']!r}")
    config = Config(max_tokens=params.max_new_tokens, temperature=params.temperature, top_p=params.top_p,
                    seed=params.seed, extensions={"max_tokens": params.max_new_tokens} if max_tokens_too else None)
    return Request(model=model, system=system, messages=tuple(turns), config=config)


def _cause(exc: BaseException) -> str:
    """One line: the error's own message, without DSPy's `[provider/model]` prefix."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if text.startswith("[") and "] " in text:
        text = text.split("] ", 1)[1]
    status = getattr(exc, "status", None)
    if isinstance(status, int) and str(status) not in text:
        text = f"HTTP {status}: {text}"
    return text if len(text) <= 300 else text[:297] + "..."


class EndpointChatModel:
    """Chat completions from an OpenAI-compatible server, via dspy.LM (LiteLLM/lm15 underneath).

    `concurrency` requests are in flight at most; each is retried `max_retries` times with
    exponential backoff (see the module docstring).
    """

    def __init__(self, model: str, base_url: str, api_key_env: str | None, concurrency: int = 8,
                 max_retries: int = 4):
        self.name = f"{model}@{base_url}"
        self.base_url = base_url
        self.model_id = f"openai/{model}"
        self.lm = dspy.LM(self.model_id, api_base=base_url, api_key=api_key(api_key_env), cache=False,
                          num_retries=max_retries)
        self.concurrency = max(1, int(concurrency))
        self.max_retries = max_retries
        self.compatible = urlparse(base_url).hostname != "api.openai.com"  # a self-hosted server: max_tokens too
        self._timed: dict[float, dspy.LM] = {}  # max_time -> a copy of the LM with that timeout

    def _lm_for(self, params: GenerationParams) -> dspy.LM:
        """The LM, or (with `params.max_time`) a copy that gives up after that many seconds, without retries."""
        if params.max_time is None:
            return self.lm
        if params.max_time not in self._timed:
            self._timed[params.max_time] = self.lm.copy(timeout=params.max_time, num_retries=0)
        return self._timed[params.max_time]

    def _one(self, conversation: list[Message], params: GenerationParams) -> str:
        try:
            response = self._lm_for(params)(_request(self.model_id, conversation, params, self.compatible))
        except Exception as exc:  # DSPy has already retried what was worth retrying
            from dspy.utils.exceptions import LMTransportError, is_retryable_lm_error

            if isinstance(exc, LMTransportError):
                raise EndpointError(f"cannot reach the endpoint {self.base_url}: {_cause(exc)}") from exc
            retried = self.max_retries and is_retryable_lm_error(exc)
            tries = f" after {self.max_retries} retries" if retried else ""
            raise EndpointError(f"the endpoint {self.base_url} failed{tries}: {_cause(exc)}") from exc
        return (response.text or "").strip()

    def chat(self, conversations: Sequence[list[Message]], params: GenerationParams) -> list[str]:
        if not conversations:
            return []
        pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(conversations)))
        try:
            futures = [pool.submit(self._one, c, params) for c in conversations]
            replies = [f.result() for f in futures]
        except BaseException:
            # Fail fast: drop the requests not started yet; those in flight end on their own.
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        return replies
