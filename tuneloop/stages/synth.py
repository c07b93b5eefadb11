"""Stage: the self-instruct data engine.

Plan -> write questions -> question filters -> write grounded answers -> answer filters -> judge
-> round trip -> (self-distillation) -> dataset artifact + report.

* Strategies (`synth.strategies`, mixable by weight): `self_instruct` (new questions in the style
  of 6 human + 2 machine demonstrations, Wang et al. 2023) and document-grounded questions per
  chunk: `fact`, `yes_no`, `explanation`, `comparison` (two passages) and `negative` (a question
  the document does not answer; its answer is "The document does not say.").
* Answers are written from the source chunk(s) plus retrieved passages and cite the chunk ids they
  rest on (explicit [n] citations, or, when the teacher gives none, the passage that supports the
  answer best: recorded as `citations_inferred`).
* Filters, each recording a reason: length/format, ROUGE-L novelty against every earlier seed,
  synthetic and evaluation question (all cycles), embedding near-duplicates, contamination
  (too close to an evaluation question), lexical support, the judge's grounding verdict, and
  round-trip consistency (answer again from retrieval alone, as the student will be served).
* Everything goes through DSPy predictors (`programs/synth.py`) in batches; every model reply is
  cached on disk by the model registry, so rerunning after a crash costs no model calls.
"""
from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

from tuneloop.artifacts import (
    artifact_path,
    clean_leftovers,
    is_complete,
    read_jsonl,
    run_name,
    write_artifact,
    write_jsonl,
)
from tuneloop.config import Project
from tuneloop.errors import StateError
from tuneloop.filters import (
    NEGATIVE_ANSWER,
    ContaminationFilter,
    NearDuplicateFilter,
    NoveltyFilter,
    answer_problem,
    distinct_n,
    embedding_spread,
    is_negative_answer,
    round_trip_agree,
    support,
)
from tuneloop.metrics import rouge_l
from tuneloop.models.base import ChatModel, Embedder
from tuneloop.models.registry import generation_params
from tuneloop.programs.dspy_bridge import make_adapter, predict_many
from tuneloop.programs.rag import Passage, Retriever, build_messages
from tuneloop.programs.synth import TASKS, SynthPrograms, clean_answer, clean_question, number_passages
from tuneloop.progress import Reporter, batched_chat
from tuneloop.stages.label_quality import with_label_quality
from tuneloop.stages.transfer import merge_reports, transfer_pass
from tuneloop.store import Artifact, Example, Session, example_hash

KIND = "datasets"


@dataclass
class SynthModels:
    """The roles the data engine uses. `judge` defaults to the teacher; `student` is only for
    self-distillation; without an `embedder` the embedding filters are skipped (and reported so)."""

    teacher: ChatModel
    judge: ChatModel | None = None
    embedder: Embedder | None = None
    student: ChatModel | None = None


@dataclass
class SynthResult:
    artifact: Path
    kept: int
    generated: int
    rejected: dict[str, int] = field(default_factory=dict)
    report: dict = field(default_factory=dict)


def build_synth_models(project: Project, embedder: Embedder | None) -> SynthModels:
    """Teacher, judge (the teacher itself when both roles name the same model), student if needed."""
    from tuneloop.models.registry import build_chat_model

    m, s = project.settings.models, project.settings.synth
    teacher = build_chat_model(project, m.teacher)
    same = m.judge.model_dump(exclude={"max_new_tokens", "temperature"}) == m.teacher.model_dump(
        exclude={"max_new_tokens", "temperature"})
    judge = teacher if same else build_chat_model(project, m.judge)
    student = build_chat_model(project, m.student) if s.self_distill else None
    return SynthModels(teacher, judge, embedder, student)


# --------------------------------------------------------------------------- planning


@dataclass
class Item:
    """One planned synthetic example, filled in as it passes the pipeline."""

    qtype: str
    chunk_ids: list[int]
    document: str
    human_demos: list[Example]
    machine_demos: list[Example]
    question: str = ""
    raw_question: str = ""
    prompt_hash: str = ""
    answer: str = ""
    context: list[Passage] = field(default_factory=list)
    cited: list[int] = field(default_factory=list)
    citations_inferred: bool = False
    scores: dict[str, Any] = field(default_factory=dict)
    vec: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def allocate(weights: dict[str, float], n: int) -> list[str]:
    """`n` question types in proportion to `weights` (largest remainder, so small n still mixes)."""
    total = sum(w for w in weights.values() if w > 0)
    exact = {t: n * w / total for t, w in weights.items() if w > 0}
    counts = {t: int(x) for t, x in exact.items()}
    for t in sorted(exact, key=lambda t: exact[t] - counts[t], reverse=True)[: n - sum(counts.values())]:
        counts[t] += 1
    return [t for t in weights if t in counts for _ in range(counts[t])]


