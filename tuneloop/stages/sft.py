"""Stage: supervised LoRA fine-tuning of the student with TRL's SFTTrainer and PEFT.

Training rows are prompt-completion conversations built by `programs.rag.build_messages`, the
exact prompt used when serving, so loss is computed on the answer only (TRL's default for
prompt-completion data). On CPU training runs in fp32 (bf16 is far slower without bf16 units);
on CUDA with bf16 support it uses bf16. A killed run resumes from its last checkpoint.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from transformers import PrinterCallback, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from tuneloop.artifacts import artifact_path, clean_leftovers, is_complete, read_meta, run_name, write_artifact
from tuneloop.config import Project, SFTSettings
from tuneloop.errors import StateError
from tuneloop.metrics import yes_no_reference_label
from tuneloop.models.defaults import resolve_model_path
from tuneloop.programs.rag import Retriever, build_messages
from tuneloop.progress import Reporter
from tuneloop.safety import safe_rmtree
from tuneloop.stages.common import (
    balance_labels, save_trained_adapter, train_losses, training_parent,
)
from tuneloop.stages.policy import device_args, load_policy
from tuneloop.store import Example, ModelVersion, Session
from tuneloop.versions import register_adapter

KIND = "adapters"


@dataclass
class SFTResult:
    version: ModelVersion
    artifact: Path
    first_loss: float | None
    last_loss: float | None


def select_examples(session: Session, settings: SFTSettings, seed: int) -> tuple[list[Example], list[Example]]:
    """(new, replay): the seeds (all of them when `seeds_every_cycle`, else those no model was
    trained on yet) + the other examples no model was trained on yet, yes/no answers balanced when
    `balance_yes_no`; and a replay share of the examples earlier versions were trained on."""
    trained_on: set[int] = set()
    for ids in session.scalars(select(ModelVersion.training_example_ids)):
        trained_on.update(ids or [])
    train = session.scalars(select(Example).where(Example.split == "train").order_by(Example.id)).all()

    def always(e: Example) -> bool:  # trained on in every cycle, never replayed
        return e.kind == "seed" and settings.seeds_every_cycle

    seeds = [e for e in train if always(e)]
    new = [e for e in train if not always(e) and e.id not in trained_on]
    old = [e for e in train if not always(e) and e.id in trained_on]
    n_replay = min(len(old), round(settings.replay_fraction * max(1, len(new))))
    rng = random.Random(seed)
    replay = rng.sample(old, n_replay)
    fresh = seeds + new
    if settings.balance_yes_no:
        fresh = balance_yes_no(fresh, rng)
    return fresh, replay


def balance_yes_no(examples: list[Example], rng: random.Random) -> list[Example]:
    """Down-sample the majority yes/no answer to the minority's count (`stages.common.balance_labels`);
    extraction examples are all kept."""
    return balance_labels(examples, lambda e: yes_no_reference_label(e.answer), rng)


def training_rows(examples: list[Example], retriever: Retriever) -> list[dict]:
    rows = []
    for e in examples:
        passages = retriever.retrieve(e.question, e.document)
        rows.append({
            "prompt": build_messages(e.question, passages),
            "completion": [{"role": "assistant", "content": e.answer}],
            "example_id": e.id,
        })
    return rows


class _ProgressCallback(TrainerCallback):
    """Moves our progress bar and keeps the loss history (TRL's own tqdm bar is turned off)."""

    def __init__(self, advance):
        self.advance = advance

    def on_step_end(self, args, state, control, **kwargs):
        self.advance(1)


def _train(model_dir: Path, parent_adapter: Path | None, rows: list[dict], s: SFTSettings,
           work_dir: Path, reporter: Reporter):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    policy = load_policy(model_dir, parent_adapter, s, s.precision)  # continues the parent's adapter
    model, peft_config, tokenizer, device, dtype = (policy.model, policy.peft_config, policy.tokenizer,
                                                    policy.device, policy.dtype)
    args = SFTConfig(
        output_dir=str(work_dir), num_train_epochs=s.epochs, learning_rate=s.learning_rate,
        per_device_train_batch_size=s.batch_size, gradient_accumulation_steps=s.grad_accum,
        max_length=s.max_length, seed=s.seed, logging_steps=1, report_to=[],
        save_strategy="steps", save_steps=s.save_steps, save_total_limit=1,
        disable_tqdm=True, lr_scheduler_type="cosine", warmup_steps=0.03,
        dataset_num_proc=None, **device_args(device, dtype),
    )
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config)
    trainer.remove_callback(PrinterCallback)  # our progress bar replaces its per-step log dicts
    total = trainer.args.max_steps if trainer.args.max_steps > 0 else None
    resume = _last_complete_checkpoint(work_dir)
    with reporter.task("fine-tuning (LoRA SFT)", total or _steps(len(rows), s)) as advance:
        if resume:
            reporter.log(f"resuming training from {resume}")
            advance(int(Path(resume).name.split("-")[-1]))
        trainer.add_callback(_ProgressCallback(advance))
        trainer.train(resume_from_checkpoint=resume)
    return trainer, tokenizer


