"""The expert review queue vs random picks, in the continuous scenario on CUAD dev.

Data: ../shared/data/cuad-dev (CUAD v1 slice by The Atticus Project, CC BY 4.0).

1. The continuous scenario's world (bench/continuous.py): cycle 1 trains the base model on the
   experts' seeds (old contracts, old question categories); the licence-like contracts arrive and
   are ingested; simulated users ask old-category questions of old contracts and licence questions
   of the new ones through the serving app (no votes: nobody has answered them yet).
2. `tuneloop review build`'s queue is rebuilt with the champion over a pool of `--pool` candidates:
   the users' questions and the seed questions asked of other contracts (`review.sources`).
3. Three arms, each a copy of the project: simulated experts (the lawyers' labels) review
   `--labels` items: the queue's first ones (arm "queue"), or as many drawn at random from the
   same scored pool (arm "random", seeded); arm "none" gets no label (the baseline the labels'
   gain is measured from: cycle 2 also trains on what every arm has, the seeds when the champion
   has not trained on them). An expert confirms the model's answer when the CUAD
   match rule holds against the lawyers' answer, else corrects it to the lawyers' answer ("The
   document does not say." where the lawyers found no such clause). Every label goes to the
   training split (`feedback.heldout_fraction: 0`), so both arms are measured on the same
   questions.
4. Each arm runs cycle 2 (SFT from the champion on what is new: the labels, plus a replay share;
   the continuous scenario's update recipe; one synthetic question, alignment and WiSE-FT off, so
   the labels are the only difference between the arms), then each arm's candidate and the
   champion answer the old held-out set and the licence probe set (questions no user asked and no
   expert labelled). Reported, by paired bootstrap over the same questions: each candidate against
   the champion, the labelled arms against arm "none" (the gain of the labels, and per label), and
   the queue arm against the random arm.

    .venv/bin/python bench/review_queue.py [--labels 40] [--pool 200]

Writes bench-runs/review-queue (the projects), docs/benchmarks/review_queue.json and the
`review-queue` section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import yaml  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from sqlalchemy import select, update  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from continuous import (  # noqa: E402
    ROOT,
    add_scenario_arguments,
    champion_name,
    cycle_summary,
    link_documents,
    make_project,
    paired,
    plan,
    probe_scores,
    refs,
    stored_items,
    summary_with_ci,
)
from cuad import machine, update_markdown  # noqa: E402

from tuneloop import metrics  # noqa: E402
from tuneloop.cli import quiet_libraries  # noqa: E402
from tuneloop.config import load_project  # noqa: E402
from tuneloop.evalsets import eval_examples, eval_set_hash  # noqa: E402
from tuneloop.loop import CycleContext, run_cycle  # noqa: E402
from tuneloop.progress import RichReporter  # noqa: E402
from tuneloop.review.queue import record  # noqa: E402
from tuneloop.serve import create_app  # noqa: E402
from tuneloop.stages.ingest import ingest_paths  # noqa: E402
from tuneloop.stages.review import build_queue  # noqa: E402
from tuneloop.store import ReviewItem, open_store  # noqa: E402

NOT_SAID = "The document does not say."


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=ROOT / "bench-runs" / "review-queue")
    add_scenario_arguments(p)
    # the scenario's users do not vote here; cycle 2 learns from the experts' labels alone, all trained on
    p.set_defaults(synth_questions=1, phase3=0, heldout_fraction=0.0, dev_fraction=0.0, wise_ft=False)
    p.add_argument("--labels", type=int, default=40, help="items the simulated experts answer per arm")
    p.add_argument("--pool", type=int, default=200, help="review.pool: candidates scored")
    p.add_argument("--samples", type=int, default=3, help="review.samples")
    p.add_argument("--json-out", type=Path, default=ROOT / "docs" / "benchmarks" / "review_queue.json")
    p.add_argument("--md-out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--markdown-only", action="store_true", help="rewrite the markdown section from --json-out")
    return p.parse_args()


def edit_settings(root: Path, **sections: dict) -> None:
    path = root / "tuneloop.yaml"
    settings = yaml.safe_load(path.read_text(encoding="utf-8"))
    for name, values in sections.items():
        settings.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(settings, sort_keys=False), encoding="utf-8")


def ask(project, rows: list[dict], reporter) -> dict:
    """Users ask `rows` through the serving app; nobody votes (the questions stay unanswered)."""
    t0, good = time.time(), 0
    with TestClient(create_app(project, auth=False)) as client:
        for i, r in enumerate(rows):
            reply = client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": r["question"]}], "document": r["contract"]})
            reply.raise_for_status()
            answer = reply.json()["choices"][0]["message"]["content"]
            good += metrics.score_item(answer, refs(r))["cuad_match"] >= 1.0
            if (i + 1) % 20 == 0:
                reporter.log(f"users: {i + 1}/{len(rows)} asked")
    return {"asked": len(rows), "right": good, "seconds": round(time.time() - t0, 1)}


def expert(labels: dict[tuple[str, str], dict], item: ReviewItem) -> tuple[str, str | None, bool]:
    """(verdict, corrected answer, model right) of a simulated expert with the lawyers' labels."""
    row = labels[(item.question, item.document)]
    truth = row["answer"].strip()
    if truth:
        right = metrics.score_item(item.answer, refs(row))["cuad_match"] >= 1.0
        return ("confirm", None, True) if right else ("correct", truth, False)
    right = metrics.score_item(item.answer, [NOT_SAID])["cuad_match"] >= 1.0 or "not say" in item.answer.lower()
    return ("confirm", None, True) if right else ("correct", NOT_SAID, False)


