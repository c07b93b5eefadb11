"""Corrected and approved answers become examples: the split is stable and held out, a question
already in one split stays there, the latest verdict wins, and SFT trains on the training side."""
from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select

from tuneloop.evalsets import eval_examples
from tuneloop.splits import heldout_side, question_key
from tuneloop.stages.eval import check_no_overlap
from tuneloop.stages.feedback import feedback_to_examples
from tuneloop.stages.sft import select_examples
from tuneloop.store import CycleStep, Example, Feedback, Interaction, ModelVersion, PreferencePair, open_store

T0 = datetime(2025, 1, 1, 12, 0, 0)


def correct(s, question, wrong, right, document="01-master-services-agreement.md", minutes=0, source="human"):
    it = Interaction(question=question, answer=wrong, chunk_ids=[], document=document)
    s.add(it)
    s.flush()
    s.add(Feedback(interaction_id=it.id, corrected_answer=right, thumbs=-1, source=source,
                   created_at=T0 + timedelta(minutes=minutes)))
    s.flush()
    return it


def vote(s, question, answer, thumbs=None, rating=None, document="01-master-services-agreement.md", minutes=0):
    it = Interaction(question=question, answer=answer, chunk_ids=[], document=document)
    s.add(it)
    s.flush()
    s.add(Feedback(interaction_id=it.id, thumbs=thumbs, rating=rating, source="human",
                   created_at=T0 + timedelta(minutes=minutes)))
    s.flush()
    return it


def questions(n):
    return [f"What does clause {i} of the agreement require from the supplier?" for i in range(n)]


def test_split_is_stable_and_near_the_fraction():
    keys = [question_key(q, "doc.md") for q in questions(400)]
    sides = [heldout_side(k, 0.2) for k in keys]
    assert sides == [heldout_side(k, 0.2) for k in keys]  # same key, same side
    assert 0.12 < sides.count("eval") / len(sides) < 0.28
    assert {heldout_side(k, 0.0) for k in keys} == {"train"} and {heldout_side(k, 1.0) for k in keys} == {"eval"}
    # the key ignores case and punctuation, not the document
    assert question_key("Who may TERMINATE?", "a") == question_key("who may terminate", "a")
    assert question_key("Who may terminate?", "a") != question_key("Who may terminate?", "b")


def test_corrections_become_examples_on_both_sides(project):
    p = project({"feedback": {"heldout_fraction": 0.5}}, pairs=False)
    sessions = open_store(p.store_url)
    with sessions() as s:
        for q in questions(20):
            correct(s, q, "No.", f"The supplier must deliver ({q[-30:]}).")
        correct(s, "Is this a thumbs-only question?", "Yes.", "")  # blank correction: not an example
        correct(s, "Did an AI correct this answer?", "No.", "Yes.", source="ai")  # only people's corrections
        r = feedback_to_examples(p, s, cycle_id=None)
        s.commit()
        rows = list(s.scalars(select(Example).where(Example.kind == "feedback")))
    assert r.corrections == 20 and r.added["train"] + r.added["eval"] == 20
    assert r.added["train"] >= 3 and r.added["eval"] >= 3  # both sides at 0.5 of 20
    assert {e.split for e in rows} == {"train", "eval"}
    assert all(e.answer.startswith("The supplier must deliver") and e.meta["original_answer"] == "No." for e in rows)
    assert all(e.split == heldout_side(question_key(e.question, e.document), 0.5) for e in rows)
    with sessions() as s:  # a second run adds nothing
        again = feedback_to_examples(p, s)
        s.commit()
        assert again.added == {"train": 0, "eval": 0} and again.already == 20
        assert len(list(s.scalars(select(Example)))) == 20


