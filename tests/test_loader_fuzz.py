"""Fuzz every loader of user files: whatever the bytes, it returns a value or raises one of
tuneloop's own user errors (which the CLI prints as one line), never another exception.

Inputs: random bytes, text in wrong encodings (latin-1, UTF-16/32 with a byte-order mark), huge
lines, deeply nested JSON, NUL bytes, and mutations of valid files (a PDF, seed rows, settings).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import make_url

from tests.test_ingest_units import minimal_pdf
from tuneloop.config import Project, load_project, sqlite_file
from tuneloop.errors import TuneloopError
from tuneloop.ingest.loaders import RawDocument, load_file
from tuneloop.stages.seeds import read_pairs

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                database=None)

_TEXT = st.text(st.characters(codec="utf-8"), max_size=300)


def _encoded(text: str, encoding: str) -> bytes:
    return text.encode(encoding, errors="replace")


def _mutated(valid: bytes) -> st.SearchStrategy[bytes]:
    """`valid` with a few bytes replaced, inserted or cut (keeps most of its structure)."""
    def edit(data: bytes, at: int, op: int, junk: bytes) -> bytes:
        at %= max(len(data), 1)
        if op == 0:
            return data[:at] + junk + data[at + len(junk):]
        if op == 1:
            return data[:at] + junk + data[at:]
        return data[:at] + data[at + len(junk) + 1:]
    return st.builds(edit, st.just(valid), st.integers(0, 10**6), st.integers(0, 2), st.binary(max_size=8))


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _shapes(valid_lines: list[str]) -> st.SearchStrategy[bytes]:
    """Bytes of every troublesome shape, plus mutations of a valid file made of `valid_lines`."""
    valid = ("\n".join(valid_lines) + "\n").encode()
    lines = st.lists(st.one_of(st.sampled_from(valid_lines), _TEXT), max_size=6)
    joined = lines.map("\n".join)
    return st.one_of(
        st.binary(max_size=400),
        st.builds(_encoded, joined, st.sampled_from(["latin-1", "utf-16", "utf-32", "utf-8-sig", "cp1252"])),
        st.builds(lambda t, n: (t + "x" * n).encode(), joined, st.integers(10_000, 300_000)),  # a huge line
        st.builds(lambda d: _nested(d).encode(), st.integers(1, 5_000)),  # deep JSON (and YAML flow lists)
        st.builds(lambda d: f'{{"text": {_nested(d)}, "question": {_nested(d)}}}'.encode(),
                  st.integers(1, 5_000)),
        st.builds(lambda t, i: (t[:i] + "\x00" + t[i:]).encode(), joined, st.integers(0, 50)),  # NUL
        st.builds(lambda d: ("x: " + "1" * d).encode(), st.integers(4000, 6000)),  # over int()'s digit limit
        st.builds(lambda d: ('{"text": %s}' % ("1" * d)).encode(), st.integers(4000, 6000)),
        _mutated(valid),
        st.just(b""),
    )


def _write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


_DOC_LINES = ['{"id": "a", "text": "The Supplier shall deliver."}', '{"title": "T", "text": "Body."}',
              "Plain text line.", "# A heading"]
_SEED_LINES = ['{"question": "Who pays?", "answer": "The Buyer", "source": "a.txt", "references": ["x"]}',
               '{"question": "Law?", "answer": "Delaware", "category": "Law"}', "question,answer,source",
               "Who pays?,The Buyer,a.txt", '"a, b",c,d']
_SETTINGS_LINES = ["project: demo", "ingest: {chunk_tokens: 64, overlap_tokens: 8, max_document_mb: 1}",
                   "continual: {wise_alphas: [0.5, 1.0]}", "store_url: sqlite:///sub/db.sqlite",
                   "synth: {min_question_chars: 5}", "sft:", "  epochs: 1"]


@pytest.mark.parametrize("suffix", [".txt", ".md", ".jsonl"])
def test_document_loaders_return_documents_or_a_user_error(tmp_path_factory, suffix):
    folder = tmp_path_factory.mktemp("docs")

    @FUZZ
    @given(_shapes(_DOC_LINES))
    def check(data: bytes) -> None:
        try:
            docs = load_file(_write(folder, "doc" + suffix, data), max_bytes=100_000)
        except TuneloopError:
            return
        assert docs and all(isinstance(d, RawDocument) and d.text.strip() for d in docs)
        assert all("\x00" not in d.text for d in docs)

    check()


def test_pdf_loader_returns_a_document_or_a_user_error(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pdf")
    pdf = minimal_pdf("The Supplier shall deliver.")

    @FUZZ
    @given(st.one_of(_mutated(pdf), st.binary(max_size=400), st.builds(lambda b: pdf[:b], st.integers(0, len(pdf)))))
    def check(data: bytes) -> None:
        try:
            docs = load_file(_write(folder, "doc.pdf", data), max_bytes=100_000)
        except TuneloopError:
            return
        assert len(docs) == 1 and docs[0].text.strip() and "\x00" not in docs[0].text

    check()


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_seed_loader_returns_pairs_or_a_user_error(tmp_path_factory, suffix):
    folder = tmp_path_factory.mktemp("seeds")

    @FUZZ
    @given(_shapes(_SEED_LINES))
    def check(data: bytes) -> None:
        try:
            rows = read_pairs(_write(folder, "seeds" + suffix, data))
        except TuneloopError:
            return
        for row in rows:
            assert row["question"] and row["answer"] and isinstance(row["references"], list)

    check()


def test_settings_loader_returns_a_project_or_a_user_error(tmp_path_factory):
    folder = tmp_path_factory.mktemp("project")

    @settings(FUZZ, max_examples=100)  # PyYAML takes ~0.5 s to give up on a deeply nested file
    @given(_shapes(_SETTINGS_LINES))
    def check(data: bytes) -> None:
        _write(folder, "tuneloop.yaml", data)
        try:
            project = load_project(folder)
        except TuneloopError:
            return
        assert isinstance(project, Project) and project.store_url

    check()


_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                     st.text(max_size=20), st.just(".inf"), st.just("not-a-url"), st.just("foo://x"),
                     st.just("sqlite:////no/such/folder/x.db"))
_SECTIONS = {"ingest": ["chunk_tokens", "overlap_tokens", "top_k", "max_document_mb"],
             "synth": ["min_question_chars", "max_question_chars", "questions_per_cycle", "seed"],
             "continual": ["wise_alphas", "anchor_tolerance"], "monitor": ["min_votes", "satisfaction_window"],
             "sft": ["epochs", "learning_rate"], "lora": ["r", "alpha"]}


def test_settings_values_of_any_type_give_a_project_or_a_user_error(tmp_path_factory):
    """Well-formed YAML with values of the wrong type, sign or range in the numeric settings."""
    folder = tmp_path_factory.mktemp("values")
    value = st.one_of(_SCALARS, st.lists(_SCALARS, max_size=3))
    section = st.sampled_from(sorted(_SECTIONS)).flatmap(
        lambda name: st.tuples(st.just(name), st.dictionaries(st.sampled_from(_SECTIONS[name]), value, max_size=3)))
    doc = st.tuples(st.lists(section, max_size=3), st.one_of(st.none(), _SCALARS))

    @FUZZ
    @given(doc)
    def check(parts) -> None:
        sections, store_url = parts
        data = dict(sections)
        if store_url is not None:
            data["store_url"] = store_url
        _write(folder, "tuneloop.yaml", yaml.safe_dump(data).encode())
        try:
            project = load_project(folder)
        except TuneloopError:
            return
        # accepted settings are usable: the store opens, the WiSE-FT alphas are mixing weights
        make_url(project.store_url).get_dialect()
        db = sqlite_file(project.store_url)
        assert db is None or db.parent.is_dir()
        alphas = project.settings.continual.wise_alphas
        assert alphas and all(0 <= a <= 1 for a in alphas)

    check()


def test_seed_rows_of_any_json_shape_give_pairs_or_a_user_error(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rows")
    scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20))
    nested = st.recursive(scalar, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                          st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                          max_leaves=10)
    text = st.text(st.characters(codec="utf-8", categories=["L", "N", "P"]), min_size=1, max_size=30)
    field = st.one_of(scalar, nested, text)
    row = st.fixed_dictionaries(  # a valid question and answer, so that the other fields get checked
        {"question": text, "answer": text},
        optional={k: field for k in ("source", "document", "contract", "category", "references", "evidence", "id")})

    @FUZZ
    @given(st.lists(row, min_size=1, max_size=4))
    def check(rows) -> None:
        data = "\n".join(json.dumps(r) for r in rows).encode()
        try:
            read_pairs(_write(folder, "rows.jsonl", data))
        except TuneloopError:
            return

    check()
