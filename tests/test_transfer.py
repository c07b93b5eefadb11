"""Seed-question transfer: the experts' questions asked of other documents, kept only when checkable."""
from __future__ import annotations

import json
import random
import re
from dataclasses import replace
from pathlib import Path

from sqlalchemy import select

from tests.helpers import CONTRACTS, SEEDS, RecordingReporter, excerpts, ingest_project
from tuneloop.config import TransferSettings
from tuneloop.filters import copied_span
from tuneloop.models.base import GenerationParams, Message
from tuneloop.programs.rag import Passage, Retriever
from tuneloop.stages.evidence import anchor_clauses, evidence_labels
from tuneloop.stages.ingest import ingest_paths
from tuneloop.stages.label_quality import label_quality, load_labels
from tuneloop.stages.sft import training_target
from tuneloop.stages.synth import synthesize
from tuneloop.stages.transfer import Labeller, plan, run_transfer
from tuneloop.store import Example, open_store, text_hash

GOVERNING = "What law governs the master services agreement?"
INSURANCE = "Does the master services agreement require the Provider to maintain insurance?"


class PassageLabeller:
    """Answers from the excerpts it is shown, like a model that reads: a scripted stand-in.

    Yes/no: margin +3 when the excerpts mention "insurance", else -3 (-0.2 when `unsure_no`).
    Other questions: the governing-law phrase of the excerpts, or a rewording."""

    name = "scripted-labeller"

    def __init__(self, reword: bool = False, unsure_no: bool = False):
        self.reword, self.unsure_no = reword, unsure_no

    def yes_no_margins(self, conversations: list[list[Message]]) -> list[float]:
        no = -0.2 if self.unsure_no else -3.0  # unsure: "No" only just below the threshold
        return [3.0 if "insurance" in excerpts(c).lower() else no for c in conversations]

    def chat(self, conversations: list[list[Message]], params: GenerationParams) -> list[str]:
        replies = []
        for c in conversations:
            m = re.search(r"the laws of ([A-Z][\w ]+?)[,.]", excerpts(c))
            if not m:
                replies.append("The document does not say.")
            elif self.reword:
                replies.append(f"It is {m.group(1).upper()} law, I believe, as a rule of thumb")
            else:
                replies.append(f"the laws of {m.group(1)}")
        return replies


def _seed_project(project, questions: list[tuple[str, str]]):
    proj = project(pairs=False)
    retriever = ingest_project(proj)
    with open_store(proj.store_url)() as s:
        for q, a in questions:
            s.add(Example(kind="seed", split="train", question=q, answer=a, document="01-master-services-agreement.md",
                          content_hash=text_hash(q, a)))
        s.commit()
    return proj, retriever


def test_plan_asks_each_seed_question_of_the_other_documents_but_never_a_held_out_one(project):
    proj, retriever = _seed_project(project, [(GOVERNING, "the laws of the State of Delaware")])
    with open_store(proj.store_url)() as s:
        s.add(Example(kind="seed", split="eval", question=GOVERNING, answer="x",
                      document="04-non-disclosure-agreement.md", content_hash="held"))
        s.commit()
        planned = plan(s, retriever, 100, random.Random(0))
    docs = sorted(c.document for c in planned)
    assert "01-master-services-agreement.md" not in docs  # the seed's own document
    assert "04-non-disclosure-agreement.md" not in docs  # a held-out question is never asked
    assert len(docs) == len(retriever.documents()) - 2 and len(set(docs)) == len(docs)
    with open_store(proj.store_url)() as s:
        assert len(plan(s, retriever, 2, random.Random(0))) == 2  # the limit holds


def test_yes_no_labels_are_kept_only_when_every_passage_set_agrees_confidently(project):
    proj, retriever = _seed_project(project, [(INSURANCE, "Yes")])
    with open_store(proj.store_url)() as s:
        settings = TransferSettings(samples=2, yes_no_margin=1.0)
        reader = Labeller("scripted", PassageLabeller(), 0.0, yes_no_accuracy=1.0)
        kept, rejected, report = run_transfer(s, retriever, reader, settings,
                                              GenerationParams(), RecordingReporter(), random.Random(0))
        assert report["asked"] == len(retriever.documents()) - 1 == len(kept) + len(rejected)
        for row in kept:
            shown = [retriever.passages[c].text for c in row["context_chunk_ids"]]
            assert row["answer"] == ("Yes" if any("insurance" in t.lower() for t in shown) else "No")
            assert row["strategy"] == "transfer" and row["question_type"] == "yes_no" and row["seed_ids"]
        # unsure of its "No" answers (margin -0.2, next to the threshold): only the "Yes" labels stay
        unsure = PassageLabeller(unsure_no=True)
        kept2, rejected2, _ = run_transfer(s, retriever, replace(reader, model=unsure), settings,
                                           GenerationParams(), RecordingReporter(), random.Random(0))
    assert {r["answer"] for r in kept} == {"Yes", "No"}
    assert {r["answer"] for r in kept2} <= {"Yes"} and len(kept2) < len(kept)
    assert any(r["reason"].startswith("not confident") for r in rejected2)


