"""The training runner (stages/training.py) and the method table (stages/methods.py), without a model."""
from __future__ import annotations

import ast
import json
from pathlib import Path
from types import SimpleNamespace

import dspy
import pytest
import torch
from sqlalchemy import select

import tuneloop.stages as stages_pkg
from tuneloop.artifacts import read_meta
from tuneloop.config import LoraSettings, Settings
from tuneloop.programs.dspy_bridge import PlainChatAdapter
from tuneloop.programs.judge import build_judge
from tuneloop.stages.methods import ALIGN_METHODS, GRPO_KL_BETA, METHODS, PAIR_METHODS, RLOO_KL_BETA
from tuneloop.stages.policy import lora_config
from tuneloop.stages.training import Run, Trained, finish, train_and_register, train_args
from tuneloop.store import Artifact, ModelVersion, open_store
from tuneloop.versions import ensure_base_version

TRAINING_MODULES = ("training", "methods", "policy", "sft", "sft_trainer", "dapt", "align", "align_data", "rloo",
                    "rewards")


def test_no_training_module_imports_tuneloop_inside_a_function():
    """An import inside a function hid the align <-> rloo cycle; every tuneloop import is at the top."""
    for name in TRAINING_MODULES:
        tree = ast.parse((Path(stages_pkg.__file__).parent / f"{name}.py").read_text(encoding="utf-8"))
        for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom):
                    assert not (node.module or "").startswith("tuneloop"), f"{name}.{fn.name} imports {node.module}"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_builds_its_trl_config_from_its_settings(name, tmp_path):
    m, settings = METHODS[name], Settings()
    s = settings.sft if name in ("sft", "dapt") else settings.align
    config_class, trainer_class = m.classes()
    args = config_class(**train_args(s, tmp_path, "cpu", torch.float32, sampling=m.sampling), **m.options(s))
    assert (name if name != "dapt" else "sft") in trainer_class.__name__.lower()
    assert args.learning_rate == s.learning_rate and args.save_total_limit == 1 and args.use_cpu
    group = s.num_generations if m.sampling else 1  # GRPO/RLOO: a step is prompts x sampled answers
    assert args.per_device_train_batch_size == s.batch_size * group
    if name in ("grpo", "rloo"):
        assert args.beta == {"grpo": GRPO_KL_BETA, "rloo": RLOO_KL_BETA}[name]
    elif name in ALIGN_METHODS:
        assert args.beta == s.beta


def test_the_table_says_which_methods_train_on_pairs_and_which_need_a_reference():
    assert PAIR_METHODS == ("dpo", "orpo", "rloo")
    assert {n for n, m in METHODS.items() if m.reference == "champion"} == {"dpo", "kto", "grpo", "rloo"}
    assert METHODS["orpo"].reference_note("v1") == "none (ORPO is reference-free)"


def test_a_new_adapter_takes_the_lora_section():
    cfg = lora_config(LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj"]), "SEQ_CLS")
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, set(cfg.target_modules), cfg.task_type) == \
        (4, 8, 0.0, {"q_proj"}, "SEQ_CLS")


def test_the_judge_adapter_is_the_judge_roles_choice(project):
    p = project({"models": {"judge": {"adapter": "chat"}}})
    assert type(build_judge(p, model=object()).adapter) is dspy.ChatAdapter
    assert isinstance(build_judge(project(name="plain"), model=object()).adapter, PlainChatAdapter)


class _FakeTrainer:
    """What the runner reads of a finished TRL trainer."""

    def __init__(self):
        self.state = SimpleNamespace(log_history=[{"loss": 2.0, "step": 1}, {"loss": 1.5, "step": 2}], global_step=2)
        self.model = SimpleNamespace(save_pretrained=lambda out, selected_adapters: (
            Path(out, "adapter_model.safetensors").write_bytes(b"w")))


def test_the_runner_saves_registers_and_cleans_up_once(project):
    p = project()
    calls = []

    def train(work_dir: Path) -> Trained:
        calls.append(work_dir)
        (work_dir / "checkpoint-1").mkdir(parents=True)
        tok = SimpleNamespace(save_pretrained=lambda out: Path(out, "tokenizer.json").write_text("{}"))
        return Trained(finish(_FakeTrainer(), tok, work_dir), [{"text": "a"}], {"hyperparams": {"x": 1}},
                       lambda tmp: Path(tmp, "extra.txt").write_text("more"))

    with open_store(p.store_url)() as s:
        parent = ensure_base_version(p, s)
        run = Run(p, "dapt", "dapt", parent, name="dapt-test", status="intermediate")
        first = train_and_register(s, run, train)
        again = train_and_register(s, run, train)  # complete artifact: registered once, not retrained
        s.commit()
        assert len(calls) == 1 and not calls[0].exists()  # the work folder is removed
        assert again.version.id == first.version.id and (first.first_loss, first.last_loss) == (2.0, 1.5)
        v = s.scalar(select(ModelVersion).where(ModelVersion.id == first.version.id))
        assert (v.method, v.status, v.parent_id, v.hyperparams) == ("dapt", "intermediate", parent.id, {"x": 1})
        assert s.scalar(select(Artifact).where(Artifact.path == str(first.artifact))).meta["stage"] == "dapt"
    meta = read_meta(first.artifact)
    assert meta["stage"] == "dapt" and meta["parent"] == parent.name and meta["hyperparams"] == {"x": 1}
    assert (first.artifact / "extra.txt").read_text() == "more"
    assert json.loads((first.artifact / "log_history.json").read_text())[-1]["loss"] == 1.5


def test_the_bar_follows_the_steps_a_ray_train_worker_writes(tmp_path):
    """A Ray Train worker cannot reach the driver's bar: rank 0 writes each step to a file in the
    shared work folder (StepFile) and the driver moves the bar to it while the run goes on."""
    import time

    from transformers import TrainerState

    from tuneloop.stages.training import StepFile, following_steps

    path, advances = tmp_path / "step", []
    writer, state = StepFile(path), TrainerState()

    def shown() -> int:
        return 4 + sum(advances)

    def wait_for(step: int) -> None:
        deadline = time.monotonic() + 10
        while shown() != step and time.monotonic() < deadline:
            time.sleep(0.01)
        assert shown() == step, advances

    with following_steps(path, advances.append, start=4, every_s=0.01):  # resumed from checkpoint-4
        time.sleep(0.05)
        assert advances == []  # nothing written yet
        for step in (5, 6, 9):
            state.global_step = step
            writer.on_step_end(None, state, None)
            wait_for(step)
        state.global_step = 12
        writer.on_step_end(None, state, None)  # written as the run ends: read once more at the end
    assert shown() == 12 and advances[:3] == [1, 1, 3]
    assert not (tmp_path / "step.tmp").exists() and path.read_text() == "12"
