"""Diagnostic for the continuous scenario: can the student learn the licence questions at all
when SFT trains on nothing else?

Run after `bench/continuous.py` (it reads that bench's project): SFT from v1 on the licence
questions' feedback examples of the training split only (Yes/No balanced), for --epochs, then
the probe of the scenario (50 licence questions no user asked). Nothing is registered in the
project; the adapter goes to --out-dir.

    .venv/bin/python bench/continuous_focus.py --epochs 4 --learning-rate 1e-3

On the second scenario run's project (v1 trained at 3e-4), 2 epochs at 3e-4 left the student
answering "No" to all 50 probe questions (balanced accuracy 0.500); 4 epochs at 1e-3 reached
0.601 (docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import continuous  # noqa: E402  (the scenario's plan and summaries)
from sqlalchemy import select  # noqa: E402

from tuneloop import metrics  # noqa: E402
from tuneloop.config import load_project  # noqa: E402
from tuneloop.loop import CycleContext  # noqa: E402
from tuneloop.models.defaults import resolve_model_path  # noqa: E402
from tuneloop.progress import RichReporter  # noqa: E402
from tuneloop.stages.eval import score_examples  # noqa: E402
from tuneloop.stages.sft import _train, balance_yes_no, training_rows  # noqa: E402
from tuneloop.store import Example, ModelVersion, open_store  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cuad-dev")
    ap.add_argument("--project", type=Path, default=ROOT / "bench-runs" / "continuous")
    ap.add_argument("--epochs", type=float, default=4.0)
    ap.add_argument("--learning-rate", type=float, default=None, help="default: the project's sft.learning_rate")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "bench-runs" / "continuous-focus")
    a = ap.parse_args()
    t0 = time.time()
    sys.argv = [sys.argv[0], "--data", str(a.data)]  # the scenario's default plan (seed 0)
    plan = continuous.plan(continuous.parse_args())
    project = load_project(a.project)
    rep = RichReporter()
    with open_store(project.store_url)() as s:
        retriever = CycleContext(project, rep, cycle_id=0).retriever(s)
        licence = {(r["question"], r["contract"]) for r in plan["phase2"]}
        examples = [e for e in s.scalars(select(Example).where(Example.kind == "feedback", Example.split == "train"))
                    if (e.question, e.document) in licence]
        train = balance_yes_no(examples, random.Random(0))
        v1 = s.scalar(select(ModelVersion).where(ModelVersion.name == "v1"))
        update = {"epochs": a.epochs} | ({"learning_rate": a.learning_rate} if a.learning_rate else {})
        settings = project.settings.sft.model_copy(update=update)
        model_dir = resolve_model_path(project.settings.models.student.model, project.cache)
        trainer, tok = _train(model_dir, Path(v1.adapter_path), training_rows(train, retriever), settings,
                              project.settings.lora, a.out_dir / "work", rep)
        adapter = a.out_dir / "adapter"
        trainer.model.save_pretrained(adapter)
        tok.save_pretrained(adapter)
        train_seconds = time.time() - t0
        items, _ = score_examples(project, adapter, continuous.probe_examples(plan["probe"]), retriever, rep)
    labels = [metrics.yes_no_label(e.answer) for e in train]
    answers = [metrics.yes_no_label(it["prediction"]) for it in items]
    result = {"epochs": a.epochs, "learning_rate": settings.learning_rate, "n_train": len(train),
              "train_labels": {x: labels.count(x) for x in ("yes", "no")},
              "probe": continuous.summary_with_ci(items, "macro_score"),
              "probe_answers": {str(x): answers.count(x) for x in set(answers)},
              "train_seconds": round(train_seconds, 1), "seconds": round(time.time() - t0, 1),
              "command": f"python bench/continuous_focus.py --epochs {a.epochs} "
                         f"--learning-rate {settings.learning_rate}"}
    (a.out_dir / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
