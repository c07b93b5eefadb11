"""Routing people's feedback into training data: each kind, contradiction rules, duplicates,
serving prompts, idempotent store rows, the datasets artifact and `tuneloop feedback export`."""
from __future__ import annotations

import json
from datetime import datetime, timedelta

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from tests.helpers import ingest_project
from tuneloop.cli import app
from tuneloop.errors import StateError
from tuneloop.feedback.export import export_feedback
from tuneloop.feedback.routing import Vote, normalize_answer, resolve_votes, route_feedback, store_human
from tuneloop.programs.prompts import PromptBuilder
from tuneloop.programs.rag import Passage, build_messages
from tuneloop.progress import SilentReporter
from tuneloop.store import Chunk, Document, Feedback, Interaction, PreferencePair, Reward, open_store

T0 = datetime(2025, 1, 1, 12, 0, 0)


@pytest.fixture
def env(project):
    """(project, sessions, retriever, chunk ids): the sample project, ingested BM25-only."""
    p = project(pairs=False)
    retriever = ingest_project(p)
    sessions = open_store(p.store_url)
    with sessions() as s:
        ids = list(s.scalars(select(Chunk.id).order_by(Chunk.id)))
    return p, sessions, retriever, ids


def interaction(s, question="Which law governs the agreement?", answer="The laws of England.", chunk_ids=(1, 2),
                **kw) -> Interaction:
    it = Interaction(question=question, answer=answer, chunk_ids=list(chunk_ids), **kw)
    s.add(it)
    s.flush()
    return it


def feedback(s, it, minutes=0, **kw) -> Feedback:
    f = Feedback(interaction_id=it.id, created_at=T0 + timedelta(minutes=minutes), **kw)
    s.add(f)
    s.flush()
    return f


def stored_prompt(s, question, chunk_ids):
    """build_messages over the stored chunk texts, independently of the code under test."""
    chunks = s.scalars(select(Chunk).where(Chunk.id.in_(chunk_ids)))
    rows = {c.id: (c, s.get(Document, c.document_id).name) for c in chunks}
    return build_messages(question, [Passage(i, rows[i][1], rows[i][0].text) for i in chunk_ids])


def route(p, s, retriever=None, rule=None):
    return route_feedback(s, PromptBuilder(s, retriever), rule or p.settings.feedback.contradiction_rule)


# --------------------------------------------------------------------------- unit: the rule


@pytest.mark.parametrize("rule, values, expected", [
    ("majority", [True, True, False], (True, "majority")),
    ("majority", [True, False], (None, "tie")),
    ("latest", [True, True, False], (False, "latest")),
    ("drop", [True, True, False], (None, "dropped")),
    ("drop", [True, True], (True, "unanimous")),
    ("latest", [False], (False, "unanimous")),
])
def test_resolve_votes(rule, values, expected):
    votes = [Vote(i, T0 + timedelta(minutes=i), v) for i, v in enumerate(values)]
    assert resolve_votes(votes, rule) == expected
    # latest is by time, not by list order
    assert resolve_votes(list(reversed(votes)), rule) == expected


def test_normalize_answer():
    assert normalize_answer('  "No."  ') == normalize_answer("no") == "no"
    assert normalize_answer("The  Licensee") == "the licensee"


# --------------------------------------------------------------------------- routing each kind


