"""Ingest that scales with what changed: adding documents to an indexed CUAD project.

Three fresh projects (the default settings and embedder), each timed around `ingest_paths` with
the embedder already loaded:

- `add_1`: the first 59 contracts ingested, then the 60th added;
- `add_40`: the first 20 contracts ingested, then the other 40 added (CUAD dev has 60 contracts,
  so "40 more" is measured on top of 20, not 60);
- `all_60_from_scratch`: all 60 at once: what every addition cost before only new and changed
  chunks were embedded (the whole corpus was embedded again).

For each: seconds, chunks in the project, chunks embedded and vectors reused.

    .venv/bin/python bench/ingest_speed.py [--data ../shared/data/cuad-dev] [--workdir DIR] [--json-out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import cuad  # noqa: E402

from tuneloop.cli import quiet_libraries  # noqa: E402
from tuneloop.config import load_project  # noqa: E402
from tuneloop.models.registry import build_embedder  # noqa: E402
from tuneloop.progress import SilentReporter  # noqa: E402
from tuneloop.settings_template import default_settings_yaml  # noqa: E402
from tuneloop.stages.ingest import ingest_paths  # noqa: E402
from tuneloop.store import Chunk, open_store  # noqa: E402


def timed_ingest(project, embedder, paths: list[Path]) -> dict:
    with open_store(project.store_url)() as s:
        t0 = time.perf_counter()
        r = ingest_paths(project, s, paths, embedder, SilentReporter())
        s.commit()
        seconds = time.perf_counter() - t0
        chunks = s.query(Chunk).count()
    return {"documents_added": len(r.added), "seconds": round(seconds, 2), "chunks_in_project": chunks,
            "chunks_embedded": r.embedded, "vectors_reused": r.reused}


def scenario(folder: Path, embedder, first: list[Path], then: list[Path]) -> dict:
    """A fresh project: ingest `first`, then add `then` (empty: nothing more)."""
    if folder.exists():
        shutil.rmtree(folder)  # this bench's own project from an earlier run
    folder.mkdir(parents=True)
    (folder / "tuneloop.yaml").write_text(default_settings_yaml(folder.name))
    project = load_project(folder)
    out = {"initial": timed_ingest(project, embedder, first)}
    if then:
        out["added"] = timed_ingest(project, embedder, first + then)
    return out


def run(data: Path, workdir: Path) -> dict:
    contracts = sorted((data / "contracts").iterdir())
    if len(contracts) < 60:
        raise SystemExit(f"expected 60 contracts in {data / 'contracts'}, found {len(contracts)}")
    contracts = contracts[:60]
    project = load_project_for_embedder(workdir)
    embedder = build_embedder(project)
    embedder.embed(["warm up"])
    result = {
        "add_1": scenario(workdir / "add-1", embedder, contracts[:59], contracts[59:]),
        "add_40": scenario(workdir / "add-40", embedder, contracts[:20], contracts[20:]),
        "all_60_from_scratch": scenario(workdir / "all-60", embedder, contracts, [])["initial"],
    }
    scratch = result["all_60_from_scratch"]["seconds"]
    result["add_1_speedup_vs_rebuild"] = round(scratch / result["add_1"]["added"]["seconds"], 1)
    result["add_40_speedup_vs_rebuild"] = round(scratch / result["add_40"]["added"]["seconds"], 2)
    result["peak_rss_mib"] = cuad.peak_rss_mib()
    return result


def load_project_for_embedder(workdir: Path):
    """A throwaway project whose settings name the default embedder."""
    folder = workdir / "embedder"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tuneloop.yaml").write_text(default_settings_yaml("embedder"))
    return load_project(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data/cuad-dev"))
    ap.add_argument("--workdir", type=Path, default=Path("bench-runs/ingest"))
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()
    quiet_libraries()
    result = {"ingest": run(args.data, args.workdir), "machine": cuad.machine(),
              "ingest_command": "python bench/ingest_speed.py"}
    print(json.dumps(result, indent=2))
    if args.json_out:
        cuad.merge_json(args.json_out, result)


if __name__ == "__main__":
    main()
