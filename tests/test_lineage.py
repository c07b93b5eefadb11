"""Lineage: the version tree, `models diff`, and manual promotion (rollback / roll-forward)."""
from __future__ import annotations

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from tuneloop.cli import app
from tuneloop.errors import StateError
from tuneloop.lineage import diff_versions, promote, training_data, version_tree
from tuneloop.store import Artifact, Cycle, EvalRun, Example, ModelVersion, open_store, text_hash
from tuneloop.versions import promotions


@pytest.fixture
def runner(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    return CliRunner()


def invoke(runner, *args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=True)


def ok(result) -> str:
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def seed_versions(project):
    """base (retired) -> v1 (champion) -> v2 (rejected), base -> v3 (candidate); eval runs on one set."""
    with open_store(project.store_url)() as s:
        ids = list(s.scalars(select(Example.id).where(Example.split == "train").order_by(Example.id)))
        assert len(ids) >= 6
        s.add_all([Cycle(id=1, status="done"), Cycle(id=2, status="done")])
        base = ModelVersion(name="base", base_model="m", method="base", status="retired")
        s.add(base)
        s.flush()
        v1 = ModelVersion(name="v1", parent_id=base.id, base_model="m", adapter_path="/a/v1", method="sft",
                          training_example_ids=ids[:4], status="champion", cycle_id=1,
                          hyperparams={"learning_rate": 1e-4, "lora_r": 8, "epochs": 1},
                          metrics={"macro_score": 0.40, "train_last_loss": 2.0})
        s.add(v1)
        s.flush()
        v2 = ModelVersion(name="v2", parent_id=v1.id, base_model="m", adapter_path="/a/v2", method="sft",
                          training_example_ids=ids[2:6], status="rejected", cycle_id=2,
                          hyperparams={"learning_rate": 5e-5, "lora_r": 8, "epochs": 2, "new_key": True},
                          metrics={"macro_score": 0.35, "gate": "does not beat"})
        v3 = ModelVersion(name="v3", parent_id=base.id, base_model="m", adapter_path="/a/v3", method="dpo",
                          training_example_ids=list(reversed(ids[:4])), status="candidate")
        s.add_all([v2, v3])
        s.flush()
        for v, score in ((v1, 0.40), (v2, 0.35)):
            s.add(EvalRun(model_version_id=v.id, eval_set_hash="e" * 64, n=6, metrics={"macro_score": score,
                          "token_f1": score / 2}, artifact_path=f"/evals/{v.name}"))
        s.commit()
        return ids


def statuses(project) -> dict[str, str]:
    with open_store(project.store_url)() as s:
        return {v.name: v.status for v in s.scalars(select(ModelVersion))}


def test_tree_lists_versions_under_their_parents(project, runner):
    proj = project()
    seed_versions(proj)
    with open_store(proj.store_url)() as s:
        roots = version_tree(s)
        assert [r.version.name for r in roots] == ["base"]
        assert [c.version.name for c in roots[0].children] == ["v1", "v3"]
        assert [c.version.name for c in roots[0].children[0].children] == ["v2"]
    out = ok(invoke(runner, "models", "-p", proj.root))
    lines = out.splitlines()
    row = {name: next(i for i, ln in enumerate(lines) if f" {name} " in ln or ln.strip().startswith(name)
                      or f"─ {name}" in ln) for name in ("base", "v1", "v2", "v3")}
    assert row["base"] < row["v1"] < row["v2"] < row["v3"]
    # indentation shows the parent: v2 (child of v1) is deeper than v1 and v3 (children of base)
    indent = {n: lines[i].index(n) for n, i in row.items()}
    assert indent["base"] < indent["v1"] == indent["v3"] < indent["v2"]
    assert "champion" in lines[row["v1"]] and "0.400" in lines[row["v1"]]
    assert "sft" in lines[row["v1"]] and "cycle 1" in lines[row["v1"]]
    assert "rejected" in lines[row["v2"]] and "dpo" in lines[row["v3"]]
    assert "macro_score" in out


def test_tree_with_no_versions(project, runner):
    proj = project(pairs=False)
    assert "no model versions yet" in ok(invoke(runner, "models", "-p", proj.root))


def test_training_data_hash_ignores_order(project):
    proj = project()
    ids = seed_versions(proj)
    with open_store(proj.store_url)() as s:
        v1, v3 = (s.scalar(select(ModelVersion).where(ModelVersion.name == n)) for n in ("v1", "v3"))
        d1, d3 = training_data(s, v1), training_data(s, v3)
        hashes = sorted(s.scalars(select(Example.content_hash).where(Example.id.in_(ids[:4]))))
        assert d1.data_hash == d3.data_hash == text_hash(*hashes)
        assert d1.missing == 0 and len(d1.ids) == 4
        assert training_data(s, s.scalar(select(ModelVersion).where(ModelVersion.name == "base"))).data_hash is None


def test_diff_shows_hyperparams_data_and_metrics(project, runner):
    proj = project()
    seed_versions(proj)
    with open_store(proj.store_url)() as s:
        a, b = (s.scalar(select(ModelVersion).where(ModelVersion.name == n)) for n in ("v1", "v2"))
        d = diff_versions(s, a, b)
        assert d.hyperparams == [("epochs", 1, 2), ("learning_rate", 1e-4, 5e-5), ("new_key", "<unset>", True)]
        assert (d.only_a, d.only_b, d.shared) == (2, 2, 2)
        assert not d.same_data
        assert ("parent", "base", "v1") in d.fields
        evals = {(r.metric): r for r in d.metrics if r.source.startswith("eval")}
        assert evals["macro_score"].delta == pytest.approx(-0.05)
        assert all(r.metric != "gate" for r in d.metrics)  # non-numeric metrics are not compared
    out = ok(invoke(runner, "models", "diff", "v1", "v2", "-p", proj.root))
    assert "learning_rate: 0.0001 -> 5e-05" in out
    assert "epochs: 1 -> 2" in out
    assert "only in v1: 2; only in v2: 2; shared: 2" in out
    assert "-0.050" in out and "0.400" in out and "0.350" in out
    out = ok(invoke(runner, "models", "diff", "v1", "v3", "-p", proj.root))
    assert "same training data" in out and "dpo" in out


def test_unknown_version_is_a_one_line_error(project, runner):
    proj = project()
    seed_versions(proj)
    for args in (("models", "diff", "v1", "nope"), ("models", "promote", "nope")):
        r = invoke(runner, *args, "-p", proj.root)
        assert r.exit_code != 0
        lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and "nope" in lines[0], r.output
        assert "Traceback" not in r.output


def test_promote_rolls_back_and_forward(project, runner):
    proj = project()
    seed_versions(proj)
    out = ok(invoke(runner, "models", "promote", "base", "-p", proj.root))
    assert "promoted base" in out and "rollback" in out
    st = statuses(proj)
    assert st["base"] == "champion" and st["v1"] == "retired"
    out = ok(invoke(runner, "models", "promote", "v2", "-p", proj.root))  # a rejected version, forward
    assert "forward" in out
    st = statuses(proj)
    assert st["v2"] == "champion" and st["base"] == "retired" and list(st.values()).count("champion") == 1
    out = ok(invoke(runner, "models", "promote", "v2", "-p", proj.root))
    assert "already the champion" in out
    with open_store(proj.store_url)() as s:
        history = promotions(s)
        assert [(h["from"], h["to"], h["reason"]) for h in history] == [("v1", "base", "manual"),
                                                                         ("base", "v2", "manual")]
        assert len(list(s.scalars(select(Artifact).where(Artifact.kind == "promotion")))) == 2
    assert "last promotion: base -> v2 (manual, forward" in ok(invoke(runner, "models", "-p", proj.root))


def test_promote_api_no_champion_and_unknown(project):
    proj = project()
    with open_store(proj.store_url)() as s:
        s.add(ModelVersion(name="v1", base_model="m", method="sft", status="candidate"))
        s.flush()
        p = promote(s, "v1")
        assert p.changed and p.previous is None and p.version.status == "champion"
        with pytest.raises(StateError, match="unknown model version 'zz'"):
            promote(s, "zz")
