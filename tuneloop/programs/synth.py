"""The data engine's DSPy programs: question writer, answer writer, grounding judge, rewriter.

Each is a `dspy.Predict` over a typed signature, so demos can be set from seeds and a DSPy
optimiser can tune them. With a small local model they run through `PlainChatAdapter` (see
`programs/dspy_bridge.py`); capable endpoints use DSPy's own adapters.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import dspy

from tuneloop.programs.dspy_bridge import cited_numbers, strip_citations
from tuneloop.programs.rag import SYSTEM_PROMPT, Passage

# What the teacher is asked for, per question type (the `task` input of WriteQuestion).
TASKS = {
    "self_instruct": "Write one new question in the style of the examples that this passage answers.",
    "fact": "Write one question asking for a specific fact (a name, date, amount or term) stated in this passage.",
    "yes_no": "Write one yes/no question of the form 'Does the document contain a clause that ...?' "
              "that this passage answers.",
    "explanation": "Write one question asking what this passage requires or why, answerable from the passage.",
    "comparison": "Write one question that needs both passages to answer, comparing what they say.",
    "negative": "Write one question a reader of this kind of document might ask that this passage does NOT "
                "answer (a topic it does not mention).",
}

QUESTION_INSTRUCTIONS = (
    "You write questions that people ask about documents. Each question must be short, specific, "
    "end with a question mark, and differ from the examples."
)


class WriteQuestion(dspy.Signature):
    """You write questions that people ask about documents. Each question must be short, specific, end with a question mark, and differ from the examples."""  # noqa: E501

    passage: str = dspy.InputField(desc="an excerpt of the document")
    task: str = dspy.InputField(desc="what kind of question to write")
    question: str = dspy.OutputField(desc="Reply with the question only.")

    @staticmethod
    def parse_plain(reply: str) -> dict:
        return {"question": clean_question(reply)}


class WriteAnswer(dspy.Signature):
    __doc__ = SYSTEM_PROMPT + " Cite the excerpts you used by their numbers, like [1]."

    excerpts: str = dspy.InputField(desc="numbered passages of the document")
    question: str = dspy.InputField()
    answer: str = dspy.OutputField(desc="")
    citations: list[int] = dspy.OutputField(desc="numbers of the excerpts the answer rests on")

    @staticmethod
    def parse_plain(reply: str) -> dict:
        return {"answer": clean_answer(strip_citations(reply)), "citations": cited_numbers(reply)}


class JudgeGrounding(dspy.Signature):
    """You check answers against document excerpts. Say whether every claim in the answer is supported by the excerpts. Reply Yes or No, then one short reason."""  # noqa: E501

    excerpts: str = dspy.InputField()
    question: str = dspy.InputField()
    answer: str = dspy.InputField()
    supported: bool = dspy.OutputField(desc="Is the answer supported by the excerpts? "
                                                                 "Reply Yes or No, then a reason.")
    rationale: str = dspy.OutputField(desc="one short reason")

    @staticmethod
    def parse_plain(reply: str) -> dict:
        verdict = parse_verdict(reply)
        if verdict is None:
            raise ValueError(f"no Yes/No verdict in {reply[:60]!r}")
        return {"supported": verdict, "rationale": re.sub(r"^\W*(yes|no)\b\W*", "", reply, flags=re.I).strip()}


class RewriteAnswer(dspy.Signature):
    __doc__ = SYSTEM_PROMPT + " Rewrite the reference answer in your own words; keep its meaning and keep it short."

    excerpts: str = dspy.InputField()
    question: str = dspy.InputField()
    reference_answer: str = dspy.InputField()
    answer: str = dspy.OutputField(desc="")

    @staticmethod
    def parse_plain(reply: str) -> dict:
        return {"answer": clean_answer(reply)}


class SynthPrograms(dspy.Module):
    """The four predictors of the data engine (saved and loaded together with `save`/`load`)."""

    def __init__(self):
        super().__init__()
        self.write_question = dspy.Predict(WriteQuestion)
        self.write_answer = dspy.Predict(WriteAnswer)
        self.judge = dspy.Predict(JudgeGrounding)
        self.rewrite = dspy.Predict(RewriteAnswer)

    def forward(self, passage: str, task: str):
        return self.write_question(passage=passage, task=task)


def number_passages(passages: Sequence[Passage]) -> str:
    """The excerpt block of every answer prompt: the same numbering as the student's prompt."""
    return "\n\n".join(f"[{i + 1}] {p.text.strip()}" for i, p in enumerate(passages))


def parse_verdict(reply: str) -> bool | None:
    m = re.match(r"^\W*(?:supported\s*:\s*)?(yes|no|true|false)\b", reply.strip(), flags=re.I)
    if not m:
        return None
    return m.group(1).lower() in ("yes", "true")


_PREFIX = re.compile(r"^\s*(?:[-*\d.)\s]*)(?:new\s+)?(?:(?:question|output|q)\s*[:\-]\s*)?", re.IGNORECASE)


def clean_question(reply: str) -> str:
    """The first question in the reply: the first line with a '?', cut after it, without list
    markers, a 'Question:'/'Output:' prefix or a lead-in such as 'Here is a question: "...'.
    A reply with no '?' gives its first line (which the format filter then rejects)."""
    lines = [ln for ln in reply.strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    line = next((ln for ln in lines if "?" in ln), lines[0])
    q = _PREFIX.sub("", line).strip()
    if "?" in q:
        q = q[: q.index("?") + 1]
        lead = max(q.rfind(': '), q.rfind('"', 0, len(q) - 1))  # 'Here is one: "What ...?'
        if lead > 0:
            q = q[lead + 1 :]
    return q.strip().strip('"').strip()


def clean_answer(reply: str) -> str:
    """The reply's first paragraph without an 'Answer:' prefix."""
    text = re.sub(r"^\s*answer\s*:\s*", "", reply.strip(), flags=re.IGNORECASE).strip()
    return text.split("\n\n")[0].strip()
