"""The retriever that learns: (question, evidence chunk) pairs, and fine-tuning the embedder on them.

The toy corpus: eight short contracts with the same five clauses (payment, termination,
confidentiality, governing law, insurance), each in its own chunk. The questions name a clause
by in-house jargon no passage uses ("the florp" is the payment clause), so the base embedder
ranks the right chunk first for few of them; a model fine-tuned on five contracts' questions
should find the clause in the other three.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tuneloop.errors import InputError, StateError
from tuneloop.ingest.index import HybridIndex
from tuneloop.ingest.tune_embedder import (
    EMBEDDER_KIND,
    NO_DOCUMENT,
    NO_EVIDENCE,
    NO_NEGATIVE,
    NOT_LOCATED,
    TrainingPair,
    finetune_embedder,
    training_pairs,
)
from tuneloop.metrics import normalize_tokens, retrieval_hit
from tuneloop.models.defaults import embedder_dir
from tuneloop.models.embed import LocalEmbedder
from tuneloop.store import Example

PARTIES = [("Acme Corp", "Birch Ltd", "Delaware"), ("Cobalt Inc", "Dune LLC", "Texas"),
           ("Ember Co", "Fjord AG", "Ohio"), ("Garnet plc", "Harbor SA", "Nevada"),
           ("Iris Labs", "Juniper BV", "Oregon"), ("Kite Group", "Lumen Oy", "Maine"),
           ("Maple Ltd", "Nova Inc", "Utah"), ("Onyx LLC", "Pine Corp", "Iowa")]
# clause: (passage, answer span, jargon)
CLAUSES = {
    "payment": ("{b} shall pay each invoice within {n} days by wire transfer to {s}.",
                "within {n} days by wire transfer", "florp"),
    "termination": ("Either party may end this agreement on {n} months written notice to the other party.",
                    "{n} months written notice", "zindle"),
    "confidentiality": ("{s} shall keep secret all business information disclosed by {b} for {n} years.",
                        "keep secret all business information", "quaxer"),
    "law": ("This agreement is governed by the laws of {st} and its courts decide disputes.",
            "the laws of {st}", "brimble"),
    "insurance": ("{s} shall maintain liability coverage of at least {n} million dollars with a rated insurer.",
                  "liability coverage of at least {n} million dollars", "tovrin"),
}
TEMPLATES = ["What does the {j} say?", "Quote the {j} of this contract.", "Find the {j}."]
TRAIN_CONTRACTS = 5  # contracts 0-4 train, 5-7 are held out


def toy_corpus() -> tuple[list[tuple[int, str, str]], list[Example]]:
    """(chunk id, document, text) rows as `stored_chunks` gives them, and one question per clause."""
    chunks, examples = [], []
    for d, (s, b, st) in enumerate(PARTIES):
        doc, n = f"contract{d}.txt", d + 2
        for passage, answer, jargon in CLAUSES.values():
            chunks.append((len(chunks) + 1, doc, passage.format(s=s, b=b, n=n, st=st)))
            examples.append(Example(question=TEMPLATES[d % 3].format(j=jargon),
                                    answer=answer.format(s=s, b=b, n=n, st=st), document=doc, meta={}))
    return chunks, examples


def hit_at_1(chunks, examples, embedder) -> float:
    """Share of `examples` whose top chunk (restricted to the example's document) holds the answer."""
    index = HybridIndex.build([c[0] for c in chunks], [c[2] for c in chunks], [c[1] for c in chunks], embedder)
    text = {c[0]: c[2] for c in chunks}
    hits = [retrieval_hit([text[cid] for cid, _ in index.search(e.question, 1, group=e.document)], [e.answer])
            for e in examples]
    return sum(hits) / len(hits)


class BagOfWords:
    """A deterministic embedder: hashed normalised tokens (enough to rank by word overlap)."""

    name = "bag-of-words"

    def embed(self, texts):
        out = np.zeros((len(texts), 64), dtype=np.float32)
        for row, text in enumerate(texts):
            for token in normalize_tokens(text):
                out[row, sum(map(ord, token)) % 64] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)

    def token_offsets(self, text):
        return []


