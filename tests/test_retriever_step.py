"""The cycle's `retriever` step: a fine-tuned embedder and index per candidate, used wherever that
version answers (eval, the canary, serving), inherited when the step skips."""
from __future__ import annotations

import hashlib
import shutil

import numpy as np
from sqlalchemy import select

from tests.helpers import CONTRACTS, RecordingReporter
from tuneloop.ingest.chunking import word_offsets
from tuneloop.ingest.index import HybridIndex, stored_chunks
from tuneloop.programs.rag import (
    RETRIEVER_KEY,
    Retriever,
    version_dense_weight,
    version_retriever_paths,
    version_top_k,
)
from tuneloop.serve.state import ModelState
from tuneloop.stages.ingest import ingest_paths
from tuneloop.stages.retriever import tune_retriever
from tuneloop.store import Example, ModelVersion, open_store, text_hash
from tuneloop.versions import Status, ensure_base_version

SETTINGS = {"ingest": {"dense": True},
            "retriever": {"min_pairs": 4, "epochs": 1.0, "batch_size": 4, "hard_negatives": True}}


def _ingested(project, real_embedder, overrides=None):
    proj = project(overrides={**SETTINGS, **(overrides or {})})
    with open_store(proj.store_url)() as s:
        ingest_paths(proj, s, [proj.path("documents")], real_embedder, RecordingReporter())
        s.commit()
    return proj


def _candidate(s, parent: ModelVersion, name: str) -> ModelVersion:
    v = ModelVersion(name=name, parent_id=parent.id, base_model="tiny", method="sft", status=Status.CANDIDATE)
    s.add(v)
    s.flush()
    return v


def test_the_candidate_gets_its_own_embedder_and_index_and_answers_with_them(project, real_embedder, tmp_path):
    proj = _ingested(project, real_embedder)
    with open_store(proj.store_url)() as s:
        champion = ensure_base_version(proj, s)
        candidate = _candidate(s, champion, "v1")
        r = tune_retriever(proj, s, candidate, champion, real_embedder, RecordingReporter(), cycle_id=1)
        s.commit()
        assert r.get("skipped") is None, r
        assert r["pairs"] >= 4 and r["steps"] >= 1 and r["hard_negatives"] is True
        assert r["not_paired"].get("no_evidence", 0) >= 1  # the sample's yes/no seeds carry no evidence clauses
        embedder_dir, index_dir = version_retriever_paths(candidate)
        assert (embedder_dir / "modules.json").is_file() and (index_dir / "index.json").is_file()

        own = Retriever.for_version(proj, s, candidate, real_embedder)
        project_wide = Retriever.for_version(proj, s, champion, real_embedder)  # no retriever of its own
        assert own.index.embedder_name == embedder_dir.name != project_wide.index.embedder_name
        assert project_wide.index.embedder_name == real_embedder.name
        question = "What law governs the supply agreement?"
        assert own.retrieve(question, "05-supply-agreement.md")  # it answers from the same chunks
        assert {p.chunk_id for p in own.passages.values()} == {p.chunk_id for p in project_wide.passages.values()}

        # documents added after the step: the version's index is rebuilt with its embedder, never stale
        extra = tmp_path / "more"
        extra.mkdir()
        shutil.copy(CONTRACTS / "05-supply-agreement.md", extra / "07-second-supply-agreement.md")
        ingest_paths(proj, s, [extra], real_embedder, RecordingReporter())
        s.commit()
        before = HybridIndex.load(index_dir, own.index.embedder).content_hash
        again = Retriever.for_version(proj, s, candidate, real_embedder)
        assert "07-second-supply-agreement.md" in again.documents()
        assert again.index.content_hash != before and again.index.embedder_name == embedder_dir.name

    # serving answers with the champion's retriever: promote the candidate
    with open_store(proj.store_url)() as s:
        for v in s.scalars(select(ModelVersion)):
            v.status = Status.CHAMPION if v.name == "v1" else Status.RETIRED
        s.commit()
    state = ModelState(proj, open_store(proj.store_url), model_factory=lambda project, version: object(),
                       embedder=real_embedder)
    served = state.load()
    assert served.champion.name == "v1"
    assert served.retriever.index.embedder_name == embedder_dir.name
    assert served.retriever_paths == (embedder_dir, index_dir)


