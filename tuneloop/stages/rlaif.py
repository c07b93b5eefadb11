"""Stage: AI feedback (RLAIF). The judge turns sampled student answers into preferences or rewards.

1. Prompts: the questions of the latest interactions (their serving prompt rebuilt from the
   stored chunks), then synthetic examples' questions, then the experts' training seeds' questions
   (both retrieved as serving would), deduplicated, up to `feedback.rlaif_prompts`.
2. Candidates: the champion student (inside a cycle: the cycle's SFT candidate) answers each prompt
   `feedback.rlaif_candidates` times at
   `feedback.rlaif_temperature`, each round with its own seed; empty and duplicate answers dropped.
3. `pairwise` mode: for a prompt from an expert seed, a pair of candidates whose token F1 against
   the expert's answer differs by at least `feedback.rlaif_reference_margin` is decided by that
   reference (judge "reference": no model call, no position bias). The judge compares every other
   pair of candidates in both orders, (A, B) and (B, A),
   with the prompt's passages as context. Only a consistent verdict (the same answer wins in both
   orders) becomes a PreferencePair(source="ai") with the judge's rationale; ties, inconsistent
   and unparseable verdicts are recorded and dropped. A judge that always prefers whichever answer
   comes first therefore keeps nothing, and the report shows that position bias.
   `rubric` mode: the judge grades each candidate 1-5 (correctness, faithfulness to the passages,
   brevity) -> Reward(source="ai"), reward = (score - 3) / 2 in [-1, 1].
4. Calibration: every human A/B choice and correction pair (after routing, `feedback/routing.py`) is
   judged the same way; agreement = consistent AI verdicts matching the human choice / pairs judged.

All model calls go through batched `predict_many` / `batched_chat` with progress; the registry's
reply cache makes a rerun cheap. The artifact (artifacts/rlaif/<name>/) holds every candidate,
every verdict, the kept pairs or rewards in TRL's conversational format, the calibration and a
report; the store rows are added from it idempotently (content keys in meta).
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

from sqlalchemy import select

from tuneloop.artifacts import artifact_path, is_complete, read_jsonl, run_name, write_artifact, write_jsonl
from tuneloop.config import Project
from tuneloop.errors import StateError
from tuneloop.evalsets import references
from tuneloop.feedback.routing import assistant, completion_key, normalize_answer, pair_key, route_feedback
from tuneloop.metrics import score_item
from tuneloop.models import registry
from tuneloop.models.base import ChatModel
from tuneloop.models.registry import generation_params
from tuneloop.programs.dspy_bridge import make_adapter, predict_many
from tuneloop.programs.judge import (
    Judged,
    JudgePrograms,
    calibration_report,
    judge_both_orders,
    parsed_score,
    position_stats,
    score_to_reward,
)
from tuneloop.programs.prompts import PromptBuilder, PromptInfo
from tuneloop.programs.synth import number_passages
from tuneloop.progress import Reporter, batched_chat
from tuneloop.store import Artifact, Example, Interaction, ModelVersion, PreferencePair, Reward, Session
from tuneloop.versions import adapter_folder, champion

KIND = "rlaif"
MODES = ("pairwise", "rubric")


@dataclass
class RlaifModels:
    student: ChatModel  # the champion, or the given version (its LoRA adapter applied)
    judge: ChatModel


def build_rlaif_models(project: Project, session: Session, student: ModelVersion | None = None) -> RlaifModels:
    """The student (the champion unless `student` is given) and the judge role."""
    version = student or champion(session)
    if version is None:
        raise StateError("no champion model yet: run `tuneloop eval` or `tuneloop cycle` first")
    m = project.settings.models
    adapter = adapter_folder(version)
    return RlaifModels(registry.build_chat_model(project, m.student, adapter),
                       registry.build_chat_model(project, m.judge))


@dataclass
class RlaifResult:
    artifact: Path
    report: dict[str, Any]
    pairs: int  # kept (consistent) AI preference pairs in the artifact
    rewards: int  # AI rewards in the artifact (rubric mode)
    added: dict[str, int] = field(default_factory=dict)  # new store rows


# --------------------------------------------------------------------------- prompts


@dataclass
class RlaifPrompt:
    info: PromptInfo
    origin: str  # interaction | synthetic | seed
    interaction_id: int | None = None
    example_id: int | None = None

    def row(self) -> dict[str, Any]:
        return {"origin": self.origin, "interaction_id": self.interaction_id, "example_id": self.example_id,
                "question": self.info.question, "document": self.info.document, "prompt_source": self.info.source,
                "chunk_ids": [p.chunk_id for p in self.info.passages]}


def collect_prompts(session: Session, builder: PromptBuilder, limit: int) -> list[RlaifPrompt]:
    """Latest interactions' questions first, then synthetic examples' (newest first), then training
    seeds', one per (question, document), at most `limit`."""
    seen: set[tuple[str, str]] = set()
    out: list[RlaifPrompt] = []

    def fresh(question: str, document: str | None) -> bool:
        key = (normalize_answer(question), document or "")
        if not key[0] or key in seen:
            return False
        seen.add(key)
        return True

    q = select(Interaction).order_by(Interaction.created_at.desc(), Interaction.id.desc())
    for it in session.scalars(q.execution_options(yield_per=256)):
        if len(out) >= limit:
            return out
        if fresh(it.question, it.document):
            out.append(RlaifPrompt(builder.for_interaction(it), "interaction", interaction_id=it.id))
    for kind, q in (("synthetic", select(Example).where(Example.kind == "synthetic").order_by(Example.id.desc())),
                    ("seed", select(Example).where(Example.kind == "seed", Example.split == "train")
                     .order_by(Example.id))):
        for e in session.scalars(q.execution_options(yield_per=256)):
            if len(out) >= limit:
                return out
            if fresh(e.question, e.document):
                out.append(RlaifPrompt(builder.for_question(e.question, e.document), kind, example_id=e.id))
    return out


