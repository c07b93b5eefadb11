"""Quality bench: automatic cycles on CUAD dev with the default models, per-cycle quality and label precision.

Data: ../shared/data/cuad-dev (CUAD v1 slice by The Atticus Project, CC BY 4.0). All 60 contracts
are ingested; the answered questions of `--seed-contracts` contracts are the experts' seeds (a
stable quarter of them goes to the dev split, where each version's yes/no threshold is chosen);
the held-out set is `--eval-questions` answered questions of the other contracts (as bench/cuad.py).

Each cycle runs `tuneloop cycle`: synth (free-form teacher questions plus seed-question transfer:
yes/no labels anchored on the experts' evidence clauses, other answers from the champion, kept
only when copied from a passage and stable across passage sets) -> SFT -> eval -> gate. The
synthetic labels are scored against the lawyers' labels (`synth.label_check`), never trained on.
Per cycle it prints and records extraction token F1, CUAD match, yes/no balanced accuracy,
retrieval hit, anchor score, synthetic examples kept and their label precision, and the paired
bootstrap of the cycle's candidate against base and against the champion before the cycle.

    .venv/bin/python bench/quality.py [--cycles 1] [--eval-questions 150] [--no-transfer] [--no-calibration]

Writes the project (bench-runs/quality), docs/benchmarks/quality.json and the quality section of
docs/benchmarks.md.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cuad  # noqa: E402
from sqlalchemy import select  # noqa: E402

from tuneloop import metrics  # noqa: E402
from tuneloop.artifacts import read_jsonl  # noqa: E402
from tuneloop.cli import quiet_libraries  # noqa: E402
from tuneloop.config import load_project  # noqa: E402
from tuneloop.evalsets import eval_examples, eval_set_hash  # noqa: E402
from tuneloop.loop import run_cycle  # noqa: E402
from tuneloop.progress import RichReporter  # noqa: E402
from tuneloop.splits import heldout_side, question_key  # noqa: E402
from tuneloop.stages.seeds import import_pairs  # noqa: E402
from tuneloop.stats import paired_bootstrap  # noqa: E402
from tuneloop.store import Cycle, CycleStep, EvalRun, ModelVersion, open_store  # noqa: E402
from tuneloop.versions import champion, promotions  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("extract_token_f1", "extract_exact_match", "extract_cuad_match", "yes_no_balanced_accuracy",
        "retrieval_hit", "anchor_score", "macro_score")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cuad-dev")
    p.add_argument("--workdir", type=Path, default=ROOT / "bench-runs" / "quality")
    p.add_argument("--cycles", type=int, default=1)
    p.add_argument("--seed-contracts", type=int, default=3)
    p.add_argument("--eval-questions", type=int, default=150)
    p.add_argument("--dev-fraction", type=float, default=0.25, help="share of the seeds sent to the dev split")
    p.add_argument("--synth-questions", type=int, default=8, help="free-form teacher questions per cycle")
    p.add_argument("--transfer-questions", type=int, default=150, help="transfer pairs answered by the labeller")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--no-transfer", action="store_true")
    p.add_argument("--no-copy", action="store_true", help="answer.copy_spans off (ablation)")
    p.add_argument("--no-retriever", action="store_true", help="retriever.fine_tune off (ablation)")
    p.add_argument("--evidence-spans", action="store_true", help="synth.transfer.evidence_spans on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report-only", action="store_true", help="rewrite the markdown section from the JSON file")
    p.add_argument("--json-out", type=Path, default=ROOT / "docs" / "benchmarks" / "quality.json")
    p.add_argument("--md-out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    return p.parse_args()


def write_labels(path: Path, data: Path) -> None:
    """The lawyers' labels in the seed format, for `synth.label_check` (read, never imported)."""
    with path.open("w", encoding="utf-8") as f:
        for line in (data / "qa.jsonl").open(encoding="utf-8"):
            r = json.loads(line)
            if r["answer"].strip():
                f.write(json.dumps({"question": r["question"], "answer": r["answer"], "source": r["contract"],
                                    "references": r["evidence"]}) + "\n")


def build(args) -> object:
    _, seeds, heldout = cuad.split_questions(args.data, args.seed_contracts, args.eval_questions, args.seed)
    dev = [r for r in seeds
           if heldout_side(question_key(r["question"], r["contract"]), 0.0, args.dev_fraction) == "dev"]
    train = [r for r in seeds if r not in dev]
    settings_args = argparse.Namespace(data=args.data, synth_questions=args.synth_questions, epochs=args.epochs,
                                       rlaif_prompts=8, rlaif_candidates=2)
    overrides = {"align": {"enabled": False},
                 "synth": {"transfer": {"enabled": not args.no_transfer, "max_questions": args.transfer_questions,
                                        "evidence_spans": args.evidence_spans},
                           "label_check": "labels.jsonl"},
                 "answer": {"copy_spans": not args.no_copy}, "retriever": {"fine_tune": not args.no_retriever}}
    project = cuad.make_project(settings_args, args.workdir, train, heldout, overrides)
    write_labels(project.root / "labels.jsonl", args.data)
    cuad.write_pairs(project.root / "dev.jsonl", dev)
    with open_store(project.store_url)() as s:
        import_pairs(s, project.root / "dev.jsonl", "dev")
        s.commit()
    return project, {"seeds_train": len(train), "seeds_dev": len(dev), "eval": len(heldout)}