def _plan(project: Project, session: Session, retriever: Retriever, rng: random.Random) -> list[Item]:
    s = project.settings.synth
    seeds = list(session.scalars(select(Example).where(Example.kind == "seed", Example.split == "train")
                                 .order_by(Example.id)))
    machine = list(session.scalars(select(Example).where(Example.kind == "synthetic").order_by(Example.id)))
    used = {c for e in machine for c in (e.meta or {}).get("source_chunk_ids", [])}
    types = allocate(s.strategies, s.questions_per_cycle)
    rng.shuffle(types)
    fresh = sorted(c for c in retriever.passages if c not in used)
    stale = sorted(c for c in retriever.passages if c in used)
    rng.shuffle(fresh)
    rng.shuffle(stale)
    order = fresh + stale  # chunks no earlier synthetic example came from (new documents) first
    by_doc: dict[str, list[int]] = {}
    for cid in sorted(retriever.passages):
        by_doc.setdefault(retriever.passages[cid].document, []).append(cid)
    items = []
    for i, qtype in enumerate(types):
        cid = order[i % len(order)]
        doc = retriever.passages[cid].document
        chunk_ids = [cid]
        if qtype == "comparison":
            others = [c for c in by_doc[doc] if abs(c - cid) > 1] or [c for c in by_doc[doc] if c != cid]
            if not others:
                qtype = "fact"  # a one-chunk document has nothing to compare
            else:
                chunk_ids.append(rng.choice(others))
        items.append(Item(qtype, chunk_ids, doc,
                          rng.sample(seeds, min(s.human_demos, len(seeds))),
                          rng.sample(machine, min(s.machine_demos, len(machine)))))
    return items


# --------------------------------------------------------------------------- the pipeline


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def _reject(rejected: list[dict], item: Item, stage: str, reason: str) -> None:
    rejected.append({"filter": stage, "reason": reason, "question_type": item.qtype, "question": item.question,
                     "answer": item.answer, "raw_question": item.raw_question, "document": item.document,
                     "source_chunk_ids": item.chunk_ids, "scores": item.scores})


def _novelty_category(reason: str) -> str:
    if reason == "duplicate":
        return "duplicate"
    return "novelty (rouge-l)" if reason.startswith("rouge") else "format"


