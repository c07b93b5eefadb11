"""Cycle step `retriever`: a retriever that learns, versioned and gated with the model.

The answer is bounded by retrieval: a clause the student never sees, it cannot copy. This step
fine-tunes the dense embedder on (question, evidence passage) pairs from the training examples
(`ingest/tune_embedder.training_pairs`: the stored chunk of the example's document that holds its
answer or, for a yes/no seed, its evidence clauses; with hard negatives, the chunk of the same
document the base embedder wrongly ranks highest), with sentence-transformers'
MultipleNegativesRankingLoss, then re-embeds every chunk into an index of its own. The cycle's
candidate records both (`ModelVersion.hyperparams["retriever"]`), so eval, the gate, the canary
and `tuneloop serve` retrieve for that version exactly as it was judged
(`programs/rag.Retriever.for_version`). The project's index is never touched: a rejected
candidate's retriever goes with it.

Each cycle trains from the base embedder on all the pairs the training split holds then (seeds
and accepted examples accumulate), so a retriever is a function of the data, not of the history.
Skipped, the candidate keeps the champion's retriever (a promotion never drops a learned one):
when the step is off, when the embedder is not a local model (an endpoint cannot be fine-tuned
here), when the index is BM25-only, or with fewer than `retriever.min_pairs` pairs.

Then the BM25/dense fusion weight (`HybridIndex.search`, weighted reciprocal rank fusion) is
chosen for the candidate's index on the dev split: among `retriever.dense_weights`, the one whose
top_k passages hold the evidence (`metrics.retrieval_hit`, as eval scores it) for the most dev
questions, ties going to the weight nearest `ingest.dense_weight`. The embedder was trained on the
training split, never on dev, so the choice is not fitted to its own training pairs.

Last, the number of passages in the prompt (top_k) is chosen by the candidate's own answers: more
passages always hold more evidence, and what they cost (a longer prompt, more distractors for a
small student) only its answers show. Every dev question is answered with each of
`retriever.top_ks` (the fusion weight above, threshold 0 for yes/no: the threshold is chosen
after, in eval, for the chosen top_k) and scored with `eval.primary_metric`; the best replaces
`ingest.top_k` only when a paired bootstrap over the dev questions gives p <= 0.05 divided by the
number of alternatives (a few dozen dev questions rarely tell them apart, and a choice fitted to
their noise would be worse than the setting). The chunk size is not chosen per version: chunks are
the store's unit (their ids key evidence labels, training pairs and feedback), so it stays an
ingest setting.
"""
from __future__ import annotations

import math
from typing import Any

from tuneloop import metrics
from tuneloop.config import Project
from tuneloop.evalsets import references, split_examples
from tuneloop.ingest.index import HybridIndex, stored_chunks
from tuneloop.ingest.tune_embedder import finetune_embedder, training_pairs
from tuneloop.models.base import Embedder
from tuneloop.models.defaults import resolve_model_path
from tuneloop.models.embed import LocalEmbedder
from tuneloop.models.registry import build_chat_model
from tuneloop.programs.rag import RETRIEVER_KEY, Retriever, rag_program_path
from tuneloop.programs.scoring import score_examples
from tuneloop.progress import Reporter
from tuneloop.stats import paired_bootstrap
from tuneloop.store import Example, ModelVersion, Session
from tuneloop.versions import adapter_folder

INDEX_KIND = "indexes"  # artifacts/indexes/<embedder name>/: a fine-tuned embedder's index of every chunk


def inherit(candidate: ModelVersion, champion: ModelVersion | None) -> str | None:
    """Give `candidate` the champion's retriever when it has none; the name it inherited, if any."""
    stored = (champion.hyperparams or {}).get(RETRIEVER_KEY) if champion is not None else None
    if not stored or RETRIEVER_KEY in (candidate.hyperparams or {}):
        return None
    candidate.hyperparams = {**(candidate.hyperparams or {}), RETRIEVER_KEY: stored}
    return str(stored.get("name") or stored.get("embedder"))