def scored_items(run: EvalRun) -> dict[int, dict]:
    items = read_jsonl(Path(run.artifact_path) / "predictions.jsonl")
    return {it["example_id"]: sc for it, sc in zip(items, metrics.score_items(items))}


def compare(a: dict[int, dict], b: dict[int, dict], primary: str) -> dict:
    common = sorted(set(a) & set(b))
    ra, rb = [a[i] for i in common], [b[i] for i in common]

    def m(rows):
        return lambda idx: metrics.summarize([rows[i] for i in idx]).get(primary, float("nan"))

    t = paired_bootstrap(len(common), m(ra), m(rb))
    return {"n": len(common), "diff": t.diff, "low": t.low, "high": t.high, "p_value": t.p_value}


def cycle_row(project, cycle_id: int, champion_before: str) -> dict:
    primary = project.settings.eval.primary_metric
    with open_store(project.store_url)() as s:
        versions = {v.id: v for v in s.scalars(select(ModelVersion))}
        held = eval_set_hash(eval_examples(project, s))
        runs = {versions[r.model_version_id].name: r for r in s.scalars(select(EvalRun).where(
            EvalRun.eval_set_hash == held))}
        anchors = {versions[r.model_version_id].name: r.metrics.get("anchor_score")
                   for r in s.scalars(select(EvalRun)) if r.eval_set_hash.startswith("anchor-")}
        steps = {st.name: {"seconds": round((st.finished_at - st.started_at).total_seconds(), 1), **st.result}
                 for st in s.scalars(select(CycleStep).where(CycleStep.cycle_id == cycle_id)) if st.finished_at}
        cycle = s.get(Cycle, cycle_id)
        n_promotions = len(promotions(s))
    synth_report = json.loads((Path(steps["synth"]["artifact"]) / "report.json").read_text()) \
        if "synth" in steps and steps["synth"].get("artifact") else {}
    quality = synth_report.get("label_quality", {})
    gate = steps.get("gate", {})
    candidate = gate.get("candidate")
    row = {"cycle": cycle_id, "candidate": candidate, "champion_before": champion_before,
           "promoted": gate.get("promoted"), "outcome": cycle.outcome if cycle else None, "steps": steps,
           "synthetic_kept": synth_report.get("kept"), "transfer": synth_report.get("transfer"),
           "label_quality": quality, "promotions": n_promotions}
    yes_no_checked = sum(q.get("yes_no_checked", 0) for q in quality.values())
    correct = sum((q.get("yes_no_label_precision") or 0) * q.get("yes_no_checked", 0) for q in quality.values())
    row["synthetic_yes_no_label_precision"] = correct / yes_no_checked if yes_no_checked else None
    if candidate in runs:
        row.update({k: runs[candidate].metrics.get(k) for k in KEYS if k != "anchor_score"})
        row["retrieval_hit_at_k"] = row["retrieval_hit"]  # the issue's key: hit within the top_k passages served
        row["anchor_score"] = anchors.get(candidate)
        row["yes_no_threshold"] = runs[candidate].metrics.get("yes_no_threshold")
        scored = {n: scored_items(r) for n, r in runs.items()}
        row["vs_base"] = compare(scored[candidate], scored["base"], primary)
        if champion_before in scored and champion_before != "base":
            row["vs_champion_before"] = compare(scored[candidate], scored[champion_before], primary)
    row["base"] = {k: runs["base"].metrics.get(k) for k in KEYS if "base" in runs and k != "anchor_score"}
    row["base"]["anchor_score"] = anchors.get("base")
    return row


def champion_name(project) -> str:
    with open_store(project.store_url)() as s:
        c = champion(s)
        return c.name if c else "base"


def fmt(v) -> str:
    return "-" if v is None or v != v else f"{v:.3f}" if isinstance(v, float) else str(v)


