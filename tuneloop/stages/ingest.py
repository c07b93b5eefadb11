"""Stage: ingest documents into the store and (re)build the hybrid retrieval index.

All files are read and chunked before anything is written, so a bad file stops the command
with nothing changed. An unchanged file (same name, same content hash) is skipped; a changed one
has its chunks replaced.

The store's write transaction is short: parsing, chunking and embedding (the slow part) come
before it, and it only inserts and deletes rows, then commits. So a running server's writes
(feedback, interactions) wait milliseconds, not the whole ingest. The store is committed before
the index is built (from the vectors already computed) and swapped in: a kill in between leaves
an index whose recorded content hash differs from the store's chunks; the next ingest rebuilds it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import delete, select

from tuneloop.config import Project
from tuneloop.ingest.chunking import Chunk as Piece
from tuneloop.ingest.chunking import chunk_text, word_offsets
from tuneloop.ingest.index import HybridIndex, clean_leftovers, stored_chunks, stored_chunks_hash
from tuneloop.ingest.loaders import RawDocument, document_sha, iter_files, load_file
from tuneloop.models.base import Embedder
from tuneloop.progress import Reporter
from tuneloop.store import Chunk, Document, Session


@dataclass
class IngestResult:
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    chunks: int = 0
    embedded: int = 0  # chunk texts sent to the embedder
    reused: int = 0  # chunk texts whose vectors came from the current index
    index_rebuilt: bool = False


@dataclass
class _Planned:
    """A new or changed document, chunked, waiting for the write transaction."""

    raw: RawDocument
    sha: str
    pieces: list[Piece]
    old_id: int | None  # the stored document it replaces


def ingest_paths(project: Project, session: Session, paths: list[Path], embedder: Embedder | None,
                 reporter: Reporter) -> IngestResult:
    """Add new and changed documents to the store and commit, then refresh the index."""
    s = project.settings.ingest
    offsets = embedder.token_offsets if embedder is not None else word_offsets
    files = iter_files(paths, require_files=True)  # an empty or wrong folder is an error, not 0 documents
    docs: list[RawDocument] = []
    for f in files:
        docs.extend(load_file(f, max_bytes=int(s.max_document_mb * 1_000_000)))
    known = {name: (doc_id, sha) for doc_id, name, sha in session.execute(
        select(Document.id, Document.name, Document.sha256))}
    result = IngestResult()
    planned: dict[str, _Planned] = {}
    with reporter.task("chunking documents", len(docs)) as advance:
        for raw in docs:
            sha = document_sha(raw.text)
            old, earlier = known.get(raw.name), planned.get(raw.name)
            if (earlier.sha if earlier else old[1] if old else None) == sha:
                result.unchanged.append(raw.name)
            else:  # a later file of the same name replaces an earlier one, as a changed file does
                pieces = chunk_text(raw.text, offsets, s.chunk_tokens, s.overlap_tokens)
                planned[raw.name] = _Planned(raw, sha, pieces, old[0] if old is not None else None)
                (result.changed if old is not None or earlier else result.added).append(raw.name)
                result.chunks += len(pieces)
            advance(1)
    todo = list(planned.values())
    vectors = None
    if todo and embedder is not None:
        vectors, result.embedded, result.reused = _embed_new_state(project, session, todo, embedder, reporter)
    if todo:
        _write(session, todo)
    result.index_rebuilt = ensure_index(project, session, embedder, reporter, vectors)
    return result


def _embed_new_state(project: Project, session: Session, planned: list[_Planned], embedder: Embedder,
                     reporter: Reporter) -> tuple[dict[str, np.ndarray], int, int]:
    """Vectors of every chunk text the store will hold once `planned` is written, computed before
    the write transaction opens: the index built after the commit then needs no model calls, so
    the window in which the committed store and the old index differ stays short.

    Kept chunks take their vectors from the current index, so only new and changed chunks are
    embedded. Returns (text -> vector, texts embedded, texts reused)."""
    replaced = {p.old_id for p in planned if p.old_id is not None}
    kept = [text for text, doc_id in session.execute(select(Chunk.text, Chunk.document_id)) if doc_id not in replaced]
    texts = list(dict.fromkeys(kept + [c.text for p in planned for c in p.pieces]))
    known = _current_vectors(project, session, embedder)
    reused = sum(t in known for t in texts)
    with reporter.task(f"embedding {len(texts) - reused} new chunks ({reused} kept)", len(texts)) as advance:
        vectors = _CountingEmbedder(embedder, advance, known).embed(texts) if texts else []
    return dict(zip(texts, vectors)), len(texts) - reused, reused


def _current_vectors(project: Project, session: Session, embedder: Embedder) -> dict[str, np.ndarray]:
    """Chunk text -> vector from the saved index, when that index is current (built by this
    embedder from exactly the stored chunks, so each id's vector is its stored text's); else {}."""
    rows = stored_chunks(session)
    index = _current_index(project, rows, embedder)
    if index is None:
        return {}
    by_id = index.dense_vectors()
    return {text: by_id[cid] for cid, _, text in rows if cid in by_id}


def _current_index(project: Project, rows: list[tuple[int, str, str]], embedder: Embedder | None) -> HybridIndex | None:
    """The saved index when it is readable, built with `embedder` and from exactly `rows` (the
    stored chunks: its content hash matches); else None."""
    if not (project.index_dir / "index.json").is_file():
        return None
    try:
        index = HybridIndex.load(project.index_dir, embedder)
    except Exception:  # unreadable or built with another embedder
        return None
    return index if index.content_hash == stored_chunks_hash(rows) else None


def _write(session: Session, planned: list[_Planned]) -> None:
    """One short write transaction: rows only, then commit (the write lock is held for just this)."""
    for p in planned:
        raw = p.raw
        if p.old_id is not None:
            session.execute(delete(Chunk).where(Chunk.document_id == p.old_id))
            doc = session.get(Document, p.old_id)
            doc.sha256, doc.source, doc.n_chars = p.sha, raw.source, len(raw.text)
        else:
            doc = Document(name=raw.name, source=raw.source, sha256=p.sha, n_chars=len(raw.text))
            session.add(doc)
            session.flush()
        session.add_all(Chunk(document_id=doc.id, position=i, text=c.text, start=c.start, end=c.end,
                              n_tokens=c.n_tokens) for i, c in enumerate(p.pieces))
    session.commit()


def ensure_index(project: Project, session: Session, embedder: Embedder | None, reporter: Reporter,
                 vectors: dict[str, np.ndarray] | None = None) -> bool:
    """Rebuild the index when it is missing, unreadable, built with another embedder, or built
    from chunks other than the stored ones (its content hash differs); return whether it was.
    `vectors` (chunk text -> embedding) are used instead of embedding those texts again.

    Removes what a killed index build left beside the index first, and keeps the index folder
    private (0700)."""
    clean_leftovers(project.index_dir)
    rows = stored_chunks(session)
    ids, documents, texts = [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]
    if (project.index_dir / "index.json").is_file():
        project.index_dir.chmod(0o700)  # one an older version saved with the umask's mode
    if _current_index(project, rows, embedder) is not None:
        return False
    kind = "BM25 + dense" if embedder is not None else "BM25"
    with reporter.task(f"indexing {len(ids)} chunks ({kind})", len(ids)) as advance:
        counted = _CountingEmbedder(embedder, advance, vectors) if embedder is not None else None
        index = HybridIndex.build(ids, texts, documents, counted)
        index.save(project.index_dir)
        if counted is None:
            advance(len(ids))
    return True


class _CountingEmbedder:
    """Embeds in slices so the progress bar moves while a large corpus is embedded; texts in
    `known` (already embedded) are not embedded again."""

    def __init__(self, inner: Embedder, advance, known: dict[str, np.ndarray] | None = None,
                 slice_size: int = 256):
        self.inner, self.advance, self.slice_size, self.name = inner, advance, slice_size, inner.name
        self.known = dict(known or {})

    def embed(self, texts):
        todo = [t for t in dict.fromkeys(texts) if t not in self.known]
        for start in range(0, len(todo), self.slice_size):
            part = todo[start : start + self.slice_size]
            self.known.update(zip(part, self.inner.embed(part)))
            self.advance(len(part))
        self.advance(len(texts) - len(todo))
        if not texts:
            return self.inner.embed(texts)
        return np.stack([np.asarray(self.known[t], dtype=np.float32) for t in texts])

    def token_offsets(self, text: str):
        return self.inner.token_offsets(text)