def tune_retriever(project: Project, session: Session, candidate: ModelVersion, champion: ModelVersion | None,
                   embedder: Embedder | None, reporter: Reporter, cycle_id: int) -> dict[str, Any]:
    """Fine-tune the embedder for `candidate`, index every chunk with it, then choose the fusion
    weight on dev (see the module docstring); what happened, as the fields of the step's result
    (`steps.RetrieverStepResult`)."""
    tuned = fine_tune(project, session, candidate, champion, embedder, reporter, cycle_id)
    fusion = choose_fusion(project, session, candidate, embedder, reporter)
    return {**tuned, **fusion, **choose_top_k(project, session, candidate, embedder, reporter)}


def choose_fusion(project: Project, session: Session, candidate: ModelVersion, embedder: Embedder | None,
                  reporter: Reporter) -> dict[str, Any]:
    """Store in `candidate` the dense weight whose retrieval finds the evidence of the most dev
    questions; the step-result fields (`dense_weight`, `dev_items`, `dev_hit`, or `fusion_kept`)."""
    settings = project.settings.retriever
    default = project.settings.ingest.dense_weight
    if not settings.dense_weights or embedder is None:
        return {}
    dev = with_textual_reference(split_examples(session, "dev"))
    if len(dev) < settings.min_dev_items:
        return {"fusion_kept": f"{len(dev)} dev questions with a textual reference, fewer than "
                               f"retriever.min_dev_items ({settings.min_dev_items}): ingest.dense_weight {default}"}
    retriever = Retriever.for_version(project, session, candidate, embedder)
    reporter.log(f"retriever: choosing the BM25/dense weight on {len(dev)} dev questions")
    hit = fusion_hits(retriever, dev, settings.dense_weights)
    best = max(hit, key=lambda w: (hit[w], -abs(w - default)))
    _store(candidate, dense_weight=best)
    return {"dense_weight": best, "dev_items": len(dev), "dev_hit": {str(w): round(h, 4) for w, h in hit.items()}}


TOP_K_P = 0.05  # family-wise: each alternative to ingest.top_k must reach TOP_K_P / alternatives


def choose_top_k(project: Project, session: Session, candidate: ModelVersion, embedder: Embedder | None,
                 reporter: Reporter) -> dict[str, Any]:
    """Store in `candidate` the number of passages its answers score best with on the dev split,
    when that beats `ingest.top_k` beyond chance (see the module docstring); the step-result
    fields (`top_k`, `top_k_scores`, `top_k_p`, or `top_k_kept`)."""
    settings, default = project.settings.retriever, project.settings.ingest.top_k
    metric = project.settings.eval.primary_metric
    top_ks = sorted({*settings.top_ks, default})
    if len(settings.top_ks) < 2:
        return {}
    dev = split_examples(session, "dev")
    if len(dev) < settings.min_dev_items:
        return {"top_k_kept": f"{len(dev)} dev questions, fewer than retriever.min_dev_items "
                              f"({settings.min_dev_items}): ingest.top_k {default}"}
    retriever = Retriever.for_version(project, session, candidate, embedder)
    adapter = adapter_folder(candidate)
    model = build_chat_model(project, project.settings.models.student, adapter)  # once for every top_k
    scored = {}
    for k in top_ks:
        reporter.log(f"retriever: answering {len(dev)} dev questions with {k} passage(s)")
        items, _ = score_examples(project, adapter, dev, retriever.with_top_k(k), reporter,
                                  rag_program_path(candidate), 0.0, model=model, semantic_similarity=False)
        scored[k] = metrics.score_items(items)

    def value(k: int):
        return lambda idx: metrics.summarize([scored[k][i] for i in idx]).get(metric, math.nan)

    scores = {k: value(k)(range(len(dev))) for k in top_ks}
    best = max(top_ks, key=lambda k: (_finite(scores[k]), -abs(k - default)))
    p = paired_bootstrap(len(dev), value(best), value(default), 1000).p_value if best != default else None
    chosen = best if p is not None and p <= TOP_K_P / (len(top_ks) - 1) else default
    _store(candidate, top_k=chosen)
    return {"top_k": chosen, "top_k_scores": {str(k): round(v, 4) for k, v in scores.items()},
            "top_k_p": None if p is None else round(p, 4)}


