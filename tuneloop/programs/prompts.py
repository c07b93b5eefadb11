"""Serving prompts rebuilt for stored questions: training, serving, monitoring and the CLI use them.

`PromptBuilder` gives the prompt the student was (or would now be) served for a question,
`build_messages(question, passages)` (`programs/rag.py`), from the chunks an interaction stored
or, when those are gone or there was no interaction, from retrieval now.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import select

from tuneloop.errors import StateError
from tuneloop.models.base import Message
from tuneloop.programs.rag import Passage, Retriever, build_messages
from tuneloop.store import Chunk, Document, Interaction, Session


@dataclass(frozen=True)
class PromptInfo:
    """The student's prompt for one question, and where its passages came from.

    `source` is "stored" (the interaction's own chunks, exactly as served) or "retrieved" (a chunk
    was deleted by a re-ingest, or the question never had an interaction: retrieved again now).
    """

    question: str
    document: str | None
    messages: list[Message]
    passages: list[Passage]
    source: str


class PromptBuilder:
    """Rebuilds serving prompts. The retriever is loaded only when a prompt needs retrieval."""

    def __init__(self, session: Session, retriever: Retriever | Callable[[], Retriever] | None = None):
        self.session = session
        self._retriever = retriever
        self._chunks: dict[int, Passage | None] = {}
        self.sources: Counter[str] = Counter()
        self.fallbacks: list[int] = []  # interactions whose chunks were gone

    @property
    def retriever(self) -> Retriever:
        if self._retriever is None:
            raise StateError("an interaction's passages were deleted by a re-ingest and there is no retrieval "
                             "index to find them again: run `tuneloop ingest PATH` first")
        if not isinstance(self._retriever, Retriever):
            self._retriever = self._retriever()
        return self._retriever

    def stored_passages(self, ids: Sequence[int]) -> list[Passage | None]:
        """The stored chunks `ids` as passages, in order; None for a chunk no longer stored (cached)."""
        missing = [i for i in ids if i not in self._chunks]
        if missing:
            rows = self.session.execute(select(Chunk.id, Document.name, Chunk.text).join(Document)
                                        .where(Chunk.id.in_(missing))).all()
            found = {cid: Passage(cid, doc, text) for cid, doc, text in rows}
            for i in missing:
                self._chunks[i] = found.get(i)
        return [self._chunks[i] for i in ids]

    def for_interaction(self, it: Interaction) -> PromptInfo:
        """`build_messages(question, the interaction's stored chunks)`, in their stored order."""
        ids = [int(c) for c in (it.chunk_ids or [])]
        passages = self.stored_passages(ids)
        if all(p is not None for p in passages):
            self.sources["stored"] += 1
            kept = [p for p in passages if p is not None]
            return PromptInfo(it.question, it.document, build_messages(it.question, kept), kept, "stored")
        self.fallbacks.append(it.id)
        return self.for_question(it.question, it.document)

    def for_question(self, question: str, document: str | None) -> PromptInfo:
        """The prompt serving would build now: retrieval (restricted to `document`) + build_messages."""
        passages = self.retriever.retrieve(question, document)
        self.sources["retrieved"] += 1
        return PromptInfo(question, document, build_messages(question, passages), passages, "retrieved")

    def report(self) -> dict:
        return {"stored": self.sources.get("stored", 0), "retrieved": self.sources.get("retrieved", 0),
                "interactions_retrieved_again": sorted(set(self.fallbacks))}
