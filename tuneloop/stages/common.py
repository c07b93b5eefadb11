"""Small helpers shared by stages."""
from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from tuneloop.errors import ConfigError, StateError
from tuneloop.store import ModelVersion, Session
from tuneloop.versions import champion

if TYPE_CHECKING:
    from tuneloop.config import Project


T = TypeVar("T")


def balance_labels(items: list[T], label: Callable[[T], str | None], rng: random.Random) -> list[T]:
    """Down-sample the majority "yes"/"no" label to the minority's count (at least one of each kept);
    items whose label is None (extraction answers) are all kept, and the order is preserved.

    Contract questions are mostly answered "No" (about 80% in CUAD); trained on that mix, a small
    model learns to say "No" to everything. Used by SFT (examples) and DPO/ORPO (the chosen answer)."""
    by_label: dict[str, list[int]] = {"yes": [], "no": []}
    for i, item in enumerate(items):
        lab = label(item)
        if lab in by_label:
            by_label[lab].append(i)
    cap = max(1, min(len(v) for v in by_label.values()))
    drop = {i for v in by_label.values() if len(v) > cap for i in rng.sample(v, len(v) - cap)}
    return [item for i, item in enumerate(items) if i not in drop]


def train_losses(log_history: list[dict]) -> list[float]:
    """The logged training losses of a (TRL/transformers) trainer's log history, in order."""
    return [h["loss"] for h in log_history if "loss" in h]


def save_trained_adapter(folder: Path, trainer, tokenizer) -> None:
    """The files of a trained LoRA: the trained "default" adapter only (never a frozen copy such as
    TRL's "ref"), the tokenizer and the log history."""
    folder.mkdir(parents=True, exist_ok=True)
    trainer.model.save_pretrained(str(folder), selected_adapters=["default"])
    tokenizer.save_pretrained(str(folder))
    (folder / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=2))


def training_parent(project: Project, session: Session, parent: ModelVersion | None, purpose: str) -> ModelVersion:
    """The version a training stage continues (`parent`, else the champion), after checking that
    the student is a local model that can be trained at all (`purpose`: "fine-tuned", "aligned")."""
    if project.settings.models.student.backend != "local":
        raise ConfigError(f"models.student must be a local model to be {purpose} (backend: local)")
    parent = parent or champion(session)
    if parent is None:
        raise StateError("no champion model yet (run `tuneloop eval` or `tuneloop cycle` first)")
    return parent
