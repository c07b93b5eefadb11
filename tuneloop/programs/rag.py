"""The retrieval-augmented answerer, and the one prompt format shared by training and serving.

`build_messages` is the single source of truth for the student's prompt: SFT trains on exactly
these messages and serving/eval generate from exactly these messages, so the fine-tuned model
never sees a format it was not trained on.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tuneloop.config import Project
from tuneloop.errors import StateError
from tuneloop.ingest.index import HybridIndex, IndexNotFoundError, stored_chunks, stored_chunks_hash
from tuneloop.models.base import ChatModel, Embedder, GenerationParams, Message
from tuneloop.models.embed import LocalEmbedder
from tuneloop.programs.decide import answer_conversations, decides
from tuneloop.progress import Reporter, SilentReporter, batched_chat
from tuneloop.store import Session

SYSTEM_PROMPT = (
    "You answer questions about the user's documents using only the given excerpts. "
    "Answer briefly: Yes or No for yes/no questions, otherwise the exact words from the document. "
    "If the excerpts do not say, answer: The document does not say."
)


@dataclass(frozen=True)
class Passage:
    chunk_id: int
    document: str
    text: str


def build_messages(question: str, passages: Sequence[Passage]) -> list[Message]:
    """System + retrieved context + question: the student's prompt, in training and serving alike."""
    context = "\n\n".join(f"[{i + 1}] {p.text.strip()}" for i, p in enumerate(passages))
    user = f"Excerpts:\n{context}\n\nQuestion: {question.strip()}"
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


class Retriever:
    """Hybrid search over the project's chunks, returning passages with their text."""

    def __init__(self, index: HybridIndex, passages: dict[int, Passage], top_k: int, rrf_k: int,
                 dense_weight: float = 0.5):
        self.index, self.passages, self.top_k, self.rrf_k = index, passages, top_k, rrf_k
        self.dense_weight = dense_weight  # BM25/dense fusion (HybridIndex.search)

    @classmethod
    def load(cls, project: Project, session: Session, embedder: Embedder | None,
             dense_weight: float | None = None, top_k: int | None = None) -> Retriever:
        """The project's index (`dense_weight`: the fusion weight, else `ingest.dense_weight`;
        `top_k`: the passages per prompt, else `ingest.top_k`)."""
        index = HybridIndex.load(project.index_dir, embedder)
        rows = stored_chunks(session)
        if index.content_hash is not None and index.content_hash != stored_chunks_hash(rows):
            # e.g. an ingest killed between its commit and the index swap: answers would cite
            # chunks the index does not hold, or the wrong document's
            raise StateError("the retrieval index was built from other chunks than the store holds "
                             "(an interrupted ingest?): run `tuneloop ingest` to rebuild it")
        return cls._over(project, index, rows, dense_weight, top_k)

    @classmethod
    def for_version(cls, project: Project, session: Session, version, embedder: Embedder | None) -> Retriever:
        """The retriever `version` answers with: its own fine-tuned embedder's index when the
        `retriever` step gave it one (`version_retriever_paths`), else the project's (`load`),
        with the fusion weight and the number of passages the step chose for it on the dev split
        (`version_dense_weight`, `version_top_k`).

        A version's index built before documents were added or changed is rebuilt here with its
        embedder (every chunk re-embedded), so it never cites chunks the store no longer holds."""
        paths, weight, top_k = version_retriever_paths(version), version_dense_weight(version), version_top_k(version)
        if paths is None:
            return cls.load(project, session, embedder, weight, top_k)
        embedder_dir, index_dir = paths
        tuned = LocalEmbedder(embedder_dir, batch_size=project.settings.models.embedder.batch_size)
        rows = stored_chunks(session)
        current = stored_chunks_hash(rows)
        try:
            index = HybridIndex.load(index_dir, tuned)
        except IndexNotFoundError:
            index = None
        if index is None or index.content_hash != current:
            index = HybridIndex.from_rows(rows, tuned)
            index.save(index_dir)
        return cls._over(project, index, rows, weight, top_k)

    @classmethod
    def _over(cls, project: Project, index: HybridIndex, rows: list[tuple[int, str, str]],
              dense_weight: float | None, top_k: int | None = None) -> Retriever:
        passages = {cid: Passage(cid, doc, text) for cid, doc, text in rows}
        s = project.settings.ingest
        return cls(index, passages, s.top_k if top_k is None else top_k, s.rrf_k,
                   s.dense_weight if dense_weight is None else dense_weight)

    def with_dense_weight(self, dense_weight: float) -> Retriever:
        """The same index and passages, fused with another weight."""
        return Retriever(self.index, self.passages, self.top_k, self.rrf_k, dense_weight)

    def with_top_k(self, top_k: int) -> Retriever:
        """The same index and passages, putting `top_k` passages in the prompt."""
        return Retriever(self.index, self.passages, top_k, self.rrf_k, self.dense_weight)

    @property
    def embedder(self) -> Embedder | None:
        """The dense index's embedder (None for a BM25-only index)."""
        return self.index.embedder

    def documents(self) -> set[str]:
        return {p.document for p in self.passages.values()}

    def retrieve(self, question: str, document: str | None = None, k: int | None = None) -> list[Passage]:
        """Top passages for a question; `document` restricts the search to one document."""
        group = document if document in self.documents() else None
        hits = self.index.search(question, k=k or self.top_k, group=group, rrf_k=self.rrf_k,
                                 dense_weight=self.dense_weight)
        return [self.passages[cid] for cid, _ in hits if cid in self.passages]

    def rankings(self, question: str, document: str | None = None, k: int | None = None
                 ) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
        """BM25's and the dense ranker's own top `k` (chunk id, raw score) for a question, before
        fusion (`HybridIndex.rankings`): how sure retrieval itself is."""
        group = document if document in self.documents() else None
        return self.index.rankings(question, k or self.top_k, group)


