"""CUAD benchmark: one tuneloop cycle on real contracts, SFT -> RLAIF -> DPO, plus a DAPT arm.

Data: ../shared/data/cuad-dev (CUAD v1 slice by The Atticus Project, CC BY 4.0). All 60 contracts
are ingested. The answered questions of a few contracts play the experts' seed examples; the
held-out set is drawn, as in the baseline script, from answered questions of the *other*
contracts, so no seed contract is ever evaluated and no evaluation item is trained on.

Main arm (bench-runs/cuad): `tuneloop cycle` with the default models: ingest -> synth -> SFT (v1)
-> RLAIF on v1's own answers (the judge compares them in both orders) -> DPO (v2, reference v1)
-> eval -> gate. The cycle evaluates base and v2; the SFT version v1 is then evaluated on the same
held-out and anchor sets, so the table shows base vs SFT vs DPO.

DAPT arm (bench-runs/cuad-dapt, `--dapt-chunks N`, 0 skips it): the same project and seeds with
`continual.dapt` on (a LoRA LM pass over N sampled chunks + 20% general text before SFT) and
alignment off, so its candidate is "SFT after DAPT", comparable with the main arm's v1. The main
arm's reply cache is copied in, so its synthetic data and base-model answers are identical.

    .venv/bin/python bench/cuad.py [--data ../shared/data/cuad-dev] [--eval-questions 150]

Writes the projects, docs/benchmarks/cuad.json and the CUAD section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import yaml  # noqa: E402
from sqlalchemy import select  # noqa: E402

from tuneloop.cli import quiet_libraries  # noqa: E402
from tuneloop.config import default_settings_yaml, load_project  # noqa: E402
from tuneloop.loop import CycleContext, run_cycle  # noqa: E402
from tuneloop.models.registry import reply_cache_dir  # noqa: E402
from tuneloop.progress import RichReporter  # noqa: E402
from tuneloop.stages.anchor import evaluate_anchor  # noqa: E402
from tuneloop.stages.evaluate import evaluate_version  # noqa: E402
from tuneloop.stages.seeds import import_pairs  # noqa: E402
from tuneloop.store import CycleStep, EvalRun, ModelVersion, open_store  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ["macro_score", "yes_no_balanced_accuracy", "yes_no_accuracy", "extract_cuad_match",
           "extract_token_f1", "token_f1", "anchor_score"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cuad-dev")
    p.add_argument("--workdir", type=Path, default=ROOT / "bench-runs" / "cuad")
    p.add_argument("--seed-contracts", type=int, default=3)
    p.add_argument("--eval-questions", type=int, default=150)
    p.add_argument("--synth-questions", type=int, default=32)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--rlaif-prompts", type=int, default=32)
    p.add_argument("--rlaif-candidates", type=int, default=3)
    p.add_argument("--dapt-chunks", type=int, default=300, help="DAPT arm: chunks pre-trained on (0: no DAPT arm)")
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
                                "references": r["evidence"], "category": r["category"]}) + "\n")


def make_project(args, work: Path, seeds, heldout, overrides: dict):
    """A fresh project folder with the default settings plus `overrides`, seeds and held-out set.

    An earlier run's reply cache (base-model replies keyed by the full request) is kept: a rerun
    gets the same synthetic data and base answers without recomputing them."""
    cache = work / "cache" / "replies"
    kept = work.parent / f".{work.name}-replies"
    if cache.is_dir():
        shutil.rmtree(kept, ignore_errors=True)
        shutil.move(str(cache), kept)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    if kept.is_dir():
        (work / "cache").mkdir()
        shutil.move(str(kept), cache)
    settings = yaml.safe_load(default_settings_yaml("cuad-bench", [str((args.data / "contracts").resolve())]))
    settings["synth"]["questions_per_cycle"] = args.synth_questions
    settings["sft"]["epochs"] = args.epochs
    settings["feedback"]["rlaif_prompts"] = args.rlaif_prompts
    settings["feedback"]["rlaif_candidates"] = args.rlaif_candidates
    for section, values in overrides.items():
        settings[section].update(values)
    (work / "tuneloop.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    write_pairs(work / "seeds.jsonl", seeds)
    write_pairs(work / "heldout.jsonl", heldout)
    project = load_project(work)
    with open_store(project.store_url)() as s:
        import_pairs(s, work / "seeds.jsonl", "train")
        import_pairs(s, work / "heldout.jsonl", "eval")
        s.commit()
    return project


def evaluate_extra(project, name: str, reporter) -> None:
    """Evaluate a version the cycle did not (the SFT version under the aligned candidate)."""
    with open_store(project.store_url)() as s:
        version = s.scalar(select(ModelVersion).where(ModelVersion.name == name))
        ctx = CycleContext(project, reporter, cycle_id=1)
        evaluate_version(project, s, version, ctx.retriever(s), reporter, 1)
        evaluate_anchor(project, s, version, reporter, 1)
        s.commit()


def collect(project) -> dict:
    """Per version: method, parent, held-out metrics + anchor score; the cycle's steps."""
    with open_store(project.store_url)() as s:
        versions = {v.id: v for v in s.scalars(select(ModelVersion))}
        evals: dict[str, dict] = {}
        for r in s.scalars(select(EvalRun).order_by(EvalRun.id)):
            v = versions[r.model_version_id]
            row = evals.setdefault(v.name, {"method": v.method, "status": v.status,
                                            "parent": versions[v.parent_id].name if v.parent_id else None})
            row.update({k: x for k, x in r.metrics.items() if x == x})
        steps = {st.name: {"seconds": round((st.finished_at - st.started_at).total_seconds(), 1), **st.result}
                 for st in s.scalars(select(CycleStep).where(CycleStep.cycle_id == 1)) if st.finished_at}
    return {"evals": evals, "steps": steps}


