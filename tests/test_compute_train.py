"""Training on Ray Train (`compute.engine: ray`): a 2-worker CPU DDP LoRA SFT on the tiny model
on a local Ray cluster lowers the loss like a run in this process and registers a normal version;
a worker that dies mid-run is restarted from the last checkpoint; a tuneloop error in a worker
reaches the caller as itself."""
from __future__ import annotations

import json
import os
import shutil

import pytest
from safetensors.torch import load_file

from tests.helpers import (
    CONTRACTS,
    RecordingReporter,
    deep_merge,
    import_sample_pairs,
    ingest_project,
    tiny_settings,
    write_settings,
)
from tuneloop.artifacts import read_meta
from tuneloop.config import load_project
from tuneloop.errors import StateError
from tuneloop.progress import SilentReporter
from tuneloop.stages.sft import train_sft
from tuneloop.store import ModelVersion, open_store
from tuneloop.versions import ensure_base_version

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.cluster  # minutes of Ray Train: `make test-cluster`

RAY = {"engine": "ray", "workers": 2, "cpus_per_worker": 1}
SFT = {"epochs": 5, "learning_rate": 1e-2, "save_steps": 4}


@pytest.fixture
def cluster(ray_cluster):
    """The session's local Ray (tests/conftest.py): 2 CPUs, one per worker."""


def sft_project(root, tiny_model_dir, overrides: dict):
    shutil.copytree(CONTRACTS, root / "documents")
    write_settings(root, deep_merge(tiny_settings(tiny_model_dir), {"sft": SFT, "lora": {"r": 16, "alpha": 32},
                                                                    "cache_dir": str(root / "cache"), **overrides}))
    project = load_project(root)
    import_sample_pairs(project)
    return project


def train(project):
    retriever = ingest_project(project)
    with open_store(project.store_url)() as s:
        base = ensure_base_version(project, s)
        result = train_sft(project, s, retriever, SilentReporter())
        s.commit()
        version = s.get(ModelVersion, result.version.id)
        return result, (version.status, version.method, version.parent_id == base.id, version.training_example_ids)


def losses(result) -> list[float]:
    return [h["loss"] for h in json.loads((result.artifact / "log_history.json").read_text()) if "loss" in h]


def test_two_worker_ddp_sft_lowers_the_loss_like_one_process_and_registers_a_normal_version(
        cluster, tmp_path, tiny_model_dir):
    local, local_version = train(sft_project(tmp_path / "local", tiny_model_dir, {}))
    on_ray, ray_version = train(sft_project(tmp_path / "ray", tiny_model_dir, {"compute": RAY}))
    # 20 seeds, batch 4: 5 steps per epoch in one process; 2 workers take 4 rows each per step
    assert len(losses(local)) == 25 and len(losses(on_ray)) == 15  # 3 steps per epoch (20 / 8, rounded up)
    for run in (local, on_ray):
        first, last = sum(losses(run)[:3]) / 3, sum(losses(run)[-3:]) / 3
        assert last < first - 0.1, losses(run)
    assert abs(losses(on_ray)[-1] - losses(local)[-1]) < 0.5 * losses(local)[0]
    assert ray_version == local_version  # candidate, sft, child of the champion, same examples
    assert sorted(p.name for p in on_ray.artifact.iterdir()) == sorted(p.name for p in local.artifact.iterdir())
    b = {k: v for k, v in load_file(str(on_ray.artifact / "adapter_model.safetensors")).items() if "lora_B" in k}
    assert b and all(abs(v).max() > 0 for v in b.values())  # every LoRA B moved from its zero init
    meta, local_meta = read_meta(on_ray.artifact), read_meta(local.artifact)
    assert {k for k in meta if k != "created_at"} == {k for k in local_meta if k != "created_at"}
    assert not (on_ray.artifact.parent / ".work").exists() or not any((on_ray.artifact.parent / ".work").iterdir())