def label_arm(root: Path, labels: dict, chosen_ids: list[int]) -> dict:
    """Open exactly `chosen_ids` and let the simulated experts review them."""
    project = load_project(root)
    counts = {"confirm": 0, "correct": 0, "yes_no": 0, "interaction": 0, "transfer": 0, "model_right": 0}
    with open_store(project.store_url)() as s:
        s.execute(update(ReviewItem).values(status="expired"))
        s.execute(update(ReviewItem).where(ReviewItem.id.in_(chosen_ids)).values(status="open"))
        for item in s.scalars(select(ReviewItem).where(ReviewItem.id.in_(chosen_ids))):
            verdict, answer, right = expert(labels, item)
            record(s, project.settings.feedback, item, verdict, "lawyers", answer)
            counts[verdict] += 1
            counts["model_right"] += right
            counts["yes_no"] += item.question_type == "yes_no"
            counts[item.source] += 1
        s.commit()
    return counts


def main() -> None:
    args = parse_args()
    if args.markdown_only:
        result = json.loads(args.json_out.read_text(encoding="utf-8"))
        update_markdown(args.md_out, markdown(result), "review-queue")
        return
    quiet_libraries()
    t0 = time.time()
    reporter = RichReporter()
    p = plan(args)
    all_rows = [json.loads(line) for line in (args.data / "qa.jsonl").open(encoding="utf-8")]
    labels = {(r["question"], r["contract"]): r for r in all_rows}
    timeline: list[dict] = []

    def mark(what: str, **info) -> None:
        timeline.append({"minute": round((time.time() - t0) / 60, 1), "event": what, **info})
        reporter.log(f"[bold]{what}[/bold] {info if info else ''}")

    base = args.workdir / "base"
    args_base = argparse.Namespace(**{**vars(args), "workdir": base})
    project = make_project(args_base, p)
    edit_settings(base, review={"enabled": False}, retriever={"fine_tune": False},
                  synth={"transfer": {"enabled": False}}, align={"enabled": False})
    project = load_project(base)
    mark("cycle 1: SFT on the seeds")
    run_cycle(project, reporter)
    champ = champion_name(project)
    mark("cycle 1 done", champion=champ, summary=cycle_summary(project, 1)["steps"].get("gate"))

    link_documents(base / "documents", args.data, p["new_docs"])
    with open_store(project.store_url)() as s:
        ingest_paths(project, s, [base / "documents"], CycleContext(project, reporter, 0).embedder(), reporter)
        s.commit()
    asked = ask(project, p["phase1"] + p["phase2"], reporter)
    mark("users asked (no votes)", **asked)

    edit_settings(base, review={"enabled": True, "pool": args.pool, "per_cycle": args.labels,
                                "samples": args.samples},
                  sft={"epochs": args.update_epochs, "learning_rate": args.update_learning_rate})
    project = load_project(base)
    with open_store(project.store_url)() as s:
        ctx = CycleContext(project, reporter, 0)
        built = build_queue(project, s, lambda v: ctx.version_retriever(s, v), reporter)
        s.commit()
        items = list(s.scalars(select(ReviewItem).where(ReviewItem.queue == built.queue).order_by(ReviewItem.rank)))
    mark("review queue built", candidates=built.candidates, by_source=built.by_source,
         mean_informativeness=built.mean_informativeness, unsure_share=built.unsure_share)
    unlabelled = [it for it in items if (it.question, it.document) not in labels]
    if unlabelled:
        raise SystemExit(f"{len(unlabelled)} queue items without a CUAD label, e.g. {unlabelled[0].question!r}")
    picks = {"none": [], "queue": [it.id for it in items[: args.labels]],
             "random": [it.id for it in random.Random(args.seed).sample(items, args.labels)]}
    pool_stats = {"n": len(items), "model_right": sum(expert(labels, it)[2] for it in items)}

    arms: dict[str, dict] = {}
    for arm, ids in picks.items():
        root = args.workdir / arm
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(base, root, symlinks=True)
        edit_settings(root, review={"enabled": False})  # cycle 2's own rebuild is not measured here
        counts = label_arm(root, labels, ids)
        arm_project = load_project(root)
        mark(f"arm {arm}: experts reviewed {len(ids)} items", **counts)
        cycle = run_cycle(arm_project, reporter, trigger=f"review ({arm})")
        summary = cycle_summary(arm_project, cycle.id)
        candidate = summary["steps"].get("gate", {}).get("candidate")
        mark(f"arm {arm}: cycle 2 done", candidate=candidate, outcome=cycle.outcome)
        arms[arm] = {"labels": counts, "candidate": candidate, "outcome": cycle.outcome, "project": arm_project,
                     "steps": {k: v.get("seconds") for k, v in summary["steps"].items()}}

    primary = project.settings.eval.primary_metric
    with open_store(project.store_url)() as s:
        held_hash = eval_set_hash(eval_examples(project, s))
    scores: dict[str, dict[str, list[dict]]] = {
        "champion": {"heldout": stored_items(project, champ, held_hash),
                     "probe": probe_scores(project, [champ], p["probe"], reporter)[champ]}}
    for arm, info in arms.items():
        cand = info["candidate"]
        scores[arm] = {"heldout": stored_items(info["project"], cand, held_hash),
                       "probe": probe_scores(info["project"], [cand], p["probe"], reporter)[cand]}
    mark("held-out and probe scored")
    result = analyse(args, arms, scores, champ, primary, pool_stats, timeline, t0)
    args.json_out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    update_markdown(args.md_out, markdown(result), "review-queue")
    print(markdown(result))


