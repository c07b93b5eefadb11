"""Ingest under a running server, and what killed runs leave behind (issue 15, faults 4 and 5).

- ingest holds the store's write lock only to write rows: a concurrent writer (the server posting
  feedback) waits milliseconds, not the whole embedding run;
- the index records the content hash of the chunks it was built from, so an index that a kill
  left out of step with the store is rebuilt by the next ingest;
- leftovers of killed runs (`.index.tmp-*`, `.index.old-*`, `.tmp-datasets-*`, unrecorded
  standalone datasets) are removed by the next run that owns them, and nothing else is;
- the index folder is private (0700) whatever the umask.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import threading
import time

import numpy as np
import pytest
from sqlalchemy import select

from tuneloop.artifacts import read_jsonl, write_artifact, write_jsonl
from tuneloop.errors import StateError
from tuneloop.ingest.chunking import word_offsets
from tuneloop.ingest.index import HybridIndex
from tuneloop.programs.rag import Retriever
from tuneloop.progress import SilentReporter
from tuneloop.stages.ingest import ingest_paths
from tuneloop.stages.synth import KIND, synthesize
from tuneloop.store import Artifact, Chunk, Document, Example, Feedback, Interaction, open_store

EMBED_SECONDS = 2.0


class SlowEmbedder:
    """Takes EMBED_SECONDS per call, as a real embedder on a large corpus does."""

    name = "slow-fake"

    def __init__(self) -> None:
        self.started = threading.Event()
        self.calls = 0

    def embed(self, texts) -> np.ndarray:
        self.calls += 1
        self.started.set()
        time.sleep(EMBED_SECONDS)
        rng = np.random.default_rng(len(texts))
        out = rng.normal(size=(len(texts), 8)).astype(np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    def token_offsets(self, text: str):
        return word_offsets(text)


def ingest(project, embedder=None):
    with open_store(project.store_url)() as s:
        result = ingest_paths(project, s, [project.root / "documents"], embedder, SilentReporter())
        s.commit()  # ingest_paths commits its rows itself; the shipped version left it to the caller
        return result


def test_a_concurrent_write_does_not_wait_for_the_ingests_embedding(project):
    """Feedback posted during a 97 s ingest got "database is locked" 500s: the ingest held the
    write lock while embedding. Now the other writer's commits finish quickly, without errors."""
    p = project(pairs=False)
    sessions = open_store(p.store_url)
    with sessions() as s:
        asked = Interaction(question="q", answer="a")
        s.add(asked)
        s.commit()
    embedder, errors = SlowEmbedder(), []

    def run_ingest():
        try:
            with sessions() as s:
                ingest_paths(p, s, [p.root / "documents"], embedder, SilentReporter())
                s.commit()
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    worker = threading.Thread(target=run_ingest)
    worker.start()
    assert embedder.started.wait(60)
    waits = []
    for i in range(3):  # what POST /feedback does: read the interaction, add feedback, commit
        t0 = time.monotonic()
        with sessions() as s:
            assert s.get(Interaction, asked.id) is not None
            s.add(Feedback(interaction_id=asked.id, thumbs=1, comment=f"during ingest {i}"))
            s.commit()
        waits.append(time.monotonic() - t0)
    still_embedding = worker.is_alive()
    worker.join(60)
    assert not errors, errors
    assert still_embedding  # the writes above really overlapped the embedding
    assert max(waits) < EMBED_SECONDS / 4, waits
    with sessions() as s:
        assert s.query(Feedback).count() == 3 and s.query(Document).count() == 6
    assert embedder.calls == 1  # embedded once, before the write; the index build reused the vectors
    assert HybridIndex.load(p.index_dir, embedder).has_dense


class TextSeededEmbedder:
    """A deterministic vector per text, counting the texts it embeds."""

    name = "text-seeded"

    def __init__(self) -> None:
        self.embedded = 0

    def embed(self, texts) -> np.ndarray:
        self.embedded += len(texts)
        rows = [np.random.default_rng(list(t.encode())).normal(size=8) for t in texts]
        out = np.asarray(rows, dtype=np.float32).reshape(len(texts), 8)
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    def token_offsets(self, text: str):
        return word_offsets(text)


def test_the_index_built_from_vectors_embedded_before_the_write_matches_a_fresh_build(project):
    p = project(pairs=False)
    embedder = TextSeededEmbedder()
    ingest(p, embedder)
    with open_store(p.store_url)() as s:
        old_texts = set(s.scalars(select(Chunk.text)))
    target = sorted((p.root / "documents").iterdir())[2]
    target.write_text(target.read_text() + "\n\nA new clause about zeppelins on the roof.\n")
    before = embedder.embedded
    assert ingest(p, embedder).changed == [target.name]
    with open_store(p.store_url)() as s:
        rows = s.execute(select(Chunk.id, Chunk.text, Document.name).join(Document).order_by(Chunk.id)).all()
    new_texts = {r[1] for r in rows} - old_texts
    assert new_texts and embedder.embedded - before == len(new_texts)  # only new texts, each once
    fresh = HybridIndex.build([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], TextSeededEmbedder())
    saved = np.load(p.index_dir / "embeddings.npy")
    assert HybridIndex.load(p.index_dir, embedder).chunk_ids == fresh.chunk_ids
    assert np.allclose(saved, fresh._embeddings)


