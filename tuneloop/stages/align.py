"""Stage: preference alignment of the student with TRL's trainers (DPO, ORPO, KTO, GRPO, RLOO).

Training continues the champion's LoRA adapter (loaded trainable). The reference model of the KL
term is the previous champion, i.e. the model as it was before this run:

* dpo, kto, grpo: when the champion has an adapter, TRL 1.16 (given a PeftModel and no ref_model)
  copies the loaded "default" adapter into a frozen adapter named "ref" and computes reference
  log-probs with it: ref = champion. When the champion is the base model, a new LoRA (the `lora`
  settings) is created and the reference is the same network with adapters disabled: the base model = champion.
  (TRL 1.16 has no `ref_adapter_name` option; this built-in copy is its mechanism.)
* orpo: reference-free by design (the odds-ratio term needs no reference model).
* rloo: classic RLHF in two phases (`stages/rloo.py`): a reward model trained on the preference
  pairs with TRL's RewardTrainer, then RLOOTrainer against it; its KL reference is the champion
  as above. TRL 1.x has no PPO trainer; RLOO is its maintained reward-model RL method.

GRPO's reward (`align.reward`, see `stages/rewards`): token F1 against the example's reference
answer ("metric"), or the AI judge's 1-5 rubric score of each sampled answer against the
retrieved excerpts ("judge"), mapped to [-1, 1].

Each method's TRL config/trainer pair and hyperparameters are its `methods.METHODS` entry; the
run (checkpoints in artifacts/.work/<run>, resume, artifact, registration) is `stages.training`.
Data and replay: see `align_data`.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from tuneloop.config import AlignSettings, LoraSettings, Project
from tuneloop.errors import ConfigError
from tuneloop.models import registry  # build_chat_model looked up at call time (tests replace it)
from tuneloop.models.registry import generation_params
from tuneloop.programs.dspy_bridge import make_adapter
from tuneloop.programs.rag import Retriever
from tuneloop.progress import Reporter
from tuneloop.safety import safe_rmtree
from tuneloop.stages.align_data import AlignData, select_align_data
from tuneloop.stages.common import training_parent
from tuneloop.stages.methods import ALIGN_METHODS, METHODS
from tuneloop.stages.policy import load_policy
from tuneloop.stages.rewards import JudgeReward, SaveJudgeCounts, f1_reward, saved_judge_stats
from tuneloop.stages.rloo import train_rloo
from tuneloop.stages.training import (
    Run,
    Trained,
    TrainResult,
    alignment_meta,
    estimated_steps,
    train_and_register,
    train_model,
)
from tuneloop.stages.training import build_trainer as build_trainer_of
from tuneloop.store import ModelVersion, Session

JUDGE_COUNTS = "judge_reward"  # the work folder's subfolder where each training process saves its judge calls


def grpo_reward(project: Project):
    """GRPO's reward function (`align.reward`): token F1 vs the reference, or the judge's rubric
    (the judge built where the policy trains: a local judge runs in each Ray Train worker)."""
    if project.settings.align.reward == "metric":
        return f1_reward
    role = project.settings.models.judge
    return JudgeReward(partial(_judge, project), generation_params(role, temperature=0.0), role.batch_size)


def _judge(project: Project):
    """The judge role's model (in the process that calls it: never a pool of Ray actors) and its adapter."""
    role = project.settings.models.judge
    return registry.build_chat_model(project, role, engine="local"), make_adapter(role.adapter, role.backend)


def build_trainer(method: str, model_dir: Path, parent_adapter: Path | None, rows: list[dict],
                  s: AlignSettings, lora: LoraSettings, work_dir: Path, reward=None):
    """The TRL trainer of `method` on `rows`, its model continuing `parent_adapter` (see module doc);
    `reward`: GRPO's reward function (token F1 when None)."""
    m = METHODS[method]
    # Continuing the champion's adapter: TRL copies it as the frozen "ref". With the base model as
    # champion, a new LoRA: ref = adapters disabled = base.
    policy = load_policy(model_dir, parent_adapter, lora, s.precision, padding_side=m.padding_side)
    extra = {"reward_funcs": [reward or f1_reward]} if method == "grpo" else {}
    return build_trainer_of(m, policy, rows, s, work_dir, **extra), policy.tokenizer


