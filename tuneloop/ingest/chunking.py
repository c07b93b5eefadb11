"""Split a document into overlapping chunks sized in tokens.

Chunks are sized in the *embedder's* tokens (pass `embedder.token_offsets`): a dense embedder only
reads its first N tokens (all-MiniLM-L6-v2: 256 word pieces), so a chunk sized in characters or
words could be silently truncated when embedded. `word_offsets` is the fallback when no embedder
is used.

Work is linear in the text's size whatever its shape (one 10 MB line, megabytes of whitespace, one
endless "word"): the tokenizer sees pieces of at most `_PIECE_CHARS` characters, a token is at
most `_MAX_TOKEN_CHARS` long (so a chunk is at most `chunk_tokens * _MAX_TOKEN_CHARS`), and a
boundary test looks at single characters, never at copies of the text.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

Offsets = list[tuple[int, int]]

# A cut right after a token ending in one of these ends a sentence (or a clause worth ending on).
_SENTENCE_END = ".!?"
# The tokenizer is called on pieces of about this many characters, cut at whitespace: a fast
# tokenizer's memory grows with its input (about 2 GB for 10 MB of text in one call).
_PIECE_CHARS = 100_000
# A longer token is cut into pieces of this length. 100 is WordPiece's longest word (a longer
# one becomes a single [UNK] spanning it); without a cap, 10 MB with no whitespace would be a
# single 10 MB "token", chunk and prompt passage.
_MAX_TOKEN_CHARS = 100
# Only the last 20% of a window is searched for a boundary: cutting earlier would waste too much
# of the window and make chunks very uneven.
_BOUNDARY_ZONE = 0.2


@dataclass(frozen=True)
class Chunk:
    """A span of a document: `text == doc_text[start:end]`, holding `n_tokens` tokens."""

    text: str
    start: int
    end: int
    n_tokens: int


def word_offsets(text: str) -> Offsets:
    """Fallback tokenizer: the character spans of runs of non-whitespace."""
    return [(m.start(), m.end()) for m in re.finditer(r"\S+", text)]


def _piece_end(text: str, start: int) -> int:
    """Where the tokenizer piece starting at `start` ends: just after its last space or line end,
    so no word is cut (or at `_PIECE_CHARS` when the piece holds none)."""
    end = start + _PIECE_CHARS
    if end >= len(text):
        return len(text)
    last = max(text.rfind(c, start, end) for c in " \n\t")
    return last + 1 if last != -1 else end


def _split_long(spans: Offsets) -> Offsets:
    out: Offsets = []
    for s, e in spans:
        out.extend((i, min(i + _MAX_TOKEN_CHARS, e)) for i in range(s, e, _MAX_TOKEN_CHARS))
    return out


def token_spans(text: str, token_offsets: Callable[[str], Offsets]) -> Offsets:
    """The non-empty token spans of `text` (see the module docstring for the bounds applied)."""
    spans: Offsets = []
    start = 0
    while start < len(text):
        end = _piece_end(text, start)
        # Empty spans are special tokens (e.g. [CLS] mapped to (0, 0)): they hold no text.
        spans.extend((start + s, start + e) for s, e in token_offsets(text[start:end]) if e > s)
        start = end
    if any(e - s > _MAX_TOKEN_CHARS for s, e in spans):
        spans = _split_long(spans)
    return spans


def _is_boundary(text: str, spans: Offsets, cut: int) -> bool:
    """Whether ending a chunk after token `cut - 1` ends it at a sentence or line end."""
    end = spans[cut - 1][1]
    if text[end - 1] in _SENTENCE_END:
        return True
    following = spans[cut][0] if cut < len(spans) else len(text)
    return text.find("\n", end, following) != -1


def _window_end(text: str, spans: Offsets, first: int, last: int, overlap: int) -> int:
    """Where to end the window spanning tokens [first, last): at the latest boundary in its
    last 20%, or at `last` when there is none there."""
    earliest = first + math.ceil((last - first) * (1 - _BOUNDARY_ZONE))
    # The next window starts `overlap` tokens before this one's end, so the end must stay more
    # than `overlap` tokens after `first`, or chunking would stop moving forward.
    earliest = max(earliest, first + overlap + 1)
    for cut in range(last, earliest - 1, -1):
        if _is_boundary(text, spans, cut):
            return cut
    return last


def chunk_text(
    text: str,
    token_offsets: Callable[[str], Offsets],
    chunk_tokens: int,
    overlap_tokens: int,
    prefer_boundaries: bool = True,
) -> list[Chunk]:
    """Cut `text` into windows of at most `chunk_tokens` tokens, consecutive windows sharing
    exactly `overlap_tokens` tokens; the last window ends at the last token.

    Without `prefer_boundaries` each window starts `chunk_tokens - overlap_tokens` tokens after
    the previous one. With it (the default) a window that is not the last is shortened to end at
    a sentence or line end if one lies in its last 20%, and the next one starts `overlap_tokens`
    before that end. A chunk spans from its first token's start to its last token's end.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
    if not 0 <= overlap_tokens < chunk_tokens:
        raise ValueError(
            f"overlap_tokens must be in [0, chunk_tokens), got {overlap_tokens} "
            f"with chunk_tokens={chunk_tokens}"
        )
    spans = token_spans(text, token_offsets)
    chunks: list[Chunk] = []
    first = 0
    while first < len(spans):
        last = min(first + chunk_tokens, len(spans))
        if prefer_boundaries and last < len(spans):
            last = _window_end(text, spans, first, last, overlap_tokens)
        start, end = spans[first][0], spans[last - 1][1]
        chunks.append(Chunk(text=text[start:end], start=start, end=end, n_tokens=last - first))
        if last == len(spans):
            break
        first = last - overlap_tokens
    return chunks
