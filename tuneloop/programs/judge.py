"""The AI judge's DSPy programs: pairwise comparison and rubric scoring.

Like the data engine's programs (`programs/synth.py`), each is a `dspy.Predict` over a typed
signature. Small local judges run through `PlainChatAdapter`, which reads the whole reply and
hands it to the signature's `parse_plain`; capable endpoints use DSPy's own adapters.

* `ComparePair`: which of two answers to the same question is better, given the passages the
  student saw. RLAIF asks it twice, with the answers swapped, and keeps a verdict only when the
  same answer wins in both orders (a judge that always prefers the first position keeps nothing).
* `ScoreAnswer`: a 1-5 grade on correctness, faithfulness to the passages and brevity, turned
  into a reward in [-1, 1] by `score_to_reward`.
* `JudgeCorrect`: the evaluation's yes/no verdict (`stages/judge_eval.py`): does the answer agree
  with the expert's reference. Faithfulness (is every claim supported by the passages) reuses the
  data engine's grounding judge, `programs.synth.JudgeGrounding`: the same question, one prompt.
"""
from __future__ import annotations

import re
from typing import Literal

import dspy

from tuneloop.programs.synth import JudgeGrounding

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
