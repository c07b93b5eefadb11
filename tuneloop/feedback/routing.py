"""Routing people's feedback on served answers into training data.

What each kind of feedback becomes (TRL's conversational formats; every prompt is the serving
prompt, `build_messages(question, passages)`, rebuilt from the chunks the interaction stored by
`programs.prompts.PromptBuilder`):

* thumbs up/down -> unpaired desirable/undesirable examples (KTO):
  `{"prompt": [...], "completion": [{"role": "assistant", ...}], "label": bool}`
* A/B choice -> preference pair (DPO/ORPO): chosen = the preferred interaction's answer, rejected =
  the other answer of the same A/B pair (same question).
* correction -> preference pair: chosen = the corrected answer, rejected = the original answer
  (skipped when the two are the same after `normalize_answer`).
* rating 1-5 -> reward `(rating - 3) / 2` in [-1, 1]; several ratings of one answer: their mean.

Votes are grouped per *answer*: one interaction, or several interactions that got the identical
prompt and answer. When the votes of a group disagree (thumbs up and down on one answer, or both
arms picked in one A/B pair), `feedback.contradiction_rule` decides:

* `majority` (default): the side with more votes wins; a tie is dropped.
* `latest`: the most recent vote wins (the newest feedback's `created_at`, then its id).
* `drop`: an answer with disagreeing votes yields no training row at all.

Unanimous votes are always kept. Duplicates (identical prompt, completion and label; or identical
prompt, chosen and rejected) become one row that lists every interaction and feedback id.
Comment-only feedback carries no label and is not routed.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import or_, select

from tuneloop.models.base import Message
from tuneloop.programs.prompts import PromptBuilder, PromptInfo
from tuneloop.programs.rag import Passage
from tuneloop.store import Feedback, Interaction, PreferencePair, Reward, Session, text_hash

RULES = ("majority", "latest", "drop")
SOURCE_ORDER = {"human": 0, "correction": 1, "ai": 2}


# --------------------------------------------------------------------------- rows


def assistant(text: str) -> list[Message]:
    return [{"role": "assistant", "content": text}]


def prompt_key(messages: Sequence[Message]) -> str:
    return json.dumps([{"role": m["role"], "content": m["content"]} for m in messages], ensure_ascii=False,
                      sort_keys=True)


def pair_key(messages: Sequence[Message], chosen: str, rejected: str) -> str:
    """Identity of a preference pair: (prompt, chosen, rejected)."""
    return text_hash("pair", prompt_key(messages), chosen, rejected)


def completion_key(messages: Sequence[Message], completion: str) -> str:
    """Identity of one answer to one prompt."""
    return text_hash("completion", prompt_key(messages), completion)


_EDGE = re.compile(r"^[\s\"'`.,;:!?]+|[\s\"'`.,;:!?]+$")


def normalize_answer(text: str) -> str:
    """Casefolded, whitespace collapsed, surrounding quotes and punctuation removed."""
    return _EDGE.sub("", " ".join((text or "").split()).casefold())


def _merge_ids(a: list[int], b: Sequence[int]) -> list[int]:
    return sorted(set(a) | {int(x) for x in b if x is not None})


@dataclass
class PairRow:
    """A preference pair with its provenance."""

    prompt: list[Message]
    chosen: str
    rejected: str
    source: str  # human (A/B choice) | correction | ai
    question: str
    document: str | None = None
    interaction_ids: list[int] = field(default_factory=list)
    feedback_ids: list[int] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    preference_pair_ids: list[int] = field(default_factory=list)
    rationale: str | None = None
    judge: str | None = None
    resolution: str | None = None  # how disagreeing votes were settled (A/B choices)
    passages: list[Passage] = field(default_factory=list, repr=False)  # the prompt's excerpts (not exported)

    @property
    def key(self) -> str:
        return pair_key(self.prompt, self.chosen, self.rejected)

    def merge(self, other: PairRow) -> None:
        self.interaction_ids = _merge_ids(self.interaction_ids, other.interaction_ids)
        self.feedback_ids = _merge_ids(self.feedback_ids, other.feedback_ids)
        self.preference_pair_ids = _merge_ids(self.preference_pair_ids, other.preference_pair_ids)
        self.sources = sorted(set(self.sources) | set(other.sources), key=SOURCE_ORDER.get)
        self.source = self.sources[0]
        self.rationale = self.rationale or other.rationale
        self.judge = self.judge or other.judge

    def to_row(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "chosen": assistant(self.chosen), "rejected": assistant(self.rejected),
                "source": self.source, "sources": self.sources, "question": self.question,
                "document": self.document, "interaction_ids": self.interaction_ids,
                "feedback_ids": self.feedback_ids, "preference_pair_ids": self.preference_pair_ids,
                "rationale": self.rationale, "judge": self.judge, "resolution": self.resolution}


@dataclass
class KTORow:
    """An unpaired desirable (label True) or undesirable (False) answer."""

    prompt: list[Message]
    completion: str
    label: bool
    question: str
    document: str | None = None
    interaction_ids: list[int] = field(default_factory=list)
    feedback_ids: list[int] = field(default_factory=list)
    votes: dict[str, int] = field(default_factory=dict)
    resolution: str = "unanimous"

    def to_row(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "completion": assistant(self.completion), "label": self.label,
                "source": "human", "question": self.question, "document": self.document,
                "interaction_ids": self.interaction_ids, "feedback_ids": self.feedback_ids,
                "votes": self.votes, "resolution": self.resolution}


@dataclass
class RewardRow:
    """A scalar reward in [-1, 1] for one answer."""

    prompt: list[Message]
    completion: str
    reward: float
    source: str  # human | ai
    question: str
    document: str | None = None
    interaction_ids: list[int] = field(default_factory=list)
    feedback_ids: list[int] = field(default_factory=list)
    reward_ids: list[int] = field(default_factory=list)
    ratings: list[float] = field(default_factory=list)  # people's 1-5 ratings, or the judge's score
    rationale: str | None = None
    judge: str | None = None

    @property
    def key(self) -> str:
        return completion_key(self.prompt, self.completion)

    def to_row(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "completion": assistant(self.completion), "reward": self.reward,
                "source": self.source, "question": self.question, "document": self.document,
                "interaction_ids": self.interaction_ids, "feedback_ids": self.feedback_ids,
                "reward_ids": self.reward_ids, "ratings": self.ratings, "rationale": self.rationale,
                "judge": self.judge}


# --------------------------------------------------------------------------- contradiction rule


@dataclass(frozen=True)
class Vote:
    feedback_id: int
    created_at: datetime
    value: Hashable  # True/False (thumbs) or the preferred interaction id (A/B)


def resolve_votes(votes: Sequence[Vote], rule: str) -> tuple[Hashable | None, str]:
    """(winning value or None, how): unanimous | majority | tie | latest | dropped.

    See the module docstring for the rules.
    """
    if rule not in RULES:
        raise ValueError(f"unknown contradiction rule {rule!r} (one of {', '.join(RULES)})")
    if not votes:
        return None, "dropped"
    counts = Counter(v.value for v in votes)
    if len(counts) == 1:
        return votes[0].value, "unanimous"
    if rule == "drop":
        return None, "dropped"
    if rule == "latest":
        newest = max(votes, key=lambda v: (v.created_at, v.feedback_id))
        return newest.value, "latest"
    (top, n), (_, m) = counts.most_common(2)
    return (top, "majority") if n > m else (None, "tie")


# --------------------------------------------------------------------------- routing


@dataclass
class Routed:
    kto: list[KTORow]
    pairs: list[PairRow]  # human A/B choices and corrections, merged
    rewards: list[RewardRow]  # human ratings
    report: dict[str, Any]


def _human(q):
    return q.where(or_(Feedback.source == "human", Feedback.source.is_(None)))


def route_feedback(session: Session, builder: PromptBuilder, rule: str) -> Routed:
    """Route every human feedback row (see the module docstring). Reads only; writes nothing."""
    feedback = list(session.scalars(_human(select(Feedback)).order_by(Feedback.id)))
    ids = {f.interaction_id for f in feedback} | {f.preferred_interaction_id for f in feedback
                                                  if f.preferred_interaction_id}
    interactions = {i.id: i for i in session.scalars(select(Interaction).where(Interaction.id.in_(ids)))}
    prompts: dict[int, PromptInfo] = {}

    def prompt(it: Interaction) -> PromptInfo:
        if it.id not in prompts:
            prompts[it.id] = builder.for_interaction(it)
        return prompts[it.id]

    report: dict[str, Any] = {"rule": rule, "feedback_rows": len(feedback), "skipped": Counter()}
    kto = _route_thumbs(feedback, interactions, prompt, rule, report)
    pairs = _route_choices(session, feedback, interactions, prompt, rule, report)
    pairs += _route_corrections(feedback, interactions, prompt, report)
    pairs, merged = merge_pairs(pairs)
    report["pairs"] = {"rows": len(pairs), "duplicates_merged": merged,
                       "by_source": dict(Counter(p.source for p in pairs))}
    rewards = _route_ratings(feedback, interactions, prompt, report)
    report["skipped"] = dict(report["skipped"])
    return Routed(kto, pairs, rewards, report)


def _route_thumbs(feedback, interactions, prompt, rule, report) -> list[KTORow]:
    groups: dict[str, list[tuple[Feedback, Interaction]]] = {}
    for f in feedback:
        if not f.thumbs:
            continue
        it = interactions[f.interaction_id]
        groups.setdefault(completion_key(prompt(it).messages, it.answer), []).append((f, it))
    rows, outcomes = [], Counter()
    for members in groups.values():
        votes = [Vote(f.id, f.created_at, f.thumbs > 0) for f, _ in members]
        label, how = resolve_votes(votes, rule)
        outcomes[how] += 1
        if label is None:
            continue
        it = members[0][1]
        info = prompt(it)
        up = sum(1 for v in votes if v.value)
        rows.append(KTORow(info.messages, it.answer, bool(label), it.question, it.document,
                           sorted({i.id for _, i in members}), sorted(f.id for f, _ in members),
                           {"up": up, "down": len(votes) - up}, how))
    n_votes = sum(len(m) for m in groups.values())
    report["thumbs"] = {"votes": n_votes, "answers": len(groups), "rows": len(rows),
                        "desirable": sum(r.label for r in rows), "undesirable": sum(not r.label for r in rows),
                        "duplicates_merged": sum(1 for m in groups.values() if len({i.id for _, i in m}) > 1),
                        "contradictions": sum(n for k, n in outcomes.items() if k != "unanimous"),
                        "resolutions": dict(outcomes)}
    return rows


def _route_choices(session, feedback, interactions, prompt, rule, report) -> list[PairRow]:
    """A/B choices, grouped by A/B pair so that opposite picks of one pair are a contradiction."""
    groups: dict[str, list[Feedback]] = {}
    skipped = report["skipped"]
    for f in feedback:
        if not f.preferred_interaction_id:
            continue
        preferred = interactions.get(f.preferred_interaction_id)
        if preferred is None or not preferred.ab_pair:
            skipped["choice: preferred interaction is not part of an A/B pair"] += 1
            continue
        groups.setdefault(preferred.ab_pair, []).append(f)
    rows, outcomes = [], Counter()
    for ab_pair, votes_f in groups.items():
        members = list(session.scalars(select(Interaction).where(Interaction.ab_pair == ab_pair)
                                       .order_by(Interaction.id)))
        if len(members) != 2:
            skipped["choice: A/B pair does not have exactly two answers"] += 1
            continue
        votes = [Vote(f.id, f.created_at, f.preferred_interaction_id) for f in votes_f]
        winner_id, how = resolve_votes(votes, rule)
        outcomes[how] += 1
        if winner_id is None:
            continue
        chosen = next(m for m in members if m.id == winner_id)
        other = next(m for m in members if m.id != winner_id)
        if normalize_answer(chosen.answer) == normalize_answer(other.answer):
            skipped["choice: both answers are the same"] += 1
            continue
        info = prompt(chosen)
        rows.append(PairRow(info.messages, chosen.answer, other.answer, "human", chosen.question, chosen.document,
                            sorted([chosen.id, other.id]), sorted(f.id for f in votes_f), ["human"], resolution=how,
                            passages=info.passages))
    report["choices"] = {"votes": sum(len(v) for v in groups.values()), "ab_pairs": len(groups),
                         "rows": len(rows), "contradictions": sum(n for k, n in outcomes.items() if k != "unanimous"),
                         "resolutions": dict(outcomes)}
    return rows


def _route_corrections(feedback, interactions, prompt, report) -> list[PairRow]:
    rows, identical = [], 0
    for f in feedback:
        if not (f.corrected_answer or "").strip():
            continue
        it = interactions[f.interaction_id]
        corrected = f.corrected_answer.strip()
        if normalize_answer(corrected) == normalize_answer(it.answer):
            identical += 1
            continue
        info = prompt(it)
        rows.append(PairRow(info.messages, corrected, it.answer, "correction", it.question, it.document,
                            [it.id], [f.id], ["correction"], passages=info.passages))
    report["corrections"] = {"rows": len(rows), "skipped_identical": identical}
    return rows


def _route_ratings(feedback, interactions, prompt, report) -> list[RewardRow]:
    from tuneloop.programs.judge import score_to_reward  # deferred: programs.judge imports dspy (seconds)

    groups: dict[str, list[tuple[Feedback, Interaction]]] = {}
    invalid = 0
    for f in feedback:
        if f.rating is None:
            continue
        if not 1 <= f.rating <= 5:
            invalid += 1
            continue
        it = interactions[f.interaction_id]
        groups.setdefault(completion_key(prompt(it).messages, it.answer), []).append((f, it))
    rows = []
    for members in groups.values():
        it = members[0][1]
        info = prompt(it)
        ratings = [float(f.rating) for f, _ in members]
        reward = sum(score_to_reward(r) for r in ratings) / len(ratings)
        rows.append(RewardRow(info.messages, it.answer, round(reward, 6), "human", it.question, it.document,
                              sorted({i.id for _, i in members}), sorted(f.id for f, _ in members),
                              ratings=ratings))
    report["ratings"] = {"ratings": sum(len(m) for m in groups.values()), "rows": len(rows), "invalid": invalid,
                         "duplicates_merged": sum(1 for m in groups.values() if len({i.id for _, i in m}) > 1)}
    return rows


def merge_pairs(pairs: Sequence[PairRow]) -> tuple[list[PairRow], int]:
    """One row per (prompt, chosen, rejected), provenance merged; returns (rows, rows merged away)."""
    out: dict[str, PairRow] = {}
    for p in pairs:
        if p.key in out:
            out[p.key].merge(p)
        else:
            out[p.key] = p
    return list(out.values()), len(pairs) - len(out)


# --------------------------------------------------------------------------- the store


def store_human(session: Session, routed: Routed) -> dict[str, int]:
    """Keep the store's human PreferencePair and Reward rows equal to `routed`, idempotently.

    Rows are keyed by content (`meta["key"]`); a rerun adds nothing, new votes update the ids
    listed in meta, and a row that routing no longer produces (new votes flipped a choice) is
    marked `meta["superseded"] = True` rather than deleted (kept for lineage). Caller commits.
    """
    counts = Counter()
    existing = {(r.meta or {}).get("key"): r for r in session.scalars(
        select(PreferencePair).where(PreferencePair.source.in_(["human", "correction"])))}
    wanted = set()
    for p in routed.pairs:
        wanted.add(p.key)
        meta = {"key": p.key, "routed": True, "prompt_messages": p.prompt, "document": p.document,
                "interaction_ids": p.interaction_ids, "feedback_ids": p.feedback_ids, "sources": p.sources,
                "resolution": p.resolution, "superseded": False}
        row = existing.get(p.key)
        if row is None:
            row = PreferencePair(prompt=p.question, chosen=p.chosen, rejected=p.rejected, source=p.source, meta=meta)
            session.add(row)
            session.flush()
            counts["pairs_added"] += 1
        elif {k: (row.meta or {}).get(k) for k in meta} != meta or row.source != p.source:
            row.meta, row.source = {**(row.meta or {}), **meta}, p.source
            counts["pairs_updated"] += 1
        p.preference_pair_ids = [row.id]
    for key, row in existing.items():
        if key not in wanted and (row.meta or {}).get("routed") and not row.meta.get("superseded"):
            row.meta = {**row.meta, "superseded": True}
            counts["pairs_superseded"] += 1
    rewards = {(r.meta or {}).get("key"): r for r in session.scalars(select(Reward).where(Reward.source == "human"))}
    wanted = set()
    for r in routed.rewards:
        wanted.add(r.key)
        meta = {"key": r.key, "routed": True, "prompt_messages": r.prompt, "document": r.document,
                "interaction_ids": r.interaction_ids, "feedback_ids": r.feedback_ids, "ratings": r.ratings,
                "superseded": False}
        row = rewards.get(r.key)
        if row is None:
            row = Reward(prompt=r.question, completion=r.completion, reward=r.reward, source="human",
                         interaction_id=r.interaction_ids[0], meta=meta)
            session.add(row)
            session.flush()
            counts["rewards_added"] += 1
        elif row.reward != r.reward or {k: (row.meta or {}).get(k) for k in meta} != meta:
            row.reward, row.meta = r.reward, {**(row.meta or {}), **meta}
            counts["rewards_updated"] += 1
        r.reward_ids = [row.id]
    for key, row in rewards.items():
        if key not in wanted and (row.meta or {}).get("routed") and not row.meta.get("superseded"):
            row.meta = {**row.meta, "superseded": True}
            counts["rewards_superseded"] += 1
    session.flush()
    return {k: counts.get(k, 0) for k in ("pairs_added", "pairs_updated", "pairs_superseded", "rewards_added",
                                          "rewards_updated", "rewards_superseded")}


def stored_ai_pairs(session: Session) -> tuple[list[PairRow], int]:
    """The AI judge's PreferencePair rows as PairRows (rows without prompt messages are counted)."""
    rows, skipped = [], 0
    for r in session.scalars(select(PreferencePair).where(PreferencePair.source == "ai").order_by(PreferencePair.id)):
        meta = r.meta or {}
        if not meta.get("prompt_messages") or meta.get("superseded"):
            skipped += 1
            continue
        rows.append(PairRow(meta["prompt_messages"], r.chosen, r.rejected, "ai", r.prompt, meta.get("document"),
                            [i for i in [meta.get("interaction_id")] if i], [], ["ai"], [r.id],
                            meta.get("rationale"), meta.get("judge")))
    return rows, skipped


def stored_ai_rewards(session: Session) -> tuple[list[RewardRow], int]:
    rows, skipped = [], 0
    for r in session.scalars(select(Reward).where(Reward.source == "ai").order_by(Reward.id)):
        meta = r.meta or {}
        if not meta.get("prompt_messages") or meta.get("superseded"):
            skipped += 1
            continue
        rows.append(RewardRow(meta["prompt_messages"], r.completion, r.reward, "ai", r.prompt, meta.get("document"),
                              [r.interaction_id] if r.interaction_id else [], [], [r.id],
                              [meta["score"]] if meta.get("score") is not None else [], meta.get("rationale"),
                              meta.get("judge")))
    return rows, skipped