def test_fine_tuned_embedder_finds_the_clause_the_base_model_misses(tmp_path, real_embedder):
    chunks, examples = toy_corpus()
    train = [e for e in examples if int(e.document[len("contract")]) < TRAIN_CONTRACTS]
    heldout = [e for e in examples if int(e.document[len("contract")]) >= TRAIN_CONTRACTS]
    before = hit_at_1(chunks, heldout, real_embedder)
    assert before <= 0.4  # the jargon is absent from every passage: the base model mostly misses

    pair_set = training_pairs(train, chunks)
    assert len(pair_set.pairs) == len(train) and pair_set.skipped == {}
    result = finetune_embedder(embedder_dir(), pair_set.pairs, tmp_path, "embedder-toy", epochs=3, batch_size=8,
                               lr=1e-4, seed=0)
    assert result.path == tmp_path / EMBEDDER_KIND / "embedder-toy"
    assert result.pairs == len(train) and not result.hard_negatives and result.steps > 0
    assert result.loss_after < result.loss_before
    meta = json.loads((result.path / "meta.json").read_text())
    assert meta["pairs"] == len(train) and meta["base_model"] == str(embedder_dir())
    assert meta["loss_after"] == pytest.approx(result.loss_after) and meta["seconds"] > 0
    assert not list(tmp_path.glob(".tmp-*")) and not (result.path / ".trainer").exists()

    tuned = LocalEmbedder(result.path)
    after = hit_at_1(chunks, heldout, tuned)
    assert after > before and after >= 0.8, (before, after)

    # the tuned model has its own name: an index built with it refuses the base embedder
    assert tuned.name == "embedder-toy" != real_embedder.name
    index_dir = tmp_path / "index-tuned"
    HybridIndex.build([c[0] for c in chunks], [c[2] for c in chunks], [c[1] for c in chunks], tuned).save(index_dir)
    with pytest.raises(StateError, match="embedder-toy"):
        HybridIndex.load(index_dir, real_embedder)

    # a complete artifact is immutable: asking again returns it as it is, without training
    again = finetune_embedder(embedder_dir(), pair_set.pairs[:2], tmp_path, "embedder-toy")
    assert again.path == result.path and again.pairs == len(train) and again.loss_after == result.loss_after


def test_training_pairs_locate_the_evidence_and_count_what_they_skip():
    chunks = [
        (1, "a.txt", "This agreement is governed by the laws of Delaware."),
        (2, "a.txt", "The supplier shall maintain insurance of five million dollars."),
        (3, "a.txt", "Either party may terminate on ninety days written notice."),
        (4, "b.txt", "The laws of Texas govern this agreement."),
    ]
    examples = [
        Example(question="Which law governs?", answer="the laws of Delaware", document="a.txt", meta={}),
        # yes/no: only the evidence clause counts; two clauses, two chunks, one pair each
        Example(question="Is there an insurance or termination clause?", answer="Yes", document="a.txt",
                meta={"references": ["maintain insurance of five million dollars", "ninety days written notice"]}),
        Example(question="Is there a non-compete?", answer="No", document="a.txt", meta={}),
        Example(question="Which law governs?", answer="Texas", document="missing.txt", meta={}),
        Example(question="Which law governs?", answer="Texas", document=None, meta={}),
        Example(question="Who audits?", answer="an independent auditor appointed yearly", document="a.txt", meta={}),
        Example(question="Which law governs?", answer="The laws of Texas", document="b.txt", meta={}),
    ]
    result = training_pairs(examples, chunks)
    assert [(p.query, p.positive) for p in result.pairs] == [
        ("Which law governs?", chunks[0][2]),
        ("Is there an insurance or termination clause?", chunks[1][2]),
        ("Is there an insurance or termination clause?", chunks[2][2]),
        ("Which law governs?", chunks[3][2]),
    ]
    assert all(p.negative is None for p in result.pairs)
    assert result.examples == 7
    assert result.skipped == {NO_EVIDENCE: 1, NO_DOCUMENT: 2, NOT_LOCATED: 1}
    assert len(training_pairs(examples, chunks, max_positives=1).pairs) == 3

    # hard negatives: the same document's chunk nearest the question that holds none of the evidence
    mined = training_pairs(examples, chunks, negatives_from=BagOfWords())
    by_query = {(p.query, p.document): p for p in mined.pairs}
    law = by_query[("Which law governs?", "a.txt")]
    assert law.negative in {chunks[1][2], chunks[2][2]}
    assert by_query[("Is there an insurance or termination clause?", "a.txt")].negative == chunks[0][2]
    assert mined.skipped[NO_NEGATIVE] == 1  # b.txt has no other chunk
    with pytest.raises(ValueError, match="max_positives"):
        training_pairs(examples, chunks, max_positives=0)


def test_bad_inputs_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(InputError, match="no training pairs"):
        finetune_embedder(embedder_dir(), [], tmp_path, "empty")
    pairs = [TrainingPair("q", "p", "a.txt"), TrainingPair("r", "s", "a.txt")]
    with pytest.raises(InputError, match="not a sentence-transformers model folder"):
        finetune_embedder(tmp_path / "nowhere", pairs, tmp_path, "bad-base")
    with pytest.raises(ValueError, match="batch_size"):
        finetune_embedder(embedder_dir(), pairs, tmp_path, "tiny-batch", batch_size=1)
    assert list(Path(tmp_path).iterdir()) == []
