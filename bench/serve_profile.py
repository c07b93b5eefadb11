"""Where serving time goes on this CPU: prefill vs decoding, and torch in a second thread.

On the project `bench/serve_load.py` builds (CUAD dev contracts ingested, the built-in student),
with the retrieval prompts of its first `--n` questions (each about its own contract):

1. batch 1 and batch `--batch`: seconds of the prefill (one forward pass over the padded prompts)
   and of greedy generation of `--tokens` tokens (decoding = the difference), and the padding;
2. the same generation (`LocalChatModel.chat`, one prompt at a time) on the main thread, on a
   second thread after the main thread has run torch code, and on the main thread again; and a
   1x576 @ 576x1536 matrix-vector product 2,000 times, the same three ways. torch's CPU kernels
   run on an OpenMP team that belongs to the calling thread; this shows what a second team costs.

    .venv/bin/python bench/serve_profile.py [--project bench-runs/serve/project] [--n 8] [--batch 8]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import cuad  # noqa: E402
import torch  # noqa: E402

from tuneloop.cli import quiet_libraries  # noqa: E402
from tuneloop.config import load_project  # noqa: E402
from tuneloop.models.base import GenerationParams  # noqa: E402
from tuneloop.models.registry import build_chat_model, build_embedder  # noqa: E402
from tuneloop.programs.rag import Retriever, build_messages  # noqa: E402
from tuneloop.store import open_store  # noqa: E402


def on_thread(fn) -> float:
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(t=fn()))
    thread.start()
    thread.join()
    return out["t"]


@torch.inference_mode()
def split(model, prompts: list[str], tokens: int) -> dict:
    """Prefill and decoding seconds of one padded batch."""
    tok = model.tokenizer
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    t0 = time.perf_counter()
    model.model(**enc, logits_to_keep=1)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.model.generate(**enc, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    total = time.perf_counter() - t0
    real, padded = int(enc["attention_mask"].sum()), enc["input_ids"].numel()
    return {"batch": len(prompts), "prompt_tokens": real, "padding": round(1 - real / padded, 3),
            "prefill_s": round(prefill, 2), "generate_s": round(total, 2),
            "decode_ms_per_step": round(1000 * (total - prefill) / (tokens - 1), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", type=Path, default=Path("bench-runs/serve/project"))
    ap.add_argument("--data", type=Path, default=Path("../shared/data/cuad-dev"))
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=48)
    args = ap.parse_args()
    quiet_libraries()
    project = load_project(args.project)
    rows = [json.loads(line) for line in (args.data / "qa.jsonl").open(encoding="utf-8")]
    with open_store(project.store_url)() as s:
        retriever = Retriever.load(project, s, build_embedder(project))
    documents = retriever.documents()
    asked = [r for r in rows if r["contract"] in documents][: args.n]
    conversations = [build_messages(r["question"], retriever.retrieve(r["question"], r["contract"])) for r in asked]
    model = build_chat_model(project, project.settings.models.student.model_copy(update={"cache": False}), None)
    prompts = [model.render(c) for c in conversations]
    params = GenerationParams(max_new_tokens=args.tokens)

    def generate() -> float:
        t0 = time.perf_counter()
        for c in conversations[:4]:
            model.chat([c], params)
        return time.perf_counter() - t0

    x, w = torch.randn(1, 576), torch.randn(576, 1536)

    def gemv() -> float:
        t0 = time.perf_counter()
        for _ in range(2000):
            x @ w
        return time.perf_counter() - t0

    split(model, prompts[:1], args.tokens)  # warm-up
    result = {
        "batches": [split(model, prompts[:1], args.tokens), split(model, prompts[: args.batch], args.tokens)],
        "generate_4_prompts_s": {"main": round(generate(), 2), "second_thread": round(on_thread(generate), 2),
                                 "main_again": round(generate(), 2)},
        "gemv_2000_s": {"main": round(gemv(), 3), "second_thread": round(on_thread(gemv), 3),
                        "main_again": round(gemv(), 3)},
        "machine": cuad.machine(),
        "command": "python bench/serve_profile.py " + " ".join(sys.argv[1:]),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