class Engine:
    """One run of the data engine over an explicit project, session, models and retriever."""

    def __init__(self, project: Project, session: Session, models: SynthModels, retriever: Retriever,
                 reporter: Reporter, cycle_id: int | None):
        self.project, self.session, self.models = project, session, models
        self.retriever, self.reporter, self.cycle_id = retriever, reporter, cycle_id
        self.s = project.settings.synth
        self.teacher_role = project.settings.models.teacher
        self.programs = SynthPrograms()
        self.adapter = make_adapter(self.teacher_role.adapter, self.teacher_role.backend)
        self.rejected: list[dict] = []
        self.optimized: dict | None = None

    def run(self) -> tuple[list[dict], list[dict], dict]:
        rng = random.Random(self.s.seed * 1000 + (self.cycle_id or 0))
        if self.s.optimize == "bootstrap":
            self.optimize(rng)
        items = _plan(self.project, self.session, self.retriever, rng)
        generated = len(items)
        items = self.write_questions(items)
        items = self.filter_questions(items)
        items = self.write_answers(items)
        if self.s.judge_grounding:
            items = self.judge(items)
        if self.s.round_trip:
            items = self.round_trip(items)
        if self.s.self_distill and self.models.student is not None:
            items = self.self_distill(items)
        kept = [self.row(it) for it in items]
        return kept, self.rejected, self.report(generated, items)

    # ---- prompt optimisation (capable teachers only)

    def optimize(self, rng: random.Random) -> None:
        """Tune the question writer's demos with DSPy's BootstrapFewShot.

        Training examples are the seeds, each with the passage retrieval finds for it. The metric
        is the engine's own verdict on a generated question: it passes the question filters
        (well-formed, novel against the seeds, mostly words of its passage), and the judge finds
        the teacher's answer to it, written from the passage, supported. Small local models cannot
        follow DSPy's formats, so with the plain adapter this is skipped and the report says so.
        """
        from tuneloop.programs.dspy_bridge import PlainChatAdapter, dspy_lm

        if isinstance(self.adapter, PlainChatAdapter):
            self.optimized = {"skipped": "the teacher uses the plain-chat adapter (cannot follow DSPy formats)"}
            self.reporter.log("synth.optimize: skipped, the teacher cannot follow DSPy's formats (adapter: plain)")
            return
        import dspy

        seeds = list(self.session.scalars(select(Example).where(Example.kind == "seed", Example.split == "train")
                                          .order_by(Example.id)))
        rng.shuffle(seeds)
        trainset = []
        for e in seeds[:16]:
            hits = self.retriever.retrieve(e.question, e.document, k=1)
            if hits:
                trainset.append(dspy.Example(passage=hits[0].text, task=TASKS["self_instruct"],
                                             question=e.question).with_inputs("passage", "task"))
        seed_questions = [e.question for e in seeds]
        judge_role = self.project.settings.models.judge
        judge_lm = dspy_lm(self.models.judge or self.models.teacher, generation_params(judge_role, temperature=0.0))
        scores = {"calls": 0, "passed": 0}

        def metric(example, pred, trace=None) -> bool:
            scores["calls"] += 1
            q = clean_question(str(getattr(pred, "question", "") or ""))
            novelty = NoveltyFilter(seed_questions, self.s.rouge_threshold)
            if novelty.check(q, self.s.min_question_chars, self.s.max_question_chars):
                return False
            if support(q.rstrip("?"), example.passage) < 0.5:
                return False
            excerpts = number_passages([Passage(0, "", example.passage)])
            try:
                answer = self.programs.write_answer(excerpts=excerpts, question=q).answer
                with dspy.context(lm=judge_lm, adapter=make_adapter(judge_role.adapter, judge_role.backend)):
                    verdict = self.programs.judge(excerpts=excerpts, question=q, answer=answer).supported
            except Exception:  # an unparseable reply fails the metric, it does not stop the run
                return False
            scores["passed"] += bool(verdict is True)
            return verdict is True

        params = generation_params(self.teacher_role, seed=self.s.seed)
        optimizer = dspy.BootstrapFewShot(metric=metric, max_bootstrapped_demos=4,
                                          max_labeled_demos=self.s.human_demos)
        with self.reporter.task("optimising the question writer (BootstrapFewShot)", None), \
                dspy.context(lm=dspy_lm(self.models.teacher, params), adapter=self.adapter):
            compiled = optimizer.compile(self.programs.write_question, trainset=trainset)
        self.programs.write_question = compiled
        self.optimized = {"optimizer": "BootstrapFewShot", "trainset": len(trainset), "demos": len(compiled.demos),
                          "metric_calls": scores["calls"], "metric_passed": scores["passed"]}

    # ---- questions

    def write_questions(self, items: list[Item]) -> list[Item]:
        inputs = [{"passage": "\n\n".join(self.retriever.passages[c].text.strip() for c in it.chunk_ids),
                   "task": TASKS[it.qtype]} for it in items]
        demos = [[{"question": d.question, "answer": d.answer} for d in it.human_demos + it.machine_demos]
                 for it in items]
        params = generation_params(self.teacher_role, seed=self.s.seed + (self.cycle_id or 0))
        results = predict_many(self.programs.write_question, self.adapter, self.models.teacher, inputs, params,
                               self.reporter, "writing questions", self.teacher_role.batch_size, demos=demos)
        out = []
        for it, inp, d, (parsed, raw) in zip(items, inputs, demos, results):
            it.raw_question, it.prompt_hash = raw, _hash([inp, d, self.programs.write_question.signature.instructions])
            if parsed is None or not str(parsed.get("question") or "").strip():
                _reject(self.rejected, it, "format", "no question in the teacher's reply")
                continue
            it.question = str(parsed["question"]).strip()
            out.append(it)
        return out

    def filter_questions(self, items: list[Item]) -> list[Item]:
        s = self.s
        # novelty: against every earlier seed and synthetic question (all cycles); evaluation
        # questions are the contamination filter's job (with its own, stricter thresholds)
        history = list(self.session.scalars(select(Example.question).where(Example.split == "train")))
        eval_items = [(q, d) for q, d in self.session.execute(
            select(Example.question, Example.document).where(Example.split.in_(("eval", "dev"))))]
        embedder = self.models.embedder
        vecs = hist_vecs = eval_vecs = None
        if embedder is not None and items:
            with self.reporter.task("embedding questions", None):
                vecs = embedder.embed([it.question for it in items])
                hist_vecs = embedder.embed(history) if history else None
                eval_vecs = embedder.embed([q for q, _ in eval_items]) if eval_items else None
        novelty = NoveltyFilter(history, s.rouge_threshold)
        contamination = ContaminationFilter(eval_items, eval_vecs, s.contamination_rouge, s.contamination_cosine,
                                            s.contamination_scope)
        near = NearDuplicateFilter(hist_vecs, s.embed_dup_threshold) if embedder is not None else None
        out = []
        for i, it in enumerate(items):
            it.vec = None if vecs is None else vecs[i]
            reason = novelty.check(it.question, s.min_question_chars, s.max_question_chars)
            if reason and _novelty_category(reason) == "format":
                _reject(self.rejected, it, "format", reason)
                continue
            reason_c, cscores = contamination.check(it.question, it.document, it.vec)
            it.scores.update({k: None if v is None else round(float(v), 4) for k, v in cscores.items()})
            if reason_c:
                _reject(self.rejected, it, "contamination", reason_c)
                continue
            if reason:
                _reject(self.rejected, it, _novelty_category(reason), reason)
                continue
            it.scores["rouge_l_max"] = round(rouge_max(it.question, novelty.pool), 4)
            if near is not None:
                reason, cos = near.check(it.vec)
                it.scores["near_duplicate_cosine"] = round(float(cos), 4)
                if reason:
                    _reject(self.rejected, it, "near-duplicate (embedding)", reason)
                    continue
                near.add(it.vec)
            novelty.add(it.question)
            out.append(it)
        return out

    # ---- answers

    def _context(self, it: Item) -> list[Passage]:
        shown = [self.retriever.passages[c] for c in it.chunk_ids]
        for p in self.retriever.retrieve(it.question, it.document):
            if p.chunk_id not in {x.chunk_id for x in shown} and len(shown) < self.project.settings.ingest.top_k + 1:
                shown.append(p)
        return shown

    def write_answers(self, items: list[Item]) -> list[Item]:
        s = self.s
        asked = [it for it in items if it.qtype != "negative"]
        for it in items:
            it.context = self._context(it)
        inputs = [{"excerpts": number_passages(it.context), "question": it.question} for it in asked]
        demos = [[{"answer": d.answer} for d in it.human_demos[:3]] for it in asked]
        params = generation_params(self.teacher_role, temperature=0.0)
        results = iter(predict_many(self.programs.write_answer, self.adapter, self.models.teacher, inputs, params,
                                    self.reporter, "writing answers", self.teacher_role.batch_size, demos=demos))
        out = []
        for it in items:
            if it.qtype == "negative":
                it.answer = NEGATIVE_ANSWER
                out.append(it)
                continue
            parsed, raw = next(results)
            it.extra["raw_answer"] = raw
            if parsed is None:
                _reject(self.rejected, it, "format", "no answer in the teacher's reply")
                continue
            it.answer = clean_answer(str(parsed.get("answer") or ""))
            numbers = [n for n in (parsed.get("citations") or []) if isinstance(n, int) and 1 <= n <= len(it.context)]
            context_text = " ".join(p.text for p in it.context)
            it.scores["support"] = round(support(it.answer, context_text), 4)
            if is_negative_answer(it.answer):
                _reject(self.rejected, it, "answer", "teacher found no answer in the passages")
                continue
            reason = answer_problem(it.answer, context_text, s.min_answer_chars, s.max_answer_chars, s.min_support)
            if reason:
                _reject(self.rejected, it, "answer", reason)
                continue
            if numbers:
                it.cited = [it.context[n - 1].chunk_id for n in numbers]
            else:  # no explicit citation: the passage that supports the answer best
                best = max(it.context, key=lambda p: support(it.answer, p.text))
                it.cited, it.citations_inferred = [best.chunk_id], True
            out.append(it)
        return out

    def judge(self, items: list[Item]) -> list[Item]:
        judged = [it for it in items if it.qtype != "negative"]
        passages = self.retriever.passages
        inputs = [{"excerpts": number_passages([passages[c] for c in it.cited]), "question": it.question,
                   "answer": it.answer} for it in judged]
        role = self.project.settings.models.judge
        adapter = make_adapter(role.adapter, role.backend)
        results = iter(predict_many(self.programs.judge, adapter, self.models.judge or self.models.teacher, inputs,
                                    generation_params(role, temperature=0.0), self.reporter, "judging grounding",
                                    role.batch_size))
        out = []
        for it in items:
            if it.qtype == "negative":
                out.append(it)
                continue
            parsed, raw = next(results)
            if parsed is None or not isinstance(parsed.get("supported"), bool):
                it.scores["judge_reply"] = raw[:200]
                _reject(self.rejected, it, "grounding (judge)", "judge gave no Yes/No verdict")
                continue
            it.scores["judge_supported"] = parsed["supported"]
            it.scores["judge_rationale"] = str(parsed.get("rationale") or "")[:300]
            if not parsed["supported"]:
                _reject(self.rejected, it, "grounding (judge)", "judge: answer not supported by its cited passages")
                continue
            out.append(it)
        return out

    def round_trip(self, items: list[Item]) -> list[Item]:
        """Answer again as the student will be served (retrieval only, the student's prompt)."""
        convs = [build_messages(it.question, self.retriever.retrieve(it.question, it.document)) for it in items]
        params = generation_params(self.teacher_role, temperature=0.0)
        replies = batched_chat(self.models.teacher, convs, params, self.reporter, "round-trip answers",
                               self.teacher_role.batch_size)
        out = []
        for it, reply in zip(items, replies):
            second = clean_answer(reply)
            agree, score = round_trip_agree(it.answer, second, self.s.round_trip_min_f1)
            it.scores["round_trip_answer"] = second[:300]
            it.scores["round_trip_score"] = round(float(score), 4)
            if not agree:
                _reject(self.rejected, it, "round-trip", f"answers disagree (score {score:.2f})")
                continue
            out.append(it)
        return out

    def self_distill(self, items: list[Item]) -> list[Item]:
        """The student rewrites each kept answer; the rewrite replaces it only when it still agrees."""
        rewrite = [it for it in items if it.qtype != "negative"]
        inputs = [{"excerpts": number_passages(it.context), "question": it.question, "reference_answer": it.answer}
                  for it in rewrite]
        role = self.project.settings.models.student
        adapter = make_adapter(role.adapter, role.backend)
        results = predict_many(self.programs.rewrite, adapter, self.models.student, inputs,
                               generation_params(role, temperature=0.0), self.reporter, "self-distillation",
                               role.batch_size)
        for it, (parsed, _raw) in zip(rewrite, results):
            new = clean_answer(str((parsed or {}).get("answer") or ""))
            agree, score = round_trip_agree(it.answer, new, self.s.round_trip_min_f1) if new else (False, 0.0)
            it.scores["self_distill_score"] = round(float(score), 4)
            if agree and len(new) <= self.s.max_answer_chars:
                it.extra["teacher_answer"], it.answer = it.answer, new
        return items

    # ---- outputs

    def row(self, it: Item) -> dict:
        return {
            "question": it.question, "answer": it.answer, "document": it.document, "question_type": it.qtype,
            "strategy": "self_instruct" if it.qtype == "self_instruct" else "grounded",
            "source_chunk_ids": it.chunk_ids, "chunk_ids": it.cited,
            "context_chunk_ids": [p.chunk_id for p in it.context],
            "citations_inferred": it.citations_inferred,
            "seed_ids": [d.id for d in it.human_demos], "machine_demo_ids": [d.id for d in it.machine_demos],
            "teacher": self.models.teacher.name,
            "judge": (self.models.judge or self.models.teacher).name if self.s.judge_grounding else None,
            "prompt_hash": it.prompt_hash, "teacher_answer": it.extra.get("teacher_answer"),
            "scores": {k: it.scores.get(k) for k in SCORE_KEYS},
        }

    def report(self, generated: int, kept: list[Item]) -> dict:
        questions = [it.question for it in kept]
        spread = None
        if self.models.embedder is not None and len(kept) >= 2:
            spread = embedding_spread(np.stack([it.vec for it in kept]))
        return {
            "generated": generated, "kept": len(kept),
            "rejected": dict(Counter(r["filter"] for r in self.rejected).most_common()),
            "rejected_detail": dict(Counter(r["reason"] for r in self.rejected).most_common(20)),
            "question_types": {
                "generated": dict(Counter([it.qtype for it in kept] + [r["question_type"] for r in self.rejected])),
                "kept": dict(Counter(it.qtype for it in kept))},
            "diversity": {"distinct_1": round(distinct_n(questions, 1), 4),
                          "distinct_2": round(distinct_n(questions, 2), 4),
                          "embedding_spread": None if spread is None else round(float(spread), 4)},
            "citations_inferred": sum(it.citations_inferred for it in kept),
            "self_distilled": sum(1 for it in kept if it.extra.get("teacher_answer")),
            "filters_on": {"embedding": self.models.embedder is not None, "judge": self.s.judge_grounding,
                           "round_trip": self.s.round_trip, "self_distill": self.s.self_distill},
            "teacher": self.models.teacher.name, "adapter": type(self.adapter).__name__,
            "optimized": self.optimized,
        }


