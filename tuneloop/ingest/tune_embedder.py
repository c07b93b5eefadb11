"""A retriever that learns: fine-tune the dense embedder on (question, evidence passage) pairs.

`training_pairs` turns examples that carry evidence (the answer text, or for a yes/no question
the highlighted clauses in `meta["references"]`) into (query, positive passage) pairs: the
positive is the stored chunk of the example's document that holds the evidence, by the rule of
`metrics.retrieval_hit` (a chunk holds a reference when it contains at least half of the
reference's distinct normalised tokens). Examples whose evidence no chunk holds are skipped and
counted by reason.

`finetune_embedder` trains a sentence-transformers model on the pairs with
`MultipleNegativesRankingLoss` (every other positive in the batch is a negative; with mined hard
negatives, a same-document chunk the base model ranks high but that does not hold the evidence
is one more), through `SentenceTransformerTrainer`, and writes the model as an artifact folder
(atomic: temporary folder, then rename; `meta.json` records base model, pairs, loss before and
after, seconds). Its folder name is the embedder's name (`LocalEmbedder`), so an index built
with it cannot be loaded with another embedder. The index's chunk vectors must be re-embedded
with the new model: `HybridIndex.build` with a `LocalEmbedder` of the artifact.
"""
from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tuneloop.artifacts import read_meta, write_artifact
from tuneloop.errors import InputError
from tuneloop.evalsets import references
from tuneloop.metrics import is_yes_no_reference, retrieval_hit
from tuneloop.models.base import Embedder
from tuneloop.safety import safe_rmtree
from tuneloop.store import Example

EMBEDDER_KIND = "embedders"  # artifacts/embedders/<name>/: fine-tuned embedders

# Why an example gave no pair (`PairSet.skipped`).
NO_DOCUMENT = "no_document"  # the example names no document, or one the store does not hold
NO_EVIDENCE = "no_evidence"  # a yes/no answer without evidence clauses: nothing to locate
NOT_LOCATED = "not_located"  # no chunk of its document holds the evidence
NO_NEGATIVE = "no_negative"  # hard negatives asked for, but every chunk of the document holds the evidence


@dataclass(frozen=True)
class TrainingPair:
    query: str
    positive: str  # a chunk text holding the evidence
    document: str
    negative: str | None = None  # a chunk of the same document that holds none of the evidence


@dataclass(frozen=True)
class PairSet:
    pairs: list[TrainingPair]
    examples: int  # examples read
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> examples without a pair


@dataclass(frozen=True)
class EmbedderTuneResult:
    path: Path  # the model folder (a sentence-transformers model + meta.json)
    name: str  # the embedder's name, as an index records it
    base_model: str
    pairs: int
    hard_negatives: bool
    loss_before: float  # MultipleNegativesRankingLoss on the training pairs before training
    loss_after: float
    steps: int
    seconds: float


def evidence_texts(example: Example) -> list[str]:
    """The texts a passage must hold to answer `example`: the answer and the evidence spans, or
    for a yes/no answer only the evidence spans (the rule of `metrics.retrieval_hit`)."""
    refs = references(example)
    wanted = refs[1:] if is_yes_no_reference(refs[0]) else refs
    return [r for r in dict.fromkeys(wanted) if r.strip()]


def _holds(passage: str, reference: str) -> bool:
    return retrieval_hit([passage], [reference]) == 1.0


def training_pairs(
    examples: Sequence[Example],
    chunks: Sequence[tuple[int, str, str]],
    max_positives: int = 3,
    negatives_from: Embedder | None = None,
) -> PairSet:
    """(question, evidence chunk) pairs from `examples` and the store's `chunks`
    (`ingest.index.stored_chunks` rows: id, document, text).

    Each evidence text gives the first chunk of the document (in id order) that holds it; an
    example gives at most `max_positives` distinct chunks, one pair each. With `negatives_from`
    (the base embedder), each pair also gets a hard negative: the chunk of the same document that
    this embedder ranks highest for the question among those holding none of the evidence.
    """
    if max_positives < 1:
        raise ValueError(f"max_positives must be at least 1, got {max_positives}")
    by_document: dict[str, list[str]] = {}
    for _, document, text in chunks:
        by_document.setdefault(document, []).append(text)
    vectors: dict[str, np.ndarray] = {}  # document -> its chunks' vectors (hard negatives only)
    pairs: list[TrainingPair] = []
    skipped: Counter[str] = Counter()
    for ex in examples:
        texts = by_document.get(ex.document or "")
        wanted = evidence_texts(ex)
        if not texts:
            skipped[NO_DOCUMENT] += 1
            continue
        if not wanted:
            skipped[NO_EVIDENCE] += 1
            continue
        positives: list[int] = []
        for ref in wanted:
            found = next((i for i, t in enumerate(texts) if _holds(t, ref)), None)
            if found is not None and found not in positives:
                positives.append(found)
        positives = positives[:max_positives]
        if not positives:
            skipped[NOT_LOCATED] += 1
            continue
        negative = None
        if negatives_from is not None:
            others = [i for i, t in enumerate(texts) if not any(_holds(t, r) for r in wanted)]
            if not others:
                skipped[NO_NEGATIVE] += 1
                continue
            if ex.document not in vectors:
                vectors[ex.document] = np.asarray(negatives_from.embed(texts), dtype=np.float32)
            query = np.asarray(negatives_from.embed([ex.question]), dtype=np.float32)[0]
            scores = vectors[ex.document][others] @ query
            negative = texts[others[int(np.argmax(scores))]]
        pairs.extend(TrainingPair(ex.question, texts[i], ex.document, negative) for i in positives)
    return PairSet(pairs, len(examples), dict(skipped))


