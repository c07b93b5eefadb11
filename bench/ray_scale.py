"""The same eval and the same SFT in this process and on Ray (`compute.engine: ray`) with 1 and 2
workers, on a local Ray cluster on this machine; then a scaling estimate for N nodes.

Project: CUAD dev (../shared/data/cuad-dev): all 60 contracts ingested, the answered questions of
3 contracts as seeds, 150 held-out questions of the other contracts (as bench/cuad.py). Model:
the built-in SmolLM2-135M-Instruct, greedy, no reply cache.

- eval: the base student answers the 150 held-out questions (`programs/scoring.score_examples`:
  retrieval, yes/no decided by the first-token margin, extraction answers generated), in this
  process (torch on every core), on 1 Ray actor with every core, on 2 actors with one core each.
  Results must be identical (same chunks, same seeds).
- SFT: one epoch of LoRA SFT on the seeds (`stages/sft.train_sft`), in this process, on 1 Ray Train
  worker with every core, on 2 DDP workers (gloo) with one core each (twice the global batch,
  half the steps).
- overhead: a Ray job of 2 questions vs the same in this process (actor start + model load).

The estimate: T(N) = job overhead + items x cost per item / (N x speedup); the cost per item is
the measured one of one worker on this machine, `--gpu-speedup` an assumption (no GPU was lent).

    .venv/bin/python bench/ray_scale.py [--eval-questions 150] [--json-out docs/benchmarks/ray_scale.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import cuad  # noqa: E402
from sqlalchemy import select  # noqa: E402

from tuneloop.cli import quiet_libraries  # noqa: E402
from tuneloop.config import ComputeSettings, Project  # noqa: E402
from tuneloop.evalsets import eval_examples  # noqa: E402
from tuneloop.models.registry import build_embedder  # noqa: E402
from tuneloop.programs.rag import Retriever  # noqa: E402
from tuneloop.programs.scoring import score_examples  # noqa: E402
from tuneloop.progress import RichReporter  # noqa: E402
from tuneloop.stages.ingest import ingest_paths  # noqa: E402
from tuneloop.stages.sft import train_sft  # noqa: E402
from tuneloop.store import ModelVersion, open_store  # noqa: E402
from tuneloop.versions import ensure_base_version  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CORES = os.cpu_count() or 2
ARMS = {  # name -> compute settings
    "in-process": ComputeSettings(),
    "ray, 1 worker": ComputeSettings(engine="ray", workers=1, cpus_per_worker=CORES, min_items=1),
    "ray, 2 workers": ComputeSettings(engine="ray", workers=2, cpus_per_worker=max(1, CORES // 2), min_items=1),
}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cuad-dev")
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench-runs" / "ray-scale")
    ap.add_argument("--eval-questions", type=int, default=150)
    ap.add_argument("--seed-contracts", type=int, default=3)
    ap.add_argument("--gpu-speedup", type=float, default=30.0,
                    help="assumed per-item speedup of one GPU node over one worker here (not measured)")
    ap.add_argument("--questions-per-contract", type=int, default=10, help="synth estimate: questions per contract")
    ap.add_argument("--json-out", type=Path, default=ROOT / "docs" / "benchmarks" / "ray_scale.json")
    ap.add_argument("--md-out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--report-only", action="store_true", help="rewrite the markdown from --json-out, run nothing")
    return ap.parse_args()


def arm_project(project: Project, compute: ComputeSettings) -> Project:
    """The project with `compute` and the student's reply cache off (every arm computes)."""
    s = project.settings
    models = s.models.model_copy(update={"student": s.models.student.model_copy(update={"cache": False})})
    return Project(project.root, s.model_copy(update={"models": models, "compute": compute}))


