"""The expert review queue: the doubts and the queue order on toy cases whose right order is known,
verdicts becoming examples, rebuilds that never show an item twice, the terminal review under a
scripted stdin, export/import, the HTTP API's roles, and the `review_queue` signal."""
from __future__ import annotations

import json
import math
import re

import pytest
import yaml
from fastapi.testclient import TestClient
from sqlalchemy import select
from typer.testing import CliRunner

from tests.helpers import excerpts, ingest_project, prompt_question
from tuneloop.cli import app
from tuneloop.errors import InputError
from tuneloop.models.base import GenerationParams, Message
from tuneloop.monitor.signals import review_queue
from tuneloop.programs.rag import Retriever
from tuneloop.progress import SilentReporter
from tuneloop.review.queue import AlreadyReviewed, find_item, item_key, open_items, record, save_queue
from tuneloop.review.scores import (
    Scored,
    Search,
    answer_disagreement,
    decision_skill,
    diverse_order,
    informativeness,
    margin_doubt,
    retrieval_doubt,
    yes_no_disagreement,
)
from tuneloop.settings_review import ReviewWeights
from tuneloop.splits import heldout_side, question_key
from tuneloop.stages.review import build_queue
from tuneloop.store import Cycle, Example, Interaction, ReviewItem, open_store
from tuneloop.versions import ensure_base_version

DOCS = ["01-master-services-agreement.md", "02-software-licence-agreement.md", "03-distribution-agreement.md",
        "04-non-disclosure-agreement.md", "05-supply-agreement.md", "06-office-lease.md"]


# --------------------------------------------------------------------------- the doubts


def test_each_doubt_orders_toy_cases_as_expected():
    assert margin_doubt(0.0, 0.0) == pytest.approx(1.0)
    assert margin_doubt(1.5, 1.5) == pytest.approx(1.0)  # at the calibrated threshold, not at 0
    assert margin_doubt(0.5, 0.0) > margin_doubt(2.0, 0.0) > margin_doubt(6.0, 0.0)
    assert margin_doubt(-2.0, 0.0) == pytest.approx(margin_doubt(2.0, 0.0))
    assert margin_doubt(6.0, 0.0) < 0.01
    assert yes_no_disagreement([2.0, 3.0, 1.0], 0.0) == 0.0
    assert yes_no_disagreement([2.0, -1.0, 1.0], 0.0) == pytest.approx(2 / 3)
    assert yes_no_disagreement([0.5, 0.5], 1.0) == 0.0  # both below the threshold: both No
    assert answer_disagreement(["the laws of Delaware", "the laws of Delaware"]) == 0.0
    assert answer_disagreement(["Delaware", "sixty days"]) == 1.0
    assert 0.0 < answer_disagreement(["the laws of Delaware", "Delaware"]) < 1.0
    sure = Search(bm25=[(1, 9.0), (2, 2.0), (3, 1.0)], dense=[(1, 0.8), (2, 0.3), (3, 0.2)])
    unsure = Search(bm25=[(4, 1.0), (5, 1.0), (6, 0.9)], dense=[(1, 0.2), (2, 0.2), (3, 0.19)])
    assert retrieval_doubt(sure, 3) < 0.3 < 0.8 < retrieval_doubt(unsure, 3)
    assert retrieval_doubt(Search(bm25=[(1, 5.0), (2, 5.0)]), 2) == 1.0  # BM25 only: flat
    assert retrieval_doubt(Search(), 3) == 1.0  # nothing retrieved
    weights = ReviewWeights(margin=1.0, disagreement=1.0, retrieval=0.0, judge=1.0)
    assert informativeness({"margin": 1.0, "disagreement": 0.0, "retrieval": 1.0}, weights) == 0.5
    assert informativeness({"disagreement": 0.8, "judge": None}, weights) == 0.8  # only the doubts it has
    assert informativeness({"margin": margin_doubt(math.nan, 0.0), "disagreement": 0.4}, weights) == 0.4


def test_a_champion_at_chance_gets_no_say_from_its_yes_no_confidence():
    assert decision_skill(0.5) == 0.0 and decision_skill(0.4) == 0.0 and decision_skill(None) == 1.0
    assert decision_skill(0.75) == pytest.approx(0.5) and decision_skill(1.0) == 1.0
    weights = ReviewWeights(margin=1.0, disagreement=1.0, retrieval=0.5, judge=1.0)
    doubts = {"margin": 1.0, "disagreement": 1.0, "retrieval": 0.2}
    assert informativeness(doubts, weights, skill=0.0, yes_no=True) == pytest.approx(0.2)  # retrieval alone
    assert informativeness(doubts, weights, skill=0.5, yes_no=True) == pytest.approx((0.5 + 0.5 + 0.1) / 1.5)
    assert informativeness(doubts, weights, skill=0.0, yes_no=False) == pytest.approx(2.1 / 2.5)  # words: kept


