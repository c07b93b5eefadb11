"""CUAD benchmark of retrieval: base embedder vs one fine-tuned on the seeds' evidence passages.

The split of bench/cuad.py (`split_questions(data, 3, 150, 0)`): the answered questions of 3
contracts are the seeds, 150 answered questions of the other contracts the held-out set; all 60
contracts are ingested. Retrieval is restricted to the asked contract, as in serving
(`Retriever.retrieve(question, document, k)`); an item counts when it has a textual reference
(`metrics.retrieval_hit`: the answer, or a yes/no answer's evidence clauses) and is a hit at k
when one of the top k chunks holds it.

1. The project: an ingested copy of `--source-project` (the store copied with SQLite's backup,
   the source is never written), or a fresh project ingested here.
2. Fine-tune (`tuneloop.ingest.tune_embedder`) on pairs from the seeds only, with and without
   mined hard negatives; each fine-tuned model gets its own index folder (every chunk re-embedded;
   the project's index is not touched).
3. Held-out hit@1/3/5 for BM25 only, dense only and hybrid (reciprocal rank fusion), base vs
   fine-tuned.
4. A grid on the seeds only: top_k and rrf_k, base embedder vs fine-tuned, the fine-tuned numbers
   by leave-one-contract-out (train on two seed contracts, measure on the third: the seeds are
   the fine-tuned model's training data). The chosen setting's held-out hit@k is reported.

    .venv/bin/python bench/retriever_cuad.py [--data ../shared/data/cuad-dev] [--source-project DIR]

Writes bench-runs/retriever-cuad/ and docs/benchmarks/retriever_cuad.{json,md}; prints the tables.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import bm25s  # noqa: E402
import numpy as np  # noqa: E402
from sqlalchemy import select  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cuad import machine, make_project, split_questions, update_markdown  # noqa: E402

from tuneloop.cli import quiet_libraries  # noqa: E402
from tuneloop.config import Project, load_project  # noqa: E402
from tuneloop.evalsets import references  # noqa: E402
from tuneloop.ingest.index import HybridIndex, stored_chunks  # noqa: E402
from tuneloop.ingest.loaders import iter_files  # noqa: E402
from tuneloop.ingest.tune_embedder import TrainingPair, finetune_embedder, training_pairs  # noqa: E402
from tuneloop.metrics import retrieval_hit  # noqa: E402
from tuneloop.models.defaults import resolve_model_path  # noqa: E402
from tuneloop.models.embed import LocalEmbedder  # noqa: E402
from tuneloop.models.registry import build_embedder  # noqa: E402
from tuneloop.programs.rag import Passage, Retriever  # noqa: E402
from tuneloop.progress import RichReporter  # noqa: E402
from tuneloop.stages.ingest import ingest_paths  # noqa: E402
from tuneloop.stats import paired_bootstrap  # noqa: E402
from tuneloop.store import Example, open_store  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KS = (1, 3, 5)
# held-out comparisons (paired bootstrap over the same questions): (candidate, reference)
COMPARE = (("in-batch:hybrid", "base:hybrid"), ("hard-neg:hybrid", "base:hybrid"), ("hard-neg:dense", "base:dense"),
           ("base:bm25", "base:hybrid"), ("hard-neg:hybrid", "base:bm25"))
GRID_TOP_K = (1, 2, 3, 4, 5)
GRID_RRF_K = (1, 10, 30, 60, 100, 300)
MODES = ("bm25", "dense", "hybrid")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "cuad-dev")
    p.add_argument("--source-project", type=Path, default=Path("/work/exp/cuadproj"),
                   help="an already ingested project of the same split to copy (never modified)")
    p.add_argument("--workdir", type=Path, default=ROOT / "bench-runs" / "retriever-cuad")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", type=Path, default=ROOT / "docs" / "benchmarks" / "retriever_cuad.json")
    p.add_argument("--md-out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    return p.parse_args()


# --------------------------------------------------------------------------- project


def copy_project(source: Path, work: Path) -> Project:
    """Copy an ingested project: files as they are, the store through SQLite's online backup
    (consistent even while another process has it open; the source is opened read-only)."""
    work.mkdir(parents=True)
    for name in ("tuneloop.yaml", "seeds.jsonl", "heldout.jsonl"):
        shutil.copy2(source / name, work / name)
    shutil.copytree(source / "index", work / "index")
    src = sqlite3.connect(f"file:{source / 'tuneloop.db'}?mode=ro", uri=True)
    dst = sqlite3.connect(work / "tuneloop.db")
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()
    return load_project(work)


def prepare_project(args, seeds: list[dict], heldout: list[dict]) -> Project:
    work = args.workdir / "project"
    if (work / "index" / "index.json").is_file():
        return load_project(work)
    if work.exists():
        shutil.rmtree(work)
    if (args.source_project / "index" / "index.json").is_file():
        return copy_project(args.source_project, work)
    ns = argparse.Namespace(data=args.data, synth_questions=32, epochs=1.0, rlaif_prompts=32, rlaif_candidates=3)
    project = make_project(ns, work, seeds, heldout, {})
    with open_store(project.store_url)() as s:
        ingest_paths(project, s, list(iter_files([args.data / "contracts"])), build_embedder(project), RichReporter())
        s.commit()
    return project


def check_split(examples: list[Example], rows: list[dict], split: str) -> None:
    got = sorted((e.question, e.document) for e in examples)
    want = sorted((r["question"], r["contract"]) for r in rows)
    if got != want:
        raise SystemExit(f"the project's {split} examples are not the bench split ({len(got)} vs {len(want)})")


# --------------------------------------------------------------------------- indexes


def variant(index_dir: Path, embedder, mode: str, embeddings: np.ndarray | None = None) -> HybridIndex:
    """The saved index at `index_dir` as BM25 only, dense only or hybrid; `embeddings` replace
    its dense vectors (the leave-one-contract-out indexes)."""
    meta = json.loads((index_dir / "index.json").read_text(encoding="utf-8"))
    bm25 = bm25s.BM25.load(index_dir / "bm25") if mode in ("bm25", "hybrid") else None
    if mode == "bm25":
        return HybridIndex(meta["chunk_ids"], meta["groups"], bm25, None, None, meta["content_hash"])
    vectors = embeddings if embeddings is not None else np.load(index_dir / "embeddings.npy")
    return HybridIndex(meta["chunk_ids"], meta["groups"], bm25, vectors, embedder, meta["content_hash"])


def build_index(chunks: list[tuple[int, str, str]], embedder, directory: Path) -> float:
    """Re-embed every chunk with `embedder` into its own index folder; return the seconds taken."""
    t0 = time.monotonic()
    HybridIndex.from_rows(chunks, embedder).save(directory)
    return time.monotonic() - t0


def hits(index: HybridIndex, passages: dict[int, Passage], examples: list[Example], rrf_k: int,
         max_k: int) -> list[list[float]]:
    """Per example with a textual reference: hit (0/1) at k = 1..max_k."""
    retriever = Retriever(index, passages, max_k, rrf_k)
    out = []
    for e in examples:
        got = retriever.retrieve(e.question, e.document, k=max_k)
        row = [retrieval_hit([p.text for p in got[:k]], references(e)) for k in range(1, max_k + 1)]
        if row[0] is not None:
            out.append(row)
    return out


def by_question(examples: list[Example], seen: set[str]) -> dict[str, list[Example]]:
    """The held-out examples whose question text the training pairs hold, and the others (CUAD
    asks one question per category, so most held-out questions repeat a seed question's words)."""
    return {"seen": [e for e in examples if e.question in seen],
            "unseen": [e for e in examples if e.question not in seen]}


def at(rows: list[list[float]], k: int) -> float:
    return round(float(np.mean([r[k - 1] for r in rows])), 3)


# --------------------------------------------------------------------------- main


def main() -> None:
    args = parse_args()
    quiet_libraries()
    if not (args.data / "qa.jsonl").is_file():
        raise SystemExit(f"CUAD data not found at {args.data} (pass --data)")
    t_start = time.monotonic()
    seed_contracts, seed_rows, heldout_rows = split_questions(args.data, 3, 150, 0)
    args.workdir.mkdir(parents=True, exist_ok=True)
    project = prepare_project(args, seed_rows, heldout_rows)
    base = build_embedder(project)
    base_dir = resolve_model_path(project.settings.models.embedder.model, project.cache)
    result: dict = {"machine": machine(), "seed_contracts": seed_contracts, "settings": vars(args)}
    with open_store(project.store_url)() as s:
        chunks = stored_chunks(s)
        seeds = list(s.scalars(select(Example).where(Example.split == "train").order_by(Example.id)))
        heldout = list(s.scalars(select(Example).where(Example.split == "eval").order_by(Example.id)))
        s.expunge_all()
    check_split(seeds, seed_rows, "train")
    check_split(heldout, heldout_rows, "eval")
    passages = {cid: Passage(cid, doc, text) for cid, doc, text in chunks}
    rrf_default = project.settings.ingest.rrf_k

    # fine-tune on the seeds: without and with mined hard negatives
    pair_sets = {"in-batch": training_pairs(seeds, chunks),
                 "hard-neg": training_pairs(seeds, chunks, negatives_from=base)}
    tuned: dict[str, dict] = {}
    for label, ps in pair_sets.items():
        r = finetune_embedder(base_dir, ps.pairs, args.workdir, f"embedder-{label}", args.epochs, args.batch_size,
                              args.lr, args.seed)
        index_dir = args.workdir / f"index-{label}"
        embedder = LocalEmbedder(r.path)
        timing = args.workdir / f"index-{label}.seconds"  # a rerun reuses the index and reports its build time
        if not (index_dir / "index.json").is_file():
            timing.write_text(str(build_index(chunks, embedder, index_dir)))
        embed_s = float(timing.read_text()) if timing.is_file() else float("nan")
        tuned[label] = {"embedder": embedder, "index": index_dir, "pairs": len(ps.pairs), "skipped": ps.skipped,
                        "examples": ps.examples, "loss_before": round(r.loss_before, 4),
                        "loss_after": round(r.loss_after, 4), "steps": r.steps, "finetune_seconds": r.seconds,
                        "reembed_seconds": round(embed_s, 1)}
        print(f"{label}: {len(ps.pairs)} pairs from {ps.examples} seeds (skipped {ps.skipped}); loss "
              f"{r.loss_before:.3f} -> {r.loss_after:.3f}; fine-tune {r.seconds:.0f} s; re-embed {embed_s:.0f} s",
              flush=True)

    # held-out: base vs fine-tuned, BM25 / dense / hybrid
    seen = {p.query for p in pair_sets["in-batch"].pairs}
    arms = {"base": (base, project.index_dir), **{k: (v["embedder"], v["index"]) for k, v in tuned.items()}}
    table: dict[str, dict] = {}
    per_item: dict[str, list[list[float]]] = {}
    for arm, (embedder, index_dir) in arms.items():
        for mode in MODES:
            if mode == "bm25" and arm != "base":
                continue
            rows = per_item[f"{arm}:{mode}"] = hits(variant(index_dir, embedder, mode), passages, heldout,
                                                    rrf_default, max(KS))
            table[f"{arm}:{mode}"] = {"n": len(rows), **{f"hit@{k}": at(rows, k) for k in KS}}
            for part, subset in by_question(heldout, seen).items():
                sub = hits(variant(index_dir, embedder, mode), passages, subset, rrf_default, max(KS))
                table[f"{arm}:{mode}"][part] = {"n": len(sub), **{f"hit@{k}": at(sub, k) for k in KS}}
            print(f"held-out {arm:9s} {mode:6s} n={len(rows)} " + " ".join(f"hit@{k}={at(rows, k)}" for k in KS))
    comparisons = [compare(per_item, a, b, k) for a, b in COMPARE for k in KS]

    # the grid on the seeds; fine-tuned arms by leave-one-contract-out
    grid = seed_grid(args, base, base_dir, project, chunks, passages, seeds, seed_contracts)
    choice = choose(grid)
    embedder, index_dir = arms[choice["arm"]]
    rows = hits(variant(index_dir, embedder, choice["mode"]), passages, heldout, choice["rrf_k"], max(KS))
    chosen = {"n": len(rows), **{f"hit@{k}": at(rows, k) for k in KS}, "hit@top_k": at(rows, choice["top_k"])}
    print(f"chosen on the seeds: {choice}; held-out {chosen}")
    result.update({"pairs": {k: {x: v[x] for x in v if x not in ("embedder", "index")} for k, v in tuned.items()},
                   "heldout": table, "comparisons": comparisons, "seed_grid": grid, "choice": choice,
                   "chosen_heldout": chosen,
                   "rrf_k_default": rrf_default, "top_k_default": project.settings.ingest.top_k,
                   "minutes": round((time.monotonic() - t_start) / 60, 1)})
    command = (f"python bench/retriever_cuad.py --epochs {args.epochs} --batch-size {args.batch_size} "
               f"--lr {args.lr} --seed {args.seed}")
    result["command"] = command
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(result, indent=2, default=str))
    text = markdown(result)
    update_markdown(args.md_out, "<!-- retriever:start -->\n## CUAD dev: retrieval, base vs fine-tuned embedder "
                    "(`bench/retriever_cuad.py`)\n" + text + "\n\nData: CUAD v1 (The Atticus Project), CC BY 4.0.\n"
                    "<!-- retriever:end -->", tag="retriever")
    print(text)


