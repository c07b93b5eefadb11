"""Seconds per SFT step of the default student on CPU, with and without activation checkpointing.

TRL turns activation checkpointing on by default; tuneloop turns it off on CPU
(`stages/policy.device_args`). This measures what that buys: the same rows (a trained adapter's
`train.jsonl`, the exact prompts of a cycle), the same number of steps, both ways.

    .venv/bin/python bench/train_speed.py --rows bench-runs/continuous/artifacts/adapters/cycle-0001-sft/train.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tuneloop.artifacts import read_jsonl  # noqa: E402
from tuneloop.config import LoraSettings, SFTSettings  # noqa: E402
from tuneloop.models.defaults import resolve_model_path  # noqa: E402
from tuneloop.stages.policy import device_args, load_policy  # noqa: E402


def seconds_per_step(model_dir: Path, rows: list[dict], steps: int, checkpointing: bool, out: Path) -> float:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    s = SFTSettings()
    policy = load_policy(model_dir, None, LoraSettings(), "fp32")
    args = SFTConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=s.batch_size,
                     learning_rate=s.learning_rate, max_length=s.max_length, report_to=[], save_strategy="no",
                     disable_tqdm=True, logging_steps=1, **(device_args(policy.device, policy.dtype)
                                                            | {"gradient_checkpointing": checkpointing}))
    data = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    trainer = SFTTrainer(model=policy.model, args=args, train_dataset=data, processing_class=policy.tokenizer,
                         peft_config=policy.peft_config)
    t0 = time.time()
    trainer.train()
    return (time.time() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=Path, required=True, help="a train.jsonl of prompt-completion rows")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("bench-runs/train-speed"))
    a = ap.parse_args()
    if not a.rows.is_file():
        raise SystemExit(f"no such file: {a.rows} (run bench/continuous.py first, or point --rows at a train.jsonl)")
    rows = read_jsonl(a.rows)[: 4 * a.steps]
    model_dir = resolve_model_path("builtin:smollm2-135m-instruct", a.out / "cache")
    result = {mode: round(seconds_per_step(model_dir, rows, a.steps, mode == "checkpointing on", a.out / "work"), 1)
              for mode in ("checkpointing on", "checkpointing off")}
    result |= {"steps": a.steps, "rows": len(rows),
               "command": f"python bench/train_speed.py --rows {a.rows} --steps {a.steps}"}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