def markdown(result: dict) -> str:
    """The quality section of docs/benchmarks.md: base and each cycle's candidate, with the paired tests."""
    cols = ["extract_token_f1", "extract_exact_match", "extract_cuad_match", "yes_no_balanced_accuracy",
            "retrieval_hit", "anchor_score", "macro_score"]
    lines = ["<!-- quality:start -->",
             "## Quality on CUAD dev: calibrated yes/no, seed-question transfer, copied answers, a learnt retriever "
             "(`bench/quality.py`)",
             "", f"Machine: {result['machine']}. Command: `{result['command']}` ({result['minutes']:.1f} min).", "",
             f"Seeds: {result['seeds_train']} answered questions of 3 contracts (+ {result['seeds_dev']} in the dev "
             f"split, where each version's yes/no threshold is chosen); held-out: {result['eval']} answered questions "
             "of the other contracts; all 60 contracts ingested.", "",
             "| version | " + " | ".join(cols) + " | synthetic kept | synthetic yes/no label precision | "
             "vs base (paired, 95% CI, p) | promoted |", "|---" * (len(cols) + 5) + "|"]
    if result["cycles"]:
        base = result["cycles"][0]["base"]
        lines.append("| base | " + " | ".join(fmt(base.get(c)) for c in cols) + " | - | - | - | - |")
    for c in result["cycles"]:
        vs = c.get("vs_base") or {}
        test = f"{vs['diff']:+.3f} [{vs['low']:+.3f}, {vs['high']:+.3f}], p={vs['p_value']:.3f}" if vs else "-"
        lines.append(f"| cycle {c['cycle']}: {c['candidate']} | " + " | ".join(fmt(c.get(k)) for k in cols)
                     + f" | {fmt(c.get('synthetic_kept'))} | {fmt(c.get('synthetic_yes_no_label_precision'))} | "
                     f"{test} | {fmt(c.get('promoted'))} |")
    for c in result["cycles"]:
        lines += ["", f"Cycle {c['cycle']} synthetic label quality (against the lawyers' labels, never trained on):",
                  "", "| strategy | checked | yes/no label precision | Yes precision | No precision | gold Yes share "
                  "| extraction token F1 |", "|---|---|---|---|---|---|---|"]
        for name, q in c.get("label_quality", {}).items():
            lines.append(f"| {name} | {q['checked']} | {fmt(q['yes_no_label_precision'])} | {fmt(q['yes_precision'])} "
                         f"| {fmt(q['no_precision'])} | {fmt(q['gold_yes_share'])} | {fmt(q['extraction_token_f1'])} |")
        r = c["steps"].get("retriever") or {}
        lines += ["", "Retriever step: " + (f"skipped ({r['skipped']})" if r.get("skipped") else
                  f"{r.get('pairs')} (question, evidence chunk) pairs from {r.get('examples')} training examples, "
                  f"loss {fmt(r.get('loss_before'))} -> {fmt(r.get('loss_after'))} in {r.get('steps')} steps, "
                  f"{r.get('seconds')} s with re-embedding every chunk; the candidate's retrieval_hit above "
                  "is with its own index, base's with the project's") + (
                  f". Fusion weight chosen on {r['dev_items']} dev questions: {r['dense_weight']} (dev hit by weight "
                  f"{json.dumps(r['dev_hit'])})" if r.get("dense_weight") is not None else
                  f". Fusion weight kept: {r['fusion_kept']}" if r.get("fusion_kept") else "")]
        t = c.get("transfer") or {}
        lines += ["", f"Transfer: asked {t.get('asked')}, kept {t.get('kept')} ({t.get('kept_yes')} Yes, "
                  f"{t.get('kept_no')} No, {t.get('kept_evidence_spans') or 0} evidence sentences); "
                  f"rejected {json.dumps(t.get('rejected'))}. Steps (s): "
                  + ", ".join(f"{k} {v['seconds']}" for k, v in c["steps"].items())]
    lines += ["", "Data: CUAD v1 (The Atticus Project), CC BY 4.0.", "<!-- quality:end -->"]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.report_only:
        cuad.update_markdown(args.md_out, markdown(json.loads(args.json_out.read_text())), tag="quality")
        return
    quiet_libraries()
    t0 = time.time()
    project, sizes = build(args)
    result = {"machine": cuad.machine(), "args": {k: str(v) for k, v in vars(args).items()}, **sizes, "cycles": []}
    for _ in range(args.cycles):
        before = champion_name(project)
        cycle = run_cycle(project, RichReporter(), trigger="bench/quality.py")
        result["cycles"].append(cycle_row(load_project(project.root), cycle.id, before))
        result["minutes"] = (time.time() - t0) / 60
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        result["command"] = "python bench/quality.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
            if k in ("cycles", "seed_contracts", "eval_questions", "dev_fraction", "synth_questions",
                     "transfer_questions", "epochs", "seed")) + "".join(
            f" --{flag}" for flag in ("no-transfer", "no-copy", "no-retriever", "evidence-spans")
            if getattr(args, flag.replace("-", "_")))
        args.json_out.write_text(json.dumps(result, indent=2, default=str))
        cuad.update_markdown(args.md_out, markdown(result), tag="quality")
        print(json.dumps({k: v for k, v in result["cycles"][-1].items() if k not in ("steps",)}, indent=2,
                         default=str))


if __name__ == "__main__":
    main()
