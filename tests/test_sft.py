"""LoRA SFT on the tiny model: it learns, it trains on the serving prompt, it registers a candidate."""
from __future__ import annotations

import json
import shutil

import pytest
from safetensors.numpy import load_file
from sqlalchemy import select

from tests.helpers import CONTRACTS, deep_merge, import_sample_pairs, ingest_project, tiny_settings, write_settings
from tuneloop.artifacts import read_jsonl, read_meta
from tuneloop.config import load_project
from tuneloop.errors import StateError
from tuneloop.programs.rag import build_messages
from tuneloop.progress import SilentReporter
from tuneloop.stages.sft import train_sft
from tuneloop.store import Artifact, Example, ModelVersion, open_store
from tuneloop.versions import ensure_base_version


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """One SFT run shared by the tests of this module (training is the slow part)."""
    root = tmp_path_factory.mktemp("sft-project")
    shutil.copytree(CONTRACTS, root / "documents")
    write_settings(root, deep_merge(tiny_settings(tiny_model_dir),
                                    {"sft": {"epochs": 5, "learning_rate": 1e-2, "save_steps": 1000},
                                     "lora": {"r": 16, "alpha": 32}, "tracking": {"report_to": ["tensorboard"]},
                                     "cache_dir": str(root / "cache")}))
    project = load_project(root)
    import_sample_pairs(project)
    retriever = ingest_project(project)
    with open_store(project.store_url)() as s:
        base = ensure_base_version(project, s)
        result = train_sft(project, s, retriever, SilentReporter())
        s.commit()
        return project, retriever, result, base.id


def test_training_lowers_the_loss(trained):
    _, _, result, _ = trained
    history = json.loads((result.artifact / "log_history.json").read_text())
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 25  # 20 seeds / batch 4 = 5 steps per epoch, 5 epochs, logged every step
    k = 5
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    # Step-to-step noise is about 0.05 nats here; the decrease is about 0.2.
    assert last < first - 0.1, losses
    assert result.first_loss == losses[0] and result.last_loss == losses[-1]


def test_training_changes_the_adapter_weights(trained):
    _, _, result, _ = trained
    tensors = load_file(str(result.artifact / "adapter_model.safetensors"))
    b_mats = {k: v for k, v in tensors.items() if "lora_B" in k}
    assert b_mats, sorted(tensors)[:5]
    # PEFT initialises every lora_B to zero; training must have moved all of them.
    assert all(abs(v).max() > 0 for v in b_mats.values())
    assert (result.artifact / "adapter_config.json").is_file()


def test_training_prompt_equals_serving_prompt(trained):
    project, retriever, result, _ = trained
    rows = read_jsonl(result.artifact / "train.jsonl")
    with open_store(project.store_url)() as s:
        examples = {e.id: e for e in s.scalars(select(Example))}
        seeds = {e.id for e in examples.values() if e.kind == "seed" and e.split == "train"}
    trained_ids = {r["example_id"] for r in rows}
    assert trained_ids <= seeds  # only seeds, never held-out items
    # balance_yes_no drops the surplus of the majority Yes/No answer (5 Yes vs 3 No in the sample).
    labels = [examples[i].answer for i in seeds]
    assert len(seeds - trained_ids) == abs(labels.count("Yes") - labels.count("No")) > 0
    assert all(examples[i].answer == "Yes" for i in seeds - trained_ids)
    for row in rows:
        e = examples[row["example_id"]]
        assert row["prompt"] == build_messages(e.question, retriever.retrieve(e.question, e.document))
        assert row["completion"] == [{"role": "assistant", "content": e.answer}]
        # the retrieved context comes from the example's own document
        assert e.document and "[1] " in row["prompt"][1]["content"]


def test_registers_a_candidate_whose_parent_is_the_champion(trained):
    project, _, result, base_id = trained
    with open_store(project.store_url)() as s:
        versions = s.scalars(select(ModelVersion).order_by(ModelVersion.id)).all()
        assert [(v.name, v.method, v.status) for v in versions] == [
            ("base", "base", "champion"), (result.version.name, "sft", "candidate")]
        cand = versions[1]
        assert cand.parent_id == base_id
        assert cand.adapter_path == str(result.artifact)
        assert sorted(cand.training_example_ids) == sorted(read_meta(result.artifact)["example_ids"])
        assert s.scalar(select(Artifact).where(Artifact.path == str(result.artifact))).kind == "adapter"
    assert not (project.artifacts / ".work").exists() or not any((project.artifacts / ".work").iterdir())