SCORE_KEYS = ("rouge_l_max", "near_duplicate_cosine", "contamination_rouge", "contamination_cosine", "support",
              "judge_supported", "judge_rationale", "round_trip_score", "round_trip_answer", "self_distill_score")


def rouge_max(question: str, pool: list[str]) -> float:
    return rouge_l(question, pool) if pool else 0.0


# --------------------------------------------------------------------------- stage entry point


def synthesize(project: Project, session: Session, models: SynthModels | ChatModel | None, retriever: Retriever,
               reporter: Reporter, cycle_id: int | None = None, name: str | None = None) -> SynthResult:
    """Write a synthetic dataset artifact and add its examples to the session (caller commits).

    If the artifact already exists (a crash after writing it), its rows are loaded instead of
    generating again, and `models` may be None. A bare ChatModel is used as teacher and judge.
    """
    name = name or run_name("synth", cycle_id)
    clean_leftovers(session, project.artifacts, KIND, "synth")  # what a killed synth left behind
    path = artifact_path(project.artifacts, KIND, name)
    if not is_complete(path):
        if models is None:
            raise StateError("synthesis needs a teacher model")
        if not isinstance(models, SynthModels):
            models = SynthModels(teacher=models)
        if not retriever.passages:
            raise StateError("no documents ingested yet: run `tuneloop ingest PATH` first")
        engine = Engine(project, session, models, retriever, reporter, cycle_id)
        kept, rejected, report = engine.run()
        t_kept, t_rejected, t_report = transfer_pass(project, session, models.teacher, retriever, reporter, cycle_id)
        kept, rejected, report = kept + t_kept, rejected + t_rejected, merge_reports(report, t_report)
        report = with_label_quality(project, kept, report)

        def write(tmp: Path) -> None:
            write_jsonl(tmp / "data.jsonl", kept)
            write_jsonl(tmp / "rejected.jsonl", rejected)
            (tmp / "report.json").write_text(json.dumps(report, indent=2))
            engine.programs.save(str(tmp / "programs.json"))  # the DSPy programs, demos included

        meta = {"stage": "synth", "cycle_id": cycle_id, "teacher": models.teacher.name, "report": report,
                "settings": project.settings.synth.model_dump()}
        path = write_artifact(project.artifacts, KIND, name, meta, write)
    return _record(session, path, cycle_id)


PROVENANCE = ("question_type", "strategy", "source_chunk_ids", "chunk_ids", "context_chunk_ids", "citations_inferred",
              "seed_ids", "machine_demo_ids", "teacher", "judge", "prompt_hash", "teacher_answer", "scores")


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
        meta = {k: row.get(k) for k in PROVENANCE}
        session.add(Example(kind="synthetic", split="train", question=row["question"], answer=row["answer"],
                            document=row["document"], content_hash=h, cycle_id=cycle_id,
                            meta={**meta, "artifact": str(path)}))
    if not session.scalar(select(Artifact).where(Artifact.path == str(path))):
        session.add(Artifact(kind="dataset", path=str(path), meta={"stage": "synth", "cycle_id": cycle_id}))
    return SynthResult(path, kept=len(rows), generated=report["generated"], rejected=report["rejected"], report=report)
