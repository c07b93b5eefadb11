"""A persisted hybrid (BM25 + dense) retrieval index over chunks.

BM25 (via `bm25s`) catches exact terms such as names, codes and numbers; dense embeddings catch
paraphrases. Their rankings are fused with reciprocal rank fusion (Cormack et al. 2009), which
needs no score calibration between the two. Without an embedder the index is BM25-only.

On disk a saved index is a directory (mode 0700: chunks quote the documents):
    index.json       chunk ids, groups, whether BM25/dense parts exist, the embedder's name, and
                     the content hash of the chunks it was built from (`chunks_hash`), which
                     tells a stale index (one a crash left behind) from a current one
    bm25/            the bm25s index (absent when no chunk has any BM25 token)
    embeddings.npy   float32 (n_chunks, dim) unit vectors (only with an embedder)
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import uuid
from pathlib import Path

import bm25s
import numpy as np
from sqlalchemy import select

from tuneloop.errors import InputError, StateError
from tuneloop.models.base import Embedder
from tuneloop.safety import safe_rmtree
from tuneloop.store import Chunk, Document, Session

FORMAT_VERSION = 2  # 2: BM25 tokens are stemmed (English Snowball)


class IndexNotFoundError(InputError, FileNotFoundError):
    """No saved index where one was expected (ingest documents first)."""


def chunks_hash(chunk_ids: list[int], texts: list[str]) -> str:
    """A content hash of chunks (ids and texts, in order): an index built from other chunks, or
    from the same ids with other texts (SQLite reuses deleted ids), has another hash."""
    h = hashlib.sha256()
    for cid, text in zip(chunk_ids, texts, strict=True):
        h.update(f"{cid}\x00{len(text)}\x00".encode())
        h.update(text.encode("utf-8"))
    return h.hexdigest()


def stored_chunks(session: Session) -> list[tuple[int, str, str]]:
    """The store's chunks as (id, document name, text), in id order: what an index is built from
    and what `chunks_hash` of the index must match."""
    return [tuple(r) for r in session.execute(
        select(Chunk.id, Document.name, Chunk.text).join(Document).order_by(Chunk.id))]


def stored_chunks_hash(chunks: list[tuple[int, str, str]]) -> str:
    """`chunks_hash` of `stored_chunks` rows."""
    return chunks_hash([c[0] for c in chunks], [c[2] for c in chunks])


def leftover_paths(directory: Path) -> list[Path]:
    """Temporary and replaced copies of the index at `directory` that a killed `save` left."""
    directory = Path(directory)
    if not directory.parent.is_dir():
        return []
    prefixes = (f".{directory.name}.tmp-", f".{directory.name}.old-")
    return [p for p in directory.parent.iterdir()
            if p.name.startswith(prefixes) and p.is_dir() and not p.is_symlink()]


def clean_leftovers(directory: Path) -> int:
    """Remove what `leftover_paths` finds; return how many folders were removed."""
    stale = leftover_paths(directory)
    for p in stale:
        safe_rmtree(p, inside=Path(directory).parent, ignore_errors=True)
    return len(stale)


@functools.lru_cache(maxsize=1)
def _stemmer():
    import Stemmer  # PyStemmer, the stemmer bm25s is built to use

    return Stemmer.Stemmer("english")


def _bm25_tokens(texts: list[str]) -> list[list[str]]:
    # return_ids=False gives token strings, which is what BM25.get_scores takes for a query;
    # with ids, each tokenize call would number tokens in its own, incompatible vocabulary.
    # Stemming lets "governs" in a question match "governed" in a contract.
    return bm25s.tokenize(texts, stopwords="en", stemmer=_stemmer(), show_progress=False, return_ids=False)


def _normalise_rows(vectors: np.ndarray) -> np.ndarray:
    # The Embedder protocol promises unit rows; renormalising is cheap and keeps "cosine = dot"
    # true for an embedder that only roughly keeps that promise.
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def _ranked(positions: np.ndarray, scores: np.ndarray, limit: int) -> list[tuple[int, float]]:
    """(position, score) best score first (ties by position, for determinism), at most `limit`."""
    order = np.lexsort((positions, -scores))[:limit]
    return [(int(p), float(v)) for p, v in zip(positions[order], scores[order])]


class HybridIndex:
    """Chunks searchable by BM25 and, with an embedder, by dense similarity; see `search`."""

    def __init__(
        self,
        chunk_ids: list[int],
        groups: list[str],
        bm25: bm25s.BM25 | None,
        embeddings: np.ndarray | None,
        embedder: Embedder | None,
        content_hash: str | None = None,
    ) -> None:
        self.chunk_ids = list(chunk_ids)
        self.groups = list(groups)
        self.content_hash = content_hash  # chunks_hash of what it was built from (None: unknown)
        self._bm25 = bm25
        self._embeddings = embeddings
        self._embedder = embedder

    def __len__(self) -> int:
        return len(self.chunk_ids)

    @property
    def has_dense(self) -> bool:
        return self._embedder is not None

    @property
    def embedder(self) -> Embedder | None:
        return self._embedder

    @property
    def embedder_name(self) -> str | None:
        return self._embedder.name if self._embedder is not None else None

    @classmethod
    def build(
        cls,
        chunk_ids: list[int],
        texts: list[str],
        groups: list[str],
        embedder: Embedder | None,
    ) -> HybridIndex:
        """Index `texts`; `groups[i]` names the document of chunk `chunk_ids[i]`."""
        if not len(chunk_ids) == len(texts) == len(groups):
            raise ValueError(
                f"chunk_ids, texts and groups differ in length: "
                f"{len(chunk_ids)}, {len(texts)}, {len(groups)}"
            )
        if len(set(chunk_ids)) != len(chunk_ids):
            raise ValueError("chunk_ids must be unique")
        tokens = _bm25_tokens(list(texts)) if texts else []
        bm25 = None
        # bm25s cannot index a corpus without a single token (it fails on an empty vocabulary);
        # such a corpus simply has no BM25 part.
        if any(tokens):
            bm25 = bm25s.BM25()
            bm25.index(tokens, show_progress=False)
        embeddings = None
        if embedder is not None:
            if texts:
                embeddings = _normalise_rows(np.asarray(embedder.embed(list(texts)), np.float32))
                if embeddings.ndim != 2 or embeddings.shape[0] != len(texts):
                    raise ValueError(
                        f"embedder {embedder.name!r} returned shape {embeddings.shape} "
                        f"for {len(texts)} texts"
                    )
            else:
                embeddings = np.zeros((0, 0), dtype=np.float32)
        return cls(list(chunk_ids), list(groups), bm25, embeddings, embedder, chunks_hash(chunk_ids, texts))

    @classmethod
    def from_rows(cls, rows: list[tuple[int, str, str]], embedder: Embedder | None) -> HybridIndex:
        """Index `stored_chunks` rows (id, document, text)."""
        return cls.build([r[0] for r in rows], [r[2] for r in rows], [r[1] for r in rows], embedder)

    def save(self, directory: Path) -> None:
        """Write the index to `directory`, replacing any index there, atomically: it is written
        in a temporary sibling and renamed into place, so a crash never leaves a half-written
        index (at worst the previous one is left aside in a hidden `.NAME.old-*` sibling)."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))  # mode 0700
        try:
            if self._bm25 is not None:
                self._bm25.save(tmp / "bm25", show_progress=False)
            if self._embeddings is not None:
                np.save(tmp / "embeddings.npy", self._embeddings, allow_pickle=False)
            meta = {
                "format": FORMAT_VERSION,
                "chunk_ids": self.chunk_ids,
                "groups": self.groups,
                "bm25": self._bm25 is not None,
                "dense": self._embeddings is not None,
                "embedder": self.embedder_name,
                "content_hash": self.content_hash,
            }
            (tmp / "index.json").write_text(json.dumps(meta), encoding="utf-8")
            old = None
            if directory.exists():
                # Two renames, not one: os.replace cannot replace a non-empty directory.
                old = directory.with_name(f".{directory.name}.old-{uuid.uuid4().hex[:8]}")
                os.rename(directory, old)
            try:
                os.rename(tmp, directory)
            except OSError:
                if old is not None:
                    os.rename(old, directory)
                raise
        except BaseException:
            safe_rmtree(tmp, inside=directory.parent, ignore_errors=True)
            raise
        if old is not None:
            safe_rmtree(old, inside=directory.parent, ignore_errors=True)

    @classmethod
    def load(cls, directory: Path, embedder: Embedder | None) -> HybridIndex:
        """Read an index saved by `save`; `embedder` must be the one it was built with."""
        directory = Path(directory)
        meta_path = directory / "index.json"
        if not meta_path.is_file():
            raise IndexNotFoundError(
                f"Retrieval index not found: {directory} (ingest documents first)"
            )
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if meta.get("format") != FORMAT_VERSION:
                raise ValueError(f"unknown index format {meta.get('format')!r}")
            chunk_ids = [int(i) for i in meta["chunk_ids"]]
            groups = [str(g) for g in meta["groups"]]
            stored_name = meta["embedder"]
            content_hash = meta.get("content_hash")  # absent in indexes saved before it was recorded
            bm25 = bm25s.BM25.load(directory / "bm25") if meta["bm25"] else None
            embeddings = None
            if meta["dense"]:
                embeddings = np.load(directory / "embeddings.npy", allow_pickle=False)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(
                f"Retrieval index at {directory} is unreadable ({exc}); re-ingest the documents"
            ) from exc
        given_name = embedder.name if embedder is not None else None
        if stored_name != given_name:
            raise StateError(
                f"Retrieval index at {directory} was built with embedder {stored_name!r} "
                f"but {given_name!r} is configured; re-ingest the documents to rebuild it"
            )
        if embeddings is not None and embeddings.shape[0] != len(chunk_ids):
            raise InputError(
                f"Retrieval index at {directory} is inconsistent (embeddings for "
                f"{embeddings.shape[0]} of {len(chunk_ids)} chunks); re-ingest the documents"
            )
        return cls(chunk_ids, groups, bm25, embeddings, embedder, content_hash)

    def dense_vectors(self) -> dict[int, np.ndarray]:
        """Chunk id -> its stored unit vector ({} without a dense part): what an ingest reuses
        for chunks it keeps, so only new and changed chunks are embedded."""
        if self._embeddings is None or not len(self.chunk_ids):
            return {}
        return dict(zip(self.chunk_ids, self._embeddings))

    def _bm25_ranking(self, query: str, positions: np.ndarray, limit: int) -> list[tuple[int, float]]:
        if self._bm25 is None:
            return []
        query_tokens = _bm25_tokens([query])[0]
        # bm25s's get_scores fails (IndexError) on an empty token list: all-stopword query.
        if not query_tokens:
            return []
        # get_scores scores the whole corpus, so the group filter can apply after scoring.
        scores = np.asarray(self._bm25.get_scores(query_tokens))[positions]
        # A zero score means no query term occurs: ranking such chunks would be arbitrary noise.
        hit = scores > 0
        return _ranked(positions[hit], scores[hit], limit)

    def _dense_ranking(self, query: str, positions: np.ndarray, limit: int) -> list[tuple[int, float]]:
        if self._embedder is None or self._embeddings is None or not len(self._embeddings):
            return []
        query_vector = _normalise_rows(np.asarray(self._embedder.embed([query]), np.float32))[0]
        scores = self._embeddings[positions] @ query_vector
        return _ranked(positions, scores, limit)

    def best_similarity(self, vectors: np.ndarray, group: str) -> float | None:
        """The highest cosine between any of `vectors` (unit rows, from this index's embedder) and
        a chunk of document `group`; None without dense vectors or chunks of that document."""
        if self._embeddings is None or not len(vectors):
            return None
        positions = [i for i, g in enumerate(self.groups) if g == group]
        if not positions:
            return None
        return float((self._embeddings[positions] @ np.asarray(vectors, dtype=np.float32).T).max())

    def _positions(self, group: str | None) -> np.ndarray:
        if group is None:
            return np.arange(len(self.chunk_ids))
        return np.array([i for i, g in enumerate(self.groups) if g == group], dtype=int)

    def rankings(self, query: str, k: int, group: str | None = None
                 ) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
        """Each ranker's own top `k` as (chunk_id, raw score): BM25's scores and the dense
        cosines, best first (empty for a ranker this index does not have, or a query it cannot
        score). What `search` fuses by rank; the review queue reads the scores themselves."""
        positions = self._positions(group)
        if k < 1 or not len(positions) or not query.strip():
            return [], []
        return tuple([(self.chunk_ids[p], v) for p, v in ranker(query, positions, k)]  # type: ignore[return-value]
                     for ranker in (self._bm25_ranking, self._dense_ranking))

    def search(
        self,
        query: str,
        k: int = 3,
        group: str | None = None,
        rrf_k: int = 60,
        candidates: int = 50,
        dense_weight: float = 0.5,
    ) -> list[tuple[int, float]]:
        """The `k` best chunks for `query` as (chunk_id, fused score), best first.

        Each ranker (BM25, dense) ranks its top `candidates` chunks (only those of document
        `group` when given); a chunk's score is the weighted sum over rankers of
        1 / (rrf_k + rank), rank starting at 1 (weighted reciprocal rank fusion): the dense
        ranking weighs `dense_weight`, BM25's 1 - `dense_weight` (0: BM25 only, 1: dense only).
        """
        if candidates < 1:
            raise ValueError(f"candidates must be at least 1, got {candidates}")
        if rrf_k < 0:
            raise ValueError(f"rrf_k must be non-negative, got {rrf_k}")
        if not 0.0 <= dense_weight <= 1.0:
            raise ValueError(f"dense_weight must be between 0 and 1, got {dense_weight}")
        if k < 1 or not self.chunk_ids or not query.strip():
            return []
        positions = self._positions(group)
        if not len(positions):
            return []
        if self._embedder is None or self._embeddings is None:  # BM25-only index: BM25 alone
            dense_weight = 0.0
        fused: dict[int, float] = {}
        for weight, ranker in ((1.0 - dense_weight, self._bm25_ranking), (dense_weight, self._dense_ranking)):
            if weight == 0.0:  # a ranker without weight is not run (a BM25-only search embeds nothing)
                continue
            for rank, (position, _) in enumerate(ranker(query, positions, candidates), start=1):
                fused[position] = fused.get(position, 0.0) + weight / (rrf_k + rank)
        best = sorted(fused.items(), key=lambda item: (-item[1], item[0]))[:k]
        return [(self.chunk_ids[position], score) for position, score in best]