def test_latest_correction_wins_and_existing_questions_keep_their_split(project):
    p = project({"feedback": {"heldout_fraction": 1.0}})  # sample seeds (train) and held-out set imported
    sessions = open_store(p.store_url)
    with sessions() as s:
        seed = s.scalars(select(Example).where(Example.split == "train")).first()
        held = s.scalars(select(Example).where(Example.split == "eval")).first()
        n_before = len(list(s.scalars(select(Example))))
        correct(s, seed.question, "wrong", "a correction of a training question", document=seed.document)
        correct(s, held.question, "wrong", "a correction of a held-out question", document=held.document)
        correct(s, "Which court hears disputes?", "London.", "The courts of Paris.", minutes=1)
        correct(s, "which court hears disputes", "London.", "The courts of Lyon.", minutes=5)
        r = feedback_to_examples(p, s)
        s.commit()
        new = list(s.scalars(select(Example).where(Example.kind == "feedback")))
        assert r.already == 2 and len(new) == 1 and len(list(s.scalars(select(Example)))) == n_before + 1
        assert new[0].answer == "The courts of Lyon." and new[0].split == "eval"
        check_no_overlap(s, eval_examples(p, s))  # no held-out question is a training question


def test_sft_trains_on_the_training_side_only(project):
    p = project({"feedback": {"heldout_fraction": 0.5}}, pairs=False)
    sessions = open_store(p.store_url)
    with sessions() as s:
        for q in questions(12):
            correct(s, q, "No.", "Within thirty days of the order.")
        feedback_to_examples(p, s)
        s.commit()
        fresh, _ = select_examples(s, p.settings.sft, seed=0)
        train_ids = {e.id for e in s.scalars(select(Example).where(Example.split == "train"))}
        eval_ids = {e.id for e in s.scalars(select(Example).where(Example.split == "eval"))}
    assert train_ids and eval_ids
    assert {e.id for e in fresh} == train_ids and not ({e.id for e in fresh} & eval_ids)


def test_a_cycle_trains_on_corrections_and_evaluates_on_the_held_out_side(project, fake_teacher, monkeypatch):
    from tests.helpers import use_teacher
    from tuneloop import loop
    from tuneloop.progress import SilentReporter

    p = project({"feedback": {"heldout_fraction": 0.5}, "align": {"method": "dpo", "ai_feedback": False},
                 "continual": {"anchor": False}, "synth": {"questions_per_cycle": 2}})
    use_teacher(monkeypatch, fake_teacher)
    sessions = open_store(p.store_url)
    with sessions() as s:
        n_eval_before = len(list(s.scalars(select(Example).where(Example.split == "eval"))))
        for q in questions(10):
            correct(s, q, "No.", "Within thirty days of the order.")
        s.commit()
    cycle = loop.run_cycle(p, SilentReporter(), trigger="test")
    with sessions() as s:
        step = s.scalars(select(CycleStep).where(CycleStep.cycle_id == cycle.id,
                                            CycleStep.name == "feedback")).one()
        fb = {e.id: e for e in s.scalars(select(Example).where(Example.kind == "feedback"))}
        v1 = s.scalars(select(ModelVersion).where(ModelVersion.name == "v1")).one()
        v2 = s.scalars(select(ModelVersion).where(ModelVersion.name == "v2")).one()
        pairs = list(s.scalars(select(PreferencePair).where(PreferencePair.source == "correction")))
        n_eval_after = len(list(s.scalars(select(Example).where(Example.split == "eval"))))
    assert step.result["added_train"] + step.result["added_eval"] == 10 and step.result["added_eval"] >= 1
    trained = set(v1.training_example_ids)
    assert {i for i, e in fb.items() if e.split == "train"} <= trained  # SFT trained on the training side
    assert not {i for i, e in fb.items() if e.split == "eval"} & trained  # never on the held-out side
    assert n_eval_after == n_eval_before + step.result["added_eval"]  # the held-out set grew
    # the corrections were also routed to preference pairs, and DPO trained the candidate on them
    assert step.result["routed"]["pairs_added"] == 10 and len(pairs) == 10
    assert {pp.chosen for pp in pairs} == {"Within thirty days of the order."}
    # ... on those of the training side only: a held-out question's correction never trains the candidate
    data = v2.hyperparams["data"]
    assert v2.method == "dpo" and v2.parent_id == v1.id and data["n_fresh"] == step.result["added_train"]
    assert data["counts"]["left_out_held_out_questions"] == step.result["added_eval"]


