"""The data engine on CUAD dev with the default teacher: what it generates, keeps and rejects.

Same split as bench/cuad.py (the answered questions of 3 contracts are the seeds; 150 answered
questions of other contracts are the evaluation set, which the contamination filter guards).
All 60 contracts are ingested (hybrid index), then one synth run writes a dataset artifact.

    .venv/bin/python bench/synth_cuad.py [--questions 48] [--data ../shared/data/cuad-dev]

Writes bench-runs/synth-cuad/ (the project), docs/benchmarks/synth_cuad.json and the synth
section of docs/benchmarks.md (with the batched-vs-loop ratio from bench/synth_throughput.py).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from cuad import make_project, split_questions, update_markdown  # noqa: E402

from tuneloop.artifacts import read_jsonl  # noqa: E402
from tuneloop.cli import quiet_libraries  # noqa: E402
from tuneloop.config import load_project  # noqa: E402
from tuneloop.models.registry import build_embedder  # noqa: E402
from tuneloop.programs.rag import Retriever  # noqa: E402
from tuneloop.progress import RichReporter  # noqa: E402
from tuneloop.stages.ingest import ingest_paths  # noqa: E402
from tuneloop.stages.seeds import import_pairs  # noqa: E402
from tuneloop.stages.synth import build_synth_models, synthesize  # noqa: E402
from tuneloop.store import open_store  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cuad-dev")
    p.add_argument("--workdir", type=Path, default=ROOT / "bench-runs" / "synth-cuad")
    p.add_argument("--questions", type=int, default=48)
    p.add_argument("--seed-contracts", type=int, default=3)
    p.add_argument("--eval-questions", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", type=Path, default=ROOT / "docs" / "benchmarks" / "synth_cuad.json")
    p.add_argument("--md-out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    return p.parse_args()


def markdown(res: dict, command: str) -> str:
    rep = res["report"]
    lines = ["<!-- synth:start -->", "## Data engine on CUAD dev (default teacher, SmolLM2-135M)", "",
             f"Machine: {res['machine']}. Command: `{command}`.", "",
             f"Generated {rep['generated']}, kept **{rep['kept']}** in {res['synth_seconds']:.0f} s "
             f"({res['kept_per_minute']:.2f} kept / {res['generated_per_minute']:.2f} generated examples per minute; "
             f"ingest of 60 contracts took {res['ingest_seconds']:.0f} s before that).", "",
             "| rejected by | count |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rep["rejected"].items()]
    types = rep["question_types"]
    lines += ["", "| question type | generated | kept |", "|---|---|---|"]
    lines += [f"| {t} | {n} | {types['kept'].get(t, 0)} |" for t, n in types["generated"].items()]
    d = rep["diversity"]
    lines += ["", f"Diversity of kept questions: distinct-1 {d['distinct_1']}, distinct-2 {d['distinct_2']}, "
              f"embedding spread (mean pairwise cosine distance) {d['embedding_spread']}. "
              f"Citations inferred (teacher gave no [n]): {rep['citations_inferred']} of {rep['kept']}.", ""]
    if res.get("examples"):
        lines += ["Kept examples (first 5):", ""]
        lines += [f"- *{x['question_type']}* — {x['question']} → {x['answer']}" for x in res["examples"]]
        lines.append("")
    tp = res.get("throughput")
    if tp:
        lines += [f"Throughput (`{tp.get('command', 'python bench/synth_throughput.py')}`): batched generation "
                  f"{tp['batched']['examples_per_minute']:.1f} examples/min vs one-at-a-time `generate` "
                  f"{tp['plain_loop']['examples_per_minute']:.1f} examples/min: **{tp['speedup']:.2f}x** "
                  f"(SmolLM2-135M, {tp['prompts']} prompts, batch {tp['batch_size']}, greedy, "
                  f"{tp['max_new_tokens']} new tokens, identical replies {tp['identical_replies']}).", ""]
    lines.append("<!-- synth:end -->")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    quiet_libraries()
    if not (args.data / "qa.jsonl").is_file():
        raise SystemExit(f"CUAD data not found at {args.data} (pass --data)")
    seed_contracts, seeds, heldout = split_questions(args.data, args.seed_contracts, args.eval_questions, args.seed)
    args.synth_questions, args.epochs = args.questions, 1.0
    work = make_project(args, seeds, heldout)
    project = load_project(work)
    reporter = RichReporter()
    sessions = open_store(project.store_url)
    embedder = build_embedder(project)
    t0 = time.time()
    with sessions() as s:
        import_pairs(s, work / "seeds.jsonl", "train")
        import_pairs(s, work / "heldout.jsonl", "eval")
        ingest_paths(project, s, [project.path(p) for p in project.settings.documents], embedder, reporter)
        s.commit()
    t1 = time.time()
    with sessions() as s:
        retriever = Retriever.load(project, s, embedder)
        r = synthesize(project, s, build_synth_models(project, embedder), retriever, reporter)
        s.commit()
    t2 = time.time()
    rows = read_jsonl(r.artifact / "data.jsonl")
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
                      f"{'CUDA' if torch.cuda.is_available() else 'CPU only'}",
           "ingest_seconds": round(t1 - t0, 1), "synth_seconds": round(t2 - t1, 1),
           "generated_per_minute": round(r.generated / (t2 - t1) * 60, 2),
           "kept_per_minute": round(r.kept / (t2 - t1) * 60, 2), "report": r.report,
           "artifact": str(r.artifact), "kept_by_type": dict(Counter(x["question_type"] for x in rows)),
           "examples": [{k: x[k] for k in ("question_type", "question", "answer")} for x in rows[:5]]}
    tp_path = ROOT / "docs" / "benchmarks" / "synth_throughput.json"
    if tp_path.is_file():
        res["throughput"] = json.loads(tp_path.read_text())
    command = f"python bench/synth_cuad.py --questions {args.questions} --seed {args.seed}"
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps({**res, "command": command}, indent=2, default=str))
    update_markdown(args.md_out, markdown(res, command), tag="synth")
    print(json.dumps(r.report, indent=2))


if __name__ == "__main__":
    main()
