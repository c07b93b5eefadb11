"""Test helpers: a tiny random-weight chat model, project settings, a scripted fake teacher.

Everything runs offline: the tokenizer is trained on the bundled sample text, the model is a
2-layer Llama built from a config, and the teacher is a deterministic fake. Importable from a
subprocess too (`from tests.helpers import ...` with the repository root on sys.path).
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported anywhere
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models: one thread is many times faster than two here (thread sync dwarfs the math).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import json
import re
import socket
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from tuneloop.config import Project
from tuneloop.models.base import GenerationParams, Message
from tuneloop.programs.rag import SYSTEM_PROMPT
from tuneloop.programs.synth import TASKS, JudgeGrounding, RewriteAnswer, WriteAnswer, WriteQuestion
from tuneloop.settings_template import default_settings_yaml

SAMPLE = Path(str(resources.files("tuneloop") / "sample"))
CONTRACTS = SAMPLE / "contracts"
SEEDS = SAMPLE / "seeds.jsonl"
HELDOUT = SAMPLE / "heldout.jsonl"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# --------------------------------------------------------------------------- tiny model


def sample_texts() -> list[str]:
    texts = [p.read_text(encoding="utf-8") for p in sorted(CONTRACTS.glob("*.md"))]
    for path in (SEEDS, HELDOUT):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                texts += [row["question"], row["answer"]]
    return texts


def build_tiny_model(target: Path) -> Path:
    """A word-level tokenizer (ChatML specials) and a 2-layer random Llama, saved into `target`."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = ["system", "user", "assistant", "Excerpts", "Question", "Passage"]
    tok.train_from_iterator(sample_texts() + extra, trainers.WordLevelTrainer(
        special_tokens=["[UNK]", "<|im_start|>", "<|im_end|>"], min_frequency=1))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<|im_start|>",
                                        eos_token="<|im_end|>", pad_token="<|im_end|>")
    tokenizer.chat_template = CHATML_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    target.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(target)
    model.save_pretrained(target)
    return target


# --------------------------------------------------------------------------- projects


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def tiny_settings(model_dir: Path, name: str = "test-project") -> dict:
    data = yaml.safe_load(default_settings_yaml(name, ["documents"]))
    m = str(model_dir)
    return deep_merge(data, {
        "models": {
            "student": {"model": m, "max_new_tokens": 12},
            "teacher": {"model": m, "max_new_tokens": 16},
            "judge": {"model": m},
        },
        "ingest": {"dense": False},
        "synth": {"questions_per_cycle": 6, "transfer": {"enabled": False}},  # tests/test_transfer.py turns it on
        "sft": {"epochs": 1, "batch_size": 4, "learning_rate": 5e-3},
        "lora": {"r": 8, "alpha": 16},
        "eval": {"limit": 6},
        "continual": {"anchor": False},  # tests/test_anchor.py covers the anchor set in a cycle
        "review": {"pool": 12, "per_cycle": 4},  # the cycle's review step, kept small (tests/test_review.py)
    })


def write_settings(root: Path, data: dict) -> None:
    (root / "tuneloop.yaml").write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def import_sample_pairs(project: Project) -> None:
    from tuneloop.stages.seeds import import_pairs
    from tuneloop.store import open_store

    with open_store(project.store_url)() as s:
        import_pairs(s, SEEDS, "train")
        import_pairs(s, HELDOUT, "eval")
        s.commit()


def ingest_project(project: Project):
    """Ingest the project's documents (BM25-only) and return its Retriever."""
    from tuneloop.programs.rag import Retriever
    from tuneloop.progress import SilentReporter
    from tuneloop.stages.ingest import ingest_paths
    from tuneloop.store import open_store

    with open_store(project.store_url)() as s:
        ingest_paths(project, s, [project.path(p) for p in project.settings.documents], None, SilentReporter())
        s.commit()
        return Retriever.load(project, s, None)


def table_counts(project: Project) -> dict[str, int]:
    from sqlalchemy import func, select

    from tuneloop import store as st
    counts = {}
    with st.open_store(project.store_url)() as s:
        for model in (st.Document, st.Chunk, st.Example, st.ModelVersion, st.EvalRun, st.Artifact, st.Cycle,
                      st.CycleStep):
            counts[model.__tablename__] = s.scalar(select(func.count()).select_from(model))
    return counts


# --------------------------------------------------------------------------- fake teacher


_WORD = re.compile(r"[A-Za-z][A-Za-z0-9]+")


def question_passage(conversation: list[Message]) -> str:
    """The passage block of a question-writing prompt (PlainChatAdapter's `Passage:` field)."""
    body = conversation[-1]["content"].split("Passage:", 1)[1]
    return min((body.split(task, 1)[0] for task in TASKS.values()), key=len).strip()


def prompt_question(conversation: list[Message]) -> str:
    """The question of an answer, judge or round-trip prompt."""
    user = conversation[-1]["content"]
    return user.rsplit("Question:", 1)[1].split("\n")[0].strip()


def excerpts(conversation: list[Message]) -> str:
    user = conversation[-1]["content"]
    return user.split("Excerpts:\n", 1)[1].rsplit("\n\nQuestion:", 1)[0]


