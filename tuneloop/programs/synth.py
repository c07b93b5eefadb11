"""Prompts the teacher uses to write synthetic questions (self-instruct, document-grounded).

Answers are written with `programs.rag.build_messages`, the same prompt the student is trained
and served with, so the teacher's answers are grounded in retrieved passages.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

from tuneloop.models.base import Message

QUESTION_SYSTEM = (
    "You write questions that people ask about documents. Each question must be answerable from "
    "the passage, short, specific, and different from the examples."
)


def question_messages(passage: str, demos: Sequence[tuple[str, str]]) -> list[Message]:
    """Ask the teacher for one new question about `passage`, with expert seed Q/A pairs as demos."""
    shown = "\n".join(f"- Question: {q}\n  Answer: {a}" for q, a in demos)
    parts = []
    if shown:
        parts.append(f"Examples of good questions and answers:\n{shown}\n")
    parts.append(f"Passage:\n{passage.strip()}\n")
    parts.append("Write one new question that this passage answers. Reply with the question only.")
    return [{"role": "system", "content": QUESTION_SYSTEM}, {"role": "user", "content": "\n".join(parts)}]


_PREFIX = re.compile(r"^\s*(?:[-*\d.)\s]*)(?:new\s+)?(?:question\s*[:\-]\s*)?", re.IGNORECASE)


def clean_question(reply: str) -> str:
    """First line of the reply, without list markers or a 'Question:' prefix, ending in '?'."""
    lines = [ln for ln in reply.strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    q = _PREFIX.sub("", lines[0]).strip().strip('"').strip()
    if "?" in q:
        q = q[: q.index("?") + 1]
    return q


def clean_answer(reply: str) -> str:
    """The reply without an 'Answer:' prefix and trailing blank lines."""
    return re.sub(r"^\s*answer\s*:\s*", "", reply.strip(), flags=re.IGNORECASE).strip()


def answer_messages(question: str, passages, demo_answers: Sequence[str]) -> list[Message]:
    """The student's own prompt (build_messages), with expert answers shown as style examples."""
    from tuneloop.programs.rag import build_messages

    messages = build_messages(question, passages)
    if demo_answers:
        shown = "; ".join(f'"{a}"' for a in demo_answers)
        messages[0] = {"role": "system", "content": f"{messages[0]['content']} Examples of good answers: {shown}."}
    return messages