def test_each_kind_routed_with_the_serving_prompt(env):
    p, sessions, retriever, ids = env
    with sessions() as s:
        chunks = [ids[5], ids[2]]  # stored order, not id order: [1] is the first stored chunk
        up = interaction(s, "Who is the supplier?", "Acme Ltd", chunks)
        down = interaction(s, "When does it end?", "Never", [ids[0]])
        fixed = interaction(s, "What is the notice period?", "Thirty days", [ids[1]])
        rated = interaction(s, "Is there a cap?", "Yes", [ids[3]])
        arm_a = interaction(s, "Who may terminate?", "Either party", [ids[4]], ab_pair="ab1", arm="champion")
        arm_b = interaction(s, "Who may terminate?", "Only the Customer", [ids[4]], ab_pair="ab1", arm="challenger")
        f_up = feedback(s, up, thumbs=1)
        f_down = feedback(s, down, thumbs=-1)
        f_fix = feedback(s, fixed, corrected_answer="Sixty days")
        feedback(s, fixed, corrected_answer="thirty days.")  # same as the original after normalisation
        f_r1, f_r2 = feedback(s, rated, rating=5), feedback(s, rated, rating=4)
        f_ab = feedback(s, arm_b, preferred_interaction_id=arm_b.id)
        feedback(s, up, comment="nice")  # comment only: not routed
        s.commit()
        r = route(p, s)

        kto = {row.completion: row for row in r.kto}
        assert set(kto) == {"Acme Ltd", "Never"}
        assert kto["Acme Ltd"].label is True and kto["Never"].label is False
        assert kto["Acme Ltd"].prompt == stored_prompt(s, "Who is the supplier?", chunks)
        first = s.get(Chunk, ids[5]).text.strip()[:30]
        assert kto["Acme Ltd"].prompt[1]["content"].startswith("Excerpts:\n[1] " + first)
        assert (kto["Acme Ltd"].interaction_ids, kto["Acme Ltd"].feedback_ids) == ([up.id], [f_up.id])
        assert kto["Never"].feedback_ids == [f_down.id]

        pairs = {pr.source: pr for pr in r.pairs}
        assert set(pairs) == {"human", "correction"} and len(r.pairs) == 2
        c = pairs["correction"]
        assert (c.chosen, c.rejected, c.feedback_ids, c.interaction_ids) == ("Sixty days", "Thirty days", [f_fix.id],
                                                                             [fixed.id])
        assert c.prompt == stored_prompt(s, "What is the notice period?", [ids[1]])
        assert r.report["corrections"] == {"rows": 1, "skipped_identical": 1}
        h = pairs["human"]
        assert (h.chosen, h.rejected) == ("Only the Customer", "Either party")
        assert h.interaction_ids == sorted([arm_a.id, arm_b.id]) and h.feedback_ids == [f_ab.id]
        assert h.prompt == stored_prompt(s, "Who may terminate?", [ids[4]])

        (rw,) = r.rewards
        assert rw.completion == "Yes" and rw.reward == pytest.approx((1.0 + 0.5) / 2)
        assert rw.ratings == [5.0, 4.0] and rw.feedback_ids == sorted([f_r1.id, f_r2.id])
        assert all(-1 <= x.reward <= 1 for x in r.rewards)


@pytest.mark.parametrize("rule, thumbs_label, ab_winner", [
    ("majority", True, "A"), ("latest", False, "B"), ("drop", None, None),
])
def test_contradiction_rules(env, rule, thumbs_label, ab_winner):
    p, sessions, retriever, ids = env
    with sessions() as s:
        it = interaction(s, chunk_ids=[ids[0]])
        for minute, vote in ((0, 1), (1, 1), (2, -1)):  # two up, then the latest down
            feedback(s, it, minutes=minute, thumbs=vote)
        tie = interaction(s, "Is there a cap?", "No", [ids[1]])
        feedback(s, tie, minutes=0, thumbs=1)
        feedback(s, tie, minutes=1, thumbs=-1)
        a = interaction(s, "Who pays?", "The Customer", [ids[2]], ab_pair="p1")
        b = interaction(s, "Who pays?", "The Supplier", [ids[2]], ab_pair="p1")
        for minute, pick in ((0, a), (1, a), (2, b)):  # A twice, then B last
            feedback(s, pick, minutes=minute, preferred_interaction_id=pick.id)
        s.commit()
        r = route(p, s, rule=rule)
    labels = {k.completion: k.label for k in r.kto}
    assert labels.get("The laws of England.") is thumbs_label
    # a 1-1 tie: majority drops it, latest takes the down vote, drop drops it
    assert labels.get("No") is {"majority": None, "latest": False, "drop": None}[rule]
    choice = [pr for pr in r.pairs if pr.source == "human"]
    if ab_winner is None:
        assert choice == []
    else:
        (pair,) = choice
        assert pair.chosen == {"A": "The Customer", "B": "The Supplier"}[ab_winner]
        assert pair.resolution == rule
    assert r.report["thumbs"]["contradictions"] == 2 and r.report["choices"]["contradictions"] == 1
    assert r.report["rule"] == rule