class DieOnce:
    """Kills its worker process right after the first checkpoint is written (once, marked by a file)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __call__(self, *args, **kwargs):
        from transformers import TrainerCallback

        marker = self.marker

        class Die(TrainerCallback):
            def on_save(self, args, state, control, **kw):
                if not os.path.exists(marker):
                    open(marker, "w").close()
                    os._exit(1)

        return Die()


def test_a_worker_that_dies_is_restarted_from_the_last_checkpoint(cluster, tmp_path, tiny_model_dir, monkeypatch):
    import tuneloop.stages.sft as sft

    marker = tmp_path / "died"
    real = sft._build

    def build_with_a_death(*args):
        trainer, tokenizer = real(*args)
        trainer.add_callback(DieOnce(str(marker))())
        return trainer, tokenizer

    monkeypatch.setattr(sft, "_build", build_with_a_death)
    result, version = train(sft_project(tmp_path / "ray", tiny_model_dir, {"compute": RAY}))
    assert marker.exists()  # a worker did die, after checkpoint-4
    assert len(losses(result)) == 15 and version[0] == "candidate"


def test_a_tuneloop_error_in_a_worker_is_raised_as_itself(cluster, tmp_path, tiny_model_dir, monkeypatch):
    import tuneloop.stages.sft as sft

    def broken(*args):
        raise StateError("the training rows could not be read")

    monkeypatch.setattr(sft, "_build", broken)
    project = sft_project(tmp_path / "ray", tiny_model_dir, {"compute": {**RAY, "max_failures": 0}})
    with pytest.raises(StateError, match="the training rows could not be read"):
        train(project)


def align_on_ray(project, tmp_path, method: str, pairs: int, align: dict | None = None):
    """A champion with an adapter, `pairs` preference pairs, then `method` trained on the 2 workers:
    (project, champion, result, the registered version)."""
    from tests.test_align import ALIGN, add_pairs, make_champion
    from tuneloop.stages.align import train_align

    p = project(deep_merge(ALIGN, {"align": align or {}, "compute": RAY}))
    with open_store(p.store_url)() as s:
        champion = make_champion(p, s, tmp_path)
        add_pairs(s, pairs)
        s.commit()
        result = train_align(p, s, None, SilentReporter(), method=method)
        s.commit()
        return p, champion, result, s.get(ModelVersion, result.version.id)


def test_dpo_on_two_workers_raises_the_margin_against_the_champion(cluster, project, tmp_path):
    from tests.test_align import mean_margin

    p, champion, result, version = align_on_ray(project, tmp_path, "dpo", 8, {"epochs": 3, "learning_rate": 1e-2})
    assert (version.method, version.status, version.parent_id) == ("dpo", "candidate", champion.id)
    meta = read_meta(result.artifact)
    assert meta["reference"] == "champion v1" and meta["global_step"] == 6  # 8 pairs / (2 workers x 2) x 3 epochs
    assert not (result.artifact / "ref").exists()  # only the trained adapter, as in one process
    model_dir = p.settings.models.student.model
    before, after = mean_margin(model_dir, champion.adapter_path), mean_margin(model_dir, result.artifact)
    assert after > before + 0.3, (before, after)


def shorter_is_better(completions, reference, **kw):
    """A GRPO reward that tells the tiny model's samples apart (its token F1 is 0 for all of them);
    module-level, so Ray's workers import it by name."""
    return [-len(c[-1]["content"]) / 100 for c in completions]


def test_grpo_with_a_metric_reward_on_two_workers(cluster, project, monkeypatch):
    from tests.helpers import deep_merge
    from tests.test_align import ALIGN
    from tuneloop.stages import align as align_stage

    monkeypatch.setattr(align_stage, "f1_reward", shorter_is_better)  # what grpo_reward hands the workers
    p = project(deep_merge(ALIGN, {"compute": RAY}))
    retriever = ingest_project(p)
    with open_store(p.store_url)() as s:
        ensure_base_version(p, s)
        s.commit()
        result = align_stage.train_align(p, s, retriever, SilentReporter(), method="grpo")
        s.commit()
        assert result.version.method == "grpo" and result.version.hyperparams["kl_beta"] == 0.04
    history = json.loads((result.artifact / "log_history.json").read_text())
    assert history[-1]["step"] == 5  # 20 prompts / (2 per step x 2 workers)
    assert any(h.get("reward_std", 0) > 0 for h in history)
    b = {k: v for k, v in load_file(str(result.artifact / "adapter_model.safetensors")).items() if "lora_B" in k}
    assert b and any(v.abs().max() > 0 for v in b.values())  # PEFT starts lora_B at zero