@dataclass(frozen=True)
class Answer:
    text: str
    passages: list[Passage]
    yes_no_margin: float | None = None  # log P(Yes) - log P(No) when the answer was decided (programs/decide.py)


class RagAnswerer:
    """Retrieve, then answer with the chat model, in batches; yes/no questions are decided by the
    first-token margin against `yes_no_threshold` (`programs/decide.py`), and with
    `copy_min_overlap` the other replies become the passage span they point at
    (`programs/copy.py`), as serving answers them."""

    def __init__(self, retriever: Retriever, model: ChatModel, params: GenerationParams,
                 yes_no_threshold: float | None = None, copy_min_overlap: float | None = None):
        self.retriever, self.model, self.params = retriever, model, params
        self.yes_no_threshold, self.copy_min_overlap = yes_no_threshold, copy_min_overlap

    def answer_many(
        self, questions: Sequence[tuple[str, str | None]], reporter: Reporter | None = None, batch: int = 8
    ) -> list[Answer]:
        """Answer (question, document-or-None) pairs."""
        contexts = [self.retriever.retrieve(q, doc) for q, doc in questions]
        convs = [build_messages(q, ctx) for (q, _), ctx in zip(questions, contexts)]

        def chat(conversations, params):
            return batched_chat(self.model, conversations, params, reporter or SilentReporter(), "answering", batch)

        replies = answer_conversations(self.model, [q for q, _ in questions], convs, self.params,
                                       self.yes_no_threshold, decides(self.model), chat,
                                       [[p.text for p in ctx] for ctx in contexts], self.copy_min_overlap)
        return [Answer(r.text, ctx, r.margin) for r, ctx in zip(replies, contexts)]


RETRIEVER_KEY = "retriever"  # ModelVersion.hyperparams key: {"embedder", "index", ...} (stages/retriever.py)


def version_retriever_paths(version) -> tuple[Path, Path] | None:
    """(fine-tuned embedder folder, index folder) of a version's own retriever, or None (the project's)."""
    stored = (getattr(version, "hyperparams", None) or {}).get(RETRIEVER_KEY)
    if not isinstance(stored, dict) or not stored.get("embedder") or not stored.get("index"):
        return None
    return Path(stored["embedder"]), Path(stored["index"])


def version_dense_weight(version) -> float | None:
    """The BM25/dense fusion weight the `retriever` step chose for a version on the dev split, or None."""
    stored = (getattr(version, "hyperparams", None) or {}).get(RETRIEVER_KEY)
    weight = stored.get("dense_weight") if isinstance(stored, dict) else None
    return float(weight) if isinstance(weight, (int, float)) and 0.0 <= weight <= 1.0 else None


def version_top_k(version) -> int | None:
    """The number of passages the `retriever` step chose for a version on the dev split, or None."""
    stored = (getattr(version, "hyperparams", None) or {}).get(RETRIEVER_KEY)
    top_k = stored.get("top_k") if isinstance(stored, dict) else None
    return top_k if isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 1 else None


PROGRAM_KEY = "rag_program"  # ModelVersion.hyperparams key: the version's compiled DSPy program (stages/prompts.py)


def rag_program_path(version) -> Path | None:
    """The compiled RAG program a model version answers with, or None (the plain `build_messages` prompt)."""
    path = (getattr(version, "hyperparams", None) or {}).get(PROGRAM_KEY)
    return Path(path) if path else None