def test_diversity_keeps_twenty_copies_of_one_doubt_from_filling_the_queue():
    same = [Scored(f"k{i}", "does the contract renew", "a.md", 0.9) for i in range(20)]
    others = [Scored("x1", "who pays", "b.md", 0.5), Scored("x2", "what law", "c.md", 0.4),
              Scored("x3", "is there a cap", "d.md", 0.3)]
    queue = diverse_order(same + others, diversity=0.5, limit=5)
    assert [it.key for it in queue[:4]] == ["k0", "x1", "x2", "x3"]  # 0.9 x 0.5^2 < 0.3 after the first
    assert sum(it.document == "a.md" for it in queue) == 2
    flat = diverse_order(same + others, diversity=1.0, limit=5)  # without the rule: five copies
    assert all(it.document == "a.md" for it in flat)


# --------------------------------------------------------------------------- a toy queue, end to end


class ToyChampion:
    """A scripted champion whose doubt about each question is known in advance.

    yes/no margins by question (and by the number of passages it is shown, which the passage sets
    vary); answers in words that agree or not across the sampled answers."""

    name = "toy-champion"
    MARGINS = {"Does the agreement renew automatically?": lambda n: 0.1 if n % 2 else -0.1,  # unsure, flips
               "Does the agreement require insurance?": lambda n: 0.5,  # near the threshold, stable
               "Does the agreement have a governing law?": lambda n: 6.0}  # sure

    def yes_no_margins(self, conversations: list[list[Message]]) -> list[float]:
        return [self.MARGINS[prompt_question(c)](excerpts(c).count("\n[") + 1) for c in conversations]

    def chat(self, conversations: list[list[Message]], params: GenerationParams) -> list[str]:
        out = []
        for c in conversations:
            q, n = prompt_question(c), excerpts(c).count("\n[") + 1
            if q == "Who signs for the Provider?":  # different words every time
                out.append(["Alice Smith", "the Chief Executive", "Board of Directors", "Bob"][n % 4])
            else:  # "What is the notice period?": a word or two in common
                out.append(["sixty days notice", "ninety days", "thirty days"][n % 3])
        return out


# question -> its informativeness (None: between 0.55 and 0.6, see ToyChampion.chat), in the right order
TOY = {"Who signs for the Provider?": 1.0,  # words: every answer different
       "Does the agreement renew automatically?": (1 - math.tanh(0.05) + 2 / 3) / 2,  # at the threshold, flips
       "What is the notice period?": None,
       "Does the agreement require insurance?": (1 - math.tanh(0.25)) / 2,  # near the threshold, stable
       "Does the agreement have a governing law?": (1 - math.tanh(3.0)) / 2}  # sure


def _asked(proj, questions: list[tuple[str, str | None]]) -> None:
    with open_store(proj.store_url)() as s:
        for q, doc in questions:
            s.add(Interaction(question=q, answer="an answer given earlier", chunk_ids=[], document=doc, client="c"))
        s.commit()


def _toy_project(project, **review):
    proj = project({"answer": {"copy_spans": False},
                    "review": {"sources": ["interactions"], "samples": 3, "per_cycle": 3, "pool": 20,
                               "weights": {"retrieval": 0.0}, **review}}, pairs=False)
    ingest_project(proj)
    return proj


def _build(proj, cycle_id=None):
    with open_store(proj.store_url)() as s:
        built = build_queue(proj, s, lambda v: Retriever.load(proj, s, None), SilentReporter(), cycle_id,
                            model=ToyChampion())
        s.commit()
    return built


