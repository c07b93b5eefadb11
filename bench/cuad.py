"""CUAD benchmark: one tuneloop cycle on real contracts, base model vs cycle-1 candidate.

Data: ../shared/data/cuad-dev (CUAD v1 slice by The Atticus Project, CC BY 4.0). All 60 contracts
are ingested. The answered questions of a few contracts play the experts' seed examples; the
held-out set is drawn, as in the baseline script, from answered questions of the *other*
contracts, so no seed contract is ever evaluated and no evaluation item is trained on.

    .venv/bin/python bench/cuad.py [--data ../shared/data/cuad-dev] [--eval-questions 150]

Writes bench-runs/cuad/ (the project), docs/benchmarks/cuad.json and the CUAD section of
docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import yaml  # noqa: E402
from sqlalchemy import select  # noqa: E402

from tuneloop.cli import quiet_libraries  # noqa: E402
from tuneloop.config import default_settings_yaml, load_project  # noqa: E402
from tuneloop.loop import run_cycle  # noqa: E402
from tuneloop.progress import RichReporter  # noqa: E402
from tuneloop.stages.seeds import import_pairs  # noqa: E402
from tuneloop.store import CycleStep, EvalRun, ModelVersion, open_store  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ["macro_score", "yes_no_balanced_accuracy", "yes_no_accuracy", "extract_cuad_match",
           "extract_token_f1", "token_f1", "exact_match", "rouge_l"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cuad-dev")
    p.add_argument("--workdir", type=Path, default=ROOT / "bench-runs" / "cuad")
    p.add_argument("--seed-contracts", type=int, default=3)
    p.add_argument("--eval-questions", type=int, default=150)
    p.add_argument("--synth-questions", type=int, default=32)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", type=Path, default=ROOT / "docs" / "benchmarks" / "cuad.json")
    p.add_argument("--md-out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    return p.parse_args()


def split_questions(data: Path, n_seed_contracts: int, n_eval: int, seed: int):
    rows = [json.loads(line) for line in (data / "qa.jsonl").open(encoding="utf-8")]
    answered = [r for r in rows if r["answer"].strip()]
    contracts = sorted({r["contract"] for r in rows})
    seed_contracts = set(random.Random(seed).sample(contracts, n_seed_contracts))
    seeds = [r for r in answered if r["contract"] in seed_contracts]
    pool = [r for r in answered if r["contract"] not in seed_contracts]
    random.Random(seed).shuffle(pool)
    return sorted(seed_contracts), seeds, pool[:n_eval]


def write_pairs(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({"question": r["question"], "answer": r["answer"], "source": r["contract"],
                                "references": r["evidence"]}) + "\n")


def make_project(args, seeds, heldout) -> Path:
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    settings = yaml.safe_load(default_settings_yaml("cuad-bench", [str((args.data / "contracts").resolve())]))
    settings["synth"]["questions_per_cycle"] = args.synth_questions
    settings["sft"]["epochs"] = args.epochs
    (work / "tuneloop.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    write_pairs(work / "seeds.jsonl", seeds)
    write_pairs(work / "heldout.jsonl", heldout)
    return work


def collect(project) -> dict:
    sessions = open_store(project.store_url)
    with sessions() as s:
        versions = {v.id: v for v in s.scalars(select(ModelVersion))}
        evals = {versions[r.model_version_id].name: r.metrics for r in s.scalars(select(EvalRun))}
        steps = {st.name: {"seconds": round((st.finished_at - st.started_at).total_seconds(), 1), **st.result}
                 for st in s.scalars(select(CycleStep).where(CycleStep.cycle_id == 1)) if st.finished_at}
    return {"evals": evals, "steps": steps}


def markdown(result: dict, command: str) -> str:
    lines = ["<!-- cuad:start -->", "## CUAD dev: base model vs cycle-1 candidate", "",
             f"Machine: {result['machine']}. Command: `{command}` ({result['minutes']:.1f} min in all).", "",
             f"Seeds: {result['n_seeds']} answered questions of {len(result['seed_contracts'])} contracts. "
             f"Held-out: {result['n_eval']} answered questions of the other contracts (random, seed "
             f"{result['seed']}). All 60 contracts ingested; retrieval restricted to the asked contract.", "",
             "| version | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, m in result["evals"].items():
        cells = ["-" if m.get(c) is None or m.get(c) != m.get(c) else f"{m[c]:.3f}" for c in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Cycle steps (seconds): " + ", ".join(f"{k} {v['seconds']}" for k, v in result["steps"].items()),
              "", f"Synthetic data: {json.dumps(result['steps'].get('synth', {}).get('rejected', {}))} rejected, "
              f"{result['steps'].get('synth', {}).get('kept')} kept. Gate: {result['steps'].get('gate', {}).get('reason')}",
              "", "Data: CUAD v1 (The Atticus Project), CC BY 4.0.", "<!-- cuad:end -->"]
    return "\n".join(lines)


def update_markdown(path: Path, section: str, tag: str = "cuad") -> None:
    """Replace the `<!-- TAG:start -->...<!-- TAG:end -->` section of a markdown file (or append it)."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"<!-- {tag}:start -->.*<!-- {tag}:end -->", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text, encoding="utf-8")


def main() -> None:
    args = parse_args()
    quiet_libraries()
    if not (args.data / "qa.jsonl").is_file():
        raise SystemExit(f"CUAD data not found at {args.data} (pass --data)")
    t0 = time.time()
    seed_contracts, seeds, heldout = split_questions(args.data, args.seed_contracts, args.eval_questions, args.seed)
    work = make_project(args, seeds, heldout)
    project = load_project(work)
    with open_store(project.store_url)() as s:
        import_pairs(s, work / "seeds.jsonl", "train")
        import_pairs(s, work / "heldout.jsonl", "eval")
        s.commit()
    run_cycle(project, RichReporter(), trigger="bench/cuad.py")
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
                         f"{'CUDA' if torch.cuda.is_available() else 'CPU only'}",
              "seed": args.seed, "seed_contracts": seed_contracts, "n_seeds": len(seeds), "n_eval": len(heldout),
              "minutes": (time.time() - t0) / 60, **collect(project)}
    command = "python bench/cuad.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if k in ("seed_contracts", "eval_questions", "synth_questions", "epochs", "seed"))
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps({**result, "command": command}, indent=2, default=str))
    update_markdown(args.md_out, markdown(result, command))
    print(json.dumps(result["evals"], indent=2))


if __name__ == "__main__":
    main()
