"""`tuneloop report`: one self-contained HTML file (inline SVG plots, no external requests) on the
project's history: metrics per model version with confidence intervals, feedback over time,
monitoring signals (drift, satisfaction), data volumes per cycle, and every gate decision.

Plots are drawn with matplotlib (Agg, SVG text kept as paths so no font is fetched) and the page
is a jinja2 template.
"""
from __future__ import annotations

import io
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select

from tuneloop.config import Project
from tuneloop.errors import InputError
from tuneloop.evalsets import EVAL_KIND, anchor_items, anchor_set_hash, eval_examples, eval_set_hash
from tuneloop.steps import FeedbackStepResult, RlaifStepResult, SynthStepResult, step_result
from tuneloop.store import Cycle, CycleStep, EvalRun, Feedback, ModelVersion, Session, SignalValue


@dataclass
class ReportData:
    project: str
    generated: str
    primary: str
    versions: list[dict[str, Any]] = field(default_factory=list)
    cycles: list[dict[str, Any]] = field(default_factory=list)
    feedback_days: list[dict[str, Any]] = field(default_factory=list)
    signals: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    votes: list[tuple[datetime, float]] = field(default_factory=list)  # (when, 1 up / 0 down), oldest first
    cycle_starts: list[tuple[int, datetime]] = field(default_factory=list)


def collect(project: Project, session: Session) -> ReportData:
    primary = project.settings.eval.primary_metric
    data = ReportData(project.settings.project, datetime.now().strftime("%Y-%m-%d %H:%M"), primary)
    examples = eval_examples(project, session)
    heldout = eval_set_hash(examples) if examples else None
    anchor = anchor_set_hash(anchor_items())
    runs: dict[int, dict[str, dict]] = defaultdict(dict)
    for r in session.scalars(select(EvalRun).order_by(EvalRun.id)):
        kind = "heldout" if r.eval_set_hash == heldout else "anchor" if r.eval_set_hash == anchor else None
        if kind:
            runs[r.model_version_id][kind] = {**r.metrics, "n": r.n}
        elif Path(r.artifact_path).parent.name == EVAL_KIND:  # an earlier held-out set (it grows with feedback)
            runs[r.model_version_id]["earlier"] = {**r.metrics, "n": r.n}
    names = {v.id: v.name for v in session.scalars(select(ModelVersion))}
    for v in session.scalars(select(ModelVersion).order_by(ModelVersion.id)):
        h, a = runs[v.id].get("heldout") or runs[v.id].get("earlier", {}), runs[v.id].get("anchor", {})
        data.versions.append({
            "name": v.name, "method": v.method, "status": v.status, "parent": names.get(v.parent_id),
            "cycle": v.cycle_id, "value": h.get(primary), "low": h.get(f"{primary}_ci_low"),
            "high": h.get(f"{primary}_ci_high"), "anchor": a.get("anchor_score"), "n": h.get("n"),
            "earlier_set": "heldout" not in runs[v.id] and bool(h),
            "gate": (v.metrics or {}).get("gate")})
    for c in session.scalars(select(Cycle).order_by(Cycle.id)):
        steps = {st.name: step_result(st.name, st.result)
                 for st in session.scalars(select(CycleStep).where(CycleStep.cycle_id == c.id))}
        synth = steps.get("synth") or SynthStepResult()
        rlaif = steps.get("rlaif") or RlaifStepResult()
        feedback = steps.get("feedback") or FeedbackStepResult()
        data.cycles.append({
            "id": c.id, "trigger": c.trigger, "status": c.status, "outcome": c.outcome or "",
            "started": c.started_at.strftime("%Y-%m-%d %H:%M"),
            "synthetic": synth.kept, "generated": synth.generated, "pairs": rlaif.kept_pairs,
            "human_pairs": feedback.routed.pairs_added if feedback.routed else None,
            "corrected": feedback.examples_added()})
        data.cycle_starts.append((c.id, c.started_at))
    days: dict[str, Counter] = defaultdict(Counter)
    for fb in session.scalars(select(Feedback).where(Feedback.source == "human").order_by(Feedback.created_at)):
        day = fb.created_at.strftime("%Y-%m-%d")
        up = (fb.thumbs or 0) > 0 or (fb.rating or 0) >= 4
        down = (fb.thumbs or 0) < 0 or 0 < (fb.rating or 0) <= 2
        days[day].update({"up": int(up), "down": int(down), "all": 1})
        if up or down:
            data.votes.append((fb.created_at, 1.0 if up else 0.0))
    data.feedback_days = [{"day": d, **c} for d, c in sorted(days.items())]
    for sv in session.scalars(select(SignalValue).order_by(SignalValue.created_at, SignalValue.id)):
        data.signals.setdefault(sv.signal, []).append({
            "at": sv.created_at.strftime("%Y-%m-%d %H:%M"), "value": sv.value, "fired": bool(sv.fired),
            "reason": (sv.detail or {}).get("reason", "")})
    return data


