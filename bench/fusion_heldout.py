"""Does the fusion weight chosen on the dev split hold on the held-out set? (after bench/quality.py)

The `retriever` cycle step chooses each candidate's BM25/dense fusion weight on the dev split
(`stages/retriever.choose_fusion`: hit@top_k of the evidence). This reads a project written by
`bench/quality.py` and, for base and every candidate, measures held-out hit@top_k for every weight
of `retriever.dense_weights` with that version's own retriever (`Retriever.for_version`), beside
the weight the step chose on dev. Retrieval only: no model answers, about a minute.

    .venv/bin/python bench/fusion_heldout.py [--workdir bench-runs/quality3]

Prints the table; adds it under "fusion" to docs/benchmarks/quality.json and to the markdown
section `fusion` of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cuad import update_markdown  # noqa: E402
from sqlalchemy import select  # noqa: E402

from tuneloop.cli import quiet_libraries  # noqa: E402
from tuneloop.config import load_project  # noqa: E402
from tuneloop.evalsets import eval_examples  # noqa: E402
from tuneloop.models.registry import build_embedder  # noqa: E402
from tuneloop.programs.rag import Retriever, version_dense_weight  # noqa: E402
from tuneloop.stages.retriever import fusion_hits, with_textual_reference  # noqa: E402
from tuneloop.store import Example, ModelVersion, open_store  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def by_name(hits: dict[float, float]) -> dict[str, float]:
    return {str(w): h for w, h in hits.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=ROOT / "bench-runs" / "quality3")
    p.add_argument("--json-out", type=Path, default=ROOT / "docs" / "benchmarks" / "quality.json")
    p.add_argument("--md-out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = p.parse_args()
    quiet_libraries()
    project = load_project(args.workdir)
    weights = project.settings.retriever.dense_weights
    embedder = build_embedder(project)
    rows = []
    with open_store(project.store_url)() as s:
        heldout = with_textual_reference(eval_examples(project, s))
        dev = with_textual_reference(s.scalars(select(Example).where(Example.split == "dev").order_by(Example.id)))
        for version in s.scalars(select(ModelVersion).order_by(ModelVersion.id)):
            retriever = Retriever.for_version(project, s, version, embedder)
            rows.append({"version": version.name, "chosen_on_dev": version_dense_weight(version),
                         "dev": by_name(fusion_hits(retriever, dev, weights)),
                         "heldout": by_name(fusion_hits(retriever, heldout, weights))})
            print(json.dumps(rows[-1]))
    result = {"command": f"python bench/fusion_heldout.py --workdir {args.workdir}",
              "top_k": project.settings.ingest.top_k, "n_dev": len(dev), "n_heldout": len(heldout),
              "default": project.settings.ingest.dense_weight, "rows": rows}
    data = json.loads(args.json_out.read_text()) if args.json_out.exists() else {}
    data["fusion"] = result
    args.json_out.write_text(json.dumps(data, indent=2, default=str))
    update_markdown(args.md_out, markdown(result), tag="fusion")


def markdown(r: dict) -> str:
    ws = list(r["rows"][0]["heldout"]) if r["rows"] else []
    lines = ["<!-- fusion:start -->", "### BM25/dense fusion weight: chosen on dev, checked on the held-out set "
             "(`bench/fusion_heldout.py`)", "",
             f"Command: `{r['command']}`. hit@{r['top_k']} (the passages the student sees) of the items with a "
             f"textual reference: {r['n_dev']} dev, {r['n_heldout']} held-out; each version with its own retriever. "
             f"Default weight {r['default']}.", "",
             "| version | chosen on dev | " + " | ".join(f"dev w={w}" for w in ws) + " | "
             + " | ".join(f"held-out w={w}" for w in ws) + " |", "|---" * (2 + 2 * len(ws)) + "|"]
    for row in r["rows"]:
        chosen = row["chosen_on_dev"]
        lines.append(f"| {row['version']} | {'-' if chosen is None else chosen} | "
                     + " | ".join(f"{row['dev'][w]:.3f}" for w in ws) + " | "
                     + " | ".join(f"{row['heldout'][w]:.3f}" for w in ws) + " |")
    lines.append("<!-- fusion:end -->")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
