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
import resource
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import yaml  # noqa: E402
from sqlalchemy import select  # noqa: E402

from tuneloop import metrics  # noqa: E402
from tuneloop.artifacts import read_jsonl  # noqa: E402
from tuneloop.cli import quiet_libraries  # noqa: E402
from tuneloop.config import load_project  # noqa: E402
from tuneloop.evalsets import eval_examples, eval_set_hash  # noqa: E402
from tuneloop.loop import CycleContext, run_cycle  # noqa: E402
from tuneloop.models.registry import reply_cache_dir  # noqa: E402
from tuneloop.progress import RichReporter  # noqa: E402
from tuneloop.settings_template import default_settings_yaml  # noqa: E402
from tuneloop.stages.anchor import evaluate_anchor  # noqa: E402
from tuneloop.stages.eval import evaluate_version  # noqa: E402
from tuneloop.stages.seeds import import_pairs  # noqa: E402
from tuneloop.stats import bootstrap_ci, paired_bootstrap  # noqa: E402
from tuneloop.steps import step_result  # noqa: E402
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
    p.add_argument("--report-only", action="store_true",
                   help="recompute intervals and comparisons from the existing projects and rewrite the outputs")
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
    return write_project(work, settings, seeds, heldout)


def write_project(work: Path, settings: dict, seeds: list[dict], heldout: list[dict]):
    """Write `settings` as the project's tuneloop.yaml and import `seeds` (train) and `heldout` (eval)."""
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


def _heldout_runs(project) -> dict[str, EvalRun]:
    with open_store(project.store_url)() as s:
        versions = {v.id: v.name for v in s.scalars(select(ModelVersion))}
        held = eval_set_hash(eval_examples(project, s))
        runs = s.scalars(select(EvalRun).where(EvalRun.eval_set_hash == held))
        return {versions[r.model_version_id]: r for r in runs}


def _scored(run: EvalRun) -> dict[str, dict]:
    items = read_jsonl(Path(run.artifact_path) / "predictions.jsonl")
    # both arms import the same seeds and held-out file in the same order, so example ids match
    return {f"{it['example_id']}\x00{it['question']}": sc for it, sc in zip(items, metrics.score_items(items))}