def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight",
                metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog and doctype: the SVG is inline


def plots(data: ReportData) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.fonttype"] = "path"
    import matplotlib.pyplot as plt

    out = {}
    scored = [v for v in data.versions if v["value"] is not None]
    if scored:
        fig, ax = plt.subplots(figsize=(7, 3))
        xs = range(len(scored))
        vals = [v["value"] for v in scored]
        lows = [v["value"] - v["low"] if v["low"] is not None else 0 for v in scored]
        highs = [v["high"] - v["value"] if v["high"] is not None else 0 for v in scored]
        colors = ["#2a7" if v["status"] == "champion" else "#c44" if v["status"] == "rejected" else "#58a"
                  for v in scored]
        ax.bar(xs, vals, yerr=[lows, highs], color=colors, capsize=4)
        anchors = [(i, v["anchor"]) for i, v in enumerate(scored) if v["anchor"] is not None]
        if anchors:
            ax.plot([i for i, _ in anchors], [a for _, a in anchors], "ko--", label="anchor score")
            ax.legend(loc="upper left")
        ax.set_xticks(list(xs), [f"{v['name']}{'*' if v.get('earlier_set') else ''}\n{v['method']}" for v in scored])
        ax.set_ylabel(data.primary)
        ax.set_title("held-out score per version (95% bootstrap CI); green = champion, red = rejected"
                     + ("\n* scored on an earlier held-out set" if any(v.get("earlier_set") for v in scored) else ""))
        out["versions"] = _svg(fig)
    if data.feedback_days:
        fig, ax = plt.subplots(figsize=(7, 2.6))
        days = [d["day"] for d in data.feedback_days]
        ax.bar(days, [d["up"] for d in data.feedback_days], color="#2a7", label="up")
        ax.bar(days, [-d["down"] for d in data.feedback_days], color="#c44", label="down")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_title("human votes per day")
        ax.legend(loc="upper left")
        ax.tick_params(axis="x", rotation=45)
        out["feedback"] = _svg(fig)
    if len(data.votes) >= 2:
        out["satisfaction"] = _satisfaction_plot(data, plt)
    for name, rows in data.signals.items():
        pts = [(i, r["value"], r["fired"]) for i, r in enumerate(rows) if r["value"] is not None]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(7, 2.4))
        ax.plot([i for i, _, _ in pts], [v for _, v, _ in pts], "-", color="#58a")
        fired = [(i, v) for i, v, f in pts if f]
        if fired:
            ax.plot([i for i, _ in fired], [v for _, v in fired], "o", color="#c44", label="fired")
            ax.legend(loc="upper left")
        ax.set_title(f"{name} (each check)")
        out[f"signal-{name}"] = _svg(fig)
    if data.cycles:
        fig, ax = plt.subplots(figsize=(7, 2.4))
        ids = [str(c["id"]) for c in data.cycles]
        ax.bar(ids, [c["synthetic"] or 0 for c in data.cycles], color="#58a", label="synthetic examples kept")
        ax.plot(ids, [c["pairs"] or 0 for c in data.cycles], "o-", color="#a5a", label="preference pairs (RLAIF)")
        ax.plot(ids, [c["human_pairs"] or 0 for c in data.cycles], "s-", color="#c84", label="new human pairs")
        ax.plot(ids, [c["corrected"] or 0 for c in data.cycles], "^-", color="#2a7",
                label="examples from feedback")
        ax.set_xlabel("cycle")
        ax.set_title("data per cycle")
        ax.legend(loc="upper left")
        out["data"] = _svg(fig)
    return out


SATISFACTION_WINDOW = 20  # votes in the running positive share of the satisfaction plot


def _satisfaction_plot(data: ReportData, plt) -> str:
    """The positive share of the latest votes after each vote, over time, with the cycles' starts."""
    fig, ax = plt.subplots(figsize=(7, 2.6))
    times = [t for t, _ in data.votes]
    values = [v for _, v in data.votes]
    rolling = [sum(values[max(0, i + 1 - SATISFACTION_WINDOW):i + 1]) / min(i + 1, SATISFACTION_WINDOW)
               for i in range(len(values))]
    ax.plot(times, rolling, "-", color="#2a7")
    for cid, start in data.cycle_starts:
        if times[0] <= start <= times[-1]:
            ax.axvline(start, color="#a5a", ls="--", lw=1)
            ax.annotate(f"cycle {cid}", (start, 1.0), fontsize=8, color="#a5a", ha="left", va="top")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"satisfaction: positive share of the latest {SATISFACTION_WINDOW} human votes")
    ax.tick_params(axis="x", rotation=30)
    return _svg(fig)


TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tuneloop report: {{ d.project }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; } td, th { border: 1px solid #ccc; padding: .3em .6em; }
th { background: #f3f3f3; } .champion { color: #172; font-weight: bold; } .rejected { color: #a22; }
.fired { color: #a22; font-weight: bold; } figure { margin: 1em 0; } svg { max-width: 100%; height: auto; }
</style></head><body>
<h1>tuneloop report: {{ d.project }}</h1>
<p>Generated {{ d.generated }}. Primary metric: <code>{{ d.primary }}</code>.</p>
<h2 id="versions">Model versions</h2>
{% if p.versions %}<figure>{{ p.versions | safe }}</figure>{% endif %}
<table><tr><th>version</th><th>method</th><th>parent</th><th>cycle</th><th>status</th><th>{{ d.primary }}</th>
<th>95% CI</th><th>anchor</th><th>gate decision</th></tr>
{% for v in d.versions %}<tr><td>{{ v.name }}</td><td>{{ v.method }}</td><td>{{ v.parent or "" }}</td>
<td>{{ v.cycle or "" }}</td><td class="{{ v.status }}">{{ v.status }}</td><td>{{ fmt(v.value) }}{% if v.n %}
<small>(n={{ v.n }}{% if v.earlier_set %}, an earlier held-out set{% endif %})</small>{% endif %}</td>
<td>{% if v.low is not none %}[{{ fmt(v.low) }}, {{ fmt(v.high) }}]{% endif %}</td><td>{{ fmt(v.anchor) }}</td>
<td>{{ v.gate or "" }}</td></tr>{% endfor %}</table>
<h2 id="cycles">Cycles</h2>
{% if p.data %}<figure>{{ p.data | safe }}</figure>{% endif %}
<table><tr><th>cycle</th><th>started</th><th>trigger</th><th>status</th><th>synthetic kept</th>
<th>RLAIF pairs</th><th>new human pairs</th><th>examples from feedback</th><th>outcome</th></tr>
{% for c in d.cycles %}<tr><td>{{ c.id }}</td><td>{{ c.started }}</td><td>{{ c.trigger }}</td><td>{{ c.status }}</td>
<td>{{ c.synthetic if c.synthetic is not none else "" }}</td><td>{{ c.pairs if c.pairs is not none else "" }}</td>
<td>{{ c.human_pairs if c.human_pairs is not none else "" }}</td>
<td>{{ c.corrected if c.corrected is not none else "" }}</td>
<td>{{ c.outcome }}</td></tr>{% endfor %}</table>
<h2 id="feedback">Feedback</h2>
{% if p.feedback %}<figure>{{ p.feedback | safe }}</figure>{% else %}<p>No human feedback yet.</p>{% endif %}
{% if p.satisfaction %}<figure>{{ p.satisfaction | safe }}</figure>{% endif %}
<h2 id="signals">Monitoring signals</h2>
{% for name, rows in d.signals.items() %}<h3>{{ name }}</h3>
{% if p["signal-" ~ name] %}<figure>{{ p["signal-" ~ name] | safe }}</figure>{% endif %}
<table><tr><th>checked</th><th>value</th><th>fired</th><th>why</th></tr>
{% for r in rows[-10:] %}<tr><td>{{ r.at }}</td><td>{{ fmt(r.value) }}</td>
<td class="{{ 'fired' if r.fired else '' }}">{{ "yes" if r.fired else "no" }}</td>
<td>{{ r.reason }}</td></tr>{% endfor %}
</table>{% else %}
<p>No signal checked yet (<code>tuneloop monitor</code> or <code>tuneloop watch</code>).</p>{% endfor %}
</body></html>
"""


def _fmt(v) -> str:
    return "-" if v is None or v != v else f"{v:.3f}"


def render(data: ReportData) -> str:
    from jinja2 import Environment

    env = Environment(autoescape=True)
    return env.from_string(TEMPLATE).render(d=data, p=plots(data), fmt=_fmt)


def write_report(project: Project, session: Session, out: Path) -> Path:
    """Write the HTML report to the file `out` (its folder is created)."""
    if out.is_dir():
        raise InputError(f"{out} is a folder: give a file name, e.g. {out / 'tuneloop-report.html'}")
    html = render(collect(project, session))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(html, encoding="utf-8")
    except OSError as exc:  # e.g. a parent that is a file, or no permission
        raise InputError(f"cannot write the report to {out}: {exc.strerror or exc}") from None
    return out
