"""Text filters for synthetic data."""
from __future__ import annotations

from collections.abc import Iterable

from tuneloop.metrics import is_yes_no_reference, normalize_tokens, rouge_l


class NoveltyFilter:
    """Self-Instruct's novelty rule: reject a question whose ROUGE-L with any earlier one is >= threshold."""

    def __init__(self, history: Iterable[str], threshold: float):
        self.threshold = threshold
        self.pool: list[str] = [q for q in history if q.strip()]
        self.seen = {" ".join(normalize_tokens(q)) for q in self.pool}

    def check(self, question: str, min_chars: int, max_chars: int) -> str | None:
        """The reason to reject `question`, or None when it is acceptable."""
        if not question.strip():
            return "empty"
        if len(question) < min_chars:
            return "too short"
        if len(question) > max_chars:
            return "too long"
        if not question.rstrip().endswith("?"):
            return "not a question (no '?')"
        if " ".join(normalize_tokens(question)) in self.seen:
            return "duplicate"
        if self.pool and rouge_l(question, self.pool) >= self.threshold:
            return f"rouge-l >= {self.threshold} vs an earlier question"
        return None

    def add(self, question: str) -> None:
        self.pool.append(question)
        self.seen.add(" ".join(normalize_tokens(question)))


def support(answer: str, context: str) -> float:
    """Share of the answer's words that occur in the context (a cheap lexical grounding check)."""
    words = normalize_tokens(answer)
    if not words:
        return 0.0
    ctx = set(normalize_tokens(context))
    return sum(w in ctx for w in words) / len(words)


def answer_problem(answer: str, context: str, min_chars: int, max_chars: int, min_support: float) -> str | None:
    """Why a synthetic answer is unusable, or None. Yes/No answers need no lexical support."""
    if len(answer) < min_chars:
        return "answer empty"
    if len(answer) > max_chars:
        return "answer too long"
    if is_yes_no_reference(answer.split(",")[0].split(".")[0]):
        return None
    if support(answer, context) < min_support:
        return f"answer not supported by its passages (< {min_support:.0%} of words)"
    return None
