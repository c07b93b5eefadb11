"""In-process chat generation with transformers (optionally with a LoRA adapter)."""
from __future__ import annotations

from collections.abc import Iterator, Sequence
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


AUTO_CUDA_START = 64  # "auto" on CUDA: first generate() batch, halved on out-of-memory
AUTO_CPU = 8  # "auto" on CPU: larger batches only add padding and memory traffic


class LocalChatModel:
    """A causal LM loaded from a folder, plus an optional PEFT adapter, generating in batches.

    Prompts are sorted by length before batching (less left padding, and on CUDA the longest
    batch, the one most likely to run out of memory, comes first); replies come back in the
    input order. `batch_size="auto"` starts at 64 on CUDA and halves on out-of-memory
    (accelerate's `find_executable_batch_size`), remembering the size that fit; on CPU it is 8.
    """

    def __init__(self, model_dir: Path, adapter_dir: Path | None = None, batch_size: int | str = 8):
        self.name = str(adapter_dir or model_dir)
        self.device = pick_device()
        self.tokenizer = load_tokenizer(model_dir)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=pick_dtype(self.device))
        if adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
        self.model = model.to(self.device).eval()
        if batch_size != "auto" and not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"batch_size must be a positive integer or 'auto', not {batch_size!r}")
        self.batch_size = batch_size
        self._auto_size = AUTO_CUDA_START  # the largest batch that fitted so far ("auto" on CUDA)

    def render(self, conversation: list[Message]) -> str:
        return self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)

    @torch.inference_mode()
    def chat(self, conversations: Sequence[list[Message]], params: GenerationParams) -> list[str]:
        if not conversations:
            return []
        prompts = [self.render(c) for c in conversations]
        lengths = [len(ids) for ids in self.tokenizer(prompts, add_special_tokens=False)["input_ids"]]
        order = sorted(range(len(prompts)), key=lambda i: -lengths[i])  # longest first, stable
        ordered = [prompts[i] for i in order]
        if self.batch_size == "auto" and self.device == "cuda":
            generated = self._chat_auto(ordered, params)
        else:
            size = AUTO_CPU if self.batch_size == "auto" else int(self.batch_size)
            generated = self._chat_fixed(ordered, params, size)
        replies = [""] * len(prompts)
        for i, reply in zip(order, generated):
            replies[i] = reply
        return replies

    @torch.inference_mode()
    def yes_no_margins(self, conversations: Sequence[list[Message]]) -> list[float]:
        """log P(Yes) - log P(No) of each reply's first token (one forward pass, no generation).

        The probability of each side is the sum over its one-token spellings ("Yes", "yes", " Yes" ...)."""
        yes, no = self._answer_token_ids()
        prompts = [self.render(c) for c in conversations]
        size = AUTO_CPU if self.batch_size == "auto" else int(self.batch_size)
        margins: list[float] = []
        for start in range(0, len(prompts), size):
            enc = self.tokenizer(prompts[start : start + size], return_tensors="pt", padding=True,
                                 add_special_tokens=False).to(self.device)
            positions = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # as generate() numbers left-padded rows
            # left padding: position -1 is every prompt's last token; the LM head runs on it alone
            logits = self.model(**enc, position_ids=positions, logits_to_keep=1).logits
            last = logits[:, -1, :].float().log_softmax(-1)
            margins.extend((torch.logsumexp(last[:, yes], -1) - torch.logsumexp(last[:, no], -1)).tolist())
        return margins

    def _answer_token_ids(self) -> tuple[list[int], list[int]]:
        def single_ids(words: list[str]) -> set[int]:
            """Ids of the spellings that are one token of their own ("YES" may be "Y"+"ES", or unknown)."""
            ids = {w: self.tokenizer.encode(w, add_special_tokens=False) for w in words}
            return {t[0] for w, t in ids.items() if len(t) == 1 and self.tokenizer.decode(t).strip() == w.strip()}

        yes, no = single_ids(["Yes", "yes", " Yes", "YES"]), single_ids(["No", "no", " No", "NO"])
        if not yes or not no or yes & no:
            raise ValueError(f"the tokenizer of {self.name} does not tell 'Yes' from 'No' by their first token")
        return sorted(yes), sorted(no)

    def _chat_fixed(self, prompts: list[str], params: GenerationParams, size: int) -> list[str]:
        out: list[str] = []
        for start in range(0, len(prompts), size):
            out.extend(self._generate(prompts[start : start + size], params, seed=params.seed + start))
        return out

    def _chat_auto(self, prompts: list[str], params: GenerationParams) -> list[str]:
        """Batches of the largest size that fits; on out-of-memory only the failed batch is redone."""
        from accelerate.utils import find_executable_batch_size

        out: list[str] = []
        size = {"now": self._auto_size}

        def halve() -> int:
            size["now"] //= 2
            return size["now"]

        @find_executable_batch_size(starting_batch_size=size["now"], reduce_batch_size_fn=halve)
        def run(batch_size: int) -> None:
            while len(out) < len(prompts):
                start = len(out)
                out.extend(self._generate(prompts[start : start + batch_size], params, seed=params.seed + start))
                self._auto_size = batch_size

        run()
        return out

    def _generate(self, prompts: list[str], params: GenerationParams, seed: int) -> list[str]:
        new = self.generate_ids(prompts, params, seed)
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    def generate_ids(self, prompts: list[str], params: GenerationParams, seed: int, streamer=None,
                     stopping_criteria=None) -> torch.Tensor:
        """Generated token ids (prompt removed) for a batch of rendered prompts; `streamer` gets each
        step's tokens and `stopping_criteria` (a transformers StoppingCriteriaList) may end rows early."""
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
            streamer=streamer,
            max_time=params.max_time,  # transformers' MaxTimeCriteria: stop after this many seconds
            stopping_criteria=stopping_criteria,
        )
        return out[:, enc["input_ids"].shape[1] :]


def stripped(pieces: Iterator[str]) -> Iterator[str]:
    """Re-chunk text pieces so that they concatenate to `"".join(pieces).strip()`."""
    pending, started = "", False
    for text in pieces:
        if not started:
            text = text.lstrip()
            if not text:
                continue
            started = True
        body = text.rstrip()
        if body:
            yield pending + body
            pending = text[len(body):]
        else:
            pending += text