def passage_phrase(passage: str, n: int = 6) -> str:
    """Words from the middle of a passage (chunk overlaps sit at the edges, so this is distinctive)."""
    words = _WORD.findall(passage)
    mid = len(words) // 2
    return " ".join(words[max(0, mid - n // 2): mid - n // 2 + n])


def default_question(conversation: list[Message]) -> str:
    return f"Which terms cover {passage_phrase(question_passage(conversation))}?"


def default_answer(conversation: list[Message]) -> str:
    """The phrase the default question asks about, when the excerpts contain it."""
    m = re.match(r"Which terms cover (.+)\?$", prompt_question(conversation))
    if m and " ".join(_WORD.findall(excerpts(conversation))).find(m.group(1)) >= 0:
        return m.group(1)
    return "The document does not say."


class FakeTeacher:
    """A scripted ChatModel for the data engine's prompts, recognised by their system message.

    question: writes a question about the passage; answer: the answer writer (cites nothing);
    judge: the grounding verdict; round_trip: the student-prompt answer (defaults to `answer`);
    rewrite: self-distillation (defaults to the reference answer unchanged).
    """

    def __init__(self, question: Callable[[list[Message]], str] = default_question,
                 answer: Callable[[list[Message]], str] = default_answer,
                 judge: Callable[[list[Message]], str] = lambda conv: "Yes. Every claim is in the excerpts.",
                 round_trip: Callable[[list[Message]], str] | None = None,
                 rewrite: Callable[[list[Message]], str] | None = None, name: str = "fake-teacher"):
        self.name = name
        self.question, self.answer, self.judge = question, answer, judge
        self.round_trip = round_trip or answer
        self.rewrite = rewrite or (lambda conv: conv[-1]["content"].split("Reference answer:", 1)[1].strip())
        self.calls = 0  # chat() invocations
        self.prompts: dict[str, list[list[Message]]] = {
            k: [] for k in ("question", "answer", "judge", "round_trip", "rewrite")}

    @property
    def question_prompts(self) -> list[list[Message]]:
        return self.prompts["question"]

    @property
    def answer_prompts(self) -> list[list[Message]]:
        return self.prompts["answer"]

    @property
    def conversations(self) -> int:
        return sum(len(v) for v in self.prompts.values())

    def kind(self, conv: list[Message]) -> str:
        system = conv[0]["content"]
        if system == WriteQuestion.instructions:
            return "question"
        if system == WriteAnswer.instructions:
            return "answer"
        if system == JudgeGrounding.instructions:
            return "judge"
        if system == RewriteAnswer.instructions:
            return "rewrite"
        if system == SYSTEM_PROMPT:
            return "round_trip"
        raise AssertionError(f"unexpected prompt: {system[:80]!r}")  # pragma: no cover

    def chat(self, conversations: Sequence[list[Message]], params: GenerationParams) -> list[str]:
        self.calls += 1
        replies = []
        for conv in conversations:
            kind = self.kind(conv)
            self.prompts[kind].append(conv)
            replies.append(getattr(self, kind)(conv))
        return replies


def use_teacher(monkeypatch, teacher: Any) -> None:
    """Make the data engine build `teacher` for the teacher role, and the real models otherwise."""
    import tuneloop.models.registry as registry

    real = registry.build_chat_model

    def build(project, role, adapter=None, engine=None):
        if role is project.settings.models.teacher:
            return teacher
        return real(project, role, adapter, engine)

    monkeypatch.setattr(registry, "build_chat_model", build)


class RecordingReporter:
    """A Reporter that keeps log messages and every progress advance, per task."""

    def __init__(self):
        self.messages: list[str] = []
        self.tasks: list[tuple[str, int | None, list[int]]] = []

    @contextmanager
    def task(self, description, total):
        advances: list[int] = []
        self.tasks.append((description, total, advances))
        yield lambda n=1: advances.append(n)

    def log(self, message: str) -> None:
        self.messages.append(message)


KILLABLE_PROJECT = {"sft": {"epochs": 8, "save_steps": 1}, "synth": {"questions_per_cycle": 4},
                    "models": {"teacher": {"max_new_tokens": 8}}}  # 20 seeds / batch 4 x 8 epochs: 40 short steps


def kill_9_during_training(script: str, project: Project, tmp_path: Path, min_step: int = 3,
                           timeout: float = 180) -> int:
    """Run `script` (Python source) in a child process and SIGKILL it once training has written a
    checkpoint of step >= `min_step` (so at least one complete checkpoint exists); its return code."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import pytest

    env = {**os.environ, "TUNELOOP_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    log = tmp_path / "killed-run.log"  # a file, not a pipe: a full pipe would stall the child
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=tmp_path, stdout=out,
                                stderr=subprocess.STDOUT)
    work = project.artifacts / ".work"
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            ckpts = list(work.glob("*/checkpoint-*")) if work.exists() else []
            if max((int(c.name.split("-")[-1]) for c in ckpts), default=0) >= min_step:
                break
            if proc.poll() is not None:
                pytest.fail("the run ended before it could be killed:\n" + log.read_text(errors="replace")[-3000:])
            time.sleep(0.05)
        else:
            pytest.fail("no checkpoint appeared:\n" + log.read_text(errors="replace")[-3000:])
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode


def free_port() -> int:
    """A loopback port nothing listens on (bound, then closed again): for a server to start on, or
    an address where nothing answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
