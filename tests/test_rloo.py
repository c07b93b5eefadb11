"""`align --method rloo` on the tiny model: the reward model learns the toy preference, RLOO trains."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from sqlalchemy import select

from tests import test_align
from tests.test_align import (
    CHOSEN,
    QUESTIONS,
    REJECTED,
    adapter,
    assert_changed,
    prompt,
)
from tuneloop.artifacts import read_meta
from tuneloop.progress import SilentReporter
from tuneloop.stages import rloo as rloo_stage
from tuneloop.stages.align import train_align
from tuneloop.store import ModelVersion, open_store

aligned_project = test_align.aligned_project  # the fixture


def pair_rows(n: int) -> list[dict]:
    return [{"prompt": prompt(q), "chosen": [{"role": "assistant", "content": CHOSEN}],
             "rejected": [{"role": "assistant", "content": REJECTED}]} for q in QUESTIONS[:n]]


def test_reward_model_learns_the_toy_preference(aligned_project, tmp_path):
    p, _ = aligned_project({"align": {"learning_rate": 2e-2, "epochs": 2}}, pairs=0)
    s = p.settings.align
    model_dir = Path(p.settings.models.student.model)
    rows = pair_rows(8)
    tok = rloo_stage._reward_tokenizer(model_dir)
    torch.manual_seed(s.seed)  # the untrained reward model (same random score head) gets every pair wrong
    assert rloo_stage.reward_accuracy(rloo_stage._seq_cls_model(model_dir, tok, torch.float32).eval(), tok, rows) == 0
    trainer, tok = rloo_stage.build_reward_trainer(model_dir, rows, s, p.settings.lora, tmp_path / "rm")
    trainer.train()
    assert trainer.state.global_step == 8  # 8 pairs / batch 2 x 2 epochs
    assert rloo_stage.reward_accuracy(trainer.model.eval(), tok, rows) >= 0.75
    # saved and reloaded (LoRA merged): the same scores
    trainer.model.save_pretrained(str(tmp_path / "saved"))
    loaded, ltok = rloo_stage.load_reward_model(model_dir, tmp_path / "saved")
    a = rloo_stage.reward_scores(trainer.model, tok, rows[0]["prompt"], [rows[0]["chosen"], rows[0]["rejected"]])
    b = rloo_stage.reward_scores(loaded, ltok, rows[0]["prompt"], [rows[0]["chosen"], rows[0]["rejected"]])
    assert abs(a[0] - b[0]) < 1e-4 and abs(a[1] - b[1]) < 1e-4


def test_rloo_trains_the_champion_adapter_and_registers_a_candidate(aligned_project):
    p, champ_path = aligned_project({"align": {"learning_rate": 2e-2}}, pairs=4)
    with open_store(p.store_url)() as s:
        result = train_align(p, s, None, SilentReporter(), method="rloo", name="rloo-run")
        s.commit()
    history = json.loads((result.artifact / "log_history.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == [1, 2]  # 4 prompts / 2 per step
    assert any("reward" in h for h in history)
    assert_changed(adapter(champ_path), adapter(result.artifact))
    assert (result.artifact / "reward_model" / "adapter_model.safetensors").is_file()
    info = json.loads((result.artifact / "reward_model" / "reward_info.json").read_text())
    meta = read_meta(result.artifact)
    assert meta["method"] == "rloo" and meta["reference"] == "champion v1"
    assert not (p.artifacts / ".work" / "rloo-run").exists()
    with open_store(p.store_url)() as s:
        v = s.get(ModelVersion, result.version.id)
        champion = s.scalar(select(ModelVersion).where(ModelVersion.name == "v1"))
        assert (v.method, v.status, v.parent_id) == ("rloo", "candidate", champion.id)
        hp = v.hyperparams
        assert hp["reward_model_accuracy"] == info["accuracy"] and 0.0 <= info["accuracy"] <= 1.0
        assert hp["reward_model"]["n_pairs"] == 4 and hp["kl_beta"] == 0.05
        assert hp["data"]["n_fresh"] == 4 and len(hp["data"]["pair_ids"]) == 4


def test_a_killed_rloo_run_reuses_its_reward_model(aligned_project, monkeypatch):
    p, _ = aligned_project(pairs=4)
    real_build = rloo_stage.build_rloo_trainer

    def killed(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(rloo_stage, "build_rloo_trainer", killed)
    with open_store(p.store_url)() as s:
        try:
            train_align(p, s, None, SilentReporter(), method="rloo", name="rloo-run")
        except KeyboardInterrupt:
            pass
    assert (p.artifacts / ".work" / "rloo-run" / "reward_model" / "reward_info.json").is_file()

    def no_retrain(*a, **kw):
        raise AssertionError("the reward model was trained again")

    monkeypatch.setattr(rloo_stage, "build_rloo_trainer", real_build)
    monkeypatch.setattr(rloo_stage, "build_reward_trainer", no_retrain)
    with open_store(p.store_url)() as s:
        result = train_align(p, s, None, SilentReporter(), method="rloo", name="rloo-run")
        s.commit()
    assert (result.artifact / "reward_model" / "reward_info.json").is_file()
    assert result.version.method == "rloo"
