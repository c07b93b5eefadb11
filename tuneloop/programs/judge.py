"""The AI judge's DSPy programs: pairwise comparison and rubric scoring.

Like the data engine's programs (`programs/synth.py`), each is a `dspy.Predict` over a typed
signature. Small local judges run through `PlainChatAdapter`, which reads the whole reply and
hands it to the signature's `parse_plain`; capable endpoints use DSPy's own adapters.

* `ComparePair`: which of two answers to the same question is better, given the passages the
  student saw. RLAIF asks it twice, with the answers swapped, and keeps a verdict only when the
  same answer wins in both orders (a judge that always prefers the first position keeps nothing).
  `judge_both_orders` runs both orders, `combine` and `Judged` hold the outcome, `position_stats`
  measures position bias and `calibration_report` the agreement with people's choices (shared by
  RLAIF, `stages/rlaif.py`, and the evaluation's pairwise win rate, `stages/judge_eval.py`).
* `ScoreAnswer`: a 1-5 grade on correctness, faithfulness to the passages and brevity, turned
  into a reward in [-1, 1] by `score_to_reward`.
* `JudgeCorrect`: the evaluation's yes/no verdict (`stages/judge_eval.py`): does the answer agree
  with the expert's reference. Faithfulness (is every claim supported by the passages) reuses the
  data engine's grounding judge, `programs.synth.JudgeGrounding`: the same question, one prompt.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import dspy

from tuneloop.config import Project
from tuneloop.models import registry  # build_chat_model looked up at call time (tests replace it)
from tuneloop.models.base import ChatModel, GenerationParams
from tuneloop.models.registry import generation_params
from tuneloop.programs.dspy_bridge import make_adapter, predict_many
from tuneloop.programs.rag import Passage
from tuneloop.programs.synth import JudgeGrounding, number_passages
from tuneloop.progress import Reporter

COMPARE_INSTRUCTIONS = (
    "You compare two answers to a question about a document. The better answer is correct, "
    "supported by the excerpts and brief. Reply 1 or 2 (or Tie), then one short reason."
)
SCORE_INSTRUCTIONS = (
    "You grade an answer to a question about a document from 1 (bad) to 5 (excellent) on correctness, "
    "faithfulness to the excerpts (no unsupported claims) and brevity. Reply with the score, then one short reason."
)
CORRECT_INSTRUCTIONS = (
    "You check an answer to a question about a document against the expert's reference answer. Say whether "
    "the answer agrees with the reference (same meaning; wording may differ). Reply Yes or No, then one short reason."
)


class ComparePair(dspy.Signature):
    __doc__ = COMPARE_INSTRUCTIONS

    excerpts: str = dspy.InputField(desc="numbered passages of the document")
    question: str = dspy.InputField()
    answer_1: str = dspy.InputField()
    answer_2: str = dspy.InputField()
    better: Literal["1", "2", "tie"] = dspy.OutputField(
        desc="Which answer is better? Reply 1 or 2 (or Tie), then one short reason.")
    rationale: str = dspy.OutputField(desc="one short reason")

    @staticmethod
    def parse_plain(reply: str) -> dict:
        choice = parse_choice(reply)
        if choice is None:
            raise ValueError(f"no 1/2/tie verdict in {reply[:60]!r}")
        return {"better": choice, "rationale": rationale_of(reply)}


class ScoreAnswer(dspy.Signature):
    __doc__ = SCORE_INSTRUCTIONS

    excerpts: str = dspy.InputField(desc="numbered passages of the document")
    question: str = dspy.InputField()
    answer: str = dspy.InputField()
    score: float = dspy.OutputField(desc="Score the answer from 1 to 5. Reply with the number, then one short reason.")
    rationale: str = dspy.OutputField(desc="one short reason")

    @staticmethod
    def parse_plain(reply: str) -> dict:
        score, criteria = parse_score(reply)
        if score is None:
            raise ValueError(f"no 1-5 score in {reply[:60]!r}")
        return {"score": score, "criteria": criteria, "rationale": rationale_of(reply)}


class JudgeCorrect(dspy.Signature):
    __doc__ = CORRECT_INSTRUCTIONS

    question: str = dspy.InputField()
    reference: str = dspy.InputField(desc="the expert's answer; other accepted answers on further lines")
    answer: str = dspy.InputField()
    correct: bool = dspy.OutputField(
        desc="Does the answer agree with the reference? Reply Yes or No, then one short reason.")
    rationale: str = dspy.OutputField(desc="one short reason")

    @staticmethod
    def parse_plain(reply: str) -> dict:
        verdict = parse_yes_no(reply)
        if verdict is None:
            raise ValueError(f"no Yes/No verdict in {reply[:60]!r}")
        return {"correct": verdict, "rationale": yes_no_rationale(reply)}


class JudgePrograms(dspy.Module):
    """The judge's predictors (saved and loaded together with `save`/`load`)."""

    def __init__(self):
        super().__init__()
        self.compare = dspy.Predict(ComparePair)
        self.score = dspy.Predict(ScoreAnswer)
        self.correct = dspy.Predict(JudgeCorrect)
        self.faithful = dspy.Predict(JudgeGrounding)

    def forward(self, excerpts: str, question: str, answer_1: str, answer_2: str):
        return self.compare(excerpts=excerpts, question=question, answer_1=answer_1, answer_2=answer_2)