def test_extraction_answers_are_kept_when_copied_from_a_passage(project):
    proj, retriever = _seed_project(project, [(GOVERNING, "the laws of the State of Delaware")])
    with open_store(proj.store_url)() as s:
        kept, rejected, report = run_transfer(s, retriever, Labeller("scripted", PassageLabeller(), None),
                                              TransferSettings(samples=2), GenerationParams(), RecordingReporter(),
                                              random.Random(0))
        _, reworded, _ = run_transfer(s, retriever, Labeller("scripted", PassageLabeller(reword=True), None),
                                      TransferSettings(samples=2), GenerationParams(), RecordingReporter(),
                                      random.Random(0))
    by_doc = {r["document"]: r["answer"] for r in kept}
    assert by_doc["02-software-licence-agreement.md"] == "the laws of England and Wales"
    assert by_doc["05-supply-agreement.md"] == "the laws of New South Wales"
    assert {r["reason"] for r in reworded} >= {"not copied from a passage"}  # a rewording is not a span
    assert all(r["reason"] != "" for r in rejected)


def test_copied_span_keeps_the_documents_own_words():
    passages = ["This Agreement is governed by the laws of the State of New York, without regard to conflicts."]
    assert copied_span("laws of the state of new york", passages) == "laws of the State of New York"
    assert copied_span("laws of New York State", passages) is None
    assert copied_span("", passages) is None


def test_the_training_target_is_the_evidence_span_the_student_can_copy():
    passage = Passage(1, "a.md", "This Agreement is entered into on the 15th day of June, 2015 by the Parties.")
    dated = Example(question="What is the date of this contract?", answer="6/15/2015",
                    meta={"references": ["the 15th day of June, 2015 by the Parties hereto", "15th day of June, 2015"]})
    assert training_target(dated, [passage]) == "15th day of June, 2015"
    assert training_target(dated, []) == "6/15/2015"  # nothing to copy: the answer stays
    yes = Example(question="Is there a date?", answer="Yes", meta={"references": ["15th day of June, 2015"]})
    assert training_target(yes, [passage]) == "Yes"


def test_synth_adds_transferred_examples_with_provenance(project, fake_teacher, monkeypatch):
    labels = [json.loads(line) for line in SEEDS.read_text().splitlines() if line.strip()]
    proj = project(overrides={"synth": {"questions_per_cycle": 2, "transfer": {"enabled": True, "samples": 2},
                                        "label_check": "labels.jsonl"}})
    (proj.root / "labels.jsonl").write_text("".join(
        json.dumps({**r, "source": d}) + "\n" for r in labels for d in sorted(p.name for p in CONTRACTS.glob("*.md"))))
    retriever = ingest_project(proj)
    # the champion of an earlier cycle (a tuned version, accurate on yes/no at its threshold) labels
    monkeypatch.setattr("tuneloop.stages.transfer.build_labeller", lambda *a, **k: Labeller(
        "champion:v1", PassageLabeller(), 0.0, yes_no_accuracy=0.9))
    with open_store(proj.store_url)() as s:
        result = synthesize(proj, s, fake_teacher, retriever, RecordingReporter())
        s.commit()
        transferred = list(s.scalars(select(Example).where(Example.kind == "synthetic")))
        transferred = [e for e in transferred if e.meta.get("strategy") == "transfer"]
        held = {(e.question, e.document) for e in s.scalars(select(Example).where(Example.split == "eval"))}
    report = json.loads((Path(result.artifact) / "report.json").read_text())
    assert report["transfer"]["kept"] == len(transferred) > 0
    # every transferred pair has a (made-up) label in the file: the report scores all of them
    assert report["label_quality"]["transfer"]["checked"] == len(transferred)
    assert report["kept"] == result.kept >= len(transferred)
    assert {e.meta["teacher"] for e in transferred} == {"champion:v1"}
    assert all(e.meta["seed_ids"] for e in transferred)
    assert not held & {(e.question, e.document) for e in transferred}


