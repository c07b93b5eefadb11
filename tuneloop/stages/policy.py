"""The model every training stage starts from (SFT, DAPT, alignment, RLOO).

One place decides how a run continues its parent: the base model in fp32 on CPU (bf16 on CUDA
that has it), plus the parent's LoRA adapter loaded trainable, or, when the parent is the base
model itself, a new LoRA config (the `lora` settings) that the TRL trainer applies.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from tuneloop.config import LoraSettings
from tuneloop.models.local import load_tokenizer, pick_device, pick_dtype


@dataclass
class Policy:
    model: Any  # a transformers causal LM, or a PeftModel continuing the parent's adapter
    peft_config: Any  # a new LoraConfig for the trainer to apply, or None when continuing an adapter
    tokenizer: Any
    device: str
    dtype: torch.dtype


def device_args(device: str, dtype: torch.dtype) -> dict:
    """The TrainingArguments every trainer shares for the device: fp32 on CPU, bf16 where the dtype
    is bf16, and activation checkpointing on CUDA only. TRL turns checkpointing on by default; it
    saves GPU memory by running each forward pass twice, and on CPU, where memory is not the limit
    for these models, that is a third more compute per step for nothing."""
    return {"use_cpu": device == "cpu", "bf16": dtype == torch.bfloat16, "fp16": False,
            "gradient_checkpointing": device == "cuda"}


def lora_config(lora: LoraSettings, task_type: str = "CAUSAL_LM"):
    """A new LoRA adapter with the project's `lora` settings."""
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules, task_type=task_type)


def load_policy(model_dir: Path, parent_adapter: Path | None, lora: LoraSettings, precision: str,
                padding_side: str = "right") -> Policy:
    """Base model + the parent's adapter (trainable), or base model + a new LoRA config."""
    from peft import PeftModel

    device = pick_device()
    dtype = pick_dtype(device, precision)
    tokenizer = load_tokenizer(model_dir)
    tokenizer.padding_side = padding_side
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    peft_config = None
    if parent_adapter is not None:  # continue the parent's adapter
        model = PeftModel.from_pretrained(model, str(parent_adapter), is_trainable=True)
    else:
        peft_config = lora_config(lora)
    return Policy(model, peft_config, tokenizer, device, dtype)
