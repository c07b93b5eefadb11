"""In-process chat generation with transformers (optionally with a LoRA adapter)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuneloop.models.base import GenerationParams, Message


def pick_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(device: str, precision: str = "auto") -> torch.dtype:
    """fp32 on CPU (bf16 matmuls are ~500x slower on CPUs without bf16 units); bf16 on CUDA that has it."""
    if precision == "fp32" or device == "cpu":
        return torch.float32
    if precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_tokenizer(model_dir: Path):
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # decoder-only batch generation needs left padding
    return tok


class LocalChatModel:
    """A causal LM loaded from a folder, plus an optional PEFT adapter, generating in batches."""

    def __init__(self, model_dir: Path, adapter_dir: Path | None = None, batch_size: int = 8):
        self.name = str(adapter_dir or model_dir)
        self.device = pick_device()
        self.tokenizer = load_tokenizer(model_dir)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=pick_dtype(self.device))
        if adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
        self.model = model.to(self.device).eval()
        self.batch_size = batch_size

    def render(self, conversation: list[Message]) -> str:
        return self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)

    @torch.inference_mode()
    def chat(self, conversations: Sequence[list[Message]], params: GenerationParams) -> list[str]:
        replies: list[str] = []
        for start in range(0, len(conversations), self.batch_size):
            batch = [self.render(c) for c in conversations[start : start + self.batch_size]]
            replies.extend(self._generate(batch, params, seed=params.seed + start))
        return replies

    def _generate(self, prompts: list[str], params: GenerationParams, seed: int) -> list[str]:
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        sample = params.temperature > 0
        torch.manual_seed(seed)
        out = self.model.generate(
            **enc,
            max_new_tokens=params.max_new_tokens,
            do_sample=sample,
            temperature=params.temperature if sample else None,
            top_p=params.top_p if sample else None,
            top_k=None,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        new = out[:, enc["input_ids"].shape[1] :]
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]