def test_duplicates_merged_with_all_provenance(env):
    p, sessions, retriever, ids = env
    with sessions() as s:
        # the same question, passages and answer served twice: one answer, four votes
        one = interaction(s, chunk_ids=[ids[0], ids[1]])
        two = interaction(s, chunk_ids=[ids[0], ids[1]])
        other = interaction(s, chunk_ids=[ids[2]])  # same text, other passages: another prompt
        votes = [feedback(s, one, thumbs=1), feedback(s, one, thumbs=1), feedback(s, two, thumbs=1)]
        feedback(s, other, thumbs=1)
        c1 = feedback(s, one, corrected_answer="English law")
        c2 = feedback(s, two, corrected_answer="English law")
        r1, r2 = feedback(s, one, rating=1), feedback(s, two, rating=2)
        s.commit()
        r = route(p, s)
    assert len(r.kto) == 2
    merged = next(k for k in r.kto if len(k.interaction_ids) == 2)
    assert merged.interaction_ids == sorted([one.id, two.id])
    assert merged.feedback_ids == sorted(f.id for f in votes) and merged.votes == {"up": 3, "down": 0}
    (pair,) = r.pairs
    assert pair.feedback_ids == sorted([c1.id, c2.id]) and pair.interaction_ids == sorted([one.id, two.id])
    assert r.report["pairs"]["duplicates_merged"] == 1
    (reward,) = r.rewards
    assert reward.feedback_ids == sorted([r1.id, r2.id]) and reward.reward == pytest.approx((-1.0 - 0.5) / 2)
    assert r.report["thumbs"]["duplicates_merged"] == 1


def test_deleted_chunks_fall_back_to_retrieval(env):
    p, sessions, retriever, ids = env
    with sessions() as s:
        it = interaction(s, "Which law governs the agreement?", "England", [ids[0], 10_000_000],
                         document="01-master-services-agreement.md")
        feedback(s, it, thumbs=1)
        s.commit()
        builder = PromptBuilder(s, lambda: retriever)
        r = route_feedback(s, builder, "majority")
        (row,) = r.kto
        expected = build_messages(it.question, retriever.retrieve(it.question, it.document))
        assert row.prompt == expected
        assert builder.report() == {"stored": 0, "retrieved": 1, "interactions_retrieved_again": [it.id]}
        with pytest.raises(StateError, match="retrieval index"):
            route_feedback(s, PromptBuilder(s, None), "majority")


# --------------------------------------------------------------------------- export


