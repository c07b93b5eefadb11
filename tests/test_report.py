"""`tuneloop report`: one self-contained HTML file, checked in headless Chromium."""
from __future__ import annotations

import re
from datetime import timedelta

from sqlalchemy import select
from typer.testing import CliRunner

from tests.test_browser import CHROMIUM, CHROMIUM_ARGS, require_chromium
from tuneloop.cli import app
from tuneloop.evalsets import anchor_items, anchor_set_hash, eval_examples, eval_set_hash
from tuneloop.store import (
    Cycle,
    CycleStep,
    EvalRun,
    Feedback,
    Interaction,
    ModelVersion,
    SignalValue,
    open_store,
    utcnow,
)
from tuneloop.versions import ensure_base_version


def history(p):
    """Two versions (v1 rejected by the gate), one cycle, votes on two days, drift checks."""
    with open_store(p.store_url)() as s:
        base = ensure_base_version(p, s)
        cycle = Cycle(trigger="watch: query drift: MMD p=0.001 < 0.01", status="done",
                      outcome="kept champion; rejected v1: not significant")
        s.add(cycle)
        s.flush()
        s.add(CycleStep(cycle_id=cycle.id, name="synth", status="done", result={"kept": 7, "generated": 24}))
        s.add(CycleStep(cycle_id=cycle.id, name="rlaif", status="done", result={"kept_pairs": 5}))
        s.add(CycleStep(cycle_id=cycle.id, name="feedback", status="done",
                        result={"routed": {"pairs_added": 9}, "added_train": 3, "added_eval": 1, "added_dev": 2}))
        v1 = ModelVersion(name="v1", parent_id=base.id, base_model="m", method="dpo", status="rejected",
                          cycle_id=cycle.id, metrics={"gate": "macro_score 0.31 beats 0.30; not significant"})
        s.add(v1)
        s.flush()
        heldout, anchor = eval_set_hash(eval_examples(p, s)), anchor_set_hash(anchor_items())
        for v, score in ((base, 0.30), (v1, 0.31)):
            s.add(EvalRun(model_version_id=v.id, eval_set_hash=heldout, n=6, artifact_path="x",
                          metrics={"macro_score": score, "macro_score_ci_low": score - 0.1,
                                   "macro_score_ci_high": score + 0.1}))
            s.add(EvalRun(model_version_id=v.id, eval_set_hash=anchor, n=30, artifact_path="y",
                          metrics={"anchor_score": 0.5}))
        t0 = utcnow() - timedelta(days=2)
        for k in range(6):
            it = Interaction(question=f"q{k}?", answer="a", model_version_id=base.id, created_at=t0)
            s.add(it)
            s.flush()
            s.add(Feedback(interaction_id=it.id, thumbs=1 if k % 3 else -1, created_at=t0 + timedelta(days=k // 3)))
        for k, pv in enumerate((0.4, 0.2, 0.001)):
            s.add(SignalValue(signal="query_drift", value=pv, fired=pv < 0.01, detail={"reason": f"check {k}"},
                              created_at=t0 + timedelta(hours=k)))
        s.commit()


def test_report_is_self_contained_and_renders_in_chromium(project, tmp_path):
    from playwright.sync_api import sync_playwright

    require_chromium()
    p = project(pairs=True)
    history(p)
    out = tmp_path / "report.html"
    result = CliRunner().invoke(app, ["report", "-o", str(out), "-p", str(p.root)])
    assert result.exit_code == 0, result.output
    html = out.read_text()
    assert re.findall(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", html) == []  # nothing is fetched
    assert "<script" not in html
    assert html.count("<svg") >= 4  # versions, data per cycle, feedback, drift
    assert "macro_score 0.31 beats 0.30; not significant" in html and "[0.210, 0.410]" in html
    errors = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(out.as_uri())
        assert page.locator("h1").inner_text() == f"tuneloop report: {p.settings.project}"
        assert page.locator("figure svg").count() >= 4
        assert page.locator("td.rejected").inner_text() == "rejected"
        assert page.locator("td.fired").count() == 1  # the third drift check
        assert page.locator("#signals ~ h3").first.inner_text() == "query_drift"
        box = page.locator("figure svg").first.bounding_box()
        assert box["width"] > 200 and box["height"] > 100  # the plot is drawn, not empty
        browser.close()
    assert errors == []


def test_report_on_a_fresh_project_says_what_is_missing(project, tmp_path):
    p = project(pairs=False)
    out = tmp_path / "empty.html"
    result = CliRunner().invoke(app, ["report", "-o", str(out), "-p", str(p.root)])
    assert result.exit_code == 0, result.output
    html = out.read_text()
    assert "No human feedback yet." in html and "No signal checked yet" in html
    with open_store(p.store_url)() as s:
        assert s.scalars(select(ModelVersion)).all() == []  # writing a report changes nothing


def test_report_plots_the_running_satisfaction_share(project):
    from tuneloop.report import collect, plots

    p = project(pairs=True)
    history(p)
    with open_store(p.store_url)() as s:
        data = collect(p, s)
    # the six thumbs of `history`, oldest first: down for k = 0 and 3, else up
    assert [v for _, v in data.votes] == [0.0, 1.0, 1.0, 0.0, 1.0, 1.0]
    assert [t for t, _ in data.votes] == sorted(t for t, _ in data.votes)
    assert [cid for cid, _ in data.cycle_starts] == [1]
    assert (data.cycles[0]["pairs"], data.cycles[0]["human_pairs"], data.cycles[0]["corrected"]) == (5, 9, 6)
    assert "<svg" in plots(data)["satisfaction"]


def test_a_version_scored_only_on_an_earlier_held_out_set_is_still_shown(project, tmp_path):
    from tuneloop.report import collect

    p = project(pairs=True)
    history(p)
    with open_store(p.store_url)() as s:
        base = s.scalars(select(ModelVersion).where(ModelVersion.name == "base")).one()
        heldout = eval_set_hash(eval_examples(p, s))
        run = s.scalars(select(EvalRun).where(EvalRun.model_version_id == base.id,
                                              EvalRun.eval_set_hash == heldout)).one()
        run.eval_set_hash, run.artifact_path = "an-earlier-set", str(tmp_path / "evals" / "base-earlier")
        s.commit()
        rows = {v["name"]: v for v in collect(p, s).versions}
    assert rows["base"]["value"] == 0.30 and rows["base"]["earlier_set"] and rows["base"]["n"] == 6
    assert rows["v1"]["value"] == 0.31 and not rows["v1"]["earlier_set"]
