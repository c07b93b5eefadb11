"""Stage: review. The expert review queue, rebuilt with the champion at the end of every cycle.

Expert time is the scarcest input of the loop; this step picks the questions an expert's answer
would teach the model most about (`review/scores.py` has the doubts and the queue order,
`review/queue.py` the rows and what a verdict becomes).

1. **Candidates** (`review.sources`, at most `review.pool`, shared evenly; a share one source
   cannot fill goes to the other):
   * `interactions`: questions people asked (newest first, one per question and document) that
     have no known answer: not an example of any split, never reviewed or skipped. The reviewer
     sees the answer the person got and the passages it cited.
   * `transfer`: the experts' seed questions asked of other documents (`stages/transfer.plan`,
     the data engine's pairs not in the store), answered now by the champion as it is served.
   A question already queued but not reviewed comes back only when it is still among the most
   informative under the new champion.
2. **Doubts** (`review/scores.py`): the champion (its adapter, its calibrated yes/no threshold,
   its own retriever) answers each candidate `review.samples` times: greedily on its top passages,
   then sampled at `review.temperature` on wider passage sets (`transfer.passage_sets`). Yes/no
   questions it decides by margin give the margin and the vote disagreement; others the
   disagreement of the answers' words. Retrieval's own rankings give the retrieval doubt; with
   `review.judge`, the judge grades the first answer.
3. **Queue**: ordered by informativeness (the yes/no doubts weighted by the champion's decision
   skill where its threshold was chosen: a model at chance has no useful confidence) with the
   diversity rule; the first `review.per_cycle` are open, the rest kept as the pool (the
   `review_queue` signal reads it).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from sqlalchemy import select

from tuneloop.config import Project
from tuneloop.models.base import ChatModel
from tuneloop.models.registry import build_chat_model, generation_params
from tuneloop.programs.decide import answer_conversations, decide, decides, is_yes_no_question, stored_threshold
from tuneloop.programs.judge import EvalJudge, build_judge, grade
from tuneloop.programs.rag import Passage, Retriever, build_messages
from tuneloop.progress import Reporter, batched_chat, batched_margins
from tuneloop.review.queue import item_key, known_keys, save_queue
from tuneloop.review.scores import (
    Scored,
    Search,
    answer_disagreement,
    decision_skill,
    diverse_order,
    informativeness,
    judge_doubt,
    margin_doubt,
    retrieval_doubt,
    yes_no_disagreement,
)
from tuneloop.splits import question_key
from tuneloop.stages.calibrate import calibrate_version
from tuneloop.stages.transfer import passage_sets, plan
from tuneloop.store import Interaction, ModelVersion, ReviewItem, Session
from tuneloop.versions import adapter_folder, champion, ensure_base_version


@dataclass(eq=False)
class Candidate:
    question: str
    document: str | None
    source: str  # interaction | transfer
    interaction: Interaction | None = None
    yes_no: bool = False
    contexts: list[list[Passage]] = field(default_factory=list)
    answer: str = ""  # what the reviewer sees
    chunk_ids: list[int] = field(default_factory=list)
    doubts: dict[str, float | None] = field(default_factory=dict)
    detail: dict = field(default_factory=dict)  # margins, sampled answers


@dataclass(frozen=True)
class QueueBuilt:
    queue: int | None  # the new queue's number (None: nothing to queue)
    candidates: int
    opened: int
    by_source: dict[str, int]
    mean_informativeness: float | None  # of the open items
    unsure_share: float | None  # of people's questions in the pool: informativeness >= review.unsure_score
    version: str


def interaction_candidates(session: Session, known: set[str], limit: int, documents: set[str]) -> list[Candidate]:
    """People's questions without a known answer, newest first, one per (question, document);
    only questions about all documents or about one of `documents` (an unknown name is no
    question an expert can answer)."""
    out: list[Candidate] = []
    seen = set(known)
    q = select(Interaction).order_by(Interaction.created_at.desc(), Interaction.id.desc())
    for it in session.scalars(q):
        if len(out) >= limit:
            break
        key = item_key(it.question, it.document)
        if key in seen or not it.question.strip() or not (it.answer or "").strip() or (
                it.document is not None and it.document not in documents):
            continue
        seen.add(key)
        out.append(Candidate(it.question, it.document, "interaction", it, answer=it.answer,
                             chunk_ids=[int(c) for c in it.chunk_ids or []]))
    return out


def transfer_candidates(session: Session, retriever: Retriever, known: set[str], limit: int,
                        seed: int) -> list[Candidate]:
    """Seed questions asked of other documents (spread over seeds and documents as synth does)."""
    planned = plan(session, retriever, None, random.Random(seed))
    out = [Candidate(c.question, c.document, "transfer") for c in planned
           if item_key(c.question, c.document) not in known]
    return out[:limit]


def gather(project: Project, session: Session, retriever: Retriever, seed: int) -> list[Candidate]:
    """Up to `review.pool` candidates, the pool shared evenly among `review.sources`."""
    s = project.settings.review
    known = known_keys(session)
    found = {"interactions": interaction_candidates(session, known, s.pool, retriever.documents())
             if "interactions" in s.sources else [],
             "transfer": transfer_candidates(session, retriever, known, s.pool, seed)
             if "transfer" in s.sources else []}
    share = s.pool // max(len(s.sources), 1)
    taken = {name: found[name][:share] for name in found}
    spare = s.pool - sum(len(v) for v in taken.values())
    for name in found:  # a share one source cannot fill goes to the other
        more = found[name][len(taken[name]):len(taken[name]) + spare]
        taken[name] += more
        spare -= len(more)
    asked = {item_key(c.question, c.document) for c in taken["interactions"]}
    return taken["interactions"] + [c for c in taken["transfer"] if item_key(c.question, c.document) not in asked]


def score_candidates(project: Project, model: ChatModel, threshold: float | None, retriever: Retriever,
                     candidates: list[Candidate], reporter: Reporter, judge: EvalJudge | None = None) -> None:
    """Fill each candidate's answer (transfer), contexts and doubts (see the module doc)."""
    s, role = project.settings.review, project.settings.models.student
    decided = decides(model)
    for c in candidates:
        c.yes_no = decided and is_yes_no_question(c.question)
        c.contexts = passage_sets(retriever, c.question, c.document, s.samples)
        c.doubts["retrieval"] = retrieval_doubt(Search(*retriever.rankings(c.question, c.document)), retriever.top_k)
    yes_no = [c for c in candidates if c.yes_no]
    words = [c for c in candidates if not c.yes_no]
    if yes_no:
        convs = [build_messages(c.question, ctx) for c in yes_no for ctx in c.contexts]
        margins = batched_margins(model, convs, reporter, "review: yes/no margins")
        for c, ms in zip(yes_no, _per_candidate(margins, [len(c.contexts) for c in yes_no])):
            c.doubts["margin"] = margin_doubt(ms[0], threshold)
            c.doubts["disagreement"] = yes_no_disagreement(ms, threshold)
            c.detail = {"margins": [round(m, 4) for m in ms], "threshold": threshold}
            if c.source == "transfer":
                c.answer = decide(ms[0], threshold)
    if words:
        greedy = generation_params(role, temperature=0.0)
        first = answer_conversations(model, [c.question for c in words],
                                     [build_messages(c.question, c.contexts[0]) for c in words], greedy,
                                     threshold, False,
                                     lambda convs, p: batched_chat(model, convs, p, reporter, "review: answering",
                                                                   role.batch_size),
                                     [[p.text for p in c.contexts[0]] for c in words],
                                     project.settings.answer.copy_threshold)
        sampled = generation_params(role, temperature=s.temperature, seed=project.settings.synth.seed)
        rest = batched_chat(model, [build_messages(c.question, ctx) for c in words for ctx in c.contexts[1:]],
                            sampled, reporter, "review: sampled answers", role.batch_size)
        for i, (c, more) in enumerate(zip(words, _per_candidate(rest, [len(c.contexts) - 1 for c in words]))):
            answers = [first[i].text, *more]
            c.doubts["disagreement"] = answer_disagreement(answers)
            c.detail = {"answers": answers}
            if c.source == "transfer":
                c.answer = first[i].text
    for c in candidates:
        if c.source == "transfer":
            c.chunk_ids = [p.chunk_id for p in c.contexts[0]]
    if judge is not None:
        by_id = retriever.passages
        grades = grade(judge, [([by_id[i] for i in c.chunk_ids if i in by_id], c.question, c.answer)
                               for c in candidates], reporter, "review: judging answers")
        for c, g in zip(candidates, grades):
            c.doubts["judge"] = judge_doubt(g)
            c.detail["judge_grade"] = g