def test_rloo_trains_its_policy_on_two_workers(cluster, project, tmp_path):
    from tests.test_align import adapter, assert_changed

    _, champion, result, version = align_on_ray(project, tmp_path, "rloo", 8, {"learning_rate": 2e-2})
    assert version.parent_id == champion.id
    history = json.loads((result.artifact / "log_history.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == [1, 2]  # 8 prompts / (2 per step x 2 workers)
    assert any("reward" in h for h in history)
    assert_changed(adapter(champion.adapter_path), adapter(result.artifact))
    info = json.loads((result.artifact / "reward_model" / "reward_info.json").read_text())
    assert info["global_step"] == 2 and 0.0 <= info["accuracy"] <= 1.0  # also on the 2 workers: 8 pairs / (2 x 2)
    assert read_meta(result.artifact)["reference"] == "champion v1"


@pytest.mark.parametrize("method", ["orpo", "kto"])
def test_orpo_and_kto_train_the_champion_adapter_on_two_workers(cluster, project, tmp_path, method):
    from tests.test_align import adapter, assert_changed

    _, champion, result, version = align_on_ray(project, tmp_path, method, 4)
    assert (version.method, version.status, version.parent_id) == (method, "candidate", champion.id)
    history = json.loads((result.artifact / "log_history.json").read_text())
    # ORPO: 4 pairs; KTO: the same pairs unpaired, 8 rows; 2 rows per worker per step
    assert [h["step"] for h in history if "loss" in h] == ([1] if method == "orpo" else [1, 2])
    assert_changed(adapter(champion.adapter_path), adapter(result.artifact))


def test_dapt_on_two_workers_registers_an_intermediate_version(cluster, tmp_path, tiny_model_dir):
    from tests.test_dapt import FAST, make_project
    from tuneloop.stages.dapt import train_dapt

    p = make_project(tmp_path / "ray", tiny_model_dir, {**FAST, "compute": RAY})
    with open_store(p.store_url)() as s:
        base = ensure_base_version(p, s)
        result = train_dapt(p, s, SilentReporter())
        s.commit()
        version = s.get(ModelVersion, result.version.id)
        assert (version.method, version.status, version.parent_id) == ("dapt", "intermediate", base.id)
    rows = sum(1 for _ in (result.artifact / "train.jsonl").open())
    steps = -(-rows // (p.settings.sft.batch_size * 2)) * FAST["continual"]["dapt_epochs"]  # a batch per worker
    history = [h for h in json.loads((result.artifact / "log_history.json").read_text()) if "loss" in h]
    assert [h["step"] for h in history] == list(range(1, steps + 1))
    b = {k: v for k, v in load_file(str(result.artifact / "adapter_model.safetensors")).items() if "lora_B" in k}
    assert b and all(abs(v).max() > 0 for v in b.values())


def test_grpo_rewarded_by_a_local_judge_on_two_workers(cluster, project):
    """Each worker builds the judge (the tiny local model) and counts its calls; the driver adds
    up what every worker saved."""
    from tests.helpers import deep_merge
    from tests.test_align import ALIGN
    from tuneloop.stages.align import train_align

    p = project(deep_merge(ALIGN, {"align": {"reward": "judge"}, "compute": RAY}))
    retriever = ingest_project(p)
    progress = RecordingReporter()
    with open_store(p.store_url)() as s:
        ensure_base_version(p, s)
        s.commit()
        result = train_align(p, s, retriever, progress, method="grpo")
        s.commit()
        stats = result.version.hyperparams["judge_reward"]
    assert stats["calls"] == 20 * 2  # 20 seed prompts x 2 samples, half on each worker
    assert stats["judge"] == p.settings.models.judge.model and stats["unparsed"] <= stats["calls"]
    history = json.loads((result.artifact / "log_history.json").read_text())
    assert history[-1]["step"] == 5 and any("rewards/judge_reward/mean" in h for h in history)
    ((_, total, advances),) = progress.tasks
    assert total == 5 and sum(advances) == 5  # the workers' steps reached the driver's bar
