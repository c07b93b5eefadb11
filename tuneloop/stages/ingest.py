"""Stage: ingest documents into the store and (re)build the hybrid retrieval index.

All files are read and chunked before anything is written, so a bad file stops the command
with nothing changed. An unchanged file (same name, same content hash) is skipped; a changed one
has its chunks replaced.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import delete, select

from tuneloop.config import Project
from tuneloop.ingest.chunking import chunk_text, word_offsets
from tuneloop.ingest.index import HybridIndex
from tuneloop.ingest.loaders import RawDocument, iter_files, load_file
from tuneloop.models.base import Embedder
from tuneloop.progress import Reporter
from tuneloop.store import Chunk, Document, Session


@dataclass
class IngestResult:
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    chunks: int = 0
    index_rebuilt: bool = False


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def ingest_paths(project: Project, session: Session, paths: list[Path], embedder: Embedder | None,
                 reporter: Reporter) -> IngestResult:
    """Add new and changed documents to the session (caller commits), then refresh the index."""
    s = project.settings.ingest
    offsets = embedder.token_offsets if embedder is not None else word_offsets
    files = iter_files(paths, require_files=True)  # an empty or wrong folder is an error, not 0 documents
    docs: list[RawDocument] = []
    for f in files:
        docs.extend(load_file(f, max_bytes=int(s.max_document_mb * 1_000_000)))
    known = {d.name: d for d in session.scalars(select(Document))}
    result = IngestResult()
    with reporter.task("chunking documents", len(docs)) as advance:
        for raw in docs:
            sha = _sha(raw.text)
            old = known.get(raw.name)
            if old is not None and old.sha256 == sha:
                result.unchanged.append(raw.name)
                advance(1)
                continue
            if old is not None:
                session.execute(delete(Chunk).where(Chunk.document_id == old.id))
                old.sha256, old.source, old.n_chars = sha, raw.source, len(raw.text)
                doc = old
                result.changed.append(raw.name)
            else:
                doc = Document(name=raw.name, source=raw.source, sha256=sha, n_chars=len(raw.text))
                session.add(doc)
                session.flush()
                known[raw.name] = doc
                result.added.append(raw.name)
            pieces = chunk_text(raw.text, offsets, s.chunk_tokens, s.overlap_tokens)
            session.add_all(Chunk(document_id=doc.id, position=i, text=c.text, start=c.start, end=c.end,
                                  n_tokens=c.n_tokens) for i, c in enumerate(pieces))
            result.chunks += len(pieces)
            advance(1)
    session.flush()
    # Force a rebuild when any text changed: SQLite reuses the ids of deleted chunks (no
    # AUTOINCREMENT), so a changed last document can get back exactly the same chunk ids, and
    # comparing ids alone would keep an index of the old text.
    result.index_rebuilt = ensure_index(project, session, embedder, reporter,
                                        force=bool(result.added or result.changed))
    return result


def scan_documents(session: Session, paths: list[Path]) -> dict[str, list[str]]:
    """Which documents under `paths` are new or changed against the store (nothing is written)."""
    known = {d.name: d.sha256 for d in session.scalars(select(Document))}
    out: dict[str, list[str]] = {"new": [], "changed": []}
    for f in iter_files(paths):
        for raw in load_file(f):
            if raw.name not in known:
                out["new"].append(raw.name)
            elif known[raw.name] != _sha(raw.text):
                out["changed"].append(raw.name)
    return out


def ensure_index(project: Project, session: Session, embedder: Embedder | None, reporter: Reporter,
                 force: bool = False) -> bool:
    """Rebuild the index when it is missing or does not hold exactly the stored chunks."""
    rows = session.execute(select(Chunk.id, Chunk.text, Document.name).join(Document).order_by(Chunk.id)).all()
    ids = [r[0] for r in rows]
    if not force and (project.index_dir / "index.json").is_file():
        try:
            current = HybridIndex.load(project.index_dir, embedder)
            if list(current.chunk_ids) == ids:
                return False
        except Exception:  # unreadable or built with another embedder: rebuild below
            pass
    kind = "BM25 + dense" if embedder is not None else "BM25"
    with reporter.task(f"indexing {len(ids)} chunks ({kind})", len(ids)) as advance:
        counted = _CountingEmbedder(embedder, advance) if embedder is not None else None
        index = HybridIndex.build(ids, [r[1] for r in rows], [r[2] for r in rows], counted)
        index.save(project.index_dir)
        if counted is None:
            advance(len(ids))
    return True


class _CountingEmbedder:
    """Embeds in slices so the progress bar moves while a large corpus is embedded."""

    def __init__(self, inner: Embedder, advance, slice_size: int = 256):
        self.inner, self.advance, self.slice_size, self.name = inner, advance, slice_size, inner.name

    def embed(self, texts):
        parts = []
        for start in range(0, len(texts), self.slice_size):
            part = texts[start : start + self.slice_size]
            parts.append(self.inner.embed(part))
            self.advance(len(part))
        return np.concatenate(parts) if parts else self.inner.embed(texts)

    def token_offsets(self, text: str):
        return self.inner.token_offsets(text)
