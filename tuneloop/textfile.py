"""Decoding user text files (documents, seeds, settings) with errors that name the file and line.

Text is UTF-8. A byte-order mark is honoured, so UTF-16 and UTF-32 files saved with one (Windows
editors do) are read correctly instead of as garbage. A NUL character is refused: real text has
none, while a binary file or UTF-16 without a byte-order mark is full of them.
"""
from __future__ import annotations

import codecs
from pathlib import Path

from tuneloop.errors import InputError, TuneloopError

# UTF-32-LE's mark begins with UTF-16-LE's, so the longer marks are tried first.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def _line_of(text: str, index: int) -> int:
    return text.count("\n", 0, index) + 1


def decode_text(data: bytes, path: Path | str, strict: bool = True,
                error: type[TuneloopError] = InputError) -> str:
    """The text of a file's bytes. `strict`: an undecodable byte is an `error` naming the file and
    line; otherwise it becomes U+FFFD (so one stray byte does not fail a whole document)."""
    encoding = next((enc for bom, enc in _BOMS if data.startswith(bom)), "utf-8")
    try:
        text = data.decode(encoding, errors="strict" if strict else "replace")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].decode(encoding, errors="replace").count("\n") + 1
        raise error(f"{path} line {line}: not {encoding.upper().replace('-SIG', '')} text "
                    f"({exc.reason} at byte {exc.start}); save the file as UTF-8") from None
    nul = text.find("\x00")
    if nul != -1:
        raise error(f"{path} line {_line_of(text, nul)}: contains a NUL character (a binary file, or "
                    "UTF-16/32 text without a byte-order mark?); save the file as UTF-8")
    return text


def read_text(path: Path, strict: bool = True, error: type[TuneloopError] = InputError) -> str:
    """Read and decode a text file (see `decode_text`); an unreadable file is an `error` too."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise error(f"Cannot read {path}: {exc.strerror or exc}") from None
    return decode_text(data, path, strict=strict, error=error)
