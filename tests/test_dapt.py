"""Domain-adaptive pre-training on the tiny model: the mix, the loss on the chunks, the version, resume."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.numpy import load_file
from sqlalchemy import select
from transformers import AutoModelForCausalLM, TrainerCallback
from typer.testing import CliRunner

import tuneloop.stages.dapt as dapt_stage
from tests.helpers import CONTRACTS, RecordingReporter, deep_merge, ingest_project, tiny_settings, write_settings
from tuneloop.artifacts import read_jsonl, read_meta
from tuneloop.config import load_project
from tuneloop.errors import ConfigError, StateError
from tuneloop.models.local import load_tokenizer
from tuneloop.progress import SilentReporter
from tuneloop.stages.dapt import dapt_parent, general_texts, mix_rows, n_general_rows, train_dapt
from tuneloop.store import Artifact, Chunk, Cycle, ModelVersion, open_store
from tuneloop.versions import ensure_base_version

FAST = {"sft": {"learning_rate": 1e-2, "save_steps": 1000}, "lora": {"r": 16, "alpha": 32},
        "continual": {"dapt": True, "dapt_epochs": 2, "dapt_general_fraction": 0.2}}


def make_project(root, tiny_model_dir, overrides):
    shutil.copytree(CONTRACTS, root / "documents")
    write_settings(root, deep_merge(deep_merge(tiny_settings(tiny_model_dir), overrides),
                                    {"cache_dir": str(root / "cache")}))
    project = load_project(root)
    ingest_project(project)
    return project


@pytest.fixture(scope="module")
def lm_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model with a 10x larger lm_head.

    Its hidden states are RMS-normalised and lm_head starts at std 0.02, so its logits can hardly
    leave the uniform distribution, and LoRA (which never adapts lm_head under TRL) barely moves
    the LM loss. With larger output weights the adapter can lower it visibly in a few steps.
    """
    target = tmp_path_factory.mktemp("lm-model")
    shutil.copytree(tiny_model_dir, target, dirs_exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    model.save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def trained(tmp_path_factory, lm_model_dir):
    """One DAPT run inside a cycle, shared by the tests of this module."""
    project = make_project(tmp_path_factory.mktemp("dapt-project"), lm_model_dir, FAST)
    with open_store(project.store_url)() as s:
        base = ensure_base_version(project, s)
        cycle = Cycle(trigger="test")
        s.add(cycle)
        s.flush()
        result = train_dapt(project, s, SilentReporter(), cycle_id=cycle.id)
        s.commit()
        return project, result, base.id, cycle.id


def test_general_corpus_and_mix_fraction():
    general = general_texts()
    assert len(general) >= 40 and all(20 < len(p) < 400 for p in general)
    domain = [f"domain {i}" for i in range(20)]
    rows = mix_rows(domain, general, 0.2, seed=0)
    assert sum(r["source"] == "general" for r in rows) / len(rows) == pytest.approx(0.2)
    assert sorted(r["text"] for r in rows if r["source"] == "domain") == sorted(domain)
    assert all(r["text"] in general for r in rows if r["source"] == "general")
    assert [r["source"] for r in rows] != sorted(r["source"] for r in rows)  # shuffled
    # more general rows than paragraphs: the corpus repeats, the fraction holds
    many = mix_rows([f"d{i}" for i in range(100)], general, 0.5, seed=1)
    assert sum(r["source"] == "general" for r in many) == 100
    assert all(r["source"] == "domain" for r in mix_rows(domain, general, 0.0, seed=0))
    assert n_general_rows(30, 0.25) == 10
    with pytest.raises(ConfigError):
        n_general_rows(10, 1.0)


def test_train_rows_are_the_chunks_plus_general_text(trained):
    project, result, _, _ = trained
    rows = read_jsonl(result.artifact / "train.jsonl")
    with open_store(project.store_url)() as s:
        chunks = s.scalars(select(Chunk)).all()
    domain = [r["text"] for r in rows if r["source"] == "domain"]
    assert sorted(domain) == sorted(c.text for c in chunks) and len(chunks) > 5
    n_general = len(rows) - len(domain)
    assert n_general == round(len(domain) * 0.2 / 0.8)
    assert result.version.hyperparams["n_domain"] == len(domain)
    assert result.version.hyperparams["n_general"] == n_general


def test_max_chunks_samples_a_seeded_subset(trained):
    project, _, _, _ = trained
    with open_store(project.store_url)() as s:
        every = dapt_stage.domain_chunks(s)
        some = dapt_stage.domain_chunks(s, limit=3, seed=7)
        assert len(some) == 3 and {c.id for c in some} < {c.id for c in every}
        assert [c.id for c in some] == [c.id for c in every if c.id in {x.id for x in some}]  # document order
        assert [c.id for c in dapt_stage.domain_chunks(s, limit=3, seed=7)] == [c.id for c in some]
        assert dapt_stage.domain_chunks(s, limit=len(every) + 5) == every


def _lm_loss(model, tokenizer, texts) -> float:
    losses = []
    with torch.no_grad():
        for t in texts:
            ids = tokenizer(t, return_tensors="pt", truncation=True, max_length=512)["input_ids"]
            losses.append(model(input_ids=ids, labels=ids).loss.item())
    return sum(losses) / len(losses)


def test_training_lowers_the_lm_loss_on_the_chunks(trained, lm_model_dir):
    from peft import PeftModel

    project, result, _, _ = trained
    with open_store(project.store_url)() as s:
        texts = [c.text for c in s.scalars(select(Chunk))]
    tokenizer = load_tokenizer(lm_model_dir)
    base = AutoModelForCausalLM.from_pretrained(str(lm_model_dir)).eval()
    before = _lm_loss(base, tokenizer, texts)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(lm_model_dir)),
                                      str(result.artifact)).eval()
    after = _lm_loss(tuned, tokenizer, texts)
    assert after < before - 0.3, (before, after)
    history = json.loads((result.artifact / "log_history.json").read_text())
    losses = [h["loss"] for h in history if "loss" in h]
    assert result.first_loss == losses[0] and result.last_loss == losses[-1] < losses[0]