# --------------------------------------------------------------------------- the judge role


@dataclass
class EvalJudge:
    """The judge model with the adapter, decoding and DSPy programs its calls go through."""

    model: ChatModel
    adapter: dspy.Adapter
    params: GenerationParams
    batch: int | str
    programs: JudgePrograms = field(default_factory=JudgePrograms)


JudgeSource = EvalJudge | Callable[[], EvalJudge] | None


def build_judge(project: Project, model: ChatModel | None = None) -> EvalJudge:
    """The judge role (or `model`), its adapter (`models.judge.adapter`) and greedy decoding."""
    role = project.settings.models.judge
    return EvalJudge(model or registry.build_chat_model(project, role),
                     make_adapter(role.adapter, role.backend),
                     generation_params(role, temperature=0.0), role.batch_size)


def resolve_judge(project: Project, judge: JudgeSource) -> EvalJudge:
    """`judge` itself, the judge a factory builds, or (None) the judge role."""
    if judge is None:
        return build_judge(project)
    return judge if isinstance(judge, EvalJudge) else judge()


def grade(judge: EvalJudge, items: Sequence[tuple[Sequence[Passage], str, str]], reporter: Reporter | None = None,
          description: str = "judging answers") -> list[float | None]:
    """The judge's 1-5 `ScoreAnswer` grade of each (passages, question, answer); None when unparseable."""
    inputs = [{"excerpts": number_passages(list(passages)), "question": question, "answer": answer}
              for passages, question, answer in items]
    results = predict_many(judge.programs.score, judge.adapter, judge.model, inputs, judge.params, reporter,
                           description, judge.batch)
    return [parsed_score(parsed) for parsed, _ in results]


# --------------------------------------------------------------------------- parsing

_WORDS = {"1": "1", "one": "1", "first": "1", "2": "2", "two": "2", "second": "2",
          "tie": "tie", "neither": "tie", "both": "tie", "equal": "tie", "same": "tie"}
_CHOICE = re.compile(
    r"^\W*(?:(?:better(?:\s+answer)?|verdict|winner|choice)\s*(?:is)?\s*[:\-]?\s*)?(?:the\s+)?(?:answer\s*)?"
    r"(1|2|one|two|first|second|tie|neither|both|equal|same)\b(?:\s+(?:one|answer))?", re.IGNORECASE)
_MENTION = re.compile(r"\banswer\s*([12])\b", re.IGNORECASE)


def parse_choice(reply: str) -> str | None:
    """'1', '2' or 'tie' from a comparison reply; None when it names no verdict.

    The verdict must open the reply ("2", "Answer 1 is better", "Better: 2", "Tie.") or, failing
    that, the reply must mention exactly one of "answer 1" / "answer 2".
    """
    text = reply.strip()
    m = _CHOICE.match(text)
    if m:
        return _WORDS[m.group(1).lower()]
    named = {x for x in _MENTION.findall(text)}
    return named.pop() if len(named) == 1 else None


