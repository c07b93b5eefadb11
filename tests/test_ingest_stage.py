"""The ingest stage: idempotent, replaces only changed documents, all-or-nothing, retrievable."""
from __future__ import annotations

import json

import numpy as np
import pytest
from sqlalchemy import select

from tests.helpers import HELDOUT, RecordingReporter
from tests.test_ingest_units import HashEmbedder
from tuneloop.errors import InputError
from tuneloop.ingest.index import HybridIndex, stored_chunks
from tuneloop.programs.rag import Retriever
from tuneloop.progress import SilentReporter
from tuneloop.stages.ingest import ingest_paths
from tuneloop.store import Chunk, Document, open_store


def ingest(project, paths=None):
    paths = paths or [project.root / "documents"]
    with open_store(project.store_url)() as s:
        r = ingest_paths(project, s, paths, None, SilentReporter())
        s.commit()
    return r


def snapshot(project):
    """Every document with its hash and its chunk ids, plus the saved index's chunk list."""
    with open_store(project.store_url)() as s:
        docs = {d.name: d.sha256 for d in s.scalars(select(Document))}
        chunks = {}
        for cid, name in s.execute(select(Chunk.id, Document.name).join(Document).order_by(Chunk.id)):
            chunks.setdefault(name, []).append(cid)
    index = project.index_dir / "index.json"
    return docs, chunks, index.read_text() if index.is_file() else None


def test_ingesting_the_same_folder_twice_adds_nothing(project):
    p = project(pairs=False)
    first = ingest(p)
    assert len(first.added) == 6 and first.chunks > 6 and first.index_rebuilt
    before = snapshot(p)
    mtime = (p.index_dir / "index.json").stat().st_mtime_ns
    second = ingest(p)
    assert (second.added, second.changed, second.chunks, second.index_rebuilt) == ([], [], 0, False)
    assert sorted(second.unchanged) == sorted(first.added)
    assert snapshot(p) == before
    assert (p.index_dir / "index.json").stat().st_mtime_ns == mtime


def test_changing_one_file_replaces_only_its_chunks(project):
    p = project(pairs=False)
    ingest(p)
    docs0, chunks0, _ = snapshot(p)
    target = p.root / "documents" / "06-office-lease.md"
    target.write_text(target.read_text() + "\n\n## 99. Parking\n\nThe Tenant may park four zeppelins on the roof.\n")
    r = ingest(p)
    assert r.changed == ["06-office-lease.md"] and r.added == [] and r.index_rebuilt
    docs1, chunks1, _ = snapshot(p)
    for name in docs0:
        if name != "06-office-lease.md":
            assert chunks1[name] == chunks0[name]
            assert docs1[name] == docs0[name]
    assert docs1["06-office-lease.md"] != docs0["06-office-lease.md"]
    with open_store(p.store_url)() as s:
        texts = [c.text for c in s.scalars(select(Chunk).join(Document)
                                           .where(Document.name == "06-office-lease.md").order_by(Chunk.position))]
    assert sum("zeppelins" in t for t in texts) >= 1 and len(texts) == len(chunks1["06-office-lease.md"])
    with open_store(p.store_url)() as s:
        retriever = Retriever.load(p, s, None)
    hits = retriever.retrieve("Where may the Tenant park zeppelins?")
    assert hits and "zeppelins" in hits[0].text and hits[0].document == "06-office-lease.md"


@pytest.mark.parametrize("bad", ["missing", "docx", "corrupt-pdf"])
def test_bad_input_raises_and_leaves_the_store_unchanged(project, bad):
    p = project(pairs=False)
    ingest(p)
    before = snapshot(p)
    # A changed document alongside the bad input: nothing at all may be written.
    lease = p.root / "documents" / "06-office-lease.md"
    lease.write_text(lease.read_text() + "\nA new clause.\n")
    extra = p.root / "extra"
    extra.mkdir()
    if bad == "missing":
        paths, name = [p.root / "documents", p.root / "nope.md"], "nope.md"
    elif bad == "docx":
        (extra / "contract.docx").write_bytes(b"PK\x03\x04 not really")
        paths, name = [p.root / "documents", extra / "contract.docx"], "contract.docx"
    else:
        (extra / "broken.pdf").write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog >>\ngarbage")
        paths, name = [p.root / "documents", extra], "broken.pdf"
    with pytest.raises(InputError, match=name):
        ingest(p, paths)
    assert snapshot(p) == before


def test_a_folder_skips_unsupported_and_hidden_files(project):
    p = project(pairs=False)
    docs = p.root / "documents"
    (docs / "notes.docx").write_bytes(b"PK")
    (docs / ".hidden.md").write_text("secret text")
    r = ingest(p)
    assert sorted(r.added) == sorted(f.name for f in docs.glob("[0-9]*.md"))


def heldout(question_start: str) -> dict:
    for line in HELDOUT.read_text().splitlines():
        row = json.loads(line)
        if row["question"].startswith(question_start):
            return row
    raise KeyError(question_start)


# BM25-only top-2: "software licence agreement" repeats in the title chunk, which outranks the
# one-sentence governing-law clause (stemming fixed the NDA case: "governs" now matches "governed").
TITLE_WINS = pytest.mark.xfail(strict=True, reason="title chunk outranks a one-line clause in BM25")