def _per_candidate(values: list, sizes: list[int]) -> list[list]:
    """`values` cut into consecutive runs of `sizes` (a candidate with nothing retrieved has one
    passage set, not `review.samples`)."""
    out, start = [], 0
    for n in sizes:
        out.append(values[start:start + n])
        start += n
    return out


def rank(project: Project, candidates: list[Candidate], skill: float = 1.0) -> list[tuple[Candidate, float]]:
    """The candidates in queue order with their informativeness (`skill`: the champion's yes/no
    decision skill, `review/scores.decision_skill`)."""
    s = project.settings.review
    scored = []
    for c in candidates:
        normalised, document = question_key(c.question, c.document)
        scored.append(Scored(item_key(c.question, c.document), normalised, document,
                             informativeness(c.doubts, s.weights, skill, c.yes_no), c))
    return [(it.payload, it.score) for it in diverse_order(scored, s.diversity)]  # type: ignore[misc]


def build_queue(project: Project, session: Session, retriever_for, reporter: Reporter,
                cycle_id: int | None = None, model: ChatModel | None = None,
                judge: EvalJudge | None = None) -> QueueBuilt:
    """Rebuild the queue with the champion (see the module doc); the caller commits.

    `retriever_for(version)` gives the retriever a version is served with; `model` replaces the
    champion's model (tests); `judge` (an `EvalJudge`) replaces the judge role with `review.judge`."""
    s = project.settings.review
    champ = champion(session) or ensure_base_version(project, session)
    retriever = retriever_for(champ)
    candidates = gather(project, session, retriever, project.settings.synth.seed * 1000 + (cycle_id or 0) + 29)
    if not candidates:
        return QueueBuilt(None, 0, 0, {}, None, None, champ.name)
    threshold, accuracy = _threshold(project, session, champ, retriever, reporter, model)
    skill = decision_skill(accuracy)
    model = model or build_chat_model(project, project.settings.models.student, adapter_folder(champ))
    if s.judge and judge is None:
        judge = build_judge(project)
    reporter.log(f"review: {len(candidates)} candidates answered {s.samples} times by {champ.name}")
    score_candidates(project, model, threshold, retriever, candidates, reporter, judge if s.judge else None)
    ordered = rank(project, candidates, skill)
    items = [ReviewItem(question=c.question, document=c.document, answer=c.answer, chunk_ids=c.chunk_ids,
                        source=c.source, interaction_id=c.interaction.id if c.interaction else None,
                        question_type="yes_no" if c.yes_no or is_yes_no_question(c.question) else "extraction",
                        item_key=item_key(c.question, c.document), score=score,
                        scores={"doubts": c.doubts, "version": champ.name, "skill": round(skill, 4), **c.detail})
             for c, score in ordered]
    queue = save_queue(session, items, s.per_cycle, cycle_id)
    opened = items[: s.per_cycle]
    people = [it.score for it in items if it.source == "interaction"]
    unsure = (sum(score >= s.unsure_score for score in people) / len(people)) if people else None
    by_source = {name: sum(it.source == name for it in opened) for name in ("interaction", "transfer")}
    return QueueBuilt(queue, len(items), len(opened), by_source,
                      sum(it.score for it in opened) / len(opened), unsure, champ.name)


def _threshold(project: Project, session: Session, champ: ModelVersion, retriever: Retriever, reporter: Reporter,
               model: ChatModel | None) -> tuple[float | None, float | None]:
    """The champion's yes/no threshold and its balanced accuracy where it was chosen (None: unknown)."""
    # a given model (tests): the champion's stored threshold, none chosen now
    found = stored_threshold(champ.hyperparams) if model is not None else \
        calibrate_version(project, session, champ, retriever, reporter)
    return (found.value, found.balanced_accuracy) if found else (None, None)