def _last_complete_checkpoint(work_dir: Path) -> str | None:
    """The newest checkpoint that was fully written, removing any a kill left half-written.

    Trainer writes a checkpoint folder in place and its trainer_state.json last; a run killed while
    saving leaves a folder without it (or with it cut short), and resuming from that folder fails
    on every later attempt.
    """
    if not work_dir.is_dir():
        return None
    while (last := get_last_checkpoint(str(work_dir))) is not None:
        try:
            json.loads((Path(last) / "trainer_state.json").read_text(encoding="utf-8"))
            return last
        except (OSError, ValueError):
            safe_rmtree(last, inside=work_dir, ignore_errors=True)
            if Path(last).exists():  # could not remove it: do not loop forever
                return None
    return None


def _steps(n_rows: int, s: SFTSettings) -> int:
    per_epoch = max(1, -(-n_rows // (s.batch_size * s.grad_accum)))
    return max(1, int(per_epoch * s.epochs + 0.999))


def train_sft(project: Project, session: Session, retriever: Retriever | None, reporter: Reporter,
              cycle_id: int | None = None, parent: ModelVersion | None = None) -> SFTResult:
    """Train a LoRA candidate from the champion (or `parent`: the cycle's DAPT version); write the
    adapter artifact; add a candidate version."""
    role = project.settings.models.student
    parent = training_parent(project, session, parent, "fine-tuned")
    name = run_name("sft", cycle_id)
    clean_leftovers(session, project.artifacts, KIND, "sft")
    path = artifact_path(project.artifacts, KIND, name)
    if not is_complete(path):
        if retriever is None:
            raise StateError("training needs the retrieval index: run `tuneloop ingest` first")
        s = project.settings.sft
        new, replay = select_examples(session, s, s.seed + (cycle_id or 0))
        if not new:
            raise StateError("no training examples: import seeds (`tuneloop seeds import`) or run `tuneloop synth`")
        rows = training_rows(new + replay, retriever)
        model_dir = resolve_model_path(role.model, project.cache)
        parent_adapter = Path(parent.adapter_path) if parent.adapter_path else None
        work_dir = project.artifacts / ".work" / name
        trainer, tokenizer = _train(model_dir, parent_adapter, rows, s, work_dir, reporter)
        losses = train_losses(trainer)

        def write(tmp: Path) -> None:
            save_trained_adapter(tmp, trainer, tokenizer, rows)

        meta = {"stage": "sft", "cycle_id": cycle_id, "base_model": role.model, "parent": parent.name,
                "parent_adapter": parent.adapter_path, "example_ids": [r["example_id"] for r in rows],
                "n_new": len(new), "n_replay": len(replay), "hyperparams": s.model_dump(),
                "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}
        path = write_artifact(project.artifacts, KIND, name, meta, write)
        safe_rmtree(work_dir, inside=project.artifacts, ignore_errors=True)
    return _register(session, path, parent, cycle_id)


def _register(session: Session, path: Path, parent: ModelVersion, cycle_id: int | None) -> SFTResult:
    meta = read_meta(path)
    version = register_adapter(
        session, path, parent, cycle_id, method="sft", base_model=meta["base_model"],
        hyperparams=meta["hyperparams"], training_example_ids=meta["example_ids"],
        metrics={"train_first_loss": meta["first_loss"], "train_last_loss": meta["last_loss"]})
    return SFTResult(version, path, meta["first_loss"], meta["last_loss"])