def fmt(m: dict, c: str) -> str:
    v = m.get(c)
    return "-" if v is None or v != v else f"{v:.3f}"


def markdown(result: dict, command: str) -> str:
    main, dapt = result["main"], result.get("dapt")
    label = {"base": "base (untuned)", "sft": "SFT", "dpo": "SFT -> RLAIF -> DPO"}
    lines = ["<!-- cuad:start -->", "## CUAD dev: base vs SFT vs DPO (one cycle), and DAPT", "",
             f"Machine: {result['machine']}. Command: `{command}` ({result['minutes']:.1f} min in all).", "",
             f"Seeds: {result['n_seeds']} answered questions of {len(result['seed_contracts'])} contracts. "
             f"Held-out: {result['n_eval']} answered questions of the other contracts (random, seed "
             f"{result['seed']}). All 60 contracts ingested; retrieval restricted to the asked contract. "
             "anchor_score: the 30 everyday questions of the anchor set (general ability).", "",
             "| version | what | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    for name, m in main["evals"].items():
        lines.append(f"| {name} | {label.get(m['method'], m['method'])} | "
                     + " | ".join(fmt(m, c) for c in COLUMNS) + " |")
    if dapt:
        for name, m in dapt["evals"].items():
            if m["method"] != "base":
                lines.append(f"| {name} (DAPT arm) | DAPT ({result['dapt_chunks']} chunks) -> SFT | "
                             + " | ".join(fmt(m, c) for c in COLUMNS) + " |")
    st = main["steps"]
    lines += ["", "Main arm, cycle steps (seconds): " + ", ".join(f"{k} {v['seconds']}" for k, v in st.items()), ""]
    if "synth" in st:
        lines.append(f"Synthetic data: {st['synth'].get('kept')} of {st['synth'].get('generated')} kept; rejected "
                     f"{json.dumps(st['synth'].get('rejected', {}))}.")
    if "rlaif" in st:
        r = st["rlaif"]
        lines.append(f"RLAIF on {r.get('student')}: {r.get('prompts')} prompts; {r.get('reference_pairs', 0)} pairs "
                     f"decided by the expert's answer; {r.get('pairs_judged')} other pairs judged in both orders, "
                     f"{r.get('kept_pairs', 0) - r.get('reference_pairs', 0)} consistent "
                     f"(consistency rate {r.get('consistency_rate')}); {r.get('kept_pairs')} pairs in all.")
    if "align" in st:
        a = st["align"]
        lines.append(f"Align: {a.get('method', '')} {a.get('version', a.get('skipped', ''))}, "
                     f"loss {a.get('first_loss')} -> {a.get('last_loss')}.")
    if "gate" in st:
        lines.append(f"Gate: {st['gate'].get('reason')}.")
    if dapt:
        ds = dapt["steps"]
        lines += ["", "DAPT arm, cycle steps (seconds): " + ", ".join(f"{k} {v['seconds']}" for k, v in ds.items())]
        if "dapt" in ds:
            lines.append(f"DAPT loss {ds['dapt'].get('first_loss')} -> {ds['dapt'].get('last_loss')}.")
    lines += ["", "Data: CUAD v1 (The Atticus Project), CC BY 4.0.", "<!-- cuad:end -->"]
    return "\n".join(lines)


def update_markdown(path: Path, section: str, tag: str = "cuad") -> None:
    """Replace the `<!-- TAG:start -->...<!-- TAG:end -->` section of a markdown file (or append it)."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"<!-- {tag}:start -->.*<!-- {tag}:end -->", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text, encoding="utf-8")


def machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
            f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU only'}")


def main() -> None:
    args = parse_args()
    quiet_libraries()
    if not (args.data / "qa.jsonl").is_file():
        raise SystemExit(f"CUAD data not found at {args.data} (pass --data)")
    t0 = time.time()
    reporter = RichReporter()
    seed_contracts, seeds, heldout = split_questions(args.data, args.seed_contracts, args.eval_questions, args.seed)
    result = {"machine": machine(), "seed": args.seed, "seed_contracts": seed_contracts, "n_seeds": len(seeds),
              "n_eval": len(heldout), "dapt_chunks": args.dapt_chunks}

    # main arm: SFT -> RLAIF -> DPO in one cycle
    project = make_project(args, args.workdir, seeds, heldout, {"align": {"method": "dpo"}})
    run_cycle(project, reporter, trigger="bench/cuad.py")
    result["main"] = collect(project)
    sft = [n for n, m in result["main"]["evals"].items() if m["method"] == "sft"]
    with open_store(project.store_url)() as s:
        sft_name = s.scalar(select(ModelVersion.name).where(ModelVersion.method == "sft"))
    if sft_name and sft_name not in sft:
        evaluate_extra(project, sft_name, reporter)
        result["main"] = collect(project)
    result["minutes_main"] = (time.time() - t0) / 60
    write_outputs(args, result, t0)

    # DAPT arm: the same seeds and synthetic data, DAPT before SFT, no alignment
    if args.dapt_chunks:
        work = args.workdir.with_name(args.workdir.name + "-dapt")
        dapt_project = make_project(args, work, seeds, heldout,
                                    {"align": {"enabled": False},
                                     "continual": {"dapt": True, "dapt_max_chunks": args.dapt_chunks}})
        shutil.copytree(reply_cache_dir(project), reply_cache_dir(dapt_project),  # same synth data, base answers
                        dirs_exist_ok=True)
        run_cycle(dapt_project, reporter, trigger="bench/cuad.py --dapt-chunks")
        result["dapt"] = collect(dapt_project)
        write_outputs(args, result, t0)
    print(json.dumps({k: result[k]["evals"] for k in ("main", "dapt") if k in result}, indent=2))


def write_outputs(args, result: dict, t0: float) -> None:
    result["minutes"] = (time.time() - t0) / 60
    command = "python bench/cuad.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if k in ("seed_contracts", "eval_questions", "synth_questions", "epochs", "rlaif_prompts",
                 "rlaif_candidates", "dapt_chunks", "seed"))
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps({**result, "command": command}, indent=2, default=str))
    update_markdown(args.md_out, markdown(result, command))


if __name__ == "__main__":
    main()