def test_training_changes_the_adapter(trained):
    _, result, _, _ = trained
    tensors = load_file(str(result.artifact / "adapter_model.safetensors"))
    b_mats = {k: v for k, v in tensors.items() if "lora_B" in k}
    assert b_mats and all(abs(v).max() > 0 for v in b_mats.values())  # PEFT starts lora_B at zero


def test_registers_an_intermediate_dapt_version(trained):
    project, result, base_id, cycle_id = trained
    with open_store(project.store_url)() as s:
        versions = s.scalars(select(ModelVersion).order_by(ModelVersion.id)).all()
        assert [(v.method, v.status) for v in versions] == [("base", "champion"), ("dapt", "intermediate")]
        v = versions[1]
        assert v.parent_id == base_id and v.cycle_id == cycle_id and v.training_example_ids == []
        assert v.adapter_path == str(result.artifact)
        assert len(v.hyperparams["chunk_ids_hash"]) == 16
        assert read_meta(result.artifact)["stage"] == "dapt"
        assert s.scalar(select(Artifact).where(Artifact.path == str(result.artifact))).kind == "adapter"
        assert dapt_parent(s, cycle_id).id == v.id
        assert dapt_parent(s, None) is None and dapt_parent(s, cycle_id + 1) is None
        # rerunning the finished step registers nothing new
        again = train_dapt(project, s, SilentReporter(), cycle_id=cycle_id)
        assert again.version.id == v.id
        assert s.scalar(select(ModelVersion).where(ModelVersion.status == "candidate")) is None


def test_cli_lists_an_intermediate_version(trained, monkeypatch):
    from tuneloop.cli import app

    project = trained[0]
    monkeypatch.setenv("COLUMNS", "200")
    runner = CliRunner()
    for args in (["status", "-p", str(project.root)], ["models", "-p", str(project.root)]):
        out = runner.invoke(app, args, catch_exceptions=True)
        assert out.exit_code == 0, (out.output, out.exception)
        assert "intermediate" in out.output and "dapt" in out.output


def test_dapt_needs_a_champion_and_chunks(project):
    p = project(pairs=False)
    with open_store(p.store_url)() as s:
        with pytest.raises(StateError, match="champion"):
            train_dapt(p, s, SilentReporter())
        ensure_base_version(p, s)
        with pytest.raises(StateError, match="ingest"):
            train_dapt(p, s, SilentReporter())


def test_interrupted_run_resumes_from_its_last_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    p = make_project(tmp_path / "p", tiny_model_dir,
                     deep_merge(FAST, {"sft": {"save_steps": 1}, "continual": {"dapt_epochs": 1}}))

    class Crash(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):  # killed right after checkpoint-2 is written
            if state.global_step == 2:
                raise KeyboardInterrupt("killed")

    real = dapt_stage.build_trainer
    trainers = []

    def build(*a, **kw):
        trainer, tok = real(*a, **kw)
        if not trainers:
            trainer.add_callback(Crash())
        trainers.append(trainer)
        return trainer, tok

    monkeypatch.setattr(dapt_stage, "build_trainer", build)
    with open_store(p.store_url)() as s:
        ensure_base_version(p, s)
        s.commit()
        with pytest.raises(KeyboardInterrupt):
            train_dapt(p, s, SilentReporter(), name="dapt-run")
    work = p.artifacts / ".work" / "dapt-run"
    assert (work / "checkpoint-2" / "trainer_state.json").is_file()
    reporter = RecordingReporter()
    with open_store(p.store_url)() as s:
        result = train_dapt(p, s, reporter, name="dapt-run")
        s.commit()
    assert any("resuming training from" in m and "checkpoint-2" in m for m in reporter.messages)
    total = trainers[1].state.global_step
    assert total > 2 and trainers[1].state.max_steps == total
    history = json.loads((result.artifact / "log_history.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == list(range(1, total + 1))
    assert reporter.tasks[0][1] == total and reporter.tasks[0][2][0] == 2  # progress starts at step 2
    assert not work.exists()


def test_cycle_runs_dapt_before_sft_and_sft_continues_it(project, monkeypatch):
    from sqlalchemy import select as _select

    from tests.helpers import FakeTeacher, use_teacher
    from tuneloop import loop
    from tuneloop.progress import SilentReporter
    from tuneloop.store import CycleStep, ModelVersion, open_store

    p = project({"continual": {"dapt": True}})
    use_teacher(monkeypatch, FakeTeacher())
    cycle = loop.run_cycle(p, SilentReporter(), trigger="test")
    with open_store(p.store_url)() as s:
        versions = {v.method: v for v in s.scalars(_select(ModelVersion))}
        dapt, sft = versions["dapt"], versions["sft"]
        assert dapt.status == "intermediate" and sft.parent_id == dapt.id and sft.cycle_id == cycle.id
        step = s.scalar(_select(CycleStep).where(CycleStep.cycle_id == cycle.id, CycleStep.name == "sft"))
        assert step.result["parent"] == dapt.name
        assert sft.status in ("champion", "rejected")  # the gate judged the SFT candidate, not the dapt one