def test_the_queue_asks_first_what_the_champion_is_least_sure_of(project):
    proj = _toy_project(project)
    _asked(proj, [(q, DOCS[i]) for i, q in enumerate(TOY)] + [("Who pays?", "no-such-contract.md")])
    built = _build(proj)  # (a question about a document that is not ingested is no candidate)
    assert (built.candidates, built.opened, built.by_source) == (5, 3, {"interaction": 3, "transfer": 0})
    with open_store(proj.store_url)() as s:
        items = list(s.scalars(select(ReviewItem).order_by(ReviewItem.rank)))
    order = [it.question for it in items]
    assert order == ["Who signs for the Provider?", "Does the agreement renew automatically?",
                     "What is the notice period?", "Does the agreement require insurance?",
                     "Does the agreement have a governing law?"]
    for it in items:
        if TOY[it.question] is not None:
            assert it.score == pytest.approx(TOY[it.question], abs=1e-6), it.question
    assert [it.status for it in items] == ["open"] * 3 + ["pool"] * 2
    assert items[1].question_type == "yes_no" and sorted(abs(m) for m in items[1].scores["margins"]) == [0.1] * 3
    assert len(set(items[1].scores["margins"])) == 2  # Yes and No
    assert items[0].question_type == "extraction" and len(items[0].scores["answers"]) == 3
    assert items[0].answer == "an answer given earlier"  # the reviewer sees what the person got


def test_a_champion_whose_yes_no_decisions_are_at_chance_is_asked_by_its_other_doubts(project):
    proj = _toy_project(project)
    _asked(proj, [(q, DOCS[i]) for i, q in enumerate(TOY)])
    with open_store(proj.store_url)() as s:
        base = ensure_base_version(proj, s)
        base.hyperparams = {"yes_no_threshold": {"value": 0.0, "source": "dev", "n": 20, "balanced_accuracy": 0.5}}
        s.commit()
    _build(proj)
    with open_store(proj.store_url)() as s:
        items = list(s.scalars(select(ReviewItem).order_by(ReviewItem.rank)))
    assert [it.question for it in items[:2]] == ["Who signs for the Provider?", "What is the notice period?"]
    assert all(it.score == 0.0 and it.scores["skill"] == 0.0 for it in items[2:])  # retrieval weighs 0 here
    assert max(it.scores["doubts"]["margin"] for it in items[2:]) == pytest.approx(1 - math.tanh(0.05))  # kept


def test_verdicts_become_examples_and_no_item_is_shown_twice(project):
    proj = _toy_project(project)
    _asked(proj, [(q, DOCS[i]) for i, q in enumerate(TOY)])
    _build(proj)
    fb = proj.settings.feedback
    with open_store(proj.store_url)() as s:
        first, second, third = open_items(s)
        shown = {first.public_id, second.public_id, third.public_id}
        with pytest.raises(InputError, match="needs the right answer"):
            record(s, fb, third, "correct", "bob", " ")
        assert third.status == "open"
        confirmed = record(s, fb, first, "confirm", "ann")
        corrected = record(s, fb, second, "correct", "bob", "  No  ")
        skipped = record(s, fb, third, "skip", "ann")
        s.commit()
        with pytest.raises(AlreadyReviewed, match="confirmed .by ann."):
            record(s, fb, first, "skip", "bob")
        with pytest.raises(AlreadyReviewed, match="is pool"):  # not shown: cannot be reviewed
            record(s, fb, find_item(s, s.scalars(select(ReviewItem.public_id).where(
                ReviewItem.status == "pool")).first()), "confirm", "bob")
        examples = {e.question: e for e in s.scalars(select(Example).where(Example.kind == "review"))}
    assert skipped.example is None and confirmed.new_example and corrected.new_example
    assert set(examples) == {first.question, second.question}
    ex = examples[first.question]
    assert ex.answer == "an answer given earlier" and ex.meta["reviewer"] == "ann" and ex.meta["from"] == "confirmed"
    assert ex.meta["reviewed_at"] and ex.document == first.document
    assert ex.split == heldout_side(question_key(ex.question, ex.document), fb.heldout_fraction, fb.dev_fraction)
    assert examples[second.question].answer == "No" and examples[second.question].meta["reviewer"] == "bob"

    _asked(proj, [("Who signs for the Customer?", DOCS[0])])  # new traffic, then the next cycle's rebuild
    _build(proj)
    with open_store(proj.store_url)() as s:
        queues = sorted(set(s.scalars(select(ReviewItem.queue))))
        latest = list(s.scalars(select(ReviewItem).where(ReviewItem.queue == queues[-1])))
        assert not s.scalars(select(ReviewItem).where(ReviewItem.queue == queues[0],
                                                       ReviewItem.status == "open")).all()  # expired
        reopened = open_items(s)
    assert queues == [1, 2]
    reviewed = {first.question, second.question, third.question}
    assert not reviewed & {it.question for it in latest}  # reviewed or skipped: never queued again
    assert not shown & {it.public_id for it in reopened}
    assert {it.question for it in latest} == set(TOY) - reviewed | {"Who signs for the Customer?"}