PARTS = ("heldout", "probe", "both")


def _items(scores: dict, who: str, part: str) -> list[dict]:
    s = scores[who]
    return s["heldout"] + s["probe"] if part == "both" else s[part]


def analyse(args, arms, scores, champ, primary, pool_stats, timeline, t0) -> dict:
    out = {"command": "python bench/review_queue.py " + " ".join(sys.argv[1:]), "machine": machine(),
           "minutes": round((time.time() - t0) / 60, 1), "primary_metric": primary, "labels": args.labels,
           "pool": pool_stats, "champion": champ, "timeline": timeline, "arms": {}, "queue_vs_random": {}}
    for part in PARTS:
        out.setdefault("champion_scores", {})[part] = summary_with_ci(_items(scores, "champion", part), primary)
    for arm, info in arms.items():
        row = {k: info[k] for k in ("labels", "candidate", "outcome", "steps")}
        for part in PARTS:
            mine = _items(scores, arm, part)
            row[part] = {"candidate": summary_with_ci(mine, primary),
                         "vs_champion": paired(mine, _items(scores, "champion", part), primary)}
            if arm != "none":
                gain = paired(mine, _items(scores, "none", part), primary)
                row[part]["vs_none"] = gain
                row[part]["gain_per_label"] = gain["diff"] / args.labels
        out["arms"][arm] = row
    for part in PARTS:
        out["queue_vs_random"][part] = paired(_items(scores, "queue", part), _items(scores, "random", part), primary)
    return out