@pytest.mark.parametrize("question", [
    "What law governs the office lease?",
    "What is the amount of the security deposit under the office lease?",
    "Who is the Supplier under the supply agreement?",
    pytest.param("What law governs the software licence agreement?", marks=TITLE_WINS),
    "What law governs the mutual non-disclosure agreement?",
])
def test_retrieval_finds_the_answer_chunk_in_its_document(ingested, question):
    p, retriever = ingested
    item = heldout(question)
    hits = retriever.retrieve(item["question"], item["source"])
    assert len(hits) == p.settings.ingest.top_k == 2
    assert all(h.document == item["source"] for h in hits)
    assert any(item["answer"] in h.text for h in hits), [h.text[:80] for h in hits]
    # Restricting to another document never returns this document's chunks.
    other = retriever.retrieve(item["question"], "01-master-services-agreement.md")
    assert other and all(h.document == "01-master-services-agreement.md" for h in other)


def test_retrieval_recall_on_extraction_questions(ingested):
    """Regression guard: BM25-only top-2 held the answer span for 16 of the 18 extraction items."""
    _, retriever = ingested
    rows = [json.loads(line) for line in HELDOUT.read_text().splitlines() if line.strip()]
    extraction = [r for r in rows if r["answer"] not in ("Yes", "No")]
    found = [any(r["answer"] in h.text for h in retriever.retrieve(r["question"], r["source"])) for r in extraction]
    assert len(extraction) == 18
    assert sum(found) >= 16


@pytest.fixture
def ingested(project):
    p = project(pairs=False)
    ingest(p)
    with open_store(p.store_url)() as s:
        return p, Retriever.load(p, s, None)


def test_ingest_reports_progress_per_document(project):
    p = project(pairs=False)
    rep = RecordingReporter()
    with open_store(p.store_url)() as s:
        ingest_paths(p, s, [p.root / "documents"], None, rep)
    chunking = [t for t in rep.tasks if t[0] == "chunking documents"]
    assert chunking and chunking[0][1] == 6 and sum(chunking[0][2]) == 6


def test_two_files_of_the_same_name_make_one_document_the_later_one_wins(project, tmp_path):
    """Documents are keyed by file name; the short write transaction must not insert it twice."""
    from tuneloop.ingest.loaders import iter_files

    p = project(pairs=False)
    for folder, text in (("a", "Alpha clause: the rent is ten."), ("b", "Beta clause: the rent is twenty.")):
        (tmp_path / "dup" / folder).mkdir(parents=True)
        (tmp_path / "dup" / folder / "notes.md").write_text(text)
    r = ingest(p, [tmp_path / "dup"])
    assert r.added == ["notes.md"] and r.changed == ["notes.md"]
    later = iter_files([tmp_path / "dup"])[-1].read_text()
    with open_store(p.store_url)() as s:
        assert [d.name for d in s.scalars(select(Document))] == ["notes.md"]
        assert [c.text for c in s.scalars(select(Chunk))] == [later]


class CountingEmbedder(HashEmbedder):
    """HashEmbedder that records every text it embeds."""

    def __init__(self) -> None:
        super().__init__()
        self.texts: list[str] = []

    def embed(self, texts):
        self.texts.extend(texts)
        return super().embed(texts)


def _ingest_with(project, embedder, paths):
    with open_store(project.store_url)() as s:
        r = ingest_paths(project, s, paths, embedder, SilentReporter())
        s.commit()
    return r


def _chunk_texts(project, names):
    with open_store(project.store_url)() as s:
        return [t for t, n in s.execute(select(Chunk.text, Document.name).join(Document)) if n in names]


def test_adding_and_changing_documents_embeds_only_their_chunks(project, tmp_path):
    """The index's vectors of kept chunks are reused; the result equals a build from scratch."""
    p = project(pairs=False)
    docs = sorted((p.root / "documents").iterdir())
    embedder = CountingEmbedder()
    first = _ingest_with(p, embedder, docs[:5])
    assert first.embedded == len(embedder.texts) > 0 and first.reused == 0

    embedder.texts.clear()
    added = _ingest_with(p, embedder, docs)  # one new document, five unchanged
    new_texts = _chunk_texts(p, {docs[5].name})
    assert added.added == [docs[5].name] and sorted(embedder.texts) == sorted(set(new_texts))
    assert added.embedded == len(set(new_texts)) and added.reused == first.embedded

    embedder.texts.clear()
    docs[0].write_text(docs[0].read_text() + "\n\n## 99. Parking\n\nThe Tenant may park four zeppelins on the roof.\n")
    changed = _ingest_with(p, embedder, docs)
    assert changed.changed == [docs[0].name]
    assert set(embedder.texts) <= set(_chunk_texts(p, {docs[0].name})) and "zeppelins" in " ".join(embedder.texts)

    with open_store(p.store_url)() as s:
        incremental = HybridIndex.load(p.index_dir, embedder)
        fresh = HybridIndex.from_rows(stored_chunks(s), HashEmbedder())
    assert incremental.chunk_ids == fresh.chunk_ids and incremental.content_hash == fresh.content_hash
    a, b = incremental.dense_vectors(), fresh.dense_vectors()
    assert all(np.allclose(a[i], b[i]) for i in fresh.chunk_ids)


def test_a_stale_index_is_not_trusted_for_vectors(project):
    """An index left behind by a kill (its content hash differs from the store) gives no vectors:
    every chunk is embedded again."""
    p = project(pairs=False)
    docs = sorted((p.root / "documents").iterdir())
    embedder = CountingEmbedder()
    _ingest_with(p, embedder, docs[:5])
    meta = json.loads((p.index_dir / "index.json").read_text())
    meta["content_hash"] = "stale"
    (p.index_dir / "index.json").write_text(json.dumps(meta))
    embedder.texts.clear()
    r = _ingest_with(p, embedder, docs)
    assert r.reused == 0 and r.embedded == len(set(_chunk_texts(p, {d.name for d in docs})))