def test_export_writes_datasets_and_is_idempotent(env):
    from datasets import load_dataset

    p, sessions, retriever, ids = env
    with sessions() as s:
        a = interaction(s, "Who pays?", "The Customer", [ids[2]], ab_pair="p1")
        b = interaction(s, "Who pays?", "The Supplier", [ids[2]], ab_pair="p1")
        feedback(s, a, preferred_interaction_id=a.id)
        fixed = interaction(s, "What is the notice period?", "Thirty days", [ids[1]])
        feedback(s, fixed, corrected_answer="Sixty days")
        feedback(s, fixed, thumbs=-1)
        feedback(s, fixed, rating=2)
        s.add(PreferencePair(prompt="Q?", chosen="x", rejected="y", source="ai",
                             meta={"key": "k", "prompt_messages": build_messages("Q?", []), "rationale": "x is quoted",
                                   "judge": "fake-judge", "interaction_id": None}))
        s.commit()
        r1 = export_feedback(p, s, PromptBuilder(s, None), SilentReporter(), name="first")
        s.commit()
        n_pairs = s.scalar(select(func.count(PreferencePair.id)))
        n_rewards = s.scalar(select(func.count(Reward.id)))
        assert n_pairs == 3 and n_rewards == 1  # ai + human choice + correction; one human reward
        r2 = export_feedback(p, s, PromptBuilder(s, None), SilentReporter(), name="second")
        s.commit()
        assert s.scalar(select(func.count(PreferencePair.id))) == n_pairs
        assert s.scalar(select(func.count(Reward.id))) == n_rewards
        assert r2.report["store"]["pairs_added"] == 0 and r2.report["store"]["rewards_added"] == 0
        human = {x.source: x for x in s.scalars(select(PreferencePair))}
        assert human["correction"].meta["prompt_messages"] == stored_prompt(s, fixed.question, [ids[1]])
        assert human["human"].chosen == "The Customer" and human["human"].prompt == "Who pays?"

        # a later vote for B flips the majority-less pair: tie (1-1) drops it, the old row is superseded
        feedback(s, b, minutes=5, preferred_interaction_id=b.id)
        s.commit()
        r3 = export_feedback(p, s, PromptBuilder(s, None), SilentReporter(), name="third", include_ai=False)
        s.commit()
        assert r3.report["store"]["pairs_superseded"] == 1
        assert s.scalar(select(func.count(PreferencePair.id))) == n_pairs
        assert r3.counts["preferences"] == 1  # only the correction: the A/B tie dropped, AI excluded

    assert r1.counts == {"preferences": 3, "kto": 1, "rewards": 1}
    assert r1.artifact == p.artifacts / "feedback" / "first"
    for kind, columns in (("preferences", {"prompt", "chosen", "rejected", "source", "rationale", "feedback_ids"}),
                          ("kto", {"prompt", "completion", "label", "interaction_ids", "feedback_ids"}),
                          ("rewards", {"prompt", "completion", "reward", "source", "feedback_ids"})):
        ds = load_dataset("json", data_files=str(r1.path(kind)), split="train")
        assert len(ds) == r1.counts[kind] and columns <= set(ds.column_names), (kind, ds.column_names)
        row = ds[0]
        assert row["prompt"][0]["role"] == "system" and row["prompt"][-1]["role"] == "user"
    prefs = load_dataset("json", data_files=str(r1.path("preferences")), split="train")
    by_source = {row["source"]: row for row in prefs}
    assert by_source["ai"]["rationale"] == "x is quoted" and by_source["ai"]["judge"] == "fake-judge"
    assert by_source["correction"]["chosen"] == [{"role": "assistant", "content": "Sixty days"}]
    assert by_source["correction"]["rejected"] == [{"role": "assistant", "content": "Thirty days"}]
    kto = load_dataset("json", data_files=str(r1.path("kto")), split="train")
    assert kto[0]["label"] is False and kto[0]["completion"][0]["content"] == "Thirty days"
    rewards = load_dataset("json", data_files=str(r1.path("rewards")), split="train")
    assert rewards[0]["reward"] == pytest.approx(-0.5)
    meta = json.loads((r1.artifact / "meta.json").read_text())
    assert meta["contradiction_rule"] == "majority" and meta["counts"] == r1.counts
    report = json.loads((r1.artifact / "report.json").read_text())
    assert report["prompts"]["stored"] >= 2 and report["ai"]["pairs"] == 1


def test_store_human_is_idempotent(env):
    p, sessions, retriever, ids = env
    with sessions() as s:
        it = interaction(s, chunk_ids=[ids[0]])
        feedback(s, it, corrected_answer="English law")
        feedback(s, it, rating=3)
        s.commit()
        first = store_human(s, route(p, s))
        second = store_human(s, route(p, s))
        s.commit()
        assert (first["pairs_added"], first["rewards_added"]) == (1, 1)
        assert all(v == 0 for v in second.values())
        (reward,) = s.scalars(select(Reward))
        assert reward.reward == 0.0 and reward.interaction_id == it.id and reward.source == "human"


def test_export_without_feedback_is_a_clear_error(env):
    p, sessions, retriever, ids = env
    with sessions() as s, pytest.raises(StateError, match="no feedback"):
        export_feedback(p, s, PromptBuilder(s, None), SilentReporter())


# --------------------------------------------------------------------------- CLI


def test_cli_feedback_export(env, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    p, sessions, retriever, ids = env
    runner = CliRunner()
    result = runner.invoke(app, ["feedback", "export", "-p", str(p.root)])
    assert result.exit_code == 3, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: no feedback"), result.output
    with sessions() as s:
        it = interaction(s, chunk_ids=[ids[0]])
        feedback(s, it, thumbs=1)
        feedback(s, it, corrected_answer="English law")
        s.commit()
    result = runner.invoke(app, ["feedback", "export", "--name", "cli", "-p", str(p.root)])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "preferences" in result.output and "kto" in result.output
    out = p.artifacts / "feedback" / "cli"
    assert [len(out.joinpath(f"{k}.jsonl").read_text().splitlines()) for k in ("preferences", "kto", "rewards")] == [
        1, 1, 0]