_CRITERION = re.compile(r"\b(correctness|faithfulness|brevity)\b\W{0,3}([1-5])(?:\s*/\s*5)?", re.IGNORECASE)
_SCORE = re.compile(r"^\W*(?:(?:score|grade|rating)\s*(?:is)?\s*[:\-]?\s*)?([1-5](?:\.\d+)?)(?!\d)(?:\s*/\s*5)?",
                    re.IGNORECASE)


def parse_score(reply: str) -> tuple[float | None, dict[str, int]]:
    """(score 1-5, per-criterion scores) from a grading reply.

    Criteria written out ("Correctness: 4, Faithfulness: 5, Brevity: 3") give their mean; otherwise
    the reply must open with the score ("4", "Score: 4/5"). None when neither is there.
    """
    criteria = {name.lower(): int(v) for name, v in _CRITERION.findall(reply)}
    if criteria:
        return sum(criteria.values()) / len(criteria), criteria
    m = _SCORE.match(reply.strip())
    if not m:
        return None, {}
    value = float(m.group(1))
    return (value if 1.0 <= value <= 5.0 else None), {}


def parsed_score(parsed: dict | None) -> float | None:
    """The 1-5 score of a parsed ScoreAnswer output (plain or DSPy adapter); None if absent or out of range."""
    if not parsed:
        return None
    try:
        value = float(parsed.get("score"))
    except (TypeError, ValueError):
        return None
    return value if 1.0 <= value <= 5.0 else None


_YES_NO = re.compile(
    r"^\W*(?:(?:verdict|correct|supported|faithful)\s*[:\-]\s*)?"
    r"(yes|no|true|false|correct|incorrect|wrong|supported|unsupported|not\s+supported)\b", re.IGNORECASE)
_YES = {"yes", "true", "correct", "supported"}


def parse_yes_no(reply: str) -> bool | None:
    """True / False from a reply that opens with its verdict ("Yes.", "No - ...", "Supported: no",
    "Incorrect"); None when it opens with none."""
    m = _YES_NO.match(reply.strip())
    return None if m is None else m.group(1).lower() in _YES


def parsed_yes_no(parsed: dict | None, key: str) -> bool | None:
    """The yes/no field `key` of a parsed JudgeCorrect / JudgeGrounding output (plain or DSPy adapter)."""
    value = (parsed or {}).get(key)
    if isinstance(value, bool) or value is None:
        return value
    return parse_yes_no(str(value))


def yes_no_rationale(reply: str) -> str:
    """The reason after a yes/no verdict."""
    m = _YES_NO.match(reply.strip())
    rest = reply.strip()[m.end():] if m else reply.strip()
    return re.sub(r"^\W*", "", rest).strip()[:500]


def score_to_reward(score: float) -> float:
    """A 1-5 score (or rating) as a reward in [-1, 1]: (score - 3) / 2."""
    return max(-1.0, min(1.0, (float(score) - 3.0) / 2.0))


def rationale_of(reply: str) -> str:
    """The reason after the verdict: the reply without its leading verdict token."""
    text = reply.strip()
    m = _CHOICE.match(text) or _SCORE.match(text)
    rest = text[m.end():] if m else text
    rest = re.sub(r"^(?:\s*(?:/\s*5|is better|is best|wins))?\W*", "", rest, flags=re.IGNORECASE)
    return rest.strip()[:500]


# --------------------------------------------------------------------------- judging in both orders


def _choice(parsed: dict | None) -> str | None:
    """'1', '2', 'tie' or None from a parsed comparison (plain or DSPy adapter)."""
    if not parsed:
        return None
    value = str(parsed.get("better") or "").strip()
    return value.lower() if value.lower() in ("1", "2", "tie") else parse_choice(value)


def combine(first: str | None, second: str | None) -> tuple[str, str | None]:
    """(outcome, winner) from the two orders' verdicts, already mapped to "a" / "b" / "tie" / None.

    consistent: the same answer wins in both orders (winner "a" or "b"); tie: both orders tie;
    inconsistent: anything else with two verdicts (e.g. position bias); unparsed: a verdict missing.
    """
    if first is None or second is None:
        return "unparsed", None
    if first == second and first in ("a", "b"):
        return "consistent", first
    if first == second == "tie":
        return "tie", None
    return "inconsistent", None