def finetune_embedder(
    base_dir: Path,
    pairs: Sequence[TrainingPair],
    root: Path,
    name: str,
    epochs: float = 1.0,
    batch_size: int = 16,
    lr: float = 2e-5,
    seed: int = 0,
) -> EmbedderTuneResult:
    """Fine-tune the sentence-transformers model at `base_dir` on `pairs` and write it to
    `root/embedders/name` (an existing complete artifact there is returned as it is).

    Loss: `MultipleNegativesRankingLoss`; batches never hold the same text twice (a repeated
    passage would be its own false negative). Hard negatives are used when every pair has one.
    fp32 on CPU, no hub access, no reporting."""
    import torch
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import (  # the 6.x path (the lock pins 6.2)
        MultipleNegativesRankingLoss,
    )
    from transformers import PrinterCallback

    from tuneloop.models.local import pick_device

    if not pairs:
        raise InputError("no training pairs: no example's evidence was found in its document's chunks")
    if batch_size < 2:
        raise ValueError(f"batch_size must be at least 2 (in-batch negatives), got {batch_size}")
    if epochs <= 0 or lr <= 0:
        raise ValueError(f"epochs and lr must be positive, got {epochs} and {lr}")
    if not (Path(base_dir) / "modules.json").is_file():
        raise InputError(f"not a sentence-transformers model folder: {base_dir}")
    hard = all(p.negative is not None for p in pairs)
    columns: dict[str, list[Any]] = {"anchor": [p.query for p in pairs], "positive": [p.positive for p in pairs]}
    if hard:
        columns["negative"] = [p.negative for p in pairs]
    dataset = Dataset.from_dict(columns)
    meta: dict[str, Any] = {"base_model": str(base_dir), "pairs": len(pairs), "hard_negatives": hard,
                            "loss": "MultipleNegativesRankingLoss", "epochs": epochs, "batch_size": batch_size,
                            "learning_rate": lr, "seed": seed}

    def write(tmp: Path) -> None:
        # write_artifact writes `meta` to meta.json after this returns: what training measured goes in
        started = time.monotonic()
        torch.manual_seed(seed)
        model = SentenceTransformer(str(base_dir), device=pick_device())
        work = tmp / ".trainer"
        args = SentenceTransformerTrainingArguments(
            output_dir=str(work), num_train_epochs=epochs, per_device_train_batch_size=batch_size,
            per_device_eval_batch_size=batch_size, learning_rate=lr, warmup_steps=0.1, seed=seed,
            data_seed=seed, batch_sampler="no_duplicates", save_strategy="no",
            eval_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
            fp16=False, bf16=False, dataloader_num_workers=0, dataloader_pin_memory=pick_device() == "cuda",
        )
        trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset,
                                             loss=MultipleNegativesRankingLoss(model))
        trainer.remove_callback(PrinterCallback)  # no per-step log dicts on stdout
        meta["loss_before"] = float(trainer.evaluate()["eval_loss"])
        meta["steps"] = int(trainer.train().global_step)
        meta["loss_after"] = float(trainer.evaluate()["eval_loss"])
        safe_rmtree(work, inside=tmp, ignore_errors=True)
        model.save(str(tmp))
        meta["seconds"] = round(time.monotonic() - started, 1)

    path = write_artifact(Path(root), EMBEDDER_KIND, name, meta, write)
    recorded = read_meta(path)  # an artifact already complete at that name is returned as it is
    return EmbedderTuneResult(
        path=path, name=path.name, base_model=str(recorded["base_model"]), pairs=int(recorded["pairs"]),
        hard_negatives=bool(recorded["hard_negatives"]), loss_before=float(recorded.get("loss_before", math.nan)),
        loss_after=float(recorded.get("loss_after", math.nan)), steps=int(recorded.get("steps", 0)),
        seconds=float(recorded.get("seconds", math.nan)),
    )
