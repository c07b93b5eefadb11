"""Stage: preference alignment of the student with TRL's trainers (DPO, ORPO, KTO, GRPO, RLOO).

Training continues the champion's LoRA adapter (loaded trainable). The reference model of the KL
term is the previous champion, i.e. the model as it was before this run:

* dpo, kto, grpo: when the champion has an adapter, TRL 1.16 (given a PeftModel and no ref_model)
  copies the loaded "default" adapter into a frozen adapter named "ref" and computes reference
  log-probs with it: ref = champion. When the champion is the base model, a new LoRA is created
  and the reference is the same network with adapters disabled: the base model = champion.
  (TRL 1.16 has no `ref_adapter_name` option; this built-in copy is its mechanism.)
* orpo: reference-free by design (the odds-ratio term needs no reference model).
* rloo: classic RLHF in two phases (`stages/rloo.py`): a reward model trained on the preference
  pairs with TRL's RewardTrainer, then RLOOTrainer against it; its KL reference is the champion
  as above. TRL 1.x has no PPO trainer; RLOO is its maintained reward-model RL method.

GRPO's reward (`align.reward`, see `stages/rewards`): token F1 against the example's reference
answer ("metric"), or the AI judge's 1-5 rubric score of each sampled answer against the
retrieved excerpts ("judge"), mapped to [-1, 1].

Hyperparameters follow the papers: beta 0.1 for DPO/KTO and lambda 0.1 for ORPO
(`align.beta`), the KL coefficient 0.04 for GRPO (DeepSeekMath). fp32 on CPU (`use_cpu=True`,
bf16 off), bf16 on CUDA that has it. Checkpoints go to artifacts/.work/<run>; a killed run
resumes from its last complete checkpoint. Data and replay: see `align_data`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PrinterCallback

from tuneloop.artifacts import artifact_path, clean_leftovers, is_complete, read_meta, run_name, write_artifact
from tuneloop.config import AlignSettings, Project, SFTSettings
from tuneloop.errors import ConfigError
from tuneloop.models.defaults import resolve_model_path
from tuneloop.programs.rag import Retriever
from tuneloop.progress import Reporter
from tuneloop.safety import safe_rmtree
from tuneloop.stages.align_data import AlignData, select_align_data
from tuneloop.stages.common import (
    save_trained_adapter, train_losses, training_parent,
)
from tuneloop.stages.policy import device_args, load_policy
from tuneloop.stages.rewards import JudgeReward, f1_reward
from tuneloop.stages.sft import _last_complete_checkpoint, _ProgressCallback
from tuneloop.store import ModelVersion, Session
from tuneloop.versions import register_adapter

KIND = "adapters"
METHODS = ("dpo", "orpo", "kto", "grpo", "rloo")  # rloo: reward model + RLOO, see `rloo`
GRPO_KL_BETA = 0.04  # DeepSeekMath's GRPO KL coefficient (TRL's own default is 0: no reference)


@dataclass
class AlignResult:
    version: ModelVersion
    artifact: Path
    method: str
    first_loss: float | None
    last_loss: float | None


def _config(method: str, s: AlignSettings, work_dir: Path, device: str, dtype: torch.dtype):
    common = {
        "output_dir": str(work_dir), "num_train_epochs": s.epochs, "learning_rate": s.learning_rate,
        "per_device_train_batch_size": s.batch_size, "gradient_accumulation_steps": s.grad_accum, "seed": s.seed,
        "logging_steps": 1, "report_to": [], "save_strategy": "steps", "save_steps": s.save_steps,
        "save_total_limit": 1, "disable_tqdm": True, **device_args(device, dtype),
    }
    if method == "dpo":
        from trl import DPOConfig
        return DPOConfig(beta=s.beta, max_length=s.max_length, **common)
    if method == "orpo":
        from trl.experimental.orpo import ORPOConfig
        return ORPOConfig(beta=s.beta, max_length=s.max_length, max_completion_length=s.max_completion_length,
                          **common)
    if method == "kto":
        from trl import KTOConfig
        return KTOConfig(beta=s.beta, max_length=s.max_length, **common)
    from trl import GRPOConfig
    # One step = batch_size prompts x num_generations sampled answers (GRPO's group).
    common["per_device_train_batch_size"] = s.batch_size * s.num_generations
    return GRPOConfig(beta=GRPO_KL_BETA, num_generations=s.num_generations,
                      max_completion_length=s.max_completion_length, **common)


def grpo_reward(project: Project):
    """GRPO's reward function (`align.reward`): token F1 vs the reference, or the judge's rubric."""
    if project.settings.align.reward == "metric":
        return f1_reward
    from tuneloop.models.registry import build_chat_model, generation_params
    from tuneloop.programs.dspy_bridge import make_adapter

    role = project.settings.models.judge
    return JudgeReward(build_chat_model(project, role), make_adapter(project.settings.synth.adapter, role.backend),
                       generation_params(role, temperature=0.0), role.batch_size)


def build_trainer(method: str, model_dir: Path, parent_adapter: Path | None, rows: list[dict],
                  s: AlignSettings, lora: SFTSettings, work_dir: Path, reward=None):
    """The TRL trainer of `method` on `rows`, its model continuing `parent_adapter` (see module doc)."""
    from datasets import Dataset

    # Continuing the champion's adapter: TRL copies it as the frozen "ref". With the base model as
    # champion, a new LoRA (SFT's settings): ref = adapters disabled = base.
    policy = load_policy(model_dir, parent_adapter, lora, s.precision,
                         padding_side="left" if method == "grpo" else "right")
    model, peft_config, tokenizer, device, dtype = (policy.model, policy.peft_config, policy.tokenizer,
                                                    policy.device, policy.dtype)
    args = _config(method, s, work_dir, device, dtype)
    dataset = Dataset.from_list(rows)
    kw = {"model": model, "args": args, "train_dataset": dataset, "processing_class": tokenizer,
          "peft_config": peft_config}
    if method == "dpo":
        from trl import DPOTrainer as Trainer
    elif method == "orpo":
        from trl.experimental.orpo import ORPOTrainer as Trainer
    elif method == "kto":
        from trl import KTOTrainer as Trainer
    else:
        from trl import GRPOTrainer as Trainer
        kw["reward_funcs"] = [reward or f1_reward]
    trainer = Trainer(**kw)
    trainer.remove_callback(PrinterCallback)
    return trainer, tokenizer


def _check_lengths(trainer, n_rows: int, s: AlignSettings, reporter: Reporter) -> None:
    """TRL drops rows whose prompt alone fills `max_length`; say so, and refuse when none is left."""
    kept = len(trainer.train_dataset) if trainer.train_dataset is not None else n_rows
    if kept == 0:
        raise ConfigError(f"every one of the {n_rows} alignment prompts is longer than align.max_length "
                          f"({s.max_length} tokens), so TRL dropped them all: raise align.max_length")
    if kept < n_rows:
        reporter.log(f"{n_rows - kept} of {n_rows} rows dropped: their prompt is longer than align.max_length "
                     f"({s.max_length} tokens)")


def _train(trainer, work_dir: Path, n_rows: int, s: AlignSettings, reporter: Reporter, method: str):
    total = trainer.args.max_steps if trainer.args.max_steps > 0 else None
    if total is None:
        per_epoch = max(1, -(-n_rows // (s.batch_size * s.grad_accum)))
        total = max(1, int(per_epoch * s.epochs + 0.999))
    resume = _last_complete_checkpoint(work_dir)
    with reporter.task(f"aligning ({method.upper()}, LoRA)", total) as advance:
        if resume:
            reporter.log(f"resuming training from {resume}")
            advance(int(Path(resume).name.split("-")[-1]))
        trainer.add_callback(_ProgressCallback(advance))
        trainer.train(resume_from_checkpoint=resume)


def train_align(project: Project, session: Session, retriever: Retriever | None, reporter: Reporter,
                method: str | None = None, data_dir: Path | None = None, cycle_id: int | None = None,
                name: str | None = None, parent: ModelVersion | None = None) -> AlignResult:
    """Align a candidate from the champion (or `parent`: inside a cycle, the cycle's SFT candidate,
    which is then also the reference); write the adapter artifact; add a candidate version.

    `name` fixes the artifact/checkpoint name (default: deterministic inside a cycle, else
    timestamped), so a rerun with the same name resumes an interrupted run. Caller commits.
    """
    s = project.settings.align
    method = method or s.method
    if method not in METHODS:
        raise ConfigError(f"align method {method!r} is not implemented yet (use one of {', '.join(METHODS)})")
    parent = training_parent(project, session, parent, "aligned")
    name = name or run_name(f"align-{method}", cycle_id)
    clean_leftovers(session, project.artifacts, KIND, f"align-{method}")
    path = artifact_path(project.artifacts, KIND, name)
    if not is_complete(path):
        data = select_align_data(session, method, retriever, Path(data_dir) if data_dir else None,
                                 s.replay_fraction, s.seed + (cycle_id or 0),
                                 project.settings.feedback.contradiction_rule, s.balance_yes_no)
        path = _run(project, method, data, parent, name, cycle_id, reporter)
    return _register(session, path, parent, cycle_id)


def _run(project: Project, method: str, data: AlignData, parent: ModelVersion, name: str,
         cycle_id: int | None, reporter: Reporter) -> Path:
    if method == "rloo":  # two phases (reward model, then RLOO): its own module
        from tuneloop.stages.rloo import run_rloo
        return run_rloo(project, data, parent, name, cycle_id, reporter)
    s = project.settings.align
    role = project.settings.models.student
    model_dir = resolve_model_path(role.model, project.cache)
    parent_adapter = Path(parent.adapter_path) if parent.adapter_path else None
    work_dir = project.artifacts / ".work" / name
    rows = data.trl_rows()
    reward = grpo_reward(project) if method == "grpo" else None
    trainer, tokenizer = build_trainer(method, model_dir, parent_adapter, rows, s, project.settings.sft, work_dir,
                                       reward)
    try:
        _check_lengths(trainer, len(rows), s, reporter)
    except ConfigError:  # nothing to train on: the trainer's empty output folder is not a checkpoint to keep
        safe_rmtree(work_dir, inside=project.artifacts, ignore_errors=True)
        raise
    _train(trainer, work_dir, len(rows), s, reporter, method)
    losses = train_losses(trainer)

    def write(tmp: Path) -> None:
        save_trained_adapter(tmp, trainer, tokenizer, data.rows)

    summary = data.summary()
    hyperparams = {**s.model_dump(), "method": method, "data": summary}
    if method == "grpo":
        hyperparams["kl_beta"] = GRPO_KL_BETA
        if isinstance(reward, JudgeReward):
            hyperparams["judge_reward"] = {"judge": reward.judge.name, **reward.stats()}
    meta = {"stage": "align", "method": method, "cycle_id": cycle_id, "base_model": role.model,
            "parent": parent.name, "parent_adapter": parent.adapter_path,
            "reference": "none (ORPO is reference-free)" if method == "orpo" else f"champion {parent.name}",
            "hyperparams": hyperparams, "global_step": trainer.state.global_step,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}
    path = write_artifact(project.artifacts, KIND, name, meta, write)
    safe_rmtree(work_dir, inside=project.artifacts, ignore_errors=True)
    return path


def _register(session: Session, path: Path, parent: ModelVersion, cycle_id: int | None) -> AlignResult:
    meta = read_meta(path)
    version = register_adapter(
        session, path, parent, cycle_id, method=meta["method"], base_model=meta["base_model"],
        hyperparams=meta["hyperparams"], artifact_meta={"stage": "align", "method": meta["method"]},
        metrics={"train_first_loss": meta["first_loss"], "train_last_loss": meta["last_loss"]})
    return AlignResult(version, path, meta["method"], meta["first_loss"], meta["last_loss"])