"""Answer a set of examples with the retrieval-augmented student and score each answer.

Shared by the held-out eval (`stages/eval.py`), WiSE-FT's dev-set scoring (`stages/wise.py`)
and the monitor's canary re-eval, so all three ask and score exactly the same way.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tuneloop import metrics
from tuneloop.config import Project
from tuneloop.evalsets import references
from tuneloop.models.base import ChatModel
from tuneloop.models.registry import build_chat_model, generation_params
from tuneloop.programs.rag import Retriever
from tuneloop.programs.rag_dspy import make_answerer
from tuneloop.progress import Reporter
from tuneloop.store import Example


def score_examples(project: Project, adapter: Path | None, examples: list[Example], retriever: Retriever,
                   reporter: Reporter, program: Path | None = None,
                   yes_no_threshold: float | None = None, model: ChatModel | None = None,
                   semantic_similarity: bool = True) -> tuple[list[dict], dict]:
    """Answer `examples` with the retrieval-augmented student (`adapter` applied; `program`: a
    compiled DSPy RAG program, else the plain prompt deciding yes/no questions against
    `yes_no_threshold`): per-item rows and the aggregate metrics. `model`: the student already
    built with `adapter` (a caller scoring several times builds it once); `semantic_similarity`:
    whether extraction items get that column (it embeds every prediction).
    Shared by the held-out eval, WiSE-FT's dev-set scoring and the retriever step's top_k choice."""
    role = project.settings.models.student
    model = model if model is not None else build_chat_model(project, role, adapter)
    answerer = make_answerer(retriever, model, generation_params(role), program,
                             yes_no_threshold, project.settings.answer.copy_threshold)
    answers = answerer.answer_many([(e.question, e.document) for e in examples], reporter, role.batch_size)
    items = []
    for e, a in zip(examples, answers):
        refs = references(e)
        items.append({"example_id": e.id, "question": e.question, "references": refs, "prediction": a.text,
                      "category": (e.meta or {}).get("category") or ("yes/no" if metrics.is_yes_no_reference(
                          refs[0]) else "extraction"),
                      "chunk_ids": [p.chunk_id for p in a.passages],
                      "retrieval_hit": metrics.retrieval_hit([p.text for p in a.passages], refs),
                      **({"yes_no_margin": a.yes_no_margin} if a.yes_no_margin is not None else {}),
                      **metrics.score_item(a.text, refs)})
    embedder = getattr(retriever, "embedder", None)
    if embedder is not None and semantic_similarity:
        add_semantic_similarity(items, embedder)
    return items, metrics.aggregate(items)


def add_semantic_similarity(items: list[dict], embedder) -> None:
    """Extraction items get "semantic_similarity": the best cosine between the prediction's and a
    reference's embedding (yes/no items are scored on their label instead)."""
    todo = [it for it in items if not metrics.is_yes_no_reference(it["references"][0])]
    if not todo:
        return
    preds = embedder.embed([it["prediction"] for it in todo])
    refs = [r for it in todo for r in it["references"]]
    ref_vecs = embedder.embed(refs)

    def unit(v):
        return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)

    preds, ref_vecs = unit(np.asarray(preds, dtype=float)), unit(np.asarray(ref_vecs, dtype=float))
    start = 0
    for it, p in zip(todo, preds):
        n = len(it["references"])
        it["semantic_similarity"] = float(max(ref_vecs[start:start + n] @ p))
        start += n