def test_sft_without_champion_or_examples_is_a_state_error(project):
    p = project(pairs=False)
    retriever = ingest_project(p)
    with open_store(p.store_url)() as s:
        with pytest.raises(StateError, match="champion"):
            train_sft(p, s, retriever, SilentReporter())
        ensure_base_version(p, s)
        with pytest.raises(StateError, match="no training examples"):
            train_sft(p, s, retriever, SilentReporter())


def test_balance_yes_no_caps_the_majority_answer_and_keeps_extractions():
    import random

    from tuneloop.stages.sft import balance_yes_no

    rows = [Example(id=i, kind="seed", split="train", question=f"q{i}", answer=a, content_hash=str(i))
            for i, a in enumerate(["No"] * 8 + ["Yes"] * 2 + ["the laws of Ontario", "30 days"])]
    kept = balance_yes_no(rows, random.Random(0))
    answers = [e.answer for e in kept]
    assert answers.count("No") == 2 and answers.count("Yes") == 2
    assert "the laws of Ontario" in answers and "30 days" in answers
    only_no = [e for e in rows if e.answer == "No"]
    assert [e.answer for e in balance_yes_no(only_no, random.Random(0))] == ["No"]


def test_balance_kinds_repeats_the_rarer_kind_up_to_its_share_and_the_cap():
    from tuneloop.stages.sft import balance_kinds

    def rows(n_yes_no: int, n_extract: int) -> list[Example]:
        answers = ["Yes", "No"] * (n_yes_no // 2) + [f"clause {i}" for i in range(n_extract)]
        return [Example(id=i, kind="seed", split="train", question=f"q{i}", answer=a, content_hash=str(i))
                for i, a in enumerate(answers)]

    mixed = rows(20, 4)  # extraction is 1/6: repeated (round-robin) to 30% of the rows
    out = balance_kinds(mixed, 0.3)
    extract = [e for e in out if e.answer not in ("Yes", "No")]
    assert out[: len(mixed)] == mixed and len(extract) == 9 and len(extract) / len(out) >= 0.3
    assert max(extract.count(e) for e in extract) - min(extract.count(e) for e in extract) <= 1
    capped = balance_kinds(rows(100, 2), 0.3)  # 2 extraction examples: at most 4 showings each
    assert sum(e.answer.startswith("clause") for e in capped) == 8
    assert balance_kinds(mixed, 0.0) == mixed  # off
    met, single = rows(6, 12), rows(0, 3)
    assert balance_kinds(met, 0.3) == met and balance_kinds(single, 0.3) == single  # share met; one kind only


def test_activation_checkpointing_only_on_cuda():
    """TRL checkpoints activations by default; on CPU that recomputes every forward pass for no
    memory the run needs, so the trainers' arguments turn it off there."""
    import torch

    from tuneloop.stages.policy import device_args

    cpu, cuda = device_args("cpu", torch.float32), device_args("cuda", torch.bfloat16)
    assert cpu["gradient_checkpointing"] is False and cpu["use_cpu"] and not cpu["bf16"]
    assert cuda["gradient_checkpointing"] is True and cuda["bf16"] and not cuda["use_cpu"]


def test_the_trainer_reports_to_tensorboard_beside_the_project(trained):
    """tracking.report_to: tensorboard: the run's scalars in <project>/runs/<run>, which outlives
    the run's work folder; the same losses as the run's log history."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    project, _, result, _ = trained
    events = EventAccumulator(str(project.root / "runs" / result.artifact.name))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    history = [(h["step"], h["loss"]) for h in json.loads((result.artifact / "log_history.json").read_text())
               if "loss" in h]
    assert [s for s, _ in logged] == [s for s, _ in history] and len(logged) == 25
    assert [v for _, v in logged] == pytest.approx([v for _, v in history], rel=1e-6)


def test_a_logger_whose_package_is_missing_is_a_config_error_naming_it(project):
    import importlib.util

    from tuneloop.errors import ConfigError

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here: this test needs a machine without it (as make test's venv)")
    p = project({"tracking": {"report_to": ["wandb"]}})
    retriever = ingest_project(p)
    with open_store(p.store_url)() as s:
        ensure_base_version(p, s)
        with pytest.raises(ConfigError, match=r"tracking.report_to: wandb cannot be used here .*pip install wandb"):
            train_sft(p, s, retriever, SilentReporter())