def _build_checked(method: str, model_dir: Path, parent_adapter: Path | None, rows: list[dict], s: AlignSettings,
                   lora: LoraSettings, reward, note: Callable[[str], None] | None, work_dir: Path):
    """`build_trainer`, then the check that TRL kept rows to train on (`_check_lengths`)."""
    trainer, tokenizer = build_trainer(method, model_dir, parent_adapter, rows, s, lora, work_dir, reward)
    _check_lengths(trainer, len(rows), s, note)
    if isinstance(reward, JudgeReward):
        trainer.add_callback(SaveJudgeCounts(reward, work_dir / JUDGE_COUNTS))
    return trainer, tokenizer


def _check_lengths(trainer, n_rows: int, s: AlignSettings, note: Callable[[str], None] | None) -> None:
    """TRL drops rows whose prompt alone fills `max_length`; say so, and refuse when none is left."""
    kept = len(trainer.train_dataset) if trainer.train_dataset is not None else n_rows
    if kept == 0:
        raise ConfigError(f"every one of the {n_rows} alignment prompts is longer than align.max_length "
                          f"({s.max_length} tokens), so TRL dropped them all: raise align.max_length")
    if kept < n_rows and note is not None:
        note(f"{n_rows - kept} of {n_rows} rows dropped: their prompt is longer than align.max_length "
             f"({s.max_length} tokens)")


def train_align(project: Project, session: Session, retriever: Retriever | None, reporter: Reporter,
                method: str | None = None, data_dir: Path | None = None, cycle_id: int | None = None,
                name: str | None = None, parent: ModelVersion | None = None) -> TrainResult:
    """Align a candidate from the champion (or `parent`: inside a cycle, the cycle's SFT candidate,
    which is then also the reference); write the adapter artifact; add a candidate version.

    `name` fixes the artifact/checkpoint name (default: deterministic inside a cycle, else
    timestamped), so a rerun with the same name resumes an interrupted run. Caller commits.
    """
    s = project.settings.align
    method = method or s.method
    if method not in ALIGN_METHODS:
        raise ConfigError(f"align method {method!r} is not implemented yet (use one of {', '.join(ALIGN_METHODS)})")
    parent = training_parent(project, session, parent, "aligned")
    run = Run(project, "align", method, parent, cycle_id, name)

    def train(work_dir: Path) -> Trained:
        data = select_align_data(session, method, retriever, Path(data_dir) if data_dir else None,
                                 s.replay_fraction, s.seed + (cycle_id or 0),
                                 project.settings.feedback.contradiction_rule, s.balance_yes_no)
        if method == "rloo":  # two phases (reward model, then RLOO): its own module
            return train_rloo(run, data, work_dir, reporter)
        return _train_policy(run, data, work_dir, reporter)

    return train_and_register(session, run, train)


def _train_policy(run: Run, data: AlignData, work_dir: Path, reporter: Reporter) -> Trained:
    """DPO, ORPO, KTO or GRPO on `data`, continuing the run's parent."""
    project, method = run.project, run.method
    s, m = project.settings.align, METHODS[run.method]
    rows = data.trl_rows()
    reward = grpo_reward(project) if method == "grpo" else None
    compute = project.settings.compute
    note = reporter.log if compute.engine == "local" else None  # a Ray worker cannot reach the reporter
    build = partial(_build_checked, method, run.model_dir, run.parent_adapter, rows, s, project.settings.lora,
                    reward, note)
    try:
        finished = train_model(build, work_dir, m.label, estimated_steps(len(rows), s), reporter, project)
    except ConfigError:  # nothing to train on: the trainer's empty output folder is not a checkpoint to keep
        safe_rmtree(work_dir, inside=project.artifacts, ignore_errors=True)
        raise
    hyperparams = {**s.model_dump(), "method": method, "data": data.summary()}
    if m.sampling:
        hyperparams["kl_beta"] = m.options(s)["beta"]
    if isinstance(reward, JudgeReward):
        hyperparams["judge_reward"] = saved_judge_stats(work_dir / JUDGE_COUNTS)  # every process's calls
    return Trained(finished, data.rows, alignment_meta(run, hyperparams, finished))
