"""Extraction answers with and without copying from the passages (`tuneloop/programs/copy.py`).

Re-scores the stored eval runs of a project: each held-out extraction item's stored reply (as the
model wrote it, with copying off) and the same reply passed through `copy_answer` with the
passages it was answered from, which is what eval and `tuneloop serve` answer with
`answer.copy_spans: true`. Copying is deterministic post-processing of the reply, so no model runs.
Prints token F1 and exact span match per run and min_overlap, and the paired bootstrap of copied
vs not copied (token F1 over the extraction items).

    .venv/bin/python bench/copy_answers.py PROJECT [PROJECT ...]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from sqlalchemy import select

from tuneloop import metrics
from tuneloop.config import load_project
from tuneloop.programs.copy import copy_answer
from tuneloop.stats import paired_bootstrap
from tuneloop.store import Chunk, open_store

OVERLAPS = (0.3, 0.5, 0.7)


def extraction_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    return [r for r in rows if not metrics.is_yes_no_reference(r["references"][0])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("projects", nargs="+", type=Path)
    args = parser.parse_args()
    print("| project | run | n | token F1 | exact match | " +
          " | ".join(f"copied ({m}) F1 / EM" for m in OVERLAPS) + " | copied (0.5) - not, 95% CI, p |")
    print("|---" * (5 + len(OVERLAPS) + 1) + "|")
    for root in args.projects:
        project = load_project(root)
        with open_store(project.store_url)() as s:
            chunks = dict(s.execute(select(Chunk.id, Chunk.text)).all())
        for run_dir in sorted((project.artifacts / "evals").iterdir()):
            if not (run_dir / "predictions.jsonl").is_file():
                continue
            rows = extraction_rows(run_dir)
            if not rows:
                continue
            raw_f1 = [metrics.token_f1(r["prediction"], r["references"]) for r in rows]
            raw_em = [metrics.exact_match(r["prediction"], r["references"]) for r in rows]
            cells, copied_f1 = [], {}
            for overlap in OVERLAPS:
                out = [copy_answer(r["prediction"], r["question"], [chunks[c] for c in r["chunk_ids"] if c in chunks],
                                   overlap) for r in rows]
                copied_f1[overlap] = [metrics.token_f1(o, r["references"]) for o, r in zip(out, rows)]
                em = [metrics.exact_match(o, r["references"]) for o, r in zip(out, rows)]
                cells.append(f"{mean(copied_f1[overlap]):.3f} / {mean(em):.3f}")
            copied, raw = np.asarray(copied_f1[0.5]), np.asarray(raw_f1)
            test = paired_bootstrap(len(rows), lambda i, c=copied: c[i].mean(), lambda i, r=raw: r[i].mean(), 2000)
            print(f"| {root.name} | {run_dir.name.split('-')[0]} | {len(rows)} | {mean(raw_f1):.3f} | "
                  f"{mean(raw_em):.3f} | " + " | ".join(cells) +
                  f" | {test.diff:+.3f} [{test.low:+.3f}, {test.high:+.3f}], p={test.p_value:.3f} |")
    print("\nCommand: .venv/bin/python bench/copy_answers.py " + " ".join(str(p) for p in args.projects))


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


if __name__ == "__main__":
    main()