def _f(v, sign: bool = False) -> str:
    return "-" if v is None else (f"{v:+.3f}" if sign else f"{v:.3f}")


def _ci(x: dict) -> str:
    return f"{_f(x['diff'], True)} [{_f(x['low'], True)}, {_f(x['high'], True)}], p={x['p_value']:.3f}"


def markdown(r: dict) -> str:
    p = r["primary_metric"]
    champ = r["champion_scores"]
    lines = ["<!-- review-queue:start -->",
             "## The expert review queue vs random picks on CUAD dev (`bench/review_queue.py`, issue 21)", "",
             f"Machine: {r['machine']}. Command: `{r['command']}` ({r['minutes']} min in all).", "",
             f"The continuous scenario's world (bench/continuous.py): cycle 1 trained a candidate on the seeds "
             f"(champion after it: {r['champion']}); the licence-like contracts arrived and users asked old and "
             f"licence questions without voting. The review queue scored {r['pool']['n']} candidates (users' "
             f"questions and seed questions asked of other contracts; the champion's answer was right on "
             f"{r['pool']['model_right']} of them by the CUAD match rule). Simulated experts (the lawyers' labels) "
             f"reviewed {r['labels']} items in arms \"queue\" (its first items) and \"random\" (drawn from the same "
             f"pool) and none in arm \"none\"; each arm then ran cycle 2 from the same champion. {p} of the "
             f"champion: old held-out {_f(champ['heldout'][p])}, licence probe {_f(champ['probe'][p])}.", "",
             f"| arm | labels: confirmed / corrected | yes/no | users' / transfer | held-out {p} | probe {p} "
             f"| both: vs champion | both: vs arm none (the labels' gain) | gain per label |",
             "|---|---|---|---|---|---|---|---|---|"]
    for arm, a in r["arms"].items():
        lab = a["labels"]
        lines.append("| " + " | ".join([
            arm, f"{lab['confirm']} / {lab['correct']}", str(lab["yes_no"]),
            f"{lab['interaction']} / {lab['transfer']}",
            _f(a["heldout"]["candidate"][p]), _f(a["probe"]["candidate"][p]), _ci(a["both"]["vs_champion"]),
            _ci(a["both"]["vs_none"]) if "vs_none" in a["both"] else "-",
            f"{a['both']['gain_per_label']:+.4f}" if "gain_per_label" in a["both"] else "-"]) + " |")
    lines += ["", "Queue arm vs random arm, paired bootstrap over the same questions:", ""]
    for part, name in (("heldout", "old held-out"), ("probe", "licence probe"), ("both", "both")):
        lines.append(f"- {name} (n={r['queue_vs_random'][part]['n']}): {_ci(r['queue_vs_random'][part])}")
    lines += ["", "Timeline:", "", "| minute | event |", "|---|---|"]
    lines += [f"| {t['minute']} | {t['event']} |" for t in r["timeline"]]
    lines += ["", "Data: CUAD v1 (The Atticus Project), CC BY 4.0.", "<!-- review-queue:end -->"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
