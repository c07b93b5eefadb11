"""Stage (optional): domain-adaptive pre-training (DAPT) of the student on the raw document chunks.

A LoRA causal-LM pass (loss on every token) over the text of the project's chunks, mixed with
general everyday prose (`tuneloop/sample/general.txt`, written for tuneloop) so that general rows
make up `continual.dapt_general_fraction` of the mix, which limits forgetting. With
`continual.dapt_max_chunks` set, a seeded random sample of that many chunks is used. It continues the
champion's adapter (or starts a new LoRA with the SFT LoRA settings when the champion is the base
model) and uses the SFT optimiser settings, for `continual.dapt_epochs` epochs.

The result is an intermediate version (status "intermediate", method "dapt"): the gate never
judges it; SFT in the same cycle continues from it (`dapt_parent`). A killed run resumes from its
last checkpoint, like SFT.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from sqlalchemy import select
from transformers import PrinterCallback

from tuneloop.artifacts import artifact_path, clean_leftovers, is_complete, read_meta, run_name, write_artifact
from tuneloop.config import Project, SFTSettings
from tuneloop.errors import ConfigError, StateError
from tuneloop.models.defaults import resolve_model_path
from tuneloop.progress import Reporter
from tuneloop.safety import safe_rmtree
from tuneloop.stages.common import (
    save_trained_adapter, train_losses, training_parent,
)
from tuneloop.stages.policy import device_args, load_policy
from tuneloop.stages.sft import _last_complete_checkpoint, _ProgressCallback, _steps
from tuneloop.store import Chunk, ModelVersion, Session, text_hash
from tuneloop.versions import register_adapter

KIND = "adapters"
METHOD = "dapt"
STATUS = "intermediate"


@dataclass
class DaptResult:
    version: ModelVersion
    artifact: Path
    first_loss: float | None
    last_loss: float | None


def general_texts(path: Path | None = None) -> list[str]:
    """The general-text paragraphs (blank-line separated)."""
    text = path.read_text(encoding="utf-8") if path else \
        (resources.files("tuneloop") / "sample" / "general.txt").read_text(encoding="utf-8")
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def n_general_rows(n_domain: int, fraction: float) -> int:
    """How many general rows make them `fraction` of a mix with `n_domain` domain rows."""
    if fraction <= 0 or n_domain == 0:
        return 0
    if fraction >= 1:
        raise ConfigError("continual.dapt_general_fraction must be below 1 (DAPT needs some domain text)")
    return round(n_domain * fraction / (1 - fraction))


def mix_rows(domain: list[str], general: list[str], fraction: float, seed: int) -> list[dict]:
    """Domain rows plus general rows (sampled, repeated when the corpus is too short) so that the
    general share is `fraction`; shuffled. Each row: {"text", "source": "domain" | "general"}."""
    rng = random.Random(seed)
    n = n_general_rows(len(domain), fraction)
    picked: list[str] = []
    while general and len(picked) < n:
        picked += rng.sample(general, min(len(general), n - len(picked)))
    rows = [{"text": t, "source": "domain"} for t in domain] + [{"text": t, "source": "general"} for t in picked]
    rng.shuffle(rows)
    return rows


def domain_chunks(session: Session, limit: int | None = None, seed: int = 0) -> list[Chunk]:
    """The project's chunks in document order; at most `limit` of them, a seeded random sample
    (a CPU cannot pre-train on a large corpus in one cycle: `continual.dapt_max_chunks`)."""
    chunks = list(session.scalars(select(Chunk).order_by(Chunk.document_id, Chunk.position)))
    if limit is not None and len(chunks) > limit:
        keep = set(random.Random(seed).sample(range(len(chunks)), limit))
        chunks = [c for i, c in enumerate(chunks) if i in keep]
    return chunks


def dapt_parent(session: Session, cycle_id: int | None) -> ModelVersion | None:
    """The cycle's DAPT version (the newest one), which SFT in that cycle continues; None if none."""
    if cycle_id is None:
        return None
    return session.scalars(select(ModelVersion).where(
        ModelVersion.method == METHOD, ModelVersion.status == STATUS, ModelVersion.cycle_id == cycle_id)
        .order_by(ModelVersion.id.desc())).first()