def setup(args) -> tuple[Project, Retriever]:
    _, seeds, heldout = cuad.split_questions(args.data, args.seed_contracts, args.eval_questions, 0)
    ns = argparse.Namespace(data=args.data, synth_questions=8, epochs=1.0, rlaif_prompts=8, rlaif_candidates=2)
    project = cuad.make_project(ns, args.workdir, seeds, heldout, {})
    reporter = RichReporter()
    with open_store(project.store_url)() as s:
        ingest_paths(project, s, [project.path(p) for p in project.settings.documents], build_embedder(project),
                     reporter)
        ensure_base_version(project, s)
        s.commit()
        return project, Retriever.load(project, s, build_embedder(project))


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run_eval(project: Project, retriever: Retriever, compute: ComputeSettings, limit: int | None = None):
    p = arm_project(project, compute)
    with open_store(p.store_url)() as s:
        examples = eval_examples(p, s)[:limit]
    (items, summary), seconds = timed(lambda: score_examples(p, None, examples, retriever, RichReporter(),
                                                             semantic_similarity=False))
    return [it["prediction"] for it in items], summary, seconds


def run_sft(project: Project, retriever: Retriever, compute: ComputeSettings) -> dict:
    p = arm_project(project, compute)
    with open_store(p.store_url)() as s:
        base = s.scalar(select(ModelVersion).where(ModelVersion.name == "base"))
        result, seconds = timed(lambda: train_sft(p, s, retriever, RichReporter(), parent=base))
        s.commit()
    history = json.loads((result.artifact / "log_history.json").read_text())
    losses = [h["loss"] for h in history if "loss" in h]
    return {"seconds": round(seconds, 1), "steps": len(losses), "first_loss": losses[0], "last_loss": losses[-1],
            "mean_last_3": sum(losses[-3:]) / len(losses[-3:]), "version": result.version.name}


def estimate(per_item_s: float, overhead_s: float, items: int, nodes: int, speedup: float) -> float:
    return overhead_s + items * per_item_s / (nodes * speedup)