def test_label_quality_scores_synthetic_labels_against_known_ones(tmp_path):
    labels_file = tmp_path / "labels.jsonl"
    labels_file.write_text("\n".join(json.dumps(r) for r in [
        {"question": "Is there insurance?", "answer": "Yes", "source": "a.md"},
        {"question": "Is there insurance?", "answer": "No", "source": "b.md"},
        {"question": "Is there insurance?", "answer": "No", "source": "c.md"},
        {"question": "What law governs?", "answer": "New York", "source": "a.md",
         "references": ["the laws of the State of New York"]},
    ]) + "\n")
    rows = [{"question": "Is there insurance?", "document": "a.md", "answer": "Yes", "strategy": "transfer"},
            {"question": "is there insurance", "document": "b.md", "answer": "Yes", "strategy": "transfer"},
            {"question": "Is there insurance?", "document": "c.md", "answer": "No", "strategy": "transfer"},
            {"question": "Is there insurance?", "document": "z.md", "answer": "No", "strategy": "transfer"},  # unknown
            {"question": "What law governs?", "document": "a.md", "answer": "the laws of the State of New York",
             "strategy": "grounded"}]
    q = label_quality(rows, load_labels(labels_file))
    assert q["transfer"]["checked"] == 3 and q["transfer"]["yes_no_label_precision"] == round(2 / 3, 4)
    assert q["transfer"]["yes_precision"] == 0.5 and q["transfer"]["no_precision"] == 1.0
    assert q["grounded"]["extraction_token_f1"] == 1.0 and q["grounded"]["yes_no_checked"] == 0


def test_evidence_labels_compare_documents_within_a_question():
    settings = TransferSettings(evidence_no_share=0.3, evidence_yes_share=0.2, evidence_yes_floor=0.6)
    # question A: a clear best match; question B: every document a poor match (below the pooled floor)
    pairs = [("Is there A?", f"d{i}") for i in range(10)] + [("Is there B?", f"d{i}") for i in range(10)]
    scores = [0.90, 0.85, 0.60, 0.55, 0.50, 0.45, 0.40, 0.35, 0.30, 0.20] + [0.30 - i / 100 for i in range(10)]
    labels = evidence_labels(pairs, scores, settings)
    assert labels[:10] == ["Yes", "Yes"] + [None] * 5 + ["No"] * 3
    assert labels[10:] == [None] * 7 + ["No"] * 3  # B's best match is below the floor: no "Yes" for B
    assert evidence_labels(pairs[:2], [None, None], settings) == [None, None]


def test_anchor_clauses_come_from_the_yes_answers_evidence():
    seeds = [Example(question="Is there insurance?", answer="Yes", meta={"references": ["Provider shall insure"]}),
             Example(question="is there insurance", answer="Yes", meta={"references": ["Tenant shall insure"]}),
             Example(question="Is there insurance?", answer="No", meta={"references": ["ignored"]}),
             Example(question="Is there a cap?", answer="Yes", meta={})]
    assert anchor_clauses(seeds) == {"is there insurance": ["Provider shall insure", "Tenant shall insure"]}


def test_evidence_labelled_transfer_on_real_embeddings(project, real_embedder):
    """The insurance clause of one contract finds the contracts with insurance clauses."""
    proj = project(pairs=False, overrides={"ingest": {"dense": True}})
    with open_store(proj.store_url)() as s:
        ingest_paths(proj, s, [proj.path(p) for p in proj.settings.documents], real_embedder, RecordingReporter())
        s.commit()
        retriever = Retriever.load(proj, s, real_embedder)
    clause = next(line for line in (proj.root / "documents" / "01-master-services-agreement.md").read_text()
                  .splitlines() if "insurance" in line.lower() and len(line) > 80)
    with open_store(proj.store_url)() as s:
        s.add(Example(kind="seed", split="train", question=INSURANCE, answer="Yes",
                      document="01-master-services-agreement.md", content_hash="ins", meta={"references": [clause]}))
        s.commit()
        settings = TransferSettings(evidence_no_share=0.4, evidence_yes_share=0.2, evidence_yes_floor=0.5)
        kept, rejected, report = run_transfer(s, retriever, Labeller("unused", PassageLabeller(), 0.0), settings,
                                              GenerationParams(), RecordingReporter(), random.Random(0))
        assert {r["strategy"] for r in kept} == {"transfer-evidence"} and len(kept) + len(rejected) == 5
        insured = {p.name for p in (proj.root / "documents").glob("*.md") if "insurance" in p.read_text().lower()}
        assert {r["document"] for r in kept if r["answer"] == "Yes"} <= insured
        assert not {r["document"] for r in kept if r["answer"] == "No"} & insured

        # the next cycle: the labelled pairs are stored; the cuts stay where they were, so the
        # documents in between are not labelled now (they go to the labeller, untrusted here)
        for r in kept:
            s.add(Example(kind="synthetic", split="train", question=r["question"], answer=r["answer"],
                          document=r["document"], content_hash=text_hash(r["question"], r["document"])))
        s.flush()
        again, rejected_again, _ = run_transfer(s, retriever, Labeller("base", PassageLabeller(), 0.0,
                                                                       yes_no_accuracy=0.5),
                                                settings, GenerationParams(), RecordingReporter(), random.Random(0))
    assert kept and again == [] and len(rejected_again) == 5 - len(kept)


