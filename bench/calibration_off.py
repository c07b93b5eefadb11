"""Yes/no answers with and without the calibrated threshold (`programs/decide.py`), from stored runs.

Eval decides a yes/no question from the first-token margin log P(Yes) - log P(No) against the
version's threshold chosen on the dev split (`stages/calibrate.py`), and stores the margin with
each held-out item (`yes_no_margin`). Without calibration the answer is the model's own
preference: Yes when the margin is above 0. This re-scores every stored held-out run of a project
both ways, so no model runs: yes/no balanced accuracy and the primary metric, and the paired
bootstrap of calibrated vs threshold 0 on the primary metric.

    .venv/bin/python bench/calibration_off.py PROJECT [PROJECT ...]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from sqlalchemy import select

from tuneloop import metrics
from tuneloop.artifacts import read_jsonl
from tuneloop.config import load_project
from tuneloop.evalsets import eval_examples, eval_set_hash
from tuneloop.stats import paired_bootstrap
from tuneloop.store import EvalRun, ModelVersion, open_store


def uncalibrated(items: list[dict]) -> list[dict]:
    """The items with each decided yes/no answer replaced by the margin's sign (threshold 0)."""
    return [{**it, "prediction": ("Yes" if it["yes_no_margin"] > 0 else "No")} if "yes_no_margin" in it else it
            for it in items]


def metric(scored: list[dict], name: str):
    return lambda idx: metrics.summarize([scored[i] for i in idx])[name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("projects", nargs="+", type=Path)
    args = parser.parse_args()
    print("| project | version | threshold | yes/no n | balanced accuracy: calibrated / threshold 0 | "
          "primary: calibrated / threshold 0 | calibrated - threshold 0 (primary), 95% CI, p |")
    print("|---" * 7 + "|")
    for root in args.projects:
        project = load_project(root)
        primary = project.settings.eval.primary_metric
        with open_store(project.store_url)() as s:
            held = eval_set_hash(eval_examples(project, s))
            names = dict(s.execute(select(ModelVersion.id, ModelVersion.name)).all())
            runs = [(names[r.model_version_id], r) for r in s.scalars(
                select(EvalRun).where(EvalRun.eval_set_hash == held).order_by(EvalRun.id))]
        for name, run in runs:
            items = read_jsonl(Path(run.artifact_path) / "predictions.jsonl")
            a, b = metrics.score_items(items), metrics.score_items(uncalibrated(items))
            sa, sb = metrics.summarize(a), metrics.summarize(b)
            n = sum(1 for it in items if "yes_no_margin" in it)
            test = paired_bootstrap(len(a), metric(a, primary), metric(b, primary), 2000)
            print(f"| {root.name} | {name} | {run.metrics.get('yes_no_threshold', 0.0):+.3f} | {n} | "
                  f"{sa['yes_no_balanced_accuracy']:.3f} / {sb['yes_no_balanced_accuracy']:.3f} | "
                  f"{sa[primary]:.3f} / {sb[primary]:.3f} | "
                  f"{test.diff:+.3f} [{test.low:+.3f}, {test.high:+.3f}], p={test.p_value:.3f} |")
    print("\nCommand: .venv/bin/python bench/calibration_off.py " + " ".join(str(p) for p in args.projects))


if __name__ == "__main__":
    main()
