"""The "the document does not say" answer: its canonical text and how to recognise one.

Lowest layer: the metrics read a yes/no question's free-text answer with it, the data engine's
filters drop or keep negative answers with it.
"""
from __future__ import annotations

import re

NEGATIVE_ANSWER = "The document does not say."
"""The canonical answer when the passages do not contain the answer."""

# What the answer says is silent. Contract words ("agreement", "contract", "lease") are left out on
# purpose: "The agreement does not specify a liability cap" is a fact about the contract, an answer.
_SOURCE = (
    r"(?:documents?|excerpts?|passages?|texts?|context|sources?|extracts?|snippets?"
    r"|(?:provided|given|available) (?:information|material)|information (?:provided|given))"
)
_SOURCE_REF = rf"(?:(?:the|these|this|those|any|all|of|provided|given|retrieved|above)\s+)*{_SOURCE}"
_NOT = r"(?:does not|doesn't|do not|don't|did not|didn't)"
_SAY = r"(?:say|state|specify|mention|indicate|address|cover|disclose|discuss|describe|answer|tell|reveal)"
_HOLD = r"(?:contain|include|provide|give|offer|have)"
_INFO = r"(?:information|details?|answer|mention|reference|indication)"
_SAID = (
    r"(?:stated|specified|mentioned|given|provided|addressed|covered|disclosed|indicated|included"
    r"|found|described|defined|set out|available|answered|discussed|listed)"
)
_NEGATIVE_PATTERNS = [
    # "The document does not say", "the excerpts provided don't explicitly specify"
    rf"\b{_SOURCE}\s+(?:(?:provided|given|above|retrieved|supplied|here)\s+)?{_NOT}\s+(?:\w+\s+)?{_SAY}\b",
    # "The text does not contain any information on ...", but not "... does not contain a clause"
    (
        rf"\b{_SOURCE}\s+(?:(?:provided|given|above|retrieved|supplied|here)\s+)?{_NOT}\s+{_HOLD}\s+"
        rf"(?:any\s+|enough\s+|sufficient\s+|specific\s+|relevant\s+|an?\s+|the\s+)*{_INFO}\b"
    ),
    # "The passages are silent on ...", "the document makes no mention of ..."
    rf"\b{_SOURCE}\s+(?:is|are)\s+silent\b",
    rf"\b{_SOURCE}\s+(?:makes?|contains?|gives?|provides?|includes?|has|have|offers?)\s+no\s+{_INFO}\b",
    # "Not stated in the document", "is not specified in any of the excerpts"
    rf"\bnot\s+(?:\w+\s+)?{_SAID}\s+(?:in|by|within)\s+{_SOURCE_REF}\b",
    # "There is no information about X in the passages"
    rf"\bno\s+{_INFO}\b.*\b(?:in|from|within)\s+{_SOURCE_REF}\b",
    # "This cannot be determined from the document", "It cannot be answered." (not "The price
    # cannot be determined unilaterally")
    (
        r"\b(?:cannot|can't|can not|could not|couldn't)\s+be\s+(?:determined|answered|established|inferred"
        r"|ascertained)(?:\s+(?:from|based on|with|using|given)\b|\W*$)"
    ),
    r"\b(?:it is|it's)\s+(?:not possible|impossible)\s+to\s+(?:determine|answer|tell|say)\b",
    # "I cannot find ...", "I don't know"
    (
        r"^\W*i\s+(?:cannot|can't|could not|couldn't|am unable to|was unable to)\s+"
        r"(?:find|locate|see|determine|tell|answer)\b"
    ),
    r"^\W*i\s+(?:do not|don't)\s+know\b",
]
_NEGATIVE_RE = re.compile("|".join(f"(?:{p})" for p in _NEGATIVE_PATTERNS))
# Short answers that are entirely a refusal (compared with the whole answer, punctuation dropped).
_NEGATIVE_WHOLE = frozenset(
    {
        "not stated", "not specified", "not mentioned", "not provided", "not given", "not available",
        "not found", "not addressed", "no information", "no information available",
        "no information provided", "unknown", "cannot determine", "cannot be determined",
    }
)


def is_negative_answer(text: str) -> bool:
    """True when ``text`` says the source does not contain the answer (see :data:`NEGATIVE_ANSWER`).

    Recognises, case-insensitively, "The document does not say", "the excerpts do not say", "Not
    stated in the document", "The document doesn't specify", "The passages are silent on this",
    "There is no information about that in the text", "This cannot be determined from the
    document", "I cannot find ...", and short refusals such as "Not specified." or "Unknown".
    The subject must be the source (document, excerpts, passages, text, context ...): "The
    agreement does not specify a cap" and "The Licensee may not assign" are ordinary answers.
    """
    lowered = " ".join(text.lower().replace("\u2019", "'").replace("\u2018", "'").split())
    if not lowered:
        return False
    if _NEGATIVE_RE.search(lowered):
        return True
    whole = " ".join(re.sub(r"[^a-z0-9' ]+", " ", lowered).split())
    return whole in _NEGATIVE_WHOLE