# --------------------------------------------------------------------------- judging
# (judging in both orders, position statistics and calibration: `programs/judge.py`)


def token_f1_item(text: str, refs: list[str]) -> float:
    """Token F1 against the references; on yes/no references, whether the yes/no label agrees."""
    return score_item(text, refs)["token_f1"]


# --------------------------------------------------------------------------- the run


class Run:
    def __init__(self, project: Project, session: Session, models: RlaifModels, builder: PromptBuilder,
                 reporter: Reporter, mode: str):
        self.project, self.session, self.models, self.builder = project, session, models, builder
        self.reporter, self.mode = reporter, mode
        self.fs = project.settings.feedback
        self.judge_role = project.settings.models.judge
        self.programs = JudgePrograms()
        self.adapter = make_adapter(self.judge_role.adapter, self.judge_role.backend)
        self.judge_params = generation_params(self.judge_role, temperature=0.0)

    def candidates(self, prompts: list[RlaifPrompt]) -> list[list[dict[str, Any]]]:
        """`rlaif_candidates` samples per prompt, one seeded round each; empty and duplicates dropped."""
        role = self.project.settings.models.student
        convs = [p.info.messages for p in prompts]
        out: list[list[dict[str, Any]]] = [[] for _ in prompts]
        seen: list[set[str]] = [set() for _ in prompts]
        n = self.fs.rlaif_candidates
        for k in range(n):
            params = generation_params(role, seed=self.fs.seed * 1_000_000 + k * 1_000,
                                       temperature=self.fs.rlaif_temperature)
            replies = batched_chat(self.models.student, convs, params, self.reporter,
                                   f"sampling candidates ({k + 1}/{n})", role.batch_size)
            for i, reply in enumerate(replies):
                text = (reply or "").strip()
                norm = normalize_answer(text)
                if norm and norm not in seen[i]:
                    seen[i].add(norm)
                    out[i].append({"text": text, "round": k, "seed": params.seed})
        return out

    def reference_pairs(self, prompts, cands) -> tuple[list[dict], list[tuple[int, int, int]]]:
        """Seed prompts: a pair whose answers' token F1 against the expert answer differs by at least
        `rlaif_reference_margin` is decided by the reference (no judge, no position bias); every
        other pair is returned for the judge."""
        index = [(i, a, b) for i, cs in enumerate(cands) for a, b in combinations(range(len(cs)), 2)]
        refs: dict[int, list[str]] = {}
        if self.fs.rlaif_reference:
            for i, p in enumerate(prompts):
                if p.origin == "seed" and (e := self.session.get(Example, p.example_id)) is not None:
                    refs[i] = references(e)
        pairs, rest = [], []
        for i, a, b in index:
            if i in refs:
                fa, fb = (token_f1_item(cands[i][k]["text"], refs[i]) for k in (a, b))
                if abs(fa - fb) >= self.fs.rlaif_reference_margin:
                    (chosen, fc), (rejected, fr) = sorted([(cands[i][a]["text"], fa), (cands[i][b]["text"], fb)],
                                                          key=lambda x: -x[1])
                    p = prompts[i]
                    pairs.append({"prompt": p.info.messages, "chosen": assistant(chosen),
                                  "rejected": assistant(rejected), "source": "ai",
                                  "key": pair_key(p.info.messages, chosen, rejected),
                                  "rationale": f"token F1 against the expert's answer: {fc:.2f} vs {fr:.2f}",
                                  "judge": "reference", "verdicts": [], **p.row()})
                    continue
            rest.append((i, a, b))
        return pairs, rest

    def pairwise(self, prompts, cands) -> tuple[list[dict], list[dict], list[Judged]]:
        ref_pairs, index = self.reference_pairs(prompts, cands)
        items = [(prompts[i].info.passages, prompts[i].info.question, cands[i][a]["text"], cands[i][b]["text"])
                 for i, a, b in index]
        judged = judge_both_orders(self.programs, self.adapter, self.models.judge, items, self.judge_params,
                                   self.reporter, "judging pairs (both orders)", self.judge_role.batch_size)
        judgments, pairs = [], []
        for (i, _, _), j in zip(index, judged):
            p = prompts[i]
            judgments.append({"prompt_index": i, "question": p.info.question, "a": j.a, "b": j.b,
                              "verdicts": j.verdicts(), "outcome": j.outcome, "winner": j.winner})
            if j.outcome != "consistent":
                continue
            chosen, rejected = (j.a, j.b) if j.winner == "a" else (j.b, j.a)
            pairs.append({"prompt": p.info.messages, "chosen": assistant(chosen), "rejected": assistant(rejected),
                          "source": "ai", "key": pair_key(p.info.messages, chosen, rejected),
                          "rationale": j.rationale, "judge": self.models.judge.name, "verdicts": j.verdicts(),
                          **p.row()})
        return judgments, ref_pairs + pairs, judged

    def rubric(self, prompts, cands) -> tuple[list[dict], list[dict]]:
        index = [(i, c) for i, cs in enumerate(cands) for c in cs]
        inputs = [{"excerpts": number_passages(prompts[i].info.passages), "question": prompts[i].info.question,
                   "answer": c["text"]} for i, c in index]
        results = predict_many(self.programs.score, self.adapter, self.models.judge, inputs, self.judge_params,
                               self.reporter, "scoring answers (rubric)", self.judge_role.batch_size)
        scores, rewards = [], []
        for (i, c), (parsed, reply) in zip(index, results):
            p = prompts[i]
            score = parsed_score(parsed)
            scores.append({"prompt_index": i, "question": p.info.question, "answer": c["text"], "reply": reply,
                           "score": score})
            if score is None:
                continue
            rewards.append({"prompt": p.info.messages, "completion": assistant(c["text"]),
                            "reward": round(score_to_reward(score), 6), "score": score,
                            "criteria": (parsed or {}).get("criteria") or {},
                            "rationale": str((parsed or {}).get("rationale") or ""), "source": "ai",
                            "key": completion_key(p.info.messages, c["text"]), "judge": self.models.judge.name,
                            **p.row()})
        return scores, rewards

    def calibrate(self) -> tuple[list[dict], dict[str, Any]]:
        routed = route_feedback(self.session, self.builder, self.fs.contradiction_rule)
        human = routed.pairs
        items = [(p.passages, p.question, p.chosen, p.rejected) for p in human]
        judged = judge_both_orders(self.programs, self.adapter, self.models.judge, items, self.judge_params,
                                   self.reporter, "calibration: judging human pairs", self.judge_role.batch_size)
        rows = [{"source": p.source, "question": p.question, "chosen": p.chosen, "rejected": p.rejected,
                 "interaction_ids": p.interaction_ids, "feedback_ids": p.feedback_ids, "verdicts": j.verdicts(),
                 "outcome": j.outcome,
                 "judge_prefers": {"a": "chosen", "b": "rejected"}.get(j.winner or ""),
                 "agrees": j.outcome == "consistent" and j.winner == "a"} for p, j in zip(human, judged)]
        return rows, calibration_report(judged, [p.source for p in human])