def test_a_question_answered_meanwhile_keeps_its_example(project):
    proj = _toy_project(project)
    _asked(proj, [("Does the agreement require insurance?", DOCS[0])])
    _build(proj)
    with open_store(proj.store_url)() as s:
        [item] = open_items(s)
        s.add(Example(kind="feedback", split="train", question=item.question.upper(), answer="Yes",
                      document=item.document, content_hash="from-feedback"))
        s.flush()
        done = record(s, proj.settings.feedback, item, "correct", "ann", "No")
        s.commit()
        assert not done.new_example and done.example.answer == "Yes" and item.example_id == done.example.id
        assert s.scalars(select(Example).where(Example.kind == "review")).all() == []


# --------------------------------------------------------------------------- the terminal, export, import


def test_terminal_review_under_a_scripted_stdin(project):
    proj = _toy_project(project, per_cycle=4)
    _asked(proj, [(q, DOCS[i]) for i, q in enumerate(TOY)])
    _build(proj)
    with open_store(proj.store_url)() as s:
        order = [it.question for it in open_items(s)]
    # confirm (Enter), an unknown key, correct (c, then an empty answer goes back, then the answer), skip, quit
    script = "\nx\nc\n\nc\nThirty days\ns\nq\n"
    result = CliRunner().invoke(app, ["review", "-p", str(proj.root), "--reviewer", "carol"], input=script)
    assert result.exit_code == 0, result.output
    assert "'x' is not one of y, c, s, q" in result.output
    assert "Reviewed 3 as carol: 1 confirmed, 1 corrected, 1 skipped" in result.output
    assert "Question: " + order[0] in result.output
    with open_store(proj.store_url)() as s:
        status = {it.question: (it.status, it.reviewer, it.final_answer) for it in s.scalars(select(ReviewItem))}
        examples = {e.question: e.answer for e in s.scalars(select(Example).where(Example.kind == "review"))}
    assert status[order[0]][:2] == ("confirmed", "carol")
    assert status[order[1]] == ("corrected", "carol", "Thirty days")
    assert status[order[2]][:2] == ("skipped", "carol") and status[order[3]][0] == "open"
    assert examples == {order[0]: "an answer given earlier", order[1]: "Thirty days"}
    again = CliRunner().invoke(app, ["review", "-p", str(proj.root), "-r", "carol"], input="")  # end of input: stop
    assert again.exit_code == 0 and "Reviewed 0 as carol" in again.output


def test_export_then_import_round_trips_and_a_bad_line_changes_nothing(project, tmp_path):
    proj = _toy_project(project)
    _asked(proj, [(q, DOCS[i]) for i, q in enumerate(TOY)])
    _build(proj)
    runner = CliRunner()
    out = tmp_path / "queue.jsonl"
    result = runner.invoke(app, ["review", "export", str(out), "-p", str(proj.root)])
    assert result.exit_code == 0, result.output
    again = runner.invoke(app, ["review", "export", str(out), "-p", str(proj.root)])  # never overwritten unasked
    assert again.exit_code == 2 and "exists: give another name, or --force" in again.output
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 3 and all(r["verdict"] is None and r["question"] and "passages" in r for r in rows)
    rows[0]["verdict"] = "confirm"
    rows[1].update(verdict="correct", answer_reviewed="Yes", reviewer="dan")
    bad = [dict(r) for r in rows]
    bad[2]["verdict"] = "maybe"
    out.write_text("".join(json.dumps(r) + "\n" for r in bad), encoding="utf-8")
    result = runner.invoke(app, ["review", "import", str(out), "-p", str(proj.root), "-r", "erin"])
    assert result.exit_code == 2 and re.search(r"line 3: verdict 'maybe' is not one of", result.output)
    with open_store(proj.store_url)() as s:
        assert len(open_items(s)) == 3  # all or nothing
    out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    result = runner.invoke(app, ["review", "import", str(out), "-p", str(proj.root), "-r", "erin"])
    assert result.exit_code == 0, result.output
    assert "1 confirmed, 1 corrected, 0 skipped, 1 left open; 2 new examples" in result.output
    with open_store(proj.store_url)() as s:
        by_q = {e.question: e for e in s.scalars(select(Example).where(Example.kind == "review"))}
        assert by_q[rows[0]["question"]].meta["reviewer"] == "erin"
        assert by_q[rows[1]["question"]].answer == "Yes" and by_q[rows[1]["question"]].meta["reviewer"] == "dan"
        assert [it.question for it in open_items(s)] == [rows[2]["question"]]
    result = runner.invoke(app, ["review", "import", str(out), "-p", str(proj.root)])  # the same file again
    assert result.exit_code == 2 and "line 1" in result.output and "is confirmed" in result.output


