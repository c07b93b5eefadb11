"""The promotion gate: a candidate must beat the champion significantly (paired bootstrap)."""
from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from tuneloop.artifacts import write_jsonl
from tuneloop.stages.gate import gate, significance_test
from tuneloop.store import EvalRun, ModelVersion, open_store
from tuneloop.versions import ensure_base_version

N = 60  # held-out questions: half yes/no, half extraction


def references(i: int) -> list[str]:
    return ["Yes" if i % 4 == 0 else "No"] if i % 2 == 0 else [f"clause {i} of the agreement"]


def predictions(right: set[int]) -> list[dict]:
    """Right answers on `right`, wrong ones elsewhere."""
    rows = []
    for i in range(N):
        ref = references(i)
        if i in right:
            pred = ref[0]
        else:
            pred = {"Yes": "No", "No": "Yes"}.get(ref[0], "something else entirely")
        rows.append({"example_id": i, "question": f"q{i}", "references": ref, "prediction": pred})
    return rows


def stored_run(tmp_path, s, version, rows, name) -> EvalRun:
    from tuneloop import metrics

    folder = tmp_path / name
    folder.mkdir()
    write_jsonl(folder / "predictions.jsonl", rows)
    run = EvalRun(model_version_id=version.id, eval_set_hash="h", n=len(rows), metrics=metrics.aggregate(rows),
                  artifact_path=str(folder))
    s.add(run)
    s.flush()
    return run


@pytest.fixture
def setup(project, tmp_path):
    def make(champ_right: set[int], cand_right: set[int], overrides=None):
        p = project(overrides, pairs=False)
        s = open_store(p.store_url)()
        base = ensure_base_version(p, s)
        cand = ModelVersion(name="v1", parent_id=base.id, base_model=base.base_model, method="sft",
                            status="candidate", adapter_path=str(tmp_path / "adapter"))
        s.add(cand)
        s.flush()
        runs = (stored_run(tmp_path, s, cand, predictions(cand_right), f"{p.root.name}-cand"),
                stored_run(tmp_path, s, base, predictions(champ_right), f"{p.root.name}-champ"))
        return p, s, cand, base, runs
    return make


BASE = set(range(0, N, 3))  # the champion gets a third right


def test_a_clear_gain_is_promoted(setup):
    p, s, cand, base, (cr, br) = setup(BASE, BASE | set(range(1, N, 3)))  # two thirds right
    d = gate(p, s, cand, cr, br)
    assert d.promoted and (cand.status, base.status) == ("champion", "retired")
    assert "paired bootstrap" in d.reason and "p=0.000 < 0.05" in d.reason
    t = cand.metrics["gate_test"]
    assert t["diff"] > 0.2 and t["low"] > 0 and t["n"] == N


def test_a_gain_on_two_questions_is_not_significant(setup):
    p, s, cand, base, (cr, br) = setup(BASE, BASE | {1, 4})
    assert cr.metrics["macro_score"] > br.metrics["macro_score"]
    d = gate(p, s, cand, cr, br)
    assert not d.promoted and (cand.status, base.status) == ("rejected", "champion")
    assert "not significant" in d.reason and cand.metrics["gate_test"]["p_value"] >= 0.05
    assert s.scalar(select(EvalRun).where(EvalRun.model_version_id == cand.id)) is not None  # eval kept


def test_a_worse_candidate_is_refused_without_a_test(setup):
    p, s, cand, base, (cr, br) = setup(BASE | {1, 4}, BASE)
    d = gate(p, s, cand, cr, br)
    assert not d.promoted and "does not beat" in d.reason and "gate_test" not in cand.metrics


def test_without_the_test_any_gain_is_promoted(setup):
    p, s, cand, base, (cr, br) = setup(BASE, BASE | {1, 4}, {"eval": {"significance": "none"}})
    assert gate(p, s, cand, cr, br).promoted


def test_stricter_confidence_needs_a_larger_gain(setup):
    gain = BASE | set(range(1, 12, 3))  # 4 more questions right
    p, s, cand, _, (cr, br) = setup(BASE, gain)
    t = significance_test(p, s, cr, br)
    p99, s99, cand99, _, (cr99, br99) = setup(BASE, gain, {"eval": {"confidence": 0.99}})
    assert significance_test(p99, s99, cr99, br99).p_value == pytest.approx(t.p_value)
    decisions = gate(p, s, cand, cr, br), gate(p99, s99, cand99, cr99, br99)
    assert 0.01 <= t.p_value < 0.05  # a gain significant at 95% but not at 99%
    assert [d.promoted for d in decisions] == [True, False]


def test_eval_runs_store_a_confidence_interval_and_a_per_category_breakdown(project, tmp_path):
    import json

    from tests.helpers import ingest_project
    from tuneloop.progress import SilentReporter
    from tuneloop.stages.eval import evaluate_version
    from tuneloop.stages.seeds import import_pairs

    p = project({"eval": {"limit": None}}, pairs=False)
    rows = [{"question": "Is the distributor exclusive?", "answer": "Yes", "category": "Exclusivity"},
            {"question": "Can the licence be assigned?", "answer": "No", "category": "Anti-Assignment"},
            {"question": "Which law governs?", "answer": "Germany"},
            {"question": "Who are the parties?", "answer": "Acme and Beta", "category": "Parties"}]
    path = tmp_path / "eval.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    retriever = ingest_project(p)
    with open_store(p.store_url)() as s:
        import_pairs(s, path, "eval")
        run = evaluate_version(p, s, ensure_base_version(p, s), retriever, SilentReporter())
        s.commit()
    m = run.metrics
    assert m["macro_score_ci_low"] <= m["macro_score"] <= m["macro_score_ci_high"]
    cats = json.loads((Path(run.artifact_path) / "by_category.json").read_text())
    assert set(cats) == {"Exclusivity", "Anti-Assignment", "extraction", "Parties"}
    assert cats["Exclusivity"]["n"] == 1 and cats["Exclusivity"]["yes_no_n"] == 1


