"""Find input files and read them into plain-text documents.

Every problem a user can fix (missing path, a folder with nothing to ingest, unsupported type,
corrupt or encrypted PDF, malformed JSONL, empty, binary or too large a document) is raised as
`InputError` naming the file, never as a library traceback.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from tuneloop.errors import InputError
from tuneloop.jsonl import json_objects
from tuneloop.store import Document
from tuneloop.textfile import read_text

SUPPORTED_SUFFIXES = (".txt", ".md", ".pdf", ".jsonl")


@dataclass(frozen=True)
class RawDocument:
    """One document's text.

    `name` is a stable key: the file name for single-document files, `"{file name}#{id or line
    number}"` for each line of a .jsonl file. `source` is the file's absolute path.
    """

    name: str
    text: str
    source: str


def _supported(path: Path) -> bool:
    return path.suffix.lower() in SUPPORTED_SUFFIXES


def _is_hidden(path: Path, root: Path) -> bool:
    # Hidden anywhere below the root given (".git/...", ".DS_Store"), not above it: a user may
    # well keep their documents under a hidden folder and name it explicitly.
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def iter_files(paths: Sequence[Path], require_files: bool = False) -> list[Path]:
    """Expand `paths` into the list of files to ingest.

    Directories are walked recursively in sorted order, keeping supported, non-hidden files; with
    `require_files`, a directory without any is an error. A file named explicitly must have a
    supported suffix. Duplicates are kept once, first seen.
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise InputError(f"Input not found: {path}")
        if path.is_dir():
            inside = [
                p
                for p in sorted(path.rglob("*"))
                if p.is_file() and _supported(p) and not _is_hidden(p, path)
            ]
            if require_files and not inside:
                raise InputError(
                    f"Nothing to ingest in folder {path}: it holds no {', '.join(SUPPORTED_SUFFIXES)} "
                    "file (hidden files and folders are skipped)"
                )
            found.extend(inside)
        elif _supported(path):
            found.append(path)
        else:
            raise InputError(
                f"Unsupported file type: {path} (supported: {', '.join(SUPPORTED_SUFFIXES)})"
            )
    unique: list[Path] = []
    seen: set[Path] = set()
    for path in found:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def _normalise(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _read_text(path: Path) -> str:
    # Not strict: a stray bad byte becomes U+FFFD rather than failing a whole document.
    return _normalise(read_text(path, strict=False))


def _too_large(what: str, size: int, max_bytes: int) -> InputError:
    return InputError(
        f"{what} is {size / 1e6:.1f} MB, over the limit of {max_bytes / 1e6:g} MB "
        "(ingest.max_document_mb): split it, or raise the limit"
    )


def _read_pdf(path: Path) -> str:
    # Imported here so that text-only ingestion does not pay for pypdf's import.
    from pypdf import PdfReader

    # pypdf signals malformed files with many exception types (its own errors, but also
    # ValueError, KeyError, struct errors...), so any failure while parsing is reported as the
    # file's problem rather than let through as a traceback.
    try:
        reader = PdfReader(path)
        if reader.is_encrypted:
            # Many PDFs are "encrypted" with an empty user password only to restrict editing:
            # those open fine. Anything else needs the password, which we do not ask for.
            try:
                opened = reader.decrypt("")
            except Exception as exc:  # noqa: BLE001 - e.g. DependencyError for AES without cryptography
                raise InputError(f"Cannot read PDF {path}: it is encrypted ({exc})") from exc
            if not opened:
                raise InputError(
                    f"Cannot read PDF {path}: it is encrypted with a password; "
                    "save an unencrypted copy and ingest that"
                )
        pages = [page.extract_text() or "" for page in reader.pages]
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - see above
        reason = str(exc) or type(exc).__name__
        raise InputError(f"Cannot read PDF {path}: {reason}") from exc
    # Text extraction can yield NUL characters, which no database column should hold.
    text = _normalise("\n\n".join(pages)).replace("\x00", "")
    if not text.strip():
        raise InputError(
            f"PDF {path} has no extractable text (a scanned PDF needs OCR first, "
            "e.g. with ocrmypdf)"
        )
    return text


def _read_jsonl(path: Path, max_bytes: int | None) -> list[RawDocument]:
    source = str(path.resolve())
    docs: list[RawDocument] = []
    names: set[str] = set()
    for lineno, where, record in json_objects(path, _read_text(path)):
        text = record.get("text")
        if not isinstance(text, str):
            raise InputError(f'Missing or non-string "text" field in {where}')
        if not text.strip():
            raise InputError(f'Empty "text" in {where}')
        if max_bytes is not None and (size := len(text.encode("utf-8"))) > max_bytes:
            raise _too_large(f'The "text" in {where}', size, max_bytes)
        doc_id = record.get("id")
        if doc_id is None:
            doc_id = lineno
        elif isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
            raise InputError(f'The "id" field in {where} must be a string or an integer')
        name = f"{path.name}#{doc_id}"
        if name in names:
            raise InputError(f"Duplicate id {doc_id!r} in {where}")
        names.add(name)
        title = record.get("title")
        if title is not None and not isinstance(title, str):
            raise InputError(f'The "title" field in {where} must be a string')
        # The title is often the most query-like part of a record, so it is kept, as a first line.
        if title and title.strip():
            text = f"{title.strip()}\n\n{text}"
        if "\x00" in text:  # JSON may escape one (\u0000); no database column should hold it
            raise InputError(f'"text" or "title" in {where} contains a NUL character')
        docs.append(RawDocument(name=name, text=_normalise(text), source=source))
    if not docs:
        raise InputError(f"Empty document: {path} has no records")
    return docs


def load_file(path: Path, max_bytes: int | None = None) -> list[RawDocument]:
    """Read one file into its documents: one for .txt/.md/.pdf, one per non-empty line of .jsonl.

    `max_bytes` limits a document's size: the file's for .txt/.md/.pdf, each record's text for .jsonl.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Input not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path, max_bytes)
    if max_bytes is not None and suffix in SUPPORTED_SUFFIXES:
        size = path.stat().st_size
        if size > max_bytes:
            raise _too_large(str(path), size, max_bytes)
    if suffix in (".txt", ".md"):
        text = _read_text(path)
    elif suffix == ".pdf":
        text = _read_pdf(path)
    else:
        raise InputError(
            f"Unsupported file type: {path} (supported: {', '.join(SUPPORTED_SUFFIXES)})"
        )
    if not text.strip():
        raise InputError(f"Empty document: {path} contains no text")
    return [RawDocument(name=path.name, text=text, source=str(path.resolve()))]


def document_sha(text: str) -> str:
    """The content hash a document is stored with (`Document.sha256`): changed text, new hash."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def scan_documents(session: Session, paths: list[Path]) -> dict[str, list[str]]:
    """Which documents under `paths` are new or changed against the store (nothing is written)."""
    known = {d.name: d.sha256 for d in session.scalars(select(Document))}
    out: dict[str, list[str]] = {"new": [], "changed": []}
    for f in iter_files(paths):
        for raw in load_file(f):
            if raw.name not in known:
                out["new"].append(raw.name)
            elif known[raw.name] != document_sha(raw.text):
                out["changed"].append(raw.name)
    return out