def analyse(project, primary: str, dapt_project=None) -> dict:
    """95% bootstrap intervals per version, and paired bootstrap tests between the arms' versions
    (matched by example id and question, so the DAPT arm's project can be compared with the main one)."""
    runs = {("main", n): r for n, r in _heldout_runs(project).items()}
    if dapt_project is not None:
        runs.update({("dapt", n): r for n, r in _heldout_runs(dapt_project).items() if n != "base"})
    scored = {k: _scored(r) for k, r in runs.items()}

    def metric(rows):
        return lambda idx: metrics.summarize([rows[i] for i in idx]).get(primary, float("nan"))

    out = {"intervals": {}, "comparisons": []}
    for (arm, name), sc in scored.items():
        rows = list(sc.values())
        ci = bootstrap_ci(len(rows), metric(rows))
        out["intervals"][f"{arm}:{name}"] = [ci.low, ci.high]
    methods = {}
    for arm, name in runs:
        with open_store((dapt_project if arm == "dapt" else project).store_url)() as s:
            methods[(arm, name)] = s.scalar(select(ModelVersion.method).where(ModelVersion.name == name))
    keys = {("main", m): k for k in runs if k[0] == "main" for m in [methods[k]]}
    dapt_sft = next((k for k in runs if k[0] == "dapt" and methods[k] == "sft"), None)
    pairs = [(keys.get(("main", "sft")), keys.get(("main", "base")), "SFT vs base"),
             (keys.get(("main", "dpo")), keys.get(("main", "sft")), "DPO vs SFT"),
             (dapt_sft, keys.get(("main", "sft")), "DAPT -> SFT vs SFT")]
    for a, b, label in pairs:
        if a is None or b is None:
            continue
        common = sorted(set(scored[a]) & set(scored[b]))
        rows_a, rows_b = [scored[a][q] for q in common], [scored[b][q] for q in common]
        test = paired_bootstrap(len(common), metric(rows_a), metric(rows_b))
        out["comparisons"].append({"what": label, "n": len(common), "diff": test.diff, "low": test.low,
                                   "high": test.high, "p_value": test.p_value})
    return out


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
             "anchor_score: the everyday questions of the anchor set (general ability).", "",
             "| version | what | " + COLUMNS[0] + " (95% CI) | " + " | ".join(COLUMNS[1:]) + " |",
             "|---" * (len(COLUMNS) + 2) + "|"]
    intervals = result.get("analysis", {}).get("intervals", {})

    def row(arm: str, name: str, m: dict, what: str) -> str:
        lo, hi = intervals.get(f"{arm}:{name}", (None, None))
        ci = f" [{lo:.3f}, {hi:.3f}]" if lo is not None else ""
        return (f"| {name}{' (DAPT arm)' if arm == 'dapt' else ''} | {what} | {fmt(m, COLUMNS[0])}{ci} | "
                + " | ".join(fmt(m, c) for c in COLUMNS[1:]) + " |")

    for name, m in main["evals"].items():
        lines.append(row("main", name, m, label.get(m["method"], m["method"])))
    if dapt:
        for name, m in dapt["evals"].items():
            if m["method"] != "base":
                lines.append(row("dapt", name, m, f"DAPT ({result['dapt_chunks']} chunks) -> SFT"))
    comps = result.get("analysis", {}).get("comparisons", [])
    if comps:
        lines += ["", "Paired bootstrap over the same held-out questions (1000 resamples; p: one-sided, the "
                  "first version not better):", "", "| comparison | gain | 95% CI | p |", "|---|---|---|---|"]
        lines += [f"| {c['what']} | {c['diff']:+.3f} | [{c['low']:+.3f}, {c['high']:+.3f}] | {c['p_value']:.3f} |"
                  for c in comps]
    st = main["steps"]
    lines += ["", "Main arm, cycle steps (seconds): " + ", ".join(f"{k} {v['seconds']}" for k, v in st.items()), ""]
    if "synth" in st:  # the steps' stored results (plus "seconds"), read as typed results
        sy = step_result("synth", st["synth"])
        lines.append(f"Synthetic data: {sy.kept} of {sy.generated} kept; rejected {json.dumps(sy.rejected or {})}.")
    if "rlaif" in st:
        r = step_result("rlaif", st["rlaif"])
        reference = r.reference_pairs or 0
        lines.append(f"RLAIF on {r.student}: {r.prompts} prompts; {reference} pairs "
                     f"decided by the expert's answer; {r.pairs_judged} other pairs judged in both orders, "
                     f"{(r.kept_pairs or 0) - reference} consistent "
                     f"(consistency rate {r.consistency_rate}); {r.kept_pairs} pairs in all.")
    if "align" in st:
        a = step_result("align", st["align"])
        lines.append(f"Align: {a.method or ''} {a.version or a.skipped or ''}, loss {a.first_loss} -> {a.last_loss}.")
    if "gate" in st:
        lines.append(f"Gate: {step_result('gate', st['gate']).reason}.")
    if dapt:
        ds = dapt["steps"]
        lines += ["", "DAPT arm, cycle steps (seconds): " + ", ".join(f"{k} {v['seconds']}" for k, v in ds.items())]
        if "dapt" in ds:
            dp = step_result("dapt", ds["dapt"])
            lines.append(f"DAPT loss {dp.first_loss} -> {dp.last_loss}.")
    lines += ["", "Data: CUAD v1 (The Atticus Project), CC BY 4.0.", "<!-- cuad:end -->"]
    return "\n".join(lines)


def update_markdown(path: Path, section: str, tag: str = "cuad") -> None:
    """Replace the `<!-- TAG:start -->...<!-- TAG:end -->` section of a markdown file (or append it)."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"<!-- {tag}:start -->.*<!-- {tag}:end -->", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text, encoding="utf-8")


def merge_json(path: Path, result: dict) -> None:
    """Write `result`'s keys into the JSON file at `path`, keeping its other keys (one file, many benches)."""
    old = json.loads(path.read_text()) if path.exists() else {}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**old, **result}, indent=2) + "\n")


def peak_rss_mib(pid: int | None = None) -> int | None:
    """Peak resident memory of this process (or of process `pid`, still running), MiB; None where
    /proc is not there to read another process's."""
    if pid is None:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    return next((int(line.split()[1]) // 1024 for line in status.splitlines() if line.startswith("VmHWM:")), None)


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

    if args.report_only:
        project = load_project(args.workdir)
        work = args.workdir.with_name(args.workdir.name + "-dapt")
        dapt_project = load_project(work) if (work / "tuneloop.yaml").is_file() else None
        old = json.loads(args.json_out.read_text()) if args.json_out.is_file() else {}
        result.update({k: old[k] for k in ("minutes_main",) if k in old})
        result["main"] = collect(project)
        if dapt_project is not None:
            result["dapt"] = collect(dapt_project)
        result["analysis"] = analyse(project, project.settings.eval.primary_metric, dapt_project)
        write_outputs(args, result, time.time() - 60 * old.get("minutes", 0))
        print(json.dumps(result["analysis"], indent=2))
        return

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
    result["analysis"] = analyse(project, project.settings.eval.primary_metric,
                                 dapt_project if args.dapt_chunks else None)
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
