"""Extraction answers in the document's words: a free reply turned into a span of its passages.

Asked "What is the initial term of the agreement?", a small model writes "The initial term of the
master services agreement is three years." where the contract says "three (3) years"; it opens
with the excerpt's marker ("[2] United States of America") or a section number ("3.2 The law
is ..."). `copy_answer` turns such a reply into the clause it points at, in three steps:

1. drop a leading excerpt marker ("[2]", the prompt numbers its excerpts) or section number ("3.2");
2. drop a restatement of the question: a leading clause made mostly of the question's own words
   (and fillers such as "the", "of", "answer"), up to "is" / "are" / "was" / "were" / ":";
3. snap to the passages: the span of the retrieved passages with the highest token F1 against
   what is left replaces it when that F1 reaches `min_overlap`; below it the reply is kept, since
   a reply the passages do not support should be seen as such, not dressed as a random quote.

The negative answer ("The document does not say.") and decided yes/no answers are left alone.
The same function runs in eval, the gate and `tuneloop serve` (`programs/decide.answer_conversations`).

Why post-processing and not constrained decoding: generation restricted token by token to spans
of the passages (transformers' `prefix_allowed_tokens_fn`) was measured first on the demo's 18
held-out extraction questions and fell from token F1 0.189 to 0.019: the model's first choice
("The ...") commits it to a wrong span or to the negative answer. Letting it write, then copying
the span it meant, kept its choice and fixed the words (0.189 -> 0.348, docs/benchmarks.md).
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from tuneloop.metrics import normalize_tokens, raw_tokens
from tuneloop.negative import is_negative_answer

# "[2] ..." (an excerpt marker), "3.2 The ..." / "9. General" (a section number before a capital);
# not "30 days" or "1.5 years", which are answers
_LEAD = re.compile(r"^\s*(?:\[\d+\]|(?:\d+(?:\.\d+)+\.?|\d+\.)(?=\s+[A-Z]))\s*")
_WORD = re.compile(r"[\w'’$£€%-]+|[^\w\s]")
_LINKS = frozenset({"is", "are", "was", "were", ":"})
_FILLERS = frozenset("""the a an of in on under for to by with this that its their his her these those
document answer excerpt excerpts""".split())
_STEM = 5  # words compared by their first letters: "governs" ~ "governing", "terminate" ~ "termination"
RESTATEMENT_SHARE = 0.6  # share of question or filler words before the link word
MAX_RESTATEMENT_WORDS = 20


def _stem(word: str) -> str:
    return word.lower()[:_STEM]


def strip_lead(reply: str) -> str:
    """`reply` without a leading excerpt marker or section number."""
    return _LEAD.sub("", reply, count=1)


def strip_restatement(reply: str, question: str) -> str:
    """`reply` without a leading restatement of `question` ("The governing law of the lease is ...")."""
    known = {_stem(w) for w in _WORD.findall(question)} | {_stem(w) for w in _FILLERS}
    words = list(_WORD.finditer(reply))
    for i, match in enumerate(words[: MAX_RESTATEMENT_WORDS + 1]):
        if i and match.group(0).lower() in _LINKS:
            before = [w.group(0) for w in words[:i] if w.group(0).isalnum() or w.group(0)[0].isalnum()]
            if before and sum(_stem(w) in known for w in before) / len(before) >= RESTATEMENT_SHARE:
                rest = reply[match.end():].lstrip(" :,-").strip()
                return rest or reply
            return reply  # the first link word decides: "X is Y" where X is not the question
    return reply


def best_span(answer: str, passages: Sequence[str]) -> tuple[str, float]:
    """The word span of `passages` with the highest token F1 against `answer`, and that F1. Ties
    go to the span closest to the answer's own words (F1 with articles kept: "the laws of X" stays
    "the laws of X"), then the shorter, then the earlier. Spans are at most twice the answer's
    length + 3 words."""
    target = Counter(normalize_tokens(answer))
    raw_target = Counter(raw_tokens(answer))
    size, raw_size = sum(target.values()), sum(raw_target.values())
    best, best_key = "", (0.0, 0.0, 0, 0)
    if not size:
        return best, 0.0
    limit = 2 * len(answer.split()) + 3
    for p_index, text in enumerate(passages):
        words = text.split()
        tokens = [normalize_tokens(w) for w in words]
        raws = [raw_tokens(w) for w in words]
        for start in range(len(words)):
            if not any(t in raw_target for t in raws[start]):
                continue  # a best span starts on a shared word (a leading extra word only lowers F1)
            seen: Counter[str] = Counter()
            raw_seen: Counter[str] = Counter()
            common = length = raw_common = raw_length = 0
            for end in range(start, min(len(words), start + limit)):
                for t in tokens[end]:
                    seen[t] += 1
                    length += 1
                    common += seen[t] <= target[t]
                for t in raws[end]:
                    raw_seen[t] += 1
                    raw_length += 1
                    raw_common += raw_seen[t] <= raw_target[t]
                if common and any(t in raw_target for t in raws[end]):
                    key = (2 * common / (length + size), 2 * raw_common / (raw_length + raw_size),
                           -(end - start), -p_index)
                    if key > best_key:
                        best_key, best = key, " ".join(words[start : end + 1])
    return best.strip(" ,;:.\"'*_`"), best_key[0]  # no trailing punctuation, quotes or Markdown emphasis


def copy_answer(reply: str, question: str, passages: Sequence[str], min_overlap: float = 0.5) -> str:
    """`reply` as the passage span it points at (see the module docstring); unchanged when it is
    the negative answer, empty, or matches no span with token F1 >= `min_overlap`."""
    if not reply.strip() or is_negative_answer(reply):
        return reply
    core = strip_restatement(strip_lead(reply), question).strip().rstrip(".").strip() or reply
    span, overlap = best_span(core, passages)
    return span if span and overlap >= min_overlap else core