# --------------------------------------------------------------------------- the HTTP API


def test_the_api_lets_reviewers_and_the_admin_review_and_no_client(project, monkeypatch):
    from tuneloop.serve.app import create_app

    proj = _toy_project(project)
    _asked(proj, [(q, DOCS[i]) for i, q in enumerate(TOY)])
    _build(proj)
    serve = proj.settings.serve
    monkeypatch.setenv(serve.api_keys_env, "cli:client-key")
    monkeypatch.setenv(serve.reviewer_keys_env, "rita:reviewer-key")
    monkeypatch.setenv(serve.admin_token_env, "admin-token")
    app_ = create_app(proj, model_factory=lambda p, v: ToyChampion())
    with TestClient(app_) as c:
        client, reviewer = {"Authorization": "Bearer client-key"}, {"Authorization": "Bearer reviewer-key"}
        r = c.get("/v1/review/queue", headers=client)
        assert r.status_code == 403 and r.json()["error"]["code"] == "reviewer_only"
        assert c.get("/v1/review/queue").status_code == 401
        queue = c.get("/v1/review/queue", headers=reviewer).json()
        assert queue["open"] == 3 and [it["rank"] for it in queue["data"]] == [1, 2, 3]
        first = queue["data"][0]["id"]
        assert c.post(f"/v1/review/{first}", json={"verdict": "confirm"}, headers=client).status_code == 403
        assert c.post(f"/v1/review/{first}", json={"verdict": "correct"}, headers=reviewer).status_code == 422
        assert c.post(f"/v1/review/{first}", json={"verdict": "ok"}, headers=reviewer).status_code == 422
        r = c.post(f"/v1/review/{first}", json={"verdict": "confirm"}, headers=reviewer)
        assert r.status_code == 200 and r.json()["status"] == "confirmed" and r.json()["reviewer"] == "rita"
        assert r.json()["example_id"] and r.json()["new_example"]
        r = c.post(f"/v1/review/{first}", json={"verdict": "skip"}, headers=reviewer)
        assert r.status_code == 409 and "confirmed (by rita)" in r.json()["error"]["message"]
        assert c.post("/v1/review/no-such-item", json={"verdict": "skip"}, headers=reviewer).status_code == 404
        admin = {"Authorization": "Bearer admin-token"}
        second = c.get("/v1/review/queue?limit=1", headers=admin).json()
        assert second["open"] == 2 and second["data"][0]["id"] != first
        r = c.post(f"/v1/review/{second['data'][0]['id']}", json={"verdict": "correct", "answer": "No"}, headers=admin)
        assert r.status_code == 200 and r.json()["reviewer"] == "admin"
    with open_store(proj.store_url)() as s:
        assert sorted(e.meta["reviewer"] for e in s.scalars(select(Example).where(Example.kind == "review"))) == [
            "admin", "rita"]


# --------------------------------------------------------------------------- the signal


def _queue(s, scores: list[float], cycle: bool = True) -> None:
    cycle_id = None
    if cycle:
        c = Cycle(status="done")
        s.add(c)
        s.flush()
        cycle_id = c.id
    items = [ReviewItem(question=f"q{i} {len(scores)} {cycle_id}", document=None, answer="a", source="interaction",
                        question_type="yes_no", item_key=item_key(f"q{i} {len(scores)} {cycle_id}", None), score=x)
             for i, x in enumerate(scores)]
    save_queue(s, items, 2, cycle_id)