def compare(per_item: dict[str, list[list[float]]], a: str, b: str, k: int) -> dict:
    """Paired bootstrap of hit@k, arm `a` minus arm `b`, over the same held-out questions."""
    xa, xb = np.array([r[k - 1] for r in per_item[a]]), np.array([r[k - 1] for r in per_item[b]])
    test = paired_bootstrap(len(xa), lambda i: xa[i].mean(), lambda i: xb[i].mean())
    return {"a": a, "b": b, "k": k, "diff": round(test.diff, 3), "low": round(test.low, 3),
            "high": round(test.high, 3), "p": round(test.p_value, 3), "a_only": int(((xa == 1) & (xb == 0)).sum()),
            "b_only": int(((xa == 0) & (xb == 1)).sum())}


def seed_grid(args, base, base_dir: Path, project: Project, chunks, passages, seeds: list[Example],
              seed_contracts: list[str]) -> list[dict]:
    """hit@top_k on the seeds for every (arm, mode, rrf_k); a fine-tuned arm's numbers for the
    seeds of one contract come from a model trained on the other two seed contracts' pairs."""
    base_vectors = np.load(project.index_dir / "embeddings.npy")
    positions = {cid: i for i, (cid, _, _) in enumerate(chunks)}
    per_arm: dict[str, dict[tuple[str, int], list[list[float]]]] = {}
    for mode in MODES:
        for rrf_k in (GRID_RRF_K if mode == "hybrid" else (GRID_RRF_K[0],)):
            rows = hits(variant(project.index_dir, base, mode), passages, seeds, rrf_k, max(GRID_TOP_K))
            per_arm.setdefault("base", {})[(mode, rrf_k)] = rows
    for label, negatives in (("in-batch", None), ("hard-neg", base)):
        for held in seed_contracts:
            train = [e for e in seeds if e.document != held]
            test = [e for e in seeds if e.document == held]
            pairs: list[TrainingPair] = training_pairs(train, chunks, negatives_from=negatives).pairs
            r = finetune_embedder(base_dir, pairs, args.workdir / "cv", f"{label}-without-{held[:40]}", args.epochs,
                                  args.batch_size, args.lr, args.seed)
            embedder = LocalEmbedder(r.path)
            vectors = base_vectors.copy()
            mine = [c for c in chunks if c[1] == held]
            vectors[[positions[c[0]] for c in mine]] = embedder.embed([c[2] for c in mine])
            for mode in ("dense", "hybrid"):
                for rrf_k in (GRID_RRF_K if mode == "hybrid" else (GRID_RRF_K[0],)):
                    index = variant(project.index_dir, embedder, mode, vectors)
                    rows = hits(index, passages, test, rrf_k, max(GRID_TOP_K))
                    per_arm.setdefault(label, {}).setdefault((mode, rrf_k), []).extend(rows)
    grid = []
    for arm, cells in per_arm.items():
        for (mode, rrf_k), rows in cells.items():
            grid.append({"arm": arm, "mode": mode, "rrf_k": rrf_k if mode == "hybrid" else None, "n": len(rows),
                         **{f"hit@{k}": at(rows, k) for k in GRID_TOP_K}})
    return grid