def test_evidence_spans_answer_in_the_other_documents_own_sentence(project, real_embedder):
    """The governing-law clause of one contract, as evidence, finds each other contract's
    governing-law sentence; the question's own passages must hold it (the verifier)."""
    proj = project(pairs=False, overrides={"ingest": {"dense": True, "top_k": 2}})
    with open_store(proj.store_url)() as s:
        ingest_paths(proj, s, [proj.path(p) for p in proj.settings.documents], real_embedder, RecordingReporter())
        s.commit()
        retriever = Retriever.load(proj, s, real_embedder)
        clause = ("This Agreement shall be governed by and construed in accordance with the laws of the State of "
                  "Delaware, without regard to its conflict of laws principles.")
        s.add(Example(kind="seed", split="train", question=GOVERNING, answer="Delaware",
                      document="01-master-services-agreement.md", content_hash="gov", meta={"references": [clause]}))
        s.commit()
        settings = TransferSettings(evidence_spans=True, evidence_span_share=1.0, evidence_span_floor=0.0)
        base = Labeller("champion:base", PassageLabeller(), None, trained=False)
        kept, rejected, report = run_transfer(s, retriever, base, settings, GenerationParams(), RecordingReporter(),
                                              random.Random(0))
        assert len(kept) + len(rejected) == 5 and report["kept_evidence_spans"] == len(kept) >= 3
        for row in kept:
            assert row["strategy"] == "transfer-evidence-span" and row["question_type"] == "extraction"
            assert "governed by" in row["answer"]  # that document's own governing-law sentence
            text = (proj.root / "documents" / row["document"]).read_text()
            assert row["answer"] in text
            chunks = {p.chunk_id: p.text for p in retriever.retrieve(GOVERNING, row["document"])}
            assert set(row["context_chunk_ids"]) == set(chunks) and any(row["answer"] in t for t in chunks.values())
        assert all(r["reason"] == "evidence sentence not among the question's passages" for r in rejected)

        off = run_transfer(s, retriever, base, TransferSettings(evidence_spans=False), GenerationParams(),
                           RecordingReporter(), random.Random(0))
    assert off[0] == [] and off[2]["rejected"] == {"labeller is the untuned base model": 5}


def test_a_labeller_at_chance_on_yes_no_labels_none(project):
    proj, retriever = _seed_project(project, [(INSURANCE, "Yes")])
    with open_store(proj.store_url)() as s:
        at_chance = Labeller("base", PassageLabeller(), 0.0, yes_no_accuracy=0.54)
        kept, rejected, report = run_transfer(s, retriever, at_chance,
                                              TransferSettings(), GenerationParams(), RecordingReporter(),
                                              random.Random(0))
    assert kept == [] and report["rejected"] == {"labeller not accurate enough on yes/no": 5}


def test_the_untuned_base_model_answers_no_extraction_question(project):
    proj, retriever = _seed_project(project, [(GOVERNING, "the laws of the State of Delaware")])
    with open_store(proj.store_url)() as s:
        base = Labeller("champion:base", PassageLabeller(), None, trained=False)
        kept, rejected, report = run_transfer(s, retriever, base, TransferSettings(samples=2), GenerationParams(),
                                              RecordingReporter(), random.Random(0))
    assert kept == [] and report["rejected"] == {"labeller is the untuned base model": 5}