def test_a_skipped_step_keeps_the_champions_retriever(project, real_embedder):
    proj = _ingested(project, real_embedder, {"retriever": {**SETTINGS["retriever"], "min_pairs": 1000}})
    with open_store(proj.store_url)() as s:
        champion = ensure_base_version(proj, s)
        learned = {"name": "cycle-0001-v1-embedder", "embedder": "/x/embedder", "index": "/x/index", "pairs": 9}
        champion.hyperparams = {**(champion.hyperparams or {}), RETRIEVER_KEY: learned}
        candidate = _candidate(s, champion, "v2")
        r = tune_retriever(proj, s, candidate, champion, real_embedder, RecordingReporter(), cycle_id=2)
        assert "fewer than retriever.min_pairs (1000)" in r["skipped"] and r["pairs"] >= 1
        assert r["inherited"] == "cycle-0001-v1-embedder"
        assert candidate.hyperparams[RETRIEVER_KEY] == learned  # promoting v2 keeps the learned retriever

        off = _candidate(s, champion, "v3")
        proj.settings.retriever.fine_tune = False
        assert tune_retriever(proj, s, off, None, real_embedder, RecordingReporter(), 3) == {
            "skipped": "retriever.fine_tune is false", "inherited": None,
            "fusion_kept": "0 dev questions with a textual reference, fewer than retriever.min_dev_items (8): "
                           "ingest.dense_weight 0.5",
            "top_k_kept": "0 dev questions, fewer than retriever.min_dev_items (8): ingest.top_k 2"}
        assert RETRIEVER_KEY not in (off.hyperparams or {})  # nothing to inherit: the project's index


class RandomEmbedder:
    """A dense side that knows nothing: a fixed pseudo-random unit vector per text."""

    name = "random-embedder"

    def token_offsets(self, text):
        return word_offsets(text)

    def embed(self, texts):
        out = []
        for text in texts:
            rng = np.random.default_rng(int(hashlib.md5(text.encode()).hexdigest()[:8], 16))
            v = rng.normal(size=32)
            out.append(v / np.linalg.norm(v))
        return np.asarray(out, dtype=np.float32)