def rlaif(project: Project, session: Session, models: RlaifModels | Callable[[], RlaifModels] | None,
          builder: PromptBuilder, reporter: Reporter, mode: str | None = None, limit: int | None = None,
          name: str | None = None, cycle_id: int | None = None, calibrate: bool = True) -> RlaifResult:
    """Sample, judge, write the artifact and add its AI pairs/rewards to the store (caller commits).

    `models` may be a factory (called only once prompts exist) or None (the champion student and
    the judge role are built). If the named artifact is already complete, it is only recorded.
    """
    fs = project.settings.feedback
    mode = mode or fs.rlaif_mode
    if mode not in MODES:
        raise StateError(f"unknown RLAIF mode '{mode}' (pairwise or rubric)")
    name = name or run_name("rlaif", cycle_id)
    path = artifact_path(project.artifacts, KIND, name)
    if not is_complete(path):
        prompts = collect_prompts(session, builder, limit or fs.rlaif_prompts)
        if not prompts:
            raise StateError("no prompts for RLAIF: no interactions, synthetic examples or training seeds yet "
                             "(serve the model, run `tuneloop synth`, or `tuneloop seeds import`)")
        if models is None:
            models = build_rlaif_models(project, session)
        elif not isinstance(models, RlaifModels):
            models = models()
        run = Run(project, session, models, builder, reporter, mode)
        cands = run.candidates(prompts)
        judgments: list[dict] = []
        pairs: list[dict] = []
        scores: list[dict] = []
        rewards: list[dict] = []
        judged: list[Judged] = []
        if mode == "pairwise":
            judgments, pairs, judged = run.pairwise(prompts, cands)
        else:
            scores, rewards = run.rubric(prompts, cands)
        calibration_rows, calibration = run.calibrate() if calibrate else ([], {"skipped": True})
        champ = champion(session)
        outcomes = Counter(j.outcome for j in judged)
        sizes = [len(c) for c in cands]
        report = {
            "mode": mode, "student": models.student.name, "judge": models.judge.name,
            "champion": champ.name if champ else None,
            "prompts": {"total": len(prompts), "from_interactions": sum(p.origin == "interaction" for p in prompts),
                        "from_synthetic": sum(p.origin == "synthetic" for p in prompts),
                        "from_seeds": sum(p.origin == "seed" for p in prompts),
                        "prompt_source": dict(Counter(p.info.source for p in prompts))},
            "candidates": {"sampled": len(prompts) * fs.rlaif_candidates, "distinct": sum(sizes),
                           "per_prompt": round(sum(sizes) / len(sizes), 3),
                           "prompts_with_fewer_than_two": sum(1 for n in sizes if n < 2),
                           "temperature": fs.rlaif_temperature},
            "pairs_judged": len(judged), "consistent": outcomes.get("consistent", 0),
            "inconsistent": outcomes.get("inconsistent", 0), "ties": outcomes.get("tie", 0),
            "unparsed": outcomes.get("unparsed", 0), "kept_pairs": len(pairs),
            "reference_pairs": sum(1 for p in pairs if p["judge"] == "reference"),
            "consistency_rate": round(outcomes.get("consistent", 0) / len(judged), 4) if judged else None,
            "position_bias": position_stats(judged),
            "rubric": {"scored": len(scores), "unparsed": sum(1 for s in scores if s["score"] is None),
                       "rewards": len(rewards),
                       "mean_reward": round(sum(r["reward"] for r in rewards) / len(rewards), 4) if rewards else None},
            "calibration": calibration,
        }

        def write(tmp: Path) -> None:
            write_jsonl(tmp / "candidates.jsonl", [{**p.row(), "prompt": p.info.messages, "candidates": c}
                                                   for p, c in zip(prompts, cands)])
            write_jsonl(tmp / "judgments.jsonl", judgments)
            write_jsonl(tmp / "pairs.jsonl", pairs)
            write_jsonl(tmp / "scores.jsonl", scores)
            write_jsonl(tmp / "rewards.jsonl", rewards)
            write_jsonl(tmp / "calibration.jsonl", calibration_rows)
            (tmp / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")

        meta = {"stage": "rlaif", "cycle_id": cycle_id, "mode": mode, "student": models.student.name,
                "judge": models.judge.name, "report": report, "settings": fs.model_dump()}
        path = write_artifact(project.artifacts, KIND, name, meta, write)
    return _record(session, path, cycle_id)


def _record(session: Session, path: Path, cycle_id: int | None) -> RlaifResult:
    """Add the artifact's pairs and rewards to the store, skipping those already there."""
    report = json.loads((path / "report.json").read_text(encoding="utf-8"))
    pairs, rewards = read_jsonl(path / "pairs.jsonl"), read_jsonl(path / "rewards.jsonl")
    have = {(r.meta or {}).get("key") for r in session.scalars(select(PreferencePair)
                                                               .where(PreferencePair.source == "ai"))}
    added = Counter()
    for row in pairs:
        if row["key"] in have:
            continue
        have.add(row["key"])
        session.add(PreferencePair(
            prompt=row["question"], chosen=row["chosen"][0]["content"], rejected=row["rejected"][0]["content"],
            source="ai", meta={"key": row["key"], "judge": row["judge"], "rationale": row["rationale"],
                               "prompt_messages": row["prompt"], "verdicts": row["verdicts"],
                               "document": row["document"], "interaction_id": row["interaction_id"],
                               "example_id": row["example_id"], "prompt_source": row["prompt_source"],
                               "artifact": str(path), "cycle_id": cycle_id}))
        added["pairs"] += 1
    existing = {(r.meta or {}).get("key"): r for r in session.scalars(select(Reward).where(Reward.source == "ai"))}
    for row in rewards:
        meta = {"key": row["key"], "judge": row["judge"], "score": row["score"], "criteria": row["criteria"],
                "rationale": row["rationale"], "prompt_messages": row["prompt"], "document": row["document"],
                "example_id": row["example_id"], "prompt_source": row["prompt_source"], "artifact": str(path),
                "cycle_id": cycle_id}
        old = existing.get(row["key"])
        if old is None:
            old = Reward(prompt=row["question"], completion=row["completion"][0]["content"], reward=row["reward"],
                         source="ai", interaction_id=row["interaction_id"], meta=meta)
            session.add(old)
            existing[row["key"]] = old
            added["rewards"] += 1
        elif old.reward != row["reward"] or (old.meta or {}).get("judge") != row["judge"]:
            old.reward, old.meta = row["reward"], meta  # re-scored by another judge
            added["rewards_updated"] += 1
    if not session.scalar(select(Artifact).where(Artifact.path == str(path))):
        session.add(Artifact(kind="dataset", path=str(path), meta={"stage": "rlaif", "cycle_id": cycle_id}))
    session.flush()
    return RlaifResult(path, report, pairs=len(pairs), rewards=len(rewards),
                       added={k: added.get(k, 0) for k in ("pairs", "rewards", "rewards_updated")})