def markdown(r: dict, command: str) -> str:
    e, t = r["eval"], r["sft"]
    lines = [
        "<!-- ray-scale:start -->",
        "## Ray: in-process vs Ray Data / Ray Train on one machine (`bench/ray_scale.py`, issue 19)",
        "",
        f"Machine: {r['machine']}; one local Ray cluster on this machine. Command: `{command}` "
        f"({r['minutes']:.1f} min, {r['date']}).",
        "",
        f"Eval: the base student on {e['n']} CUAD held-out questions (retrieval, yes/no by margin, extraction "
        "generated; greedy, no reply cache). SFT: one epoch of LoRA SFT on the "
        f"{t['in-process']['steps']}-step seed set.",
        "",
        "| arm | eval wall (s) | vs in-process | predictions identical | SFT wall (s) | vs in-process | SFT steps | "
        "last loss (mean of last 3) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm in ARMS:
        a, s = e["arms"][arm], t[arm]
        lines.append(f"| {arm} | {a['seconds']:.1f} | {a['seconds'] / e['arms']['in-process']['seconds']:.2f}x | "
                     f"{a['identical']}/{e['n']} | {s['seconds']:.1f} | "
                     f"{s['seconds'] / t['in-process']['seconds']:.2f}x | {s['steps']} | {s['mean_last_3']:.4f} |")
    o, one, two = r["overhead"], e["arms"]["ray, 1 worker"], e["arms"]["ray, 2 workers"]
    lines += [
        "",
        f"Fixed cost of one Ray job (2 questions on 1 actor vs in this process): {o['ray_s']:.1f} s vs "
        f"{o['local_s']:.1f} s, **{o['job_overhead_s']:.1f} s** of actor start and model load per step call. "
        f"2 workers vs 1 worker on these 2 cores: eval {two['seconds'] / one['seconds']:.2f}x, "
        f"SFT {t['ray, 2 workers']['seconds'] / t['ray, 1 worker']['seconds']:.2f}x the wall time.",
        "",
        "### Scaling estimate (not measured: from the costs above and stated assumptions)",
        "",
        f"Cost per item on one worker here: eval {r['per_item']['eval_s']:.3f} s/question (the 1-worker arm); "
        f"synth {r['per_item']['synth_s']:.2f} s per generated question (`bench/synth_cuad.py`: 64 in 307 s, four "
        f"model passes each). Assumptions: one worker per node; a GPU node is {r['gpu_speedup']:.0f}x one worker "
        f"here (assumed, no GPU was lent); {r['questions_per_contract']} synthetic questions per contract; the job "
        "overhead is paid once per step call; items are independent (no shared state between actors); the driver "
        "and the store are not the bottleneck.",
        "",
        "| work | CPU nodes like this one: 1 | 8 | GPU nodes: 1 | 8 |",
        "|---|---|---|---|---|",
    ]
    for row in r["estimate"]:
        lines.append(f"| {row['work']} | {row['cpu_1']} | {row['cpu_8']} | {row['gpu_1']} | {row['gpu_8']} |")
    lines.append("<!-- ray-scale:end -->")
    return "\n".join(lines)


def human(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def main() -> None:
    args = parse_args()
    if args.report_only:
        result = json.loads(args.json_out.read_text())
        cuad.update_markdown(args.md_out, markdown(result, "python bench/ray_scale.py"), tag="ray-scale")
        return
    quiet_libraries()
    t0 = time.time()
    project, retriever = setup(args)

    eval_arms, sft_arms = {}, {}
    for arm, compute in ARMS.items():
        predictions, summary, seconds = run_eval(project, retriever, compute)
        eval_arms[arm] = {"seconds": round(seconds, 1), "predictions": predictions,
                          "macro_score": summary.get("macro_score")}
        print(f"eval {arm}: {seconds:.1f} s", flush=True)
    reference = eval_arms["in-process"]["predictions"]
    for a in eval_arms.values():
        a["identical"] = sum(x == y for x, y in zip(a.pop("predictions"), reference))
    for arm, compute in ARMS.items():
        sft_arms[arm] = run_sft(project, retriever, compute)
        print(f"sft {arm}: {sft_arms[arm]}", flush=True)
    _, _, local_s = run_eval(project, retriever, ARMS["in-process"], limit=2)
    _, _, ray_s = run_eval(project, retriever, ARMS["ray, 1 worker"], limit=2)

    n = len(reference)
    per_eval = eval_arms["ray, 1 worker"]["seconds"] / n
    per_synth = 307 / 64  # bench/synth_cuad.py on this machine (docs/benchmarks.md, data engine)
    overhead = max(0.0, ray_s - local_s)
    rows = []
    for work, items, per in (("eval, 10,000 questions", 10_000, per_eval),
                             ("synth, 5,000 contracts", 5_000 * args.questions_per_contract, per_synth)):
        rows.append({"work": work, **{f"cpu_{k}": human(estimate(per, overhead, items, k, 1.0)) for k in (1, 8)},
                     **{f"gpu_{k}": human(estimate(per, overhead, items, k, args.gpu_speedup)) for k in (1, 8)}})
    result = {"eval": {"n": n, "arms": eval_arms}, "sft": sft_arms,
              "overhead": {"local_s": round(local_s, 1), "ray_s": round(ray_s, 1),
                           "job_overhead_s": round(overhead, 1)},
              "per_item": {"eval_s": per_eval, "synth_s": per_synth}, "gpu_speedup": args.gpu_speedup,
              "questions_per_contract": args.questions_per_contract, "estimate": rows, "machine": cuad.machine(),
              "minutes": (time.time() - t0) / 60, "date": time.strftime("%Y-%m-%d %H:%M")}
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(result, indent=2) + "\n")
    cuad.update_markdown(args.md_out, markdown(result, "python bench/ray_scale.py"), tag="ray-scale")
    print(json.dumps({k: v for k, v in result.items() if k != "estimate"}, indent=2))


if __name__ == "__main__":
    main()