def _dev_questions(s, n: int) -> list[tuple[str, str]]:
    """(question, document) dev items whose answer is a stretch of one stored chunk, asked with its words."""
    items = []
    for _, document, text in stored_chunks(s)[::3][:n]:
        words = text.split()
        answer = " ".join(words[len(words) // 3: len(words) // 3 + 12])
        question = "Where does the contract say " + " ".join(answer.split()[:8]) + "?"
        s.add(Example(kind="seed", split="dev", question=question, answer=answer, document=document,
                      content_hash=text_hash(question, answer, document), meta={}))
        items.append((question, document))
    s.flush()
    return items


def test_the_fusion_weight_is_chosen_on_dev_and_used_where_the_version_answers(project):
    """With a dense side that ranks at random and questions that share the evidence's words, the
    dev split chooses a BM25-heavy fusion; for_version (eval, serving) then retrieves with it."""
    proj = project(overrides={"ingest": {"dense": True, "top_k": 1}, "retriever": {"fine_tune": False}})
    embedder = RandomEmbedder()
    with open_store(proj.store_url)() as s:
        ingest_paths(proj, s, [proj.path("documents")], embedder, RecordingReporter())
        champion = ensure_base_version(proj, s)
        candidate = _candidate(s, champion, "v1")
        _dev_questions(s, 12)
        r = tune_retriever(proj, s, candidate, champion, embedder, RecordingReporter(), cycle_id=1)
        s.commit()
        hit = r["dev_hit"]
        assert r["dev_items"] == 12 and hit["0.0"] == hit["0.25"] == 1.0 > hit["0.5"] > hit["1.0"], hit
        assert r["dense_weight"] == 0.25  # of the best, the one nearest ingest.dense_weight (0.5)
        assert version_dense_weight(candidate) == 0.25
        assert Retriever.for_version(proj, s, candidate, embedder).dense_weight == 0.25
        assert Retriever.for_version(proj, s, champion, embedder).dense_weight == 0.5  # ingest.dense_weight

        few = project(overrides={"ingest": {"dense": True}, "retriever": {"fine_tune": False, "min_dev_items": 50}})
    with open_store(few.store_url)() as s:
        ingest_paths(few, s, [few.path("documents")], embedder, RecordingReporter())
        v = _candidate(s, ensure_base_version(few, s), "v1")
        _dev_questions(s, 12)
        r = tune_retriever(few, s, v, None, embedder, RecordingReporter(), cycle_id=1)
    assert "fewer than retriever.min_dev_items (50)" in r["fusion_kept"] and version_dense_weight(v) is None


class OnePassageReader:
    """A chat model that knows every dev answer but finds it only in a prompt holding one excerpt
    (more passages distract it); with `distracted=False` it answers whatever the prompt."""

    name = "one-passage-reader"

    def __init__(self, answers: dict[str, str], distracted: bool = True):
        self.answers, self.distracted, self.excerpts = answers, distracted, []

    def chat(self, conversations, params):
        replies = []
        for conv in conversations:
            user = conv[-1]["content"]
            question = user.rsplit("Question: ", 1)[1]
            self.excerpts.append(user.count("\n\n[") + 1)
            one = "[2]" not in user
            replies.append(self.answers[question] if one or not self.distracted else "The document does not say.")
        return replies


def test_top_k_is_chosen_on_dev_by_the_candidates_answers_and_used_where_it_answers(project, monkeypatch):
    proj = project(overrides={"ingest": {"dense": False, "top_k": 2}, "retriever": {"fine_tune": False}})
    with open_store(proj.store_url)() as s:
        ingest_paths(proj, s, [proj.path("documents")], None, RecordingReporter())
        champion = ensure_base_version(proj, s)
        candidate = _candidate(s, champion, "v1")
        _dev_questions(s, 12)
        answers = {e.question: e.answer for e in s.scalars(select(Example).where(Example.split == "dev"))}
        reader, built = OnePassageReader(answers), []
        monkeypatch.setattr("tuneloop.stages.retriever.build_chat_model", lambda *a, **k: built.append(a) or reader)
        r = tune_retriever(proj, s, candidate, champion, None, RecordingReporter(), cycle_id=1)
        assert sorted(set(reader.excerpts)) == [1, 2, 3]  # every dev question asked with 1, 2 and 3 passages
        assert len(built) == 1  # the student is loaded once for the three top_k
        assert r["top_k_scores"] == {"1": 1.0, "2": 0.0, "3": 0.0} and r["top_k"] == 1 and r["top_k_p"] == 0.0
        assert version_top_k(candidate) == 1
        assert Retriever.for_version(proj, s, candidate, None).top_k == 1  # eval, the gate and serving
        assert Retriever.for_version(proj, s, champion, None).top_k == 2  # ingest.top_k

        # a reader that answers alike with any number of passages: no reason to move from ingest.top_k
        other = _candidate(s, champion, "v2")
        monkeypatch.setattr("tuneloop.stages.retriever.build_chat_model",
                            lambda *a, **k: OnePassageReader(answers, distracted=False))
        r = tune_retriever(proj, s, other, champion, None, RecordingReporter(), cycle_id=2)
        assert r["top_k"] == 2 and r["top_k_p"] is None and Retriever.for_version(proj, s, other, None).top_k == 2


def test_top_k_is_not_chosen_on_a_small_dev_split(project):
    proj = project(overrides={"ingest": {"dense": False}, "retriever": {"fine_tune": False, "min_dev_items": 50}})
    with open_store(proj.store_url)() as s:
        ingest_paths(proj, s, [proj.path("documents")], None, RecordingReporter())
        v = _candidate(s, ensure_base_version(proj, s), "v1")
        _dev_questions(s, 12)
        r = tune_retriever(proj, s, v, None, None, RecordingReporter(), cycle_id=1)
    assert r["top_k_kept"] == "12 dev questions, fewer than retriever.min_dev_items (50): ingest.top_k 2"
    assert version_top_k(v) is None