def choose(grid: list[dict]) -> dict:
    """On the seeds: the (arm, mode, rrf_k) with the best mean hit@1..5 (ties: the first), then
    top_k: the smallest k whose hit is within 0.03 of hit@5 (each passage costs prompt tokens)."""
    best = max(grid, key=lambda g: np.mean([g[f"hit@{k}"] for k in GRID_TOP_K]))
    top_k = next(k for k in GRID_TOP_K if best[f"hit@{k}"] >= best[f"hit@{max(GRID_TOP_K)}"] - 0.03)
    return {"arm": best["arm"], "mode": best["mode"], "rrf_k": best["rrf_k"] or 60, "top_k": top_k,
            "seed_hits": {k: best[f"hit@{k}"] for k in GRID_TOP_K}}


def markdown(result: dict) -> str:
    base_row = result["heldout"]["base:hybrid"]
    lines = ["", f"Command: `{result['command']}` ({result['minutes']} min; {result['machine']})", "",
             "Held-out (150 questions of 57 contracts; items with a textual reference):", "",
             "Seen / unseen: the held-out items whose question text is / is not a training pair's question "
             f"(n = {base_row['seen']['n']} / {base_row['unseen']['n']}).",
             "", "| embedder | retrieval | n | " + " | ".join(f"hit@{k}" for k in KS) + " | "
             + " | ".join(f"{part} hit@{k}" for part in ("seen", "unseen") for k in KS) + " |",
             "|---" * (3 + 3 * len(KS)) + "|"]
    for key, row in result["heldout"].items():
        arm, mode = key.split(":")
        lines.append(f"| {arm} | {mode} | {row['n']} | " + " | ".join(f"{row[f'hit@{k}']:.3f}" for k in KS)
                     + " | " + " | ".join(f"{row[part][f'hit@{k}']:.3f}" for part in ("seen", "unseen") for k in KS)
                     + " |")
    lines += ["", "Paired bootstrap (1000 resamples; p one-sided: a not better; a_only / b_only: questions only "
              "one of them finds):", "", "| a | b | k | a - b | 95% CI | p | a_only | b_only |", "|---" * 8 + "|"]
    lines += [f"| {c['a']} | {c['b']} | {c['k']} | {c['diff']:+.3f} | [{c['low']:+.3f}, {c['high']:+.3f}] | "
              f"{c['p']:.3f} | {c['a_only']} | {c['b_only']} |" for c in result["comparisons"]]
    c = result["choice"]
    lines += ["", f"Chosen on the seeds: {c['arm']} {c['mode']} rrf_k={c['rrf_k']} top_k={c['top_k']}; held-out "
              + ", ".join(f"hit@{k} {result['chosen_heldout'][f'hit@{k}']:.3f}" for k in KS), "",
              "Seed grid (fine-tuned arms: leave-one-contract-out):", "",
              "| embedder | retrieval | rrf_k | n | " + " | ".join(f"hit@{k}" for k in GRID_TOP_K) + " |",
              "|---" * (4 + len(GRID_TOP_K)) + "|"]
    for g in result["seed_grid"]:
        lines.append(f"| {g['arm']} | {g['mode']} | {g['rrf_k'] or '-'} | {g['n']} | "
                     + " | ".join(f"{g[f'hit@{k}']:.3f}" for k in GRID_TOP_K) + " |")
    for label, p in result["pairs"].items():
        lines.append(f"\n{label}: {p['pairs']} pairs from {p['examples']} seeds, skipped {p['skipped']}; loss "
                     f"{p['loss_before']} -> {p['loss_after']} in {p['steps']} steps; fine-tune "
                     f"{p['finetune_seconds']} s, re-embedding the corpus {p['reembed_seconds']} s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
