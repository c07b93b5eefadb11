"""Stage: self-instruct synthetic data.

The teacher writes a new question from a sampled chunk, with a few expert seeds as demonstrations
(Wang et al. 2023, Self-Instruct), then answers it from retrieved passages. Filters keep only
well-formed, novel questions: not an exact duplicate and ROUGE-L < threshold against every
earlier seed, synthetic and evaluation question (all cycles); answers must be short and
lexically supported by the passages they were written from. Every rejection records a reason.
"""
from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from tuneloop.artifacts import artifact_path, is_complete, read_jsonl, write_artifact, write_jsonl
from tuneloop.config import Project
from tuneloop.errors import StateError
from tuneloop.models.base import ChatModel
from tuneloop.models.registry import generation_params
from tuneloop.programs.rag import Retriever
from tuneloop.programs.synth import answer_messages, clean_answer, clean_question, question_messages
from tuneloop.progress import Reporter, batched_chat
from tuneloop.stages.common import run_name
from tuneloop.store import Artifact, Example, Session, example_hash
from tuneloop.text import NoveltyFilter, answer_problem

KIND = "datasets"


@dataclass
class SynthResult:
    artifact: Path
    kept: int
    generated: int
    rejected: dict[str, int] = field(default_factory=dict)


def _pick_chunks(retriever: Retriever, used: set[int], n: int, rng: random.Random) -> list[int]:
    """Prefer chunks no earlier synthetic example came from (new documents first), then the rest."""
    fresh = sorted(cid for cid in retriever.passages if cid not in used)
    stale = sorted(cid for cid in retriever.passages if cid in used)
    rng.shuffle(fresh)
    rng.shuffle(stale)
    return (fresh + stale)[:n]


def _generate(project: Project, session: Session, teacher: ChatModel, retriever: Retriever,
              cycle_id: int | None, reporter: Reporter) -> tuple[list[dict], list[dict]]:
    s = project.settings.synth
    role = project.settings.models.teacher
    rng = random.Random(s.seed * 1000 + (cycle_id or 0))
    seeds = session.scalars(select(Example).where(Example.kind == "seed", Example.split == "train")).all()
    history = session.scalars(select(Example.question)).all()  # every split, every cycle
    used = {c for m in session.scalars(select(Example.meta).where(Example.kind == "synthetic"))
            for c in (m or {}).get("source_chunk_ids", [])}
    chunk_ids = _pick_chunks(retriever, used, s.questions_per_cycle, rng)
    demo_sets = [rng.sample(seeds, min(s.demos, len(seeds))) for _ in chunk_ids]
    prompts = [question_messages(retriever.passages[c].text, [(d.question, d.answer) for d in demos])
               for c, demos in zip(chunk_ids, demo_sets)]
    params = generation_params(role, seed=s.seed + (cycle_id or 0))
    raw_questions = batched_chat(teacher, prompts, params, reporter, "writing questions", role.batch_size)

    novelty = NoveltyFilter(history, s.rouge_threshold)
    candidates, rejected, demo_answers = [], [], []
    for cid, demos, prompt, raw in zip(chunk_ids, demo_sets, prompts, raw_questions):
        q = clean_question(raw)
        reason = novelty.check(q, s.min_question_chars, s.max_question_chars)
        record = {"question": q, "raw": raw, "source_chunk_ids": [cid]}
        if reason:
            rejected.append({**record, "reason": reason})
            continue
        novelty.add(q)
        prompt_hash = hashlib.sha256(repr(prompt).encode()).hexdigest()[:16]
        candidates.append({**record, "document": retriever.passages[cid].document, "prompt_hash": prompt_hash,
                           "seed_ids": [d.id for d in demos]})
        demo_answers.append([d.answer for d in demos[:3]])

    contexts = [retriever.retrieve(c["question"], c["document"]) for c in candidates]
    answer_prompts = [answer_messages(c["question"], ctx, demos)
                      for c, ctx, demos in zip(candidates, contexts, demo_answers)]
    answers = batched_chat(teacher, answer_prompts, generation_params(role, temperature=0.0), reporter,
                           "writing answers", role.batch_size)
    kept = []
    for cand, ctx, raw in zip(candidates, contexts, answers):
        a = clean_answer(raw)
        reason = answer_problem(a, " ".join(p.text for p in ctx), s.min_answer_chars, s.max_answer_chars,
                                s.min_support)
        if reason:
            rejected.append({**cand, "answer": a, "reason": reason})
            continue
        kept.append({**cand, "answer": a, "chunk_ids": [p.chunk_id for p in ctx], "teacher": teacher.name})
    return kept, rejected


def synthesize(project: Project, session: Session, teacher: ChatModel | None, retriever: Retriever,
               reporter: Reporter, cycle_id: int | None = None, name: str | None = None) -> SynthResult:
    """Write a synthetic dataset artifact and add its examples to the session (caller commits).

    If the artifact already exists (a crash after writing it), its rows are loaded instead of
    generating again. `teacher` may be None only in that case.
    """
    name = name or run_name("synth", cycle_id)
    path = artifact_path(project.artifacts, KIND, name)
    if not is_complete(path):
        if teacher is None:
            raise StateError("synthesis needs a teacher model")
        if not retriever.passages:
            raise StateError("no documents ingested yet: run `tuneloop ingest PATH` first")
        kept, rejected = _generate(project, session, teacher, retriever, cycle_id, reporter)
        report = {"generated": len(kept) + len(rejected), "kept": len(kept),
                  "rejected": dict(Counter(r["reason"] for r in rejected))}

        def write(tmp: Path) -> None:
            write_jsonl(tmp / "data.jsonl", kept)
            write_jsonl(tmp / "rejected.jsonl", rejected)
            (tmp / "report.json").write_text(json.dumps(report, indent=2))

        meta = {"stage": "synth", "cycle_id": cycle_id, "teacher": teacher.name, "report": report,
                "settings": project.settings.synth.model_dump()}
        path = write_artifact(project.artifacts, KIND, name, meta, write)
    return _record(session, path, cycle_id)


def _record(session: Session, path: Path, cycle_id: int | None) -> SynthResult:
    """Add the artifact's examples to the store, skipping any already there."""
    rows = read_jsonl(path / "data.jsonl")
    report = json.loads((path / "report.json").read_text())
    existing = set(session.scalars(select(Example.content_hash).where(Example.split == "train")))
    for row in rows:
        h = example_hash(row["question"], row["answer"], row["document"])
        if h in existing:
            continue
        existing.add(h)
        meta = {k: row[k] for k in ("source_chunk_ids", "chunk_ids", "seed_ids", "prompt_hash", "teacher")}
        session.add(Example(kind="synthetic", split="train", question=row["question"], answer=row["answer"],
                            document=row["document"], content_hash=h, cycle_id=cycle_id,
                            meta={**meta, "artifact": str(path)}))
    if not session.scalar(select(Artifact).where(Artifact.path == str(path))):
        session.add(Artifact(kind="dataset", path=str(path), meta={"stage": "synth", "cycle_id": cycle_id}))
    return SynthResult(path, kept=len(rows), generated=report["generated"], rejected=report["rejected"])