def test_an_index_left_stale_by_a_kill_is_rebuilt_by_the_next_ingest(project):
    """Killed after the store's commit and before the index swap: the next ingest must not say
    "up to date" (same chunk ids, since SQLite reuses them) and answers must cite the new text."""
    p = project(pairs=False)
    assert ingest(p).index_rebuilt
    stale = p.root / "stale-index"
    shutil.copytree(p.index_dir, stale)
    target = sorted((p.root / "documents").iterdir())[-1]  # the last document: its chunk ids are reused
    text = target.read_text()
    word = next(w for w in text.split() if w.isalpha() and len(w) > 4)
    target.write_text(text.replace(word, "zeppelin", 1))  # same words count: same chunking
    changed = ingest(p)
    assert changed.changed == [target.name] and changed.index_rebuilt
    with open_store(p.store_url)() as s:
        new_ids = Retriever.load(p, s, None).index.chunk_ids
    shutil.rmtree(p.index_dir)  # the kill: the store is committed, the old index still in place
    shutil.copytree(stale, p.index_dir)
    assert HybridIndex.load(p.index_dir, None).chunk_ids == new_ids  # ids alone cannot tell
    with open_store(p.store_url)() as s, pytest.raises(StateError, match="run `tuneloop ingest`"):
        Retriever.load(p, s, None)  # what the server, eval and chat load: refused, not mixed up

    again = ingest(p)
    assert (again.added, again.changed, again.index_rebuilt) == ([], [], True)
    with open_store(p.store_url)() as s:
        hits = Retriever.load(p, s, None).retrieve("zeppelin")
    assert hits and "zeppelin" in hits[0].text
    assert not ingest(p).index_rebuilt  # and now it is up to date


def test_index_leftovers_of_a_killed_build_are_removed_and_nothing_else(project):
    p = project(pairs=False)
    ingest(p)
    leftovers = [p.root / ".index.old-1a2b3c4d", p.root / ".index.tmp-x8y9z0"]
    kept = [p.root / ".index-notes", p.root / "index.bak", p.root / ".indexer.old-1"]
    for folder in leftovers + kept:
        (folder / "bm25").mkdir(parents=True)
        (folder / "index.json").write_text("{}")
    assert not ingest(p).index_rebuilt
    assert not any(f.exists() for f in leftovers)
    assert all((f / "index.json").is_file() for f in kept)
    assert (p.root / "tuneloop.db").is_file() and (p.index_dir / "index.json").is_file()


@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_the_index_folder_is_private_whatever_the_umask(project, umask):
    p = project(pairs=False)
    previous = os.umask(umask)
    try:
        ingest(p)
        assert stat.S_IMODE(p.index_dir.stat().st_mode) == 0o700
        p.index_dir.chmod(0o755)  # as an older version left it
        assert not ingest(p).index_rebuilt
        assert stat.S_IMODE(p.index_dir.stat().st_mode) == 0o700
        assert stat.S_IMODE((p.root / "tuneloop.db").stat().st_mode) == 0o600
    finally:
        os.umask(previous)


def test_synth_removes_what_a_killed_synth_left_and_keeps_recorded_datasets(project):
    """A synth killed mid-write leaves `.tmp-datasets-*`; one killed before its commit leaves a
    dataset no store row knows (its timestamped name is never reused)."""
    p = project(pairs=False)
    root = p.artifacts
    row = {"question": "Who pays?", "answer": "The Tenant.", "document": "06-office-lease.md"}

    def dataset(name: str, age_s: float = 3600.0):
        path = write_artifact(root, KIND, name, {"stage": "synth"}, lambda t: (
            write_jsonl(t / "data.jsonl", [row]),
            (t / "report.json").write_text(json.dumps({"generated": 1, "rejected": 0}))))
        old = time.time() - age_s
        os.utime(path, (old, old))
        return path

    orphan = dataset("synth-20250101-120000-000001")
    recorded = dataset("synth-20250101-120000-000002")
    resumable = dataset("cycle-0003-synth")
    done = dataset("synth-manual")  # complete: synthesize records it without a teacher
    tmp = root / ".tmp-datasets-synth-20250101-130000-000000-1a2b3c4d"
    tmp.mkdir()
    write_jsonl(tmp / "data.jsonl", [row])
    sessions = open_store(p.store_url)
    with sessions() as s:
        s.add(Artifact(kind="dataset", path=str(recorded)))
        s.commit()
        result = synthesize(p, s, None, None, SilentReporter(), name="synth-manual")
        s.commit()
        assert result.artifact == done and s.query(Example).count() == 1
    assert not orphan.exists() and not tmp.exists()
    assert read_jsonl(recorded / "data.jsonl") == [row] and resumable.is_dir() and done.is_dir()
