"""Teacher throughput: tuneloop's batched LocalChatModel vs a plain one-prompt-at-a-time loop.

Both ways use the SAME loaded model (the default builtin:smollm2-135m-instruct), the same chat
template and the same greedy decoding (max_new_tokens 48) on N question-writing prompts built
from the bundled sample contracts (one paragraph each). After a warm-up, each way is timed
once; the script prints examples/minute for both and their ratio, and writes
docs/benchmarks/synth_throughput.json.

    .venv/bin/python bench/synth_throughput.py [--n 32] [--batch 16] [--max-new-tokens 48]

The model comes from $TUNELOOP_CACHE (default ~/.cache/tuneloop); it is converted from the
bundled GGUF on first use. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from importlib import resources
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from tuneloop.models.base import GenerationParams  # noqa: E402
from tuneloop.models.defaults import resolve_model_path  # noqa: E402
from tuneloop.models.local import LocalChatModel  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = "builtin:smollm2-135m-instruct"
SYSTEM = "You write exam questions about contracts. Reply with the question only."


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=32, help="prompts to generate for (default 32)")
    p.add_argument("--batch", default="16", help="LocalChatModel batch_size: an integer or 'auto' (default 16)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--json-out", type=Path, default=ROOT / "docs" / "benchmarks" / "synth_throughput.json")
    return p.parse_args()


def paragraphs(min_chars: int = 120) -> list[str]:
    """Prose paragraphs of the bundled sample contracts (headings and short lines dropped)."""
    folder = Path(str(resources.files("tuneloop") / "sample" / "contracts"))
    out = []
    for path in sorted(folder.glob("*.md")):
        for block in path.read_text(encoding="utf-8").split("\n\n"):
            text = " ".join(block.split())
            if len(text) >= min_chars and not text.startswith("#"):
                out.append(text)
    return out


def prompts(n: int) -> list[list[dict]]:
    paras = paragraphs()
    if not paras:
        sys.exit("no paragraphs found in the sample contracts")
    return [[{"role": "system", "content": SYSTEM},
             {"role": "user", "content": f"Passage:\n{paras[i % len(paras)]}\n\n"
                                         "Write one new question that this passage answers."}]
            for i in range(n)]


@torch.inference_mode()
def plain_loop(model: LocalChatModel, conversations: list[list[dict]], max_new_tokens: int) -> list[str]:
    """The baseline: one `model.generate` per prompt, no batching, no padding."""
    tok, lm = model.tokenizer, model.model
    replies = []
    for conv in conversations:
        text = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        enc = tok(text, return_tensors="pt", add_special_tokens=False).to(model.device)
        out = lm.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                          top_k=None, pad_token_id=tok.pad_token_id)
        replies.append(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return replies


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = "auto" if args.batch == "auto" else int(args.batch)
    env = os.environ.get("TUNELOOP_CACHE")
    cache = Path(env) if env else Path.home() / ".cache" / "tuneloop"
    model = LocalChatModel(resolve_model_path(MODEL, cache), batch_size=batch)
    params = GenerationParams(max_new_tokens=args.max_new_tokens, temperature=0.0)
    conversations = prompts(args.n)

    warm = prompts(4)  # first calls pay for lazy initialisation; keep them out of the timings
    model.chat(warm, params)
    plain_loop(model, warm[:2], args.max_new_tokens)

    batched, t_batched = timed(lambda: model.chat(conversations, params))
    plain, t_plain = timed(lambda: plain_loop(model, conversations, args.max_new_tokens))

    per_min = lambda seconds: 60.0 * len(conversations) / seconds  # noqa: E731
    same = sum(a == b for a, b in zip(batched, plain))
    command = " ".join(["python bench/synth_throughput.py", *(shlex.quote(a) for a in sys.argv[1:])])
    result = {
        "benchmark": "teacher throughput: LocalChatModel.chat (batched, left padding, length-sorted) "
                     "vs one model.generate per prompt",
        "model": MODEL,
        "prompts": len(conversations),
        "max_new_tokens": args.max_new_tokens,
        "decoding": "greedy",
        "batch_size": batch,
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": model.device,
            "gpu": torch.cuda.get_device_name(0) if model.device == "cuda" else None,
            "torch": torch.__version__,
        },
        "batched": {"seconds": round(t_batched, 2), "examples_per_minute": round(per_min(t_batched), 1)},
        "plain_loop": {"seconds": round(t_plain, 2), "examples_per_minute": round(per_min(t_plain), 1)},
        "speedup": round(t_plain / t_batched, 2),
        "identical_replies": f"{same}/{len(conversations)}",
        "sample": [{"passage": c[-1]["content"].split("\n")[1][:120] + "...", "batched": b, "plain_loop": p}
                   for c, b, p in list(zip(conversations, batched, plain))[:3]],
        "command": command,
    }
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    m = result["machine"]
    print(f"machine: {m['cpu_count']} CPU cores, {m['torch_threads']} torch threads, device {m['device']}"
          + (f" ({m['gpu']})" if m["gpu"] else "") + f", torch {m['torch']}")
    print(f"{len(conversations)} prompts, greedy, max_new_tokens {args.max_new_tokens}, model {MODEL}")
    print(f"  LocalChatModel.chat (batch {batch}): {t_batched:7.2f} s  {per_min(t_batched):7.1f} examples/min")
    print(f"  plain loop, one generate per prompt: {t_plain:7.2f} s  {per_min(t_plain):7.1f} examples/min")
    print(f"  speedup {t_plain / t_batched:.2f}x; identical replies {same}/{len(conversations)}")
    print(f"wrote {args.json_out}")
    print(f"reproduce: {command}")


if __name__ == "__main__":
    main()
