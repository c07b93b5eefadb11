"""Any OpenAI-compatible endpoint (vLLM, Ollama, llama.cpp server, hosted APIs) through DSPy's LM."""
from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import dspy

from tuneloop.errors import ConfigError
from tuneloop.models.base import GenerationParams, Message


def api_key(env_name: str | None) -> str:
    if not env_name:
        return "not-needed"  # local servers usually accept any key
    key = os.environ.get(env_name)
    if not key:
        raise ConfigError(f"environment variable {env_name} (api_key_env) is not set")
    return key


class EndpointChatModel:
    """Chat completions from an OpenAI-compatible server, via dspy.LM (LiteLLM underneath)."""

    def __init__(self, model: str, base_url: str, api_key_env: str | None, concurrency: int = 8):
        self.name = f"{model}@{base_url}"
        self.lm = dspy.LM(f"openai/{model}", api_base=base_url, api_key=api_key(api_key_env), cache=True)
        self.concurrency = concurrency

    def _one(self, conversation: list[Message], params: GenerationParams) -> str:
        out = self.lm(
            messages=conversation,
            temperature=params.temperature,
            max_tokens=params.max_new_tokens,
            top_p=params.top_p,
            seed=params.seed,
        )
        first = out[0]
        return (first["text"] if isinstance(first, dict) else first).strip()

    def chat(self, conversations: Sequence[list[Message]], params: GenerationParams) -> list[str]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(lambda c: self._one(c, params), conversations))