@dataclass
class Judged:
    """One pair judged in both orders."""

    a: str
    b: str
    replies: tuple[str, str]
    choices: tuple[str | None, str | None]  # raw "1"/"2"/"tie"/None of order (a, b) and order (b, a)
    rationales: tuple[str, str]
    outcome: str
    winner: str | None  # "a" | "b" | None

    def verdicts(self) -> list[dict[str, Any]]:
        out = []
        for order, reply, choice, rationale in zip(("ab", "ba"), self.replies, self.choices, self.rationales):
            out.append({"order": order, "reply": reply, "choice": choice, "rationale": rationale,
                        "winner": _map(choice, order)})
        return out

    @property
    def rationale(self) -> str:
        win = self.winner
        for v in self.verdicts():
            if v["winner"] == win and v["rationale"]:
                return v["rationale"]
        return ""


def _map(choice: str | None, order: str) -> str | None:
    if choice is None or choice == "tie":
        return choice
    first, second = ("a", "b") if order == "ab" else ("b", "a")
    return first if choice == "1" else second


def judge_both_orders(programs: JudgePrograms, adapter, judge: ChatModel, items: Sequence[tuple[list[Passage], str,
                      str, str]], params, reporter: Reporter, description: str, batch) -> list[Judged]:
    """Judge each (passages, question, a, b) as (a, b) and as (b, a), in one batched run."""
    inputs = []
    for passages, question, a, b in items:
        base = {"excerpts": number_passages(passages), "question": question}
        inputs.append({**base, "answer_1": a, "answer_2": b})
        inputs.append({**base, "answer_1": b, "answer_2": a})
    results = predict_many(programs.compare, adapter, judge, inputs, params, reporter, description, batch)
    out = []
    for i, (_, _, a, b) in enumerate(items):
        (p1, r1), (p2, r2) = results[2 * i], results[2 * i + 1]
        c1, c2 = _choice(p1), _choice(p2)
        outcome, winner = combine(_map(c1, "ab"), _map(c2, "ba"))
        out.append(Judged(a, b, (r1, r2), (c1, c2),
                          (str((p1 or {}).get("rationale") or ""), str((p2 or {}).get("rationale") or "")),
                          outcome, winner))
    return out


def position_stats(judged: Sequence[Judged]) -> dict[str, Any]:
    """How often the answer in the first position wins a single-order verdict (0.5: no bias)."""
    decisive = [c for j in judged for c in j.choices if c in ("1", "2")]
    first = sum(1 for c in decisive if c == "1")
    return {"verdicts": 2 * len(judged), "decisive": len(decisive), "first_position_wins": first,
            "first_position_rate": round(first / len(decisive), 4) if decisive else None,
            "ties": sum(1 for j in judged for c in j.choices if c == "tie"),
            "unparsed": sum(1 for j in judged for c in j.choices if c is None)}


def calibration_report(judged: Sequence[Judged], sources: Sequence[str]) -> dict[str, Any]:
    """Agreement with people: each human pair was judged with a = chosen, b = rejected."""

    def stats(items: list[Judged]) -> dict[str, Any]:
        outcomes = Counter(j.outcome for j in items)
        agree = sum(1 for j in items if j.outcome == "consistent" and j.winner == "a")
        disagree = sum(1 for j in items if j.outcome == "consistent" and j.winner == "b")
        return {"pairs": len(items), "agree": agree, "disagree": disagree,
                "inconsistent": outcomes.get("inconsistent", 0), "ties": outcomes.get("tie", 0),
                "unparsed": outcomes.get("unparsed", 0),
                "agreement": round(agree / len(items), 4) if items else None,
                "agreement_when_consistent": round(agree / (agree + disagree), 4) if agree + disagree else None}

    report = stats(list(judged))
    report["by_source"] = {s: stats([j for j, src in zip(judged, sources) if src == s]) for s in sorted(set(sources))}
    report["position_bias"] = position_stats(judged)
    if not judged:
        report["note"] = "no human A/B choices or corrections to compare with"
    return report