def test_approved_answers_become_examples_and_a_later_verdict_overrides(project):
    p = project({"feedback": {"heldout_fraction": 0.0}}, pairs=False)
    sessions = open_store(p.store_url)
    with sessions() as s:
        vote(s, "Does the licence survive termination?", "Yes", thumbs=1)  # approved: an example
        vote(s, "Is the licence exclusive?", "No", rating=5)  # a rating at the threshold or above approves
        vote(s, "Is the licence transferable?", "Yes", rating=3)  # below approved_rating: wrong, no example
        vote(s, "Is there a source code escrow?", "Yes", thumbs=1, minutes=0)
        vote(s, "is there a source code escrow", "Yes", thumbs=-1, minutes=3)  # later thumbs down: no answer known
        correct(s, "Who owns the improvements?", "The licensee.", "The licensor.", minutes=0)
        vote(s, "Who owns the improvements?", "Both parties jointly.", thumbs=1, minutes=9)  # later approval wins
        r = feedback_to_examples(p, s)
        s.commit()
        rows = {e.question: e for e in s.scalars(select(Example).where(Example.kind == "feedback"))}
    assert set(rows) == {"Does the licence survive termination?", "Is the licence exclusive?",
                         "Who owns the improvements?"}
    assert rows["Does the licence survive termination?"].answer == "Yes"
    assert rows["Does the licence survive termination?"].meta["from"] == "approval"
    assert rows["Who owns the improvements?"].answer == "Both parties jointly."
    assert r.approvals == 3 and r.corrections == 0 and r.added == {"train": 3, "eval": 0}


def test_approvals_can_be_turned_off(project):
    p = project({"feedback": {"approved_to_examples": False}}, pairs=False)
    sessions = open_store(p.store_url)
    with sessions() as s:
        vote(s, "Does the licence survive termination?", "Yes", thumbs=1)
        correct(s, "Who owns the improvements?", "The licensee.", "The licensor.")
        r = feedback_to_examples(p, s)
        s.commit()
        answers = [e.answer for e in s.scalars(select(Example).where(Example.kind == "feedback"))]
    assert answers == ["The licensor."] and r.approvals == 0 and r.corrections == 1


def test_seeds_join_the_replay_pool_once_trained_on_unless_seeds_every_cycle(project):
    """Cycle 2 after a version trained on the seeds: by default every seed is trained on again;
    with `sft.seeds_every_cycle: false` the fresh data is only what is new, and seeds are replayed."""
    p = project({"feedback": {"heldout_fraction": 0.0}, "sft": {"balance_yes_no": False, "replay_fraction": 0.5}})
    sessions = open_store(p.store_url)
    with sessions() as s:
        seed_ids = set(s.scalars(select(Example.id).where(Example.kind == "seed", Example.split == "train")))
        s.add(ModelVersion(name="v1", base_model="tiny", method="sft", status="champion",
                            training_example_ids=sorted(seed_ids)))
        for q in questions(4):
            correct(s, q, "No.", "Within thirty days of the order.")
        feedback_to_examples(p, s)
        s.commit()
        new_ids = set(s.scalars(select(Example.id).where(Example.kind == "feedback")))
        fresh, replay = select_examples(s, p.settings.sft, seed=0)
        assert {e.id for e in fresh} == seed_ids | new_ids and not replay
        only_new = p.settings.sft.model_copy(update={"seeds_every_cycle": False})
        fresh, replay = select_examples(s, only_new, seed=0)
    assert len(seed_ids) > 2 and len(new_ids) == 4
    assert {e.id for e in fresh} == new_ids
    assert len(replay) == 2 and {e.id for e in replay} <= seed_ids  # replay_fraction 0.5 of the 4 new


