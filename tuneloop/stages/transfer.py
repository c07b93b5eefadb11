"""Stage (part of synth): seed-question transfer, a data strategy that works with weak models.

A small teacher rarely writes a usable question, but the experts already wrote good ones: their
seed questions are asked again of every *other* document. The questions are well-formed by
construction; only the answers come from a model, the **labeller** (`synth.transfer.labeller`):
the champion student (self-training: the promoted model of cycle N labels for cycle N+1, with its
calibrated yes/no threshold) or the teacher. An answer is kept only when it can be checked:

* **yes/no** questions whose seeds answered "Yes" with evidence clauses are labelled by how close
  each document comes to those clauses (`stages/evidence.py`); the documents in between, and the
  yes/no questions without evidence, go to the labeller: its first-token margin
  (`programs/decide.py`) under several passage sets (`samples`: the top passages, a wider set,
  and the wider set in reverse order), kept when every decision agrees and each margin is at
  least `yes_no_margin` (log-odds) away from its threshold, and only when its calibrated dev
  balanced accuracy reaches `labeller_min_accuracy` (the base 135M model is at chance);
* **other** questions whose seeds carry evidence spans, with `evidence_spans`: the document's
  sentence closest to those spans and to the question (`stages/evidence.evidence_sentences`),
  kept only when the question's own passages hold it (the verifier), so the training prompt shows
  the sentence the student learns to copy;
* the rest of the **other** questions (up to `max_questions` a pass; not by the untuned base model, whose answers
  kept 0 of 48 on CUAD and 0 of 100 on the bundled sample) are answered greedily under the same
  passage sets: kept when the answers
  agree (token F1 >= `min_agreement` with the first) and the answer is *copied*: its words are a
  contiguous span of one passage (`copied_span`), which then becomes the training target, in the
  document's own words. Answers saying the document does not say are not kept (nothing to check).

A (question, document) pair already in the store (any split: the seed itself, an earlier
synthetic example, a held-out or dev question) is never asked, so no evaluation question is ever
trained on. Every candidate records its provenance (seed id, labeller, margins, agreement) and
every rejection its reason, as the rest of the data engine does.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from sqlalchemy import select

from tuneloop import metrics
from tuneloop.config import Project, TransferSettings
from tuneloop.filters import copied_span, is_negative_answer
from tuneloop.models.base import ChatModel, GenerationParams
from tuneloop.models.registry import build_chat_model, generation_params
from tuneloop.programs.decide import decide, decides, is_yes_no_question
from tuneloop.programs.rag import Passage, Retriever, build_messages
from tuneloop.progress import Reporter, batched_chat, batched_margins
from tuneloop.splits import question_key
from tuneloop.stages.calibrate import calibrate_version
from tuneloop.stages.evidence import (
    anchor_clauses,
    evidence_labels,
    evidence_sentences,
    similarity_scores,
    span_anchors,
)
from tuneloop.store import Example, Session
from tuneloop.versions import adapter_folder, champion, ensure_base_version

STRATEGY = "transfer"  # answered by the labeller
EVIDENCE = "transfer-evidence"  # yes/no labelled by the experts' evidence clauses (stages/evidence.py)
EVIDENCE_SPAN = "transfer-evidence-span"  # answered in words by the sentence closest to the experts' evidence


@dataclass
class Labeller:
    """The model that answers transferred questions, and its yes/no threshold."""

    name: str  # "champion:<version>" or "teacher:<model>"
    model: ChatModel
    threshold: float | None
    batch_size: int | str = 8
    yes_no_accuracy: float | None = None  # balanced accuracy at its threshold where it was calibrated
    trained: bool = True  # False: the untuned base model, whose answers are not used (see run_transfer)


@dataclass(eq=False)
class Candidate:
    seed: Example
    document: str
    yes_no: bool = False  # decided by the labeller's margin (else answered in words)
    contexts: list[list[Passage]] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    margins: list[float] = field(default_factory=list)
    similarity: float | None = None  # to the experts' evidence clauses (stages/evidence.py)
    evidence_label: str | None = None  # "Yes"/"No", or the evidence sentence of a question answered in words
    evidence_chunk: int | None = None  # the chunk holding that sentence

    @property
    def question(self) -> str:
        return self.seed.question


def plan(session: Session, retriever: Retriever, limit: int | None, rng: random.Random,
         skip_known: bool = True) -> list[Candidate]:
    """Up to `limit` (None: all) (seed question, other document) pairs not in the store yet (with
    `skip_known`; else also those), spread evenly: every seed question before any is asked twice,
    documents in a seeded random order."""
    seeds = list(session.scalars(select(Example).where(Example.kind == "seed", Example.split == "train")
                                 .order_by(Example.id)))
    known = {question_key(q, d) for q, d in session.execute(select(Example.question, Example.document))} \
        if skip_known else set()
    documents = sorted(retriever.documents())
    per_seed = []
    for seed in seeds:
        others = [d for d in documents if d != seed.document and question_key(seed.question, d) not in known]
        rng.shuffle(others)
        per_seed.append((seed, others))
    out: list[Candidate] = []
    asked: set[tuple[str, str]] = set()
    rank = 0
    limit = limit if limit is not None else sum(len(o) for _, o in per_seed)
    while len(out) < limit and any(rank < len(o) for _, o in per_seed):
        for seed, others in per_seed:
            if rank < len(others) and len(out) < limit:
                key = question_key(seed.question, others[rank])
                if key not in asked:  # two seeds with the same question: ask it once per document
                    asked.add(key)
                    out.append(Candidate(seed, others[rank]))
        rank += 1
    return out


def passage_sets(retriever: Retriever, question: str, document: str, samples: int) -> list[list[Passage]]:
    """`samples` passage sets for one question: the served top-k, then wider sets (alternately reversed)."""
    top_k = retriever.top_k
    wide = retriever.retrieve(question, document, k=top_k + samples)
    sets = [wide[:top_k]]
    for i in range(1, samples):
        chosen = wide[: top_k + i]
        sets.append(list(reversed(chosen)) if i % 2 else chosen)
    return [s for s in sets if s] or [[]]


Rows = list[dict]


def run_transfer(session: Session, retriever: Retriever, labeller: Labeller, settings: TransferSettings,
                 params: GenerationParams, reporter: Reporter, rng: random.Random) -> tuple[Rows, Rows, dict]:
    """(kept rows, rejected rows, report) of one transfer pass."""
    candidates = plan(session, retriever, None, rng)
    seeds = list({c.seed.id: c.seed for c in candidates}.values())
    # the evidence cuts are taken of every pair, asked before or not, so they do not move across cycles
    everywhere = [(c.question, c.document) for c in plan(session, retriever, None, random.Random(0), False)]
    yes_no_everywhere = [pair for pair in everywhere if is_yes_no_question(pair[0])]
    population = (yes_no_everywhere, similarity_scores(retriever, yes_no_everywhere, anchor_clauses(seeds)))
    score_of = {question_key(q, d): score for (q, d), score in zip(*population)}  # the candidates are part of it
    scores = [score_of.get(question_key(c.question, c.document)) for c in candidates]
    anchored = []
    for c, score in zip(candidates, scores):
        if score is not None and is_yes_no_question(c.question):
            c.similarity = score
            anchored.append(c)
    for c, label in zip(anchored, evidence_labels([(c.question, c.document) for c in anchored],
                                                  [c.similarity for c in anchored], settings, population)):
        c.evidence_label = label
    anchored = [c for c in anchored if c.evidence_label is not None]  # the ones in between: the labeller's
    if settings.evidence_spans:
        anchored += _anchor_spans(retriever, [c for c in candidates if not is_yes_no_question(c.question)], seeds,
                                  settings, [pair for pair in everywhere if not is_yes_no_question(pair[0])])
    decided = decides(labeller.model)
    by_model, untrusted = [], []
    for c in candidates:
        if c.evidence_label is None:
            c.yes_no = decided and is_yes_no_question(c.question)
            trusted = _trusted(labeller, settings) if c.yes_no else labeller.trained
            (by_model if trusted else untrusted).append(c)
    by_model = by_model[: settings.max_questions]
    for c in by_model + anchored:
        c.contexts = passage_sets(retriever, c.question, c.document, settings.samples if c in by_model else 1)
    yes_no = [c for c in by_model if c.yes_no]
    free = [c for c in by_model if not c.yes_no]
    spans = sum(1 for c in anchored if c.evidence_chunk is not None)
    reporter.log(f"transfer: seed questions asked of other documents: {len(anchored) - spans} yes/no and "
                 f"{spans} other answered by their experts' evidence; {len(yes_no)} yes/no and {len(free)} "
                 f"other answered by {labeller.name}")
    if yes_no:
        margins = _margins(labeller, [build_messages(c.question, ctx) for c in yes_no for ctx in c.contexts], reporter)
        for c, part in zip(yes_no, _split(margins, yes_no)):
            c.margins = part
    if free:
        convs = [build_messages(c.question, ctx) for c in free for ctx in c.contexts]
        replies = batched_chat(labeller.model, convs, params, reporter, "transfer: answering", labeller.batch_size)
        for c, part in zip(free, _split(replies, free)):
            c.answers = part
    candidates = anchored + by_model
    skipped = [_provenance(c, labeller, {"filter": "transfer", "reason": "labeller not accurate enough on yes/no"
                                         if c.yes_no else "labeller is the untuned base model"}) for c in untrusted]
    kept, rejected = [], skipped
    for c in candidates:
        row, reason = (_judge_anchored(c, settings) if c.evidence_label is not None else
                       _judge_yes_no(c, labeller, settings) if c.yes_no else _judge_free(c, settings))
        if row is None:
            rejected.append(_provenance(c, labeller, {"filter": "transfer", "reason": reason}))
        else:
            kept.append(_provenance(c, labeller, row))
    report = {"asked": len(kept) + len(rejected), "kept": len(kept),
              "kept_yes": sum(1 for r in kept if r["answer"] == "Yes"),
              "kept_no": sum(1 for r in kept if r["answer"] == "No"),
              "kept_evidence_spans": sum(1 for r in kept if r["strategy"] == EVIDENCE_SPAN),
              "rejected": dict(Counter(r["reason"] for r in rejected)), "labeller": labeller.name}
    return kept, rejected, report


def _split(values: list, candidates: list[Candidate]) -> list[list]:
    """`values` (one per passage set, candidates in order) cut into one list per candidate."""
    out, start = [], 0
    for c in candidates:
        out.append(values[start:start + len(c.contexts)])
        start += len(c.contexts)
    return out


def _margins(labeller: Labeller, convs: list, reporter: Reporter) -> list[float]:
    return batched_margins(labeller.model, convs, reporter, "transfer: yes/no margins")


def _trusted(labeller: Labeller, s: TransferSettings) -> bool:
    """Whether the labeller's yes/no decisions may become labels: its balanced accuracy where its
    threshold was chosen reaches `labeller_min_accuracy` (the base 135M model is at chance)."""
    return labeller.yes_no_accuracy is not None and labeller.yes_no_accuracy >= s.labeller_min_accuracy


def _anchor_spans(retriever: Retriever, candidates: list[Candidate], seeds: list[Example],
                  settings: TransferSettings, population: list[tuple[str, str]]) -> list[Candidate]:
    """The candidates answered in words by their evidence sentence (`stages/evidence.py`)."""
    found = evidence_sentences(retriever, [(c.question, c.document) for c in candidates], span_anchors(seeds),
                               settings, population)
    out = []
    for c, match in zip(candidates, found):
        if match is not None:
            c.evidence_label, c.evidence_chunk, c.similarity = match.sentence, match.chunk_id, match.similarity
            out.append(c)
    return out


def _judge_anchored(c: Candidate, s: TransferSettings) -> tuple[dict | None, str]:
    if c.evidence_chunk is not None:  # the verifier: the question's own passages hold the evidence sentence
        if c.evidence_chunk not in {p.chunk_id for p in c.contexts[0]}:
            return None, "evidence sentence not among the question's passages"
        if len(c.evidence_label or "") > s.max_answer_chars:
            return None, "answer too long"
    return {"answer": c.evidence_label, "passages": c.contexts[0]}, ""


def _judge_yes_no(c: Candidate, labeller: Labeller, s: TransferSettings) -> tuple[dict | None, str]:
    labels = {decide(m, labeller.threshold) for m in c.margins}
    if len(labels) != 1:
        return None, "passage sets disagree"
    t = labeller.threshold or 0.0
    if min(abs(m - t) for m in c.margins) < s.yes_no_margin:
        return None, "not confident (margin near the threshold)"
    return {"answer": labels.pop(), "passages": c.contexts[0]}, ""


def _judge_free(c: Candidate, s: TransferSettings) -> tuple[dict | None, str]:
    first = c.answers[0].strip()
    if not first or is_negative_answer(first):
        return None, "no answer (the document does not say)"
    if any(metrics.token_f1(a, [first]) < s.min_agreement for a in c.answers[1:]):
        return None, "passage sets disagree"
    span = copied_span(first, [p.text for ctx in c.contexts for p in ctx])
    if span is None:
        return None, "not copied from a passage"
    if len(span) > s.max_answer_chars:
        return None, "answer too long"
    return {"answer": span, "passages": c.contexts[0]}, ""


def _provenance(c: Candidate, labeller: Labeller, row: dict) -> dict:
    passages = row.pop("passages", c.contexts[0] if c.contexts else [])
    anchored, span = c.evidence_label is not None, c.evidence_chunk is not None
    return {"question": c.question, "document": c.document,
            "strategy": EVIDENCE_SPAN if span else EVIDENCE if anchored else STRATEGY,
            "question_type": "yes_no" if c.yes_no or (anchored and not span) else "extraction",
            "seed_ids": [c.seed.id],
            "teacher": "evidence" if anchored else labeller.name,
            "context_chunk_ids": [p.chunk_id for p in passages], "source_chunk_ids": [p.chunk_id for p in passages],
            "scores": {"evidence_similarity": c.similarity} if anchored else {
                "margins": [round(m, 4) for m in c.margins], "answers": c.answers, "threshold": labeller.threshold,
                "evidence_similarity": c.similarity},
            **row}


def build_labeller(project: Project, session: Session, teacher: ChatModel | None, retriever: Retriever,
                   reporter: Reporter) -> Labeller:
    """The labeller `synth.transfer.labeller` names: the champion student with its calibrated yes/no
    threshold (chosen now when it has none: `stages/calibrate.py`), or the teacher."""
    s = project.settings
    if s.synth.transfer.labeller == "teacher" and teacher is not None:
        return Labeller(f"teacher:{teacher.name}", teacher, None, s.models.teacher.batch_size)
    champ = champion(session) or ensure_base_version(project, session)
    threshold = calibrate_version(project, session, champ, retriever, reporter)
    adapter = adapter_folder(champ)
    model = build_chat_model(project, s.models.student, adapter)
    return Labeller(f"champion:{champ.name}", model, threshold.value if threshold else None,
                    s.models.student.batch_size, threshold.balanced_accuracy if threshold else None,
                    trained=adapter is not None)


def transfer_pass(project: Project, session: Session, teacher: ChatModel | None, retriever: Retriever,
                  reporter: Reporter, cycle_id: int | None) -> tuple[list[dict], list[dict], dict]:
    """The transfer strategy of one synth run (nothing when `synth.transfer.enabled` is off)."""
    s = project.settings.synth
    if not s.transfer.enabled or s.transfer.max_questions == 0:
        return [], [], {"enabled": False}
    labeller = build_labeller(project, session, teacher, retriever, reporter)
    params = generation_params(project.settings.models.student, temperature=0.0)
    rng = random.Random(s.seed * 1000 + (cycle_id or 0) + 17)
    kept, rejected, report = run_transfer(session, retriever, labeller, s.transfer, params, reporter, rng)
    reporter.log(f"transfer: kept {report['kept']} of {report['asked']} ({report['kept_yes']} Yes, "
                 f"{report['kept_no']} No)")
    return kept, rejected, report


def merge_reports(report: dict, transfer: dict) -> dict:
    """The synth report with the transfer pass added to its totals and under "transfer"."""
    if not transfer.get("enabled", True):
        return {**report, "transfer": transfer}
    rejected = dict(report.get("rejected", {}))
    n_rejected = sum(transfer["rejected"].values())
    if n_rejected:
        rejected["transfer"] = n_rejected
    return {**report, "generated": report["generated"] + transfer["asked"], "kept": report["kept"] + transfer["kept"],
            "rejected": rejected, "transfer": transfer}
