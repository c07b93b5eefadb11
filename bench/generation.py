"""Generation throughput on CPU: one prompt at a time vs tuneloop's padded batches vs transformers'
continuous batching (`model.generate_batch`, paged attention), on the prompts eval and serving send.

The prompts are a project's extraction questions (held-out and dev splits) with their retrieved
passages (`programs/rag.build_messages`, ~400 tokens each), the model is the project's student
(the built-in SmolLM2-135M-Instruct), greedy decoding, `--max-new-tokens` new tokens. Every way
must give the same replies as one prompt at a time; the script counts them. It also times the
prefill alone (one forward pass per prompt, one at a time and in batches): no batching makes
generation faster than one-at-a-time time / prefill time where the prefill is compute-bound.

    make demo
    .venv/bin/python bench/generation.py --project demo-project [--n 24] [--json-out docs/benchmarks/speed.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import cuad  # noqa: E402
import torch  # noqa: E402
from sqlalchemy import select  # noqa: E402
from synth_throughput import timed  # noqa: E402
from transformers import GenerationConfig  # noqa: E402

from tuneloop.cli import quiet_libraries  # noqa: E402
from tuneloop.config import load_project  # noqa: E402
from tuneloop.models.base import GenerationParams  # noqa: E402
from tuneloop.models.defaults import resolve_model_path  # noqa: E402
from tuneloop.models.local import LocalChatModel  # noqa: E402
from tuneloop.models.registry import build_embedder  # noqa: E402
from tuneloop.programs.decide import is_yes_no_question  # noqa: E402
from tuneloop.programs.rag import Retriever, build_messages  # noqa: E402
from tuneloop.store import Example, open_store  # noqa: E402

PAGED = ("sdpa", "paged|sdpa")  # attention implementations tried with generate_batch


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", type=Path, default=Path("demo-project"))
    ap.add_argument("--n", type=int, default=24, help="prompts")
    ap.add_argument("--batch", type=int, default=16, help="tuneloop's batch size")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--json-out", type=Path, default=None)
    return ap.parse_args()


def prompts(project, n: int) -> list:
    """The first `n` extraction questions of the eval and dev splits, as the student is prompted."""
    with open_store(project.store_url)() as s:
        rows = s.scalars(select(Example).where(Example.split.in_(["eval", "dev"])).order_by(Example.id))
        questions = [e for e in rows if not is_yes_no_question(e.question)][:n]
        retriever = Retriever.load(project, s, build_embedder(project))
        return [build_messages(e.question, retriever.retrieve(e.question, e.document)) for e in questions]


@torch.inference_mode()
def prefill(model: LocalChatModel, convs: list, batch: int) -> None:
    """One forward pass over every prompt (the LM head on the last position only), `batch` at a
    time: the part of generation that batching cannot shorten where the prefill is compute-bound."""
    for start in range(0, len(convs), batch):
        enc = model.tokenizer([model.render(c) for c in convs[start : start + batch]], return_tensors="pt",
                              padding=True, add_special_tokens=False)
        model.model(**enc, logits_to_keep=1)


def main() -> None:
    args = parse_args()
    quiet_libraries()
    if not (args.project / "tuneloop.yaml").exists():
        raise SystemExit(f"no tuneloop project at {args.project}: run `make demo` first, or pass --project")
    project = load_project(args.project)
    convs = prompts(project, args.n)
    model_dir = resolve_model_path(project.settings.models.student.model, project.cache)
    params = GenerationParams(max_new_tokens=args.max_new_tokens, temperature=0.0)
    batched_model = LocalChatModel(model_dir, batch_size=args.batch)
    single_model = LocalChatModel(model_dir, batch_size=1)
    batched_model.chat(convs[:2], params)  # warm-up
    single_model.chat(convs[:1], params)
    single, t_single = timed(lambda: single_model.chat(convs, params))
    batched, t_batched = timed(lambda: batched_model.chat(convs, params))
    ways = {"one_at_a_time": {"seconds": round(t_single, 1), "identical": len(convs)},
            f"tuneloop_batches_of_{args.batch}": {"seconds": round(t_batched, 1),
                                                   "identical": sum(a == b for a, b in zip(single, batched))}}
    tok, model = batched_model.tokenizer, batched_model.model
    ids = [tok(batched_model.render(c), add_special_tokens=False)["input_ids"] for c in convs]
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id)
    for impl in PAGED:
        model.set_attn_implementation(impl)
        out, seconds = timed(lambda: model.generate_batch(ids, generation_config=config, progress_bar=False))
        replies = [tok.decode(out[k].generated_tokens, skip_special_tokens=True).strip()
                   for k in sorted(out, key=lambda k: int(k.rsplit("_", 1)[-1]))]
        ways[f"generate_batch[{impl}]"] = {"seconds": round(seconds, 1),
                                           "identical": sum(a == b for a, b in zip(single, replies))}
    for way in ways.values():
        way["speedup_vs_one_at_a_time"] = round(t_single / way["seconds"], 2)
    model.set_attn_implementation("sdpa")
    _, t_prefill_1 = timed(lambda: prefill(batched_model, convs, 1))
    _, t_prefill_b = timed(lambda: prefill(batched_model, convs, args.batch))
    bound = {"prefill_one_at_a_time_s": round(t_prefill_1, 1),
             f"prefill_batches_of_{args.batch}_s": round(t_prefill_b, 1),
             "max_speedup_if_decoding_were_free": round(t_single / min(t_prefill_1, t_prefill_b), 2)}
    result = {"generation_speedup_vs_naive": ways[f"tuneloop_batches_of_{args.batch}"]["speedup_vs_one_at_a_time"],
              "generation": {"prompts": len(convs), "max_new_tokens": args.max_new_tokens, "ways": ways,
                             "prefill_bound": bound, "peak_rss_mib": cuad.peak_rss_mib(),
                             "machine": cuad.machine(),
                             "command": f"python bench/generation.py --project {args.project} --n {args.n}"}}
    print(json.dumps(result, indent=2))
    if args.json_out:
        cuad.merge_json(args.json_out, result)


if __name__ == "__main__":
    main()