def test_a_rejected_candidates_data_is_new_again_for_the_next_cycle_from_the_champion(project):
    """v2 (rejected, trained on the first corrections) is not an ancestor of the champion v1, so
    training from v1 takes those examples as new; what v1 itself saw is only replayed."""
    p = project({"feedback": {"heldout_fraction": 0.0},
                 "sft": {"balance_yes_no": False, "replay_fraction": 0.5, "seeds_every_cycle": False}})
    with open_store(p.store_url)() as s:
        seed_ids = sorted(s.scalars(select(Example.id).where(Example.kind == "seed", Example.split == "train")))
        v1 = ModelVersion(name="v1", base_model="tiny", method="sft", status="champion",
                          training_example_ids=seed_ids)
        s.add(v1)
        s.flush()
        for q in questions(4):
            correct(s, q, "No.", "Within thirty days of the order.")
        feedback_to_examples(p, s)
        first = sorted(s.scalars(select(Example.id).where(Example.kind == "feedback")))
        s.add(ModelVersion(name="v2", base_model="tiny", method="sft", status="rejected", parent_id=v1.id,
                           training_example_ids=first))
        s.flush()
        fresh, replay = select_examples(s, p.settings.sft, seed=0, parent=v1)
        assert sorted(e.id for e in fresh) == first  # v2's data, lost with v2, is trained on again
        assert {e.id for e in replay} <= set(seed_ids) and len(replay) == 2
        fresh_any, _ = select_examples(s, p.settings.sft, seed=0)  # no parent: every version counts
    assert fresh_any == []


def test_a_dev_share_follows_the_held_out_share_without_moving_it():
    keys = [question_key(q, "doc.md") for q in questions(400)]
    sides = [heldout_side(k, 0.2, 0.15) for k in keys]
    assert sides == [heldout_side(k, 0.2, 0.15) for k in keys]
    assert 0.08 < sides.count("dev") / len(sides) < 0.22 and 0.12 < sides.count("eval") / len(sides) < 0.28
    # turning the dev share on moves training questions only: the held-out set stays as it was
    assert [s == "eval" for s in sides] == [heldout_side(k, 0.2) == "eval" for k in keys]
    assert "dev" not in {heldout_side(k, 0.2) for k in keys}


def test_dev_fraction_routes_feedback_to_the_dev_split_never_trained_on(project):
    from tuneloop.stages.wise import dev_examples

    p = project({"feedback": {"heldout_fraction": 0.3, "dev_fraction": 0.3}}, pairs=False)
    sessions = open_store(p.store_url)
    with sessions() as s:
        for q in questions(30):
            correct(s, q, "No.", "Within thirty days of the order.")
        r = feedback_to_examples(p, s)
        s.commit()
        rows = list(s.scalars(select(Example).where(Example.kind == "feedback")))
        fresh, _ = select_examples(s, p.settings.sft, seed=0)
        dev = dev_examples(p, s)
    assert r.added["dev"] >= 3 and r.as_dict()["added_dev"] == r.added["dev"]
    assert sum(r.added.values()) == 30 and {e.split for e in rows} == {"train", "eval", "dev"}
    assert all(e.split == heldout_side(question_key(e.question, e.document), 0.3, 0.3) for e in rows)
    assert {e.id for e in dev} == {e.id for e in rows if e.split == "dev"}
    assert not ({e.id for e in fresh} & {e.id for e in dev})  # SFT never sees a dev question


def test_held_out_and_dev_shares_must_fit(tmp_path):
    import pytest

    from tuneloop.config import parse_settings
    from tuneloop.errors import ConfigError

    with pytest.raises(ConfigError, match=r"heldout_fraction \(0.7\) \+ feedback.dev_fraction \(0.4\)") as err:
        parse_settings({"feedback": {"heldout_fraction": 0.7, "dev_fraction": 0.4}}, tmp_path / "tuneloop.yaml")
    assert "Traceback" not in str(err.value)