def test_the_signal_fires_while_the_champion_stays_unsure_of_what_people_ask(project):
    proj = project({"review": {"trigger_min": 4, "trigger_share": 0.5, "unsure_score": 0.5}}, pairs=False)
    with open_store(proj.store_url)() as s:
        assert review_queue(proj, s).value is None
        _queue(s, [0.9, 0.8, 0.2])  # too few questions
        r = review_queue(proj, s)
        assert not r.fired and "fewer than 4" in r.reason
        _queue(s, [0.9, 0.8, 0.7, 0.1])  # unsure of 3/4
        r = review_queue(proj, s)
        assert r.fired and r.value == 0.75
        _queue(s, [0.9, 0.8, 0.1, 0.1, 0.2])  # 2/5 after a cycle: it fell below the share
        assert not review_queue(proj, s).fired
        _queue(s, [0.9, 0.8, 0.7, 0.1])  # 3/4, up from 2/5: stays high
        assert review_queue(proj, s).fired
        _queue(s, [0.9, 0.8, 0.7, 0.1, 0.1, 0.1, 0.1, 0.6])  # 4/8: above the share but falling since 3/4
        r = review_queue(proj, s)
        assert not r.fired and r.value == 0.5 and r.detail["previous_share"] == 0.75
        _queue(s, [0.9] * 10, cycle=False)  # a queue built by hand (`tuneloop review build`) is not "after a cycle"
        assert review_queue(proj, s).detail["queue"] == 5


def test_a_question_nothing_is_retrieved_for_keeps_the_others_doubts_aligned(project):
    proj = _toy_project(project, weights={"retrieval": 1.0})
    _asked(proj, [("Zyxwvq qwxzy?", DOCS[0]), ("Who signs for the Provider?", DOCS[1])])
    _build(proj)
    with open_store(proj.store_url)() as s:
        items = {it.question: it for it in s.scalars(select(ReviewItem))}
    nothing, signs = items["Zyxwvq qwxzy?"], items["Who signs for the Provider?"]
    assert len(nothing.scores["answers"]) == 1 and nothing.scores["doubts"]["retrieval"] == 1.0  # one empty set
    assert len(signs.scores["answers"]) == 3 and signs.scores["doubts"]["disagreement"] == 1.0


@pytest.mark.parametrize("review, message", [
    ({"pool": 5, "per_cycle": 10}, "pool (5) is smaller than per_cycle (10)"),
    ({"weights": {"margins": 1.0}}, "margins"),
    ({"sources": ["emails"]}, "sources"),
    ({"diversity": 1.5}, "diversity"),
])
def test_bad_review_settings_are_named(project, review, message):
    from tuneloop.config import load_project
    from tuneloop.errors import ConfigError

    proj = project(pairs=False)
    settings = yaml.safe_load((proj.root / "tuneloop.yaml").read_text(encoding="utf-8"))
    settings["review"].update(review)
    (proj.root / "tuneloop.yaml").write_text(yaml.safe_dump(settings), encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_project(proj.root)


def test_review_build_and_list_on_the_command_line(project):
    """`tuneloop review build` scores with the real (tiny) champion, under the cycle lock; `list` shows it."""
    proj = project({"review": {"sources": ["interactions"], "pool": 4, "per_cycle": 2}}, pairs=False)
    ingest_project(proj)
    runner = CliRunner()
    result = runner.invoke(app, ["review", "build", "-p", str(proj.root)])
    assert result.exit_code == 0 and "Nothing to review" in result.output, result.output
    _asked(proj, [(q, DOCS[i]) for i, q in enumerate(TOY)])
    result = runner.invoke(app, ["review", "build", "-p", str(proj.root)])
    assert result.exit_code == 0, result.output
    assert re.search(r"Review queue 1: 2 open of 4 scored by base \(mean informativeness 0\.\d\d\)", result.output)
    listed = runner.invoke(app, ["review", "list", "-p", str(proj.root)])
    with open_store(proj.store_url)() as s:
        shown = [it.question for it in open_items(s)]
    assert listed.exit_code == 0 and len(shown) == 2
    assert all(q in listed.output for q in shown) and listed.output.index(shown[0]) < listed.output.index(shown[1])


def test_watch_starts_a_cycle_when_the_queue_stays_unsure(project):
    from tuneloop.monitor.watch import tick

    proj = project({"review": {"trigger_min": 3}, "monitor": {"cooldown_seconds": 0}}, pairs=False)
    ingest_project(proj)  # no new documents: only the queue can fire
    started = []

    def run_cycle(p, reporter, trigger):
        started.append(trigger)
        return Cycle(id=99)

    with open_store(proj.store_url)() as s:
        _queue(s, [0.9, 0.2, 0.2, 0.1])  # unsure of 1/4: below the share
        s.commit()
    assert tick(proj, SilentReporter(), None, run_cycle).started is None and started == []
    with open_store(proj.store_url)() as s:
        _queue(s, [0.9, 0.8, 0.7, 0.1])  # 3/4 after the next cycle
        s.commit()
    assert tick(proj, SilentReporter(), None, run_cycle).started == 99
    assert len(started) == 1 and "unsure of 75% of 4 unanswered questions" in started[0]
