"""Stable held-out splits: which side of the train / held-out line a question falls on.

The side is a hash of the normalised question and its document, so it never depends on import
order, on which run sees a question first, or on the machine; the same question about the same
document always lands on the same side (used by `seeds import --holdout` and by the cycle's
feedback step for corrected answers, which can also send a share to the dev split).
"""
from __future__ import annotations

import hashlib

from tuneloop.metrics import normalize_tokens


def question_key(question: str, document: str | None) -> tuple[str, str]:
    """The identity of a question for splitting: its normalised words and its document."""
    return " ".join(normalize_tokens(question)), document or ""


def _unit(key: tuple[str, str]) -> float:
    """A number in [0, 1) fixed by the key (the first 8 bytes of its SHA-256)."""
    digest = hashlib.sha256("\x00".join(key).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def heldout_side(key: tuple[str, str], fraction: float, dev_fraction: float = 0.0) -> str:
    """'eval' for about `fraction` of keys, 'dev' for about `dev_fraction` more, else 'train';
    stable across runs and machines (a key's side changes only if the fractions do)."""
    u = _unit(key)
    if u < fraction:
        return "eval"
    return "dev" if u < fraction + dev_fraction else "train"