def _store(candidate: ModelVersion, **fields) -> None:
    """Add `fields` to the candidate's retriever settings (`hyperparams.retriever`)."""
    stored = (candidate.hyperparams or {}).get(RETRIEVER_KEY) or {}
    candidate.hyperparams = {**(candidate.hyperparams or {}), RETRIEVER_KEY: {**stored, **fields}}


def _finite(value: float) -> float:
    return value if not math.isnan(value) else -math.inf


Item = tuple[Example, list[str]]  # an example and its references


def with_textual_reference(examples) -> list[Item]:
    """The examples whose references hold text a passage can contain (`metrics.retrieval_hit`)."""
    items = [(e, references(e)) for e in examples]
    return [(e, refs) for e, refs in items if metrics.retrieval_hit([], refs) is not None]


def fusion_hits(retriever: Retriever, items: list[Item], weights: list[float]) -> dict[float, float]:
    """Weight -> share of `items` whose top_k passages, fused with that weight, hold a reference."""
    hit = {}
    for weight in weights:
        fused = retriever.with_dense_weight(weight)
        hit[weight] = sum(metrics.retrieval_hit([p.text for p in fused.retrieve(e.question, e.document)], refs)
                          for e, refs in items) / len(items)
    return hit


def fine_tune(project: Project, session: Session, candidate: ModelVersion, champion: ModelVersion | None,
              embedder: Embedder | None, reporter: Reporter, cycle_id: int) -> dict[str, Any]:
    """Fine-tune the embedder for `candidate` and index every chunk with it, or give it the
    champion's retriever (`inherit`)."""
    settings = project.settings.retriever
    role = project.settings.models.embedder

    def skip(why: str, **counts) -> dict[str, Any]:
        return {"skipped": why, "inherited": inherit(candidate, champion), **counts}

    if not settings.fine_tune:
        return skip("retriever.fine_tune is false")
    if embedder is None:
        return skip("no dense index (ingest.dense is false)")
    if role.backend != "local":
        return skip("the embedder is an endpoint: only a local embedder is fine-tuned")
    base_dir = resolve_model_path(role.model, project.cache)
    examples = split_examples(session, "train")
    chunks = stored_chunks(session)
    reporter.log(f"retriever: pairs from {len(examples)} training examples")
    pairs = training_pairs(examples, chunks, negatives_from=embedder if settings.hard_negatives else None)
    counts = {"examples": pairs.examples, "pairs": len(pairs.pairs), "not_paired": pairs.skipped or None}
    if len(pairs.pairs) < settings.min_pairs:
        return skip(f"{len(pairs.pairs)} (question, evidence passage) pairs, fewer than retriever.min_pairs "
                    f"({settings.min_pairs})", **counts)
    name = f"cycle-{cycle_id:04d}-{candidate.name}-embedder"
    reporter.log(f"retriever: fine-tuning {role.model} on {len(pairs.pairs)} pairs")
    tuned = finetune_embedder(base_dir, pairs.pairs, project.artifacts, name, epochs=settings.epochs,
                              batch_size=settings.batch_size, lr=settings.learning_rate, seed=settings.seed)
    reporter.log(f"retriever: re-embedding {len(chunks)} chunks")
    index_dir = project.artifacts / INDEX_KIND / tuned.name
    model = LocalEmbedder(tuned.path, batch_size=role.batch_size)
    HybridIndex.from_rows(chunks, model).save(index_dir)
    candidate.hyperparams = {**(candidate.hyperparams or {}), RETRIEVER_KEY: {
        "name": tuned.name, "embedder": str(tuned.path), "index": str(index_dir), "pairs": tuned.pairs,
        "hard_negatives": tuned.hard_negatives}}
    return {"version": candidate.name, "embedder": str(tuned.path), "index": str(index_dir),
            "loss_before": tuned.loss_before, "loss_after": tuned.loss_after, "steps": tuned.steps,
            "hard_negatives": tuned.hard_negatives, **counts}
