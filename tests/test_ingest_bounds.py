"""Ingest does bounded work per input: documents of any shape ingest quickly or are refused clearly
(BM25 only, `dense: false`: embedding is per chunk, so linear by construction, and slow on a CPU)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from tuneloop.config import load_project
from tuneloop.errors import InputError
from tuneloop.progress import SilentReporter
from tuneloop.stages.ingest import ingest_paths
from tuneloop.store import Chunk, Document, open_store


def _project(root: Path, settings: str = "ingest: {dense: false}\n"):
    root.mkdir()
    (root / "tuneloop.yaml").write_text(settings)
    project = load_project(root)
    return project, open_store(project.store_url)


def _ingest(project, sessions, *paths: Path):
    with sessions() as s:
        result = ingest_paths(project, s, list(paths), None, SilentReporter())
        s.commit()
    return result


def _counts(sessions) -> tuple[int, int]:
    with sessions() as s:
        return s.scalar(select(func.count(Document.id))), s.scalar(select(func.count(Chunk.id)))


def test_a_3_mb_single_line_document_ingests_quickly(tmp_path):
    project, sessions = _project(tmp_path / "p")
    words = ("alpha", "contract", "party", "shall", "notice", "term", "supplier")
    (tmp_path / "line.txt").write_text(" ".join(words[i % 7] for i in range(500_000)))  # ~3.3 MB, no newline
    start = time.perf_counter()
    r = _ingest(project, sessions, tmp_path / "line.txt")
    assert time.perf_counter() - start < 30  # about 2 s alone on one core
    assert r.added == ["line.txt"] and r.chunks > 4_000
    with sessions() as s:
        assert max(len(t) for t in s.scalars(select(Chunk.text))) < 128 * 100


@pytest.mark.parametrize("content", [" " * 3_000_000, "\n" * 3_000_000, "\t \r\n" * 750_000])
def test_a_whitespace_only_document_is_refused_quickly(tmp_path, content):
    project, sessions = _project(tmp_path / "p")
    (tmp_path / "blank.txt").write_text(content)
    start = time.perf_counter()
    with pytest.raises(InputError, match=r"Empty document: .*blank.txt contains no text"):
        _ingest(project, sessions, tmp_path / "blank.txt")
    assert time.perf_counter() - start < 10
    assert _counts(sessions) == (0, 0)


def test_a_document_over_max_document_mb_is_refused_and_nothing_is_stored(tmp_path):
    project, sessions = _project(tmp_path / "p", "ingest: {dense: false, max_document_mb: 0.5}\n")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# Small\n\nThe Supplier shall deliver.\n")
    (docs / "b.txt").write_text("x " * 300_000)
    with pytest.raises(InputError, match=r"b.txt is 0.6 MB, over the limit of 0.5 MB \(ingest.max_document_mb\)"):
        _ingest(project, sessions, docs)
    assert _counts(sessions) == (0, 0)


def test_an_empty_or_wrong_folder_is_an_error_not_an_empty_index(tmp_path):
    project, sessions = _project(tmp_path / "p")
    (tmp_path / "empty").mkdir()
    (tmp_path / "wrong").mkdir()
    (tmp_path / "wrong" / "contract.docx").write_bytes(b"PK\x03\x04")
    for folder in ("empty", "wrong"):
        with pytest.raises(InputError, match=f"Nothing to ingest in folder .*{folder}: it holds no .txt, .md"):
            _ingest(project, sessions, tmp_path / folder)
    assert _counts(sessions) == (0, 0) and not (project.index_dir / "index.json").exists()