def build_trainer(model_dir: Path, parent_adapter: Path | None, rows: list[dict], s: SFTSettings,
                  epochs: float, work_dir: Path):
    """An SFTTrainer doing plain language modelling on the rows' "text" (loss on every token)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    policy = load_policy(model_dir, parent_adapter, s, s.precision)  # continues the parent's adapter
    model, peft_config, tokenizer, device, dtype = (policy.model, policy.peft_config, policy.tokenizer,
                                                    policy.device, policy.dtype)
    args = SFTConfig(
        output_dir=str(work_dir), num_train_epochs=epochs, learning_rate=s.learning_rate,
        per_device_train_batch_size=s.batch_size, gradient_accumulation_steps=s.grad_accum,
        max_length=s.max_length, seed=s.seed, logging_steps=1, report_to=[],
        save_strategy="steps", save_steps=s.save_steps, save_total_limit=1,
        disable_tqdm=True, lr_scheduler_type="cosine", warmup_steps=0.03, **device_args(device, dtype),
        dataset_num_proc=None, dataset_text_field="text", packing=False,
        completion_only_loss=False, assistant_only_loss=False,
    )
    dataset = Dataset.from_list([{"text": r["text"]} for r in rows])
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config)
    trainer.remove_callback(PrinterCallback)
    return trainer, tokenizer


def train_dapt(project: Project, session: Session, reporter: Reporter, cycle_id: int | None = None,
               name: str | None = None) -> DaptResult:
    """Run DAPT from the champion; write the adapter artifact; add an intermediate "dapt" version."""
    role = project.settings.models.student
    parent = training_parent(project, session, None, "fine-tuned")
    name = name or run_name("dapt", cycle_id)
    clean_leftovers(session, project.artifacts, KIND, "dapt")
    path = artifact_path(project.artifacts, KIND, name)
    if not is_complete(path):
        s = project.settings.sft
        c = project.settings.continual
        chunks = domain_chunks(session, c.dapt_max_chunks, s.seed + (cycle_id or 0))
        if not chunks:
            raise StateError("no document chunks to pre-train on: run `tuneloop ingest` first")
        rows = mix_rows([ch.text for ch in chunks], general_texts(), c.dapt_general_fraction,
                        s.seed + (cycle_id or 0))
        model_dir = resolve_model_path(role.model, project.cache)
        parent_adapter = Path(parent.adapter_path) if parent.adapter_path else None
        work_dir = project.artifacts / ".work" / name
        trainer, tokenizer = build_trainer(model_dir, parent_adapter, rows, s, c.dapt_epochs, work_dir)
        total = trainer.args.max_steps if trainer.args.max_steps > 0 else None
        resume = _last_complete_checkpoint(work_dir)
        with reporter.task("domain-adaptive pre-training (LoRA)",
                           total or _steps(len(rows), s.model_copy(update={"epochs": c.dapt_epochs}))) as advance:
            if resume:
                reporter.log(f"resuming training from {resume}")
                advance(int(Path(resume).name.split("-")[-1]))
            trainer.add_callback(_ProgressCallback(advance))
            trainer.train(resume_from_checkpoint=resume)
        losses = train_losses(trainer)

        def write(tmp: Path) -> None:
            save_trained_adapter(tmp, trainer, tokenizer, rows)

        chunk_ids = [ch.id for ch in chunks]
        n_general = sum(r["source"] == "general" for r in rows)
        hyperparams = {"n_domain": len(rows) - n_general, "n_general": n_general,
                       "max_chunks": c.dapt_max_chunks,
                       "general_fraction": c.dapt_general_fraction, "epochs": c.dapt_epochs,
                       "chunk_ids_hash": text_hash(*map(str, chunk_ids))[:16], "sft": s.model_dump()}
        meta = {"stage": "dapt", "cycle_id": cycle_id, "base_model": role.model, "parent": parent.name,
                "parent_adapter": parent.adapter_path, "chunk_ids": chunk_ids, "hyperparams": hyperparams,
                "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}
        path = write_artifact(project.artifacts, KIND, name, meta, write)
        safe_rmtree(work_dir, inside=project.artifacts, ignore_errors=True)
    return _register(session, path, parent, cycle_id)


def _register(session: Session, path: Path, parent: ModelVersion, cycle_id: int | None) -> DaptResult:
    meta = read_meta(path)
    version = register_adapter(
        session, path, parent, cycle_id, method=METHOD, base_model=meta["base_model"], status=STATUS,
        hyperparams=meta["hyperparams"],
        metrics={"train_first_loss": meta["first_loss"], "train_last_loss": meta["last_loss"]})
    return DaptResult(version, path, meta["first_loss"], meta["last_loss"])