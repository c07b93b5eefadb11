"""Stage (optional): domain-adaptive pre-training (DAPT) of the student on the raw document chunks.

A LoRA causal-LM pass (loss on every token) over the text of the project's chunks, mixed with
general everyday prose (`tuneloop/sample/general.txt`, written for tuneloop) so that general rows
make up `continual.dapt_general_fraction` of the mix, which limits forgetting. With
`continual.dapt_max_chunks` set, a seeded random sample of that many chunks is used. It continues the
champion's adapter (or starts a new LoRA with the `lora` settings when the champion is the base
model) and uses the SFT optimiser settings, for `continual.dapt_epochs` epochs.

The result is an intermediate version (status "intermediate", method "dapt"): the gate never
judges it; SFT in the same cycle continues from it (`dapt_parent`). A killed run resumes from its
last checkpoint, like SFT.
"""
from __future__ import annotations

import random
from functools import partial
from importlib import resources
from pathlib import Path

from sqlalchemy import select

from tuneloop.config import LoraSettings, Project, SFTSettings
from tuneloop.errors import ConfigError, StateError
from tuneloop.progress import Reporter
from tuneloop.stages.common import training_parent
from tuneloop.stages.methods import METHODS
from tuneloop.stages.policy import load_policy
from tuneloop.stages.training import (
    Run,
    Trained,
    TrainResult,
    estimated_steps,
    train_and_register,
    train_model,
    trl_rows,
)
from tuneloop.stages.training import build_trainer as build_trainer_of
from tuneloop.store import Chunk, ModelVersion, Session, text_hash

METHOD = "dapt"
STATUS = "intermediate"
DAPT = METHODS[METHOD]


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
                  epochs: float, work_dir: Path, lora: LoraSettings):
    """An SFTTrainer doing plain language modelling on the rows' "text" (loss on every token)."""
    policy = load_policy(model_dir, parent_adapter, lora, s.precision)
    return build_trainer_of(DAPT, policy, trl_rows(rows, DAPT), s, work_dir, epochs), policy.tokenizer


def train_dapt(project: Project, session: Session, reporter: Reporter, cycle_id: int | None = None,
               name: str | None = None) -> TrainResult:
    """Run DAPT from the champion; write the adapter artifact; add an intermediate "dapt" version."""
    parent = training_parent(project, session, None, "fine-tuned")
    run = Run(project, "dapt", METHOD, parent, cycle_id, name, status=STATUS)

    def train(work_dir: Path) -> Trained:
        s, c, lora = project.settings.sft, project.settings.continual, project.settings.lora
        chunks = domain_chunks(session, c.dapt_max_chunks, s.seed + (cycle_id or 0))
        if not chunks:
            raise StateError("no document chunks to pre-train on: run `tuneloop ingest` first")
        rows = mix_rows([ch.text for ch in chunks], general_texts(), c.dapt_general_fraction,
                        s.seed + (cycle_id or 0))
        build = partial(build_trainer, run.model_dir, run.parent_adapter, rows, s, c.dapt_epochs, lora=lora)
        finished = train_model(build, work_dir, DAPT.label, estimated_steps(len(rows), s, c.dapt_epochs), reporter,
                               project)
        chunk_ids = [ch.id for ch in chunks]
        n_general = sum(r["source"] == "general" for r in rows)
        hyperparams = {"n_domain": len(rows) - n_general, "n_general": n_general,
                       "max_chunks": c.dapt_max_chunks,
                       "general_fraction": c.dapt_general_fraction, "epochs": c.dapt_epochs,
                       "chunk_ids_hash": text_hash(*map(str, chunk_ids))[:16], "sft": s.model_dump(),
                       "lora": lora.model_dump()}
        return Trained(finished, rows, {"chunk_ids": chunk_ids, "hyperparams": hyperparams})

    return train_and_register(session, run, train)