def test_evaluation_refuses_held_out_questions_that_were_trained_on(project):
    from tuneloop.errors import StateError
    from tuneloop.progress import SilentReporter
    from tuneloop.stages.eval import evaluate_version
    from tuneloop.store import Example, example_hash

    p = project()  # the sample seeds (train) and held-out questions (eval)
    with open_store(p.store_url)() as s:
        held = s.scalar(select(Example).where(Example.split == "eval"))
        # the same question about the same document, with another answer: a different content hash
        s.add(Example(kind="synthetic", split="train", question=held.question.upper() + "  ", answer="other",
                      document=held.document, content_hash=example_hash(held.question, "other", held.document)))
        s.flush()
        with pytest.raises(StateError, match=r"1 held-out question\(s\) are also training questions"):
            evaluate_version(p, s, ensure_base_version(p, s), None, SilentReporter())
        assert s.scalars(select(EvalRun)).all() == []


def test_semantic_similarity_rewards_a_paraphrase_over_a_wrong_answer(real_embedder):
    from tuneloop import metrics
    from tuneloop.programs.scoring import add_semantic_similarity

    items = [{"prediction": "the laws of the State of Delaware", "references": ["Delaware law"]},
             {"prediction": "thirty days of written notice", "references": ["Delaware law"]},
             {"prediction": "No", "references": ["No"]}]
    add_semantic_similarity(items, real_embedder)
    assert items[0]["semantic_similarity"] > items[1]["semantic_similarity"] + 0.2
    assert "semantic_similarity" not in items[2]  # yes/no items are scored on their label
    result = metrics.aggregate(items)
    assert result["extract_semantic_similarity"] == pytest.approx(
        (items[0]["semantic_similarity"] + items[1]["semantic_similarity"]) / 2)


def sourced_runs(project, tmp_path, overrides, champ_right, cand_right, n_old=48, n_new=12):
    """Held-out examples from two sources (imported "seed", "feedback" from use) and stored runs."""
    from tuneloop.store import Example, example_hash

    p = project(overrides, pairs=False)
    s = open_store(p.store_url)()
    tmp_path.mkdir(parents=True, exist_ok=True)
    rows = {}
    for i in range(n_old + n_new):
        kind = "seed" if i < n_old else "feedback"
        ref = references(i)[0]
        e = Example(kind=kind, split="eval", question=f"question {i}?", answer=ref,
                    content_hash=example_hash(f"question {i}?", ref, None))
        s.add(e)
        s.flush()
        rows[i] = e.id
    base = ensure_base_version(p, s)
    cand = ModelVersion(name="v1", parent_id=base.id, base_model=base.base_model, method="sft",
                        status="candidate", adapter_path=str(tmp_path / "adapter"))
    s.add(cand)
    s.flush()

    def preds(right):
        out = []
        for r in predictions(right)[: n_old + n_new]:
            out.append({**r, "example_id": rows[r["example_id"]]})
        return out

    runs = (stored_run(tmp_path, s, cand, preds(cand_right), f"{p.root.name}-cand"),
            stored_run(tmp_path, s, base, preds(champ_right), f"{p.root.name}-champ"))
    return p, s, cand, runs


NEW = set(range(48, 60))


def test_averaging_over_sources_weighs_the_new_traffic_as_much_as_the_imported_set(project, tmp_path):
    champ_right = set(range(0, 48, 2))  # half of the old questions, none of the new
    cand_right = champ_right | NEW  # the same old ones, and every new question
    items = sourced_runs(project, tmp_path / "a", {}, champ_right, cand_right)
    sources = sourced_runs(project, tmp_path / "b", {"eval": {"gate_average": "sources"}}, champ_right, cand_right)
    t_items = significance_test(items[0], items[1], *items[3])
    t_sources = significance_test(sources[0], sources[1], *sources[3])
    assert t_sources.diff > t_items.diff + 0.1  # the 12 new questions count for half, not a fifth
    d = gate(sources[0], sources[1], sources[2], *sources[3])
    assert d.promoted and "mean over held-out sources" in d.reason


def test_a_gain_on_new_traffic_bought_with_the_old_questions_is_refused(project, tmp_path):
    champ_right = set(range(0, 48))  # every old question, none of the new
    cand_right = set(range(0, 36)) | NEW  # a quarter of the old ones lost, every new one right
    p, s, cand, (cr, br) = sourced_runs(project, tmp_path, {"eval": {"gate_average": "sources"}},
                                         champ_right, cand_right)
    d = gate(p, s, cand, cr, br)
    assert not d.promoted and "refused by guard" in d.reason and "'seed' held-out questions (48)" in d.reason
    assert cand.status == "rejected"
