"""Speed, side by side on one machine: tuneloop's SFT against TRL's SFTTrainer with its defaults.

The same rows (CUAD dev seeds of `--contracts` contracts, each prompt built by
`programs/rag.build_messages` from the project's hybrid retrieval, as a cycle builds them), the
same base model (the built-in SmolLM2-135M-Instruct), the same LoRA (the `lora` settings), the same
optimiser settings (`sft` settings: learning rate, cosine schedule, batch size), the same number
of optimizer steps, fp32, each arm in a fresh process (its own peak RSS):

- `trl_default`: `trl.SFTTrainer` as TRL configures it (activation checkpointing on, every position
  through the LM head on CPU; LoRA dropout 0.05, `trl.ModelConfig`'s default);
- `tuneloop`: what `tuneloop train sft` runs (`stages/methods.METHODS["sft"]`: the LM head only on
  labelled positions, `stages/sft_trainer.py`; no activation checkpointing on CPU; LoRA dropout 0,
  the `lora` settings' default).

Printed and written to `--json-out`: non-padding tokens per second, the ratio, each arm's loss
curve, the loss of each trained model on all rows (the "final loss"), their relative gap, peak
RSS, and the fraction of this machine's measured fp32 matmul peak reached (LoRA training costs
about 4 FLOP per parameter per token: forward 2, backward through the frozen weights 2).

With `--dpo`, the same two arms train DPO (TRL's `DPOTrainer` both ways; each row's answer chosen,
the next row's rejected; the prompt counted twice per pair): `dpo_speedup_vs_trl`. With `--demo`,
`make demo` is timed too (a fresh project in the workdir): `demo_minutes` and each step's minutes,
then `bench/generation.py` on its project (`generation_speedup_vs_naive`). `--serve` and `--ingest`
run `bench/serve_load.py` (`serve_*`) and `bench/ingest_speed.py` (`ingest`) in the same run.
With `--device cuda` (a CUDA machine): both SFT arms in bf16 on the GPU (tokens/s, fraction of the
GPU's measured bf16 matmul peak, peak GPU memory), then the CUDA path checked against the CPU's:
the tuneloop arm's loss curve trained again in fp32 on the CPU, and batched greedy replies (bf16 on
the GPU, fp32 on the CPU); written under `cuda` in `--json-out`.

    .venv/bin/python bench/speed.py [--steps 12] [--contracts 3] [--dpo] [--demo] [--serve] [--ingest] [--device cuda]
        [--json-out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import cuad  # noqa: E402
import torch  # noqa: E402
from sqlalchemy import select  # noqa: E402

from tuneloop.artifacts import read_jsonl, write_jsonl  # noqa: E402
from tuneloop.cli import quiet_libraries  # noqa: E402
from tuneloop.config import load_project  # noqa: E402
from tuneloop.models.defaults import resolve_model_path  # noqa: E402
from tuneloop.models.registry import build_embedder  # noqa: E402
from tuneloop.programs.rag import Retriever  # noqa: E402
from tuneloop.progress import SilentReporter  # noqa: E402
from tuneloop.stages.ingest import ingest_paths  # noqa: E402
from tuneloop.stages.methods import METHODS  # noqa: E402
from tuneloop.stages.policy import load_policy  # noqa: E402
from tuneloop.stages.sft import training_rows  # noqa: E402
from tuneloop.stages.training import build_trainer, train_args, trl_rows  # noqa: E402
from tuneloop.store import CycleStep, Example, open_store  # noqa: E402

ARMS = ("trl_default", "tuneloop")
PARAMS = 134_515_008  # SmolLM2-135M


def peak_fraction(tokens_per_s: float, peak_gflops: float) -> float:
    """The share of a matmul peak that LoRA training at `tokens_per_s` uses (about 4 FLOP per
    parameter per token: forward 2, backward through the frozen weights 2)."""
    return 4 * PARAMS * tokens_per_s / (peak_gflops * 1e9)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data/cuad-dev"))
    ap.add_argument("--contracts", type=int, default=3, help="CUAD contracts whose seeds give the rows")
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per arm")
    ap.add_argument("--workdir", type=Path, default=Path("bench-runs/speed"))
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--demo", action="store_true", help="also time `make demo` (a fresh sample project; ~7 min)")
    ap.add_argument("--dpo", action="store_true", help="also DPO: TRL's DPOTrainer defaults vs tuneloop's")
    ap.add_argument("--serve", action="store_true", help="also serving: 1 vs 8 clients (bench/serve_load.py, ~5 min)")
    ap.add_argument("--ingest", action="store_true", help="also adding 1 and 40 contracts to indexed ones "
                                                          "(bench/ingest_speed.py, ~3 min)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: both arms in bf16 on the GPU, then the CUDA path checked against the CPU's "
                         "(the tuneloop arm's loss curve, batched greedy replies); written under `cuda`")
    ap.add_argument("--arm", choices=ARMS, default=None, help=argparse.SUPPRESS)  # one arm, in a child process
    ap.add_argument("--replies", action="store_true", help=argparse.SUPPRESS)  # child: batched greedy replies
    ap.add_argument("--method", choices=("sft", "dpo"), default="sft", help=argparse.SUPPRESS)
    return ap.parse_args()


def build_rows(args) -> Path:
    """The SFT rows of the seed contracts' questions, written once to the workdir."""
    path = args.workdir / "rows.jsonl"
    if path.exists():
        return path
    _, seeds, heldout = cuad.split_questions(args.data, args.contracts, 10, 0)  # the project needs a held-out set
    work = args.workdir / "project"
    settings = argparse.Namespace(data=args.data, synth_questions=1, epochs=2.0, rlaif_prompts=1, rlaif_candidates=2)
    project = cuad.make_project(settings, work, seeds, heldout, {})
    contracts = sorted({r["contract"] for r in seeds})
    with open_store(project.store_url)() as s:
        embedder = build_embedder(project)
        ingest_paths(project, s, [args.data / "contracts" / c for c in contracts], embedder, SilentReporter())
        s.commit()
        examples = list(s.scalars(select(Example).where(Example.split == "train").order_by(Example.id)))
        rows = training_rows(examples, Retriever.load(project, s, embedder))
    write_jsonl(path, [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    return path


def matmul_peak_gflops(size: int = 1536, repeats: int = 10, device: str = "cpu",
                       dtype: torch.dtype = torch.float32) -> float:
    """Best matmul throughput of this machine (fp32 with torch's threads on CPU; pass
    device="cuda", dtype=torch.bfloat16 and a larger size for a GPU's bf16 peak), GFLOP/s."""
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best / 1e9


def method_rows(method: str, rows: list[dict]) -> list[dict]:
    """SFT rows as they are; DPO pairs: each row's answer chosen, the next row's answer rejected."""
    if method == "sft":
        return rows
    return [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": rows[(i + 1) % len(rows)]["completion"]}
            for i, r in enumerate(rows)]


def processed_tokens(method: str, dataset) -> int:
    """Non-padding tokens one pass over `dataset` feeds the model (DPO: the prompt twice)."""
    if method == "sft":
        return sum(len(ids) for ids in dataset["input_ids"])
    return sum(2 * len(p) + len(c) + len(r)
               for p, c, r in zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"]))


def run_arm(arm: str, method: str, rows_path: Path, steps: int, work: Path, device: str = "cpu") -> dict:
    """Train `steps` steps of `method` with one arm; its measurements. Both arms share
    `training.train_args` (no checkpoint is saved: it costs both the same and is not training
    throughput)."""
    import trl
    from datasets import Dataset

    project = load_project(work.parent / "project")
    settings = project.settings.sft if method == "sft" else project.settings.align
    s = settings.model_copy(update={"epochs": 1.0, "save_steps": 10**6})  # one pass, no checkpoint
    spec = METHODS[method]
    rows = trl_rows(method_rows(method, read_jsonl(rows_path))[: steps * s.batch_size], spec)
    lora = project.settings.lora  # the same rank, alpha and target modules in both arms
    if arm == "trl_default":  # TRL's LoRA dropout default (`trl.ModelConfig.lora_dropout`, 0.05)
        lora = lora.model_copy(update={"dropout": trl.ModelConfig().lora_dropout})
    policy = load_policy(resolve_model_path(project.settings.models.student.model, project.cache), None, lora,
                         "bf16" if device == "cuda" else "fp32", spec.padding_side)
    if policy.device != device:
        raise SystemExit(f"asked for {device}, but the model loaded on {policy.device}")
    if arm == "tuneloop":
        trainer = build_trainer(spec, policy, rows, s, work / f"{method}-{arm}")
    else:  # TRL's trainer and config, fp32 forced; activation checkpointing as TRL defaults it (on)
        config_class, trainer_class = {"sft": (trl.SFTConfig, trl.SFTTrainer),
                                       "dpo": (trl.DPOConfig, trl.DPOTrainer)}[method]
        args = config_class(**{**train_args(s, work / f"{method}-{arm}", policy.device, policy.dtype),
                               "gradient_checkpointing": True}, **spec.options(s))
        trainer = trainer_class(model=policy.model, args=args, train_dataset=Dataset.from_list(rows),
                                processing_class=policy.tokenizer, peft_config=policy.peft_config)
    tokens = processed_tokens(method, trainer.train_dataset)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"arm": arm, "method": method, "trainer": type(trainer).__name__, "steps": trainer.state.global_step,
            "rows": len(rows), "tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1), "loss_curve": losses,
            "final_loss": round(mean_loss(trainer), 5) if method == "sft" else None,
            "peak_rss_mib": cuad.peak_rss_mib(), "threads": torch.get_num_threads(),
            "lora": lora.model_dump(include={"r", "alpha", "dropout"}), "device": policy.device,
            "dtype": str(policy.dtype).removeprefix("torch."),
            "peak_gpu_mib": torch.cuda.max_memory_allocated() // 2**20 if policy.device == "cuda" else None}


def greedy_replies(rows_path: Path, work: Path, n: int = 16) -> list[str]:
    """Batched greedy replies (`LocalChatModel.chat`: bf16 on CUDA, fp32 on CPU) to the first `n`
    rows' prompts, 48 new tokens."""
    from tuneloop.models.base import GenerationParams
    from tuneloop.models.local import LocalChatModel

    project = load_project(work.parent / "project")
    model = LocalChatModel(resolve_model_path(project.settings.models.student.model, project.cache), batch_size=8)
    conversations = [r["prompt"] for r in read_jsonl(rows_path)[:n]]
    return model.chat(conversations, GenerationParams(max_new_tokens=48))


@torch.no_grad()
def mean_loss(trainer) -> float:
    """The trained model's mean loss over the answer tokens of every row (eval mode, one pass)."""
    model = trainer.model
    model.eval()
    total, count = 0.0, 0
    for batch in trainer.get_train_dataloader():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        mask = labels != -100
        total += torch.nn.functional.cross_entropy(logits[mask].float(), labels[mask], reduction="sum").item()
        count += int(mask.sum())
    return total / max(count, 1)


def demo_minutes(workdir: Path) -> dict:
    """Wall minutes of `make demo` into a fresh folder (the venv in place), and each step's minutes."""
    folder = (workdir / "demo").resolve()
    t0 = time.perf_counter()
    subprocess.run(["make", "demo", f"DEMO_DIR={folder}"], check=True, capture_output=True, text=True)
    minutes = (time.perf_counter() - t0) / 60
    with open_store(load_project(folder).store_url)() as s:
        steps = {st.name: round((st.finished_at - st.started_at).total_seconds() / 60, 2)
                 for st in s.scalars(select(CycleStep).order_by(CycleStep.id))}
    return {"demo_minutes": round(minutes, 2), "demo_step_minutes": steps}


def cuda_run(args, arm, child) -> dict:
    """Both SFT arms in bf16 on the GPU, then the CUDA path checked against the CPU's: the
    tuneloop arm's loss curve (fp32 on CPU) and batched greedy replies (bf16 vs fp32)."""
    arms = {name: arm(name, "sft") for name in ARMS}
    cpu = arm("tuneloop", "sft", device="cpu")
    peak = matmul_peak_gflops(size=8192, device="cuda", dtype=torch.bfloat16)
    gpu_curve, cpu_curve = arms["tuneloop"]["loss_curve"], cpu["loss_curve"]
    step_gap = max(abs(g - c) / c for g, c in zip(gpu_curve, cpu_curve))
    final_gap = abs(arms["tuneloop"]["final_loss"] - cpu["final_loss"]) / cpu["final_loss"]
    print("generating: batched greedy replies on cuda and on cpu", flush=True)
    gpu_replies, cpu_replies = child("--replies"), child("--replies", device="cpu")
    same = sum(a == b for a, b in zip(gpu_replies, cpu_replies))
    return {
        "gpu": torch.cuda.get_device_name(0),
        "sft_speedup_vs_trl": round(arms["tuneloop"]["tokens_per_s"] / arms["trl_default"]["tokens_per_s"], 3),
        "sft_tokens_per_s": {a: arms[a]["tokens_per_s"] for a in ARMS},
        "bf16_matmul_peak_tflops": round(peak / 1000, 1),
        "sft_fraction_of_bf16_peak": {a: round(peak_fraction(arms[a]["tokens_per_s"], peak), 4) for a in ARMS},
        "peak_gpu_mib": {a: arms[a]["peak_gpu_mib"] for a in ARMS},
        "sft": arms,
        "cuda_vs_cpu": {
            "tuneloop_loss_curve_max_relative_gap": round(step_gap, 4),
            "tuneloop_final_loss_gap": round(final_gap, 4),
            "loss_within_tolerance": final_gap <= 0.02 and step_gap <= 0.05,  # bf16 vs fp32
            "greedy_replies_identical": f"{same}/{len(cpu_replies)}",
            "replies_within_tolerance": same >= 0.75 * len(cpu_replies),  # bf16 may flip a near-tie token
            "cpu_arm": cpu,
        },
        "machine": cuad.machine(),
        "command": f"python bench/speed.py --device cuda --steps {args.steps} --contracts {args.contracts}",
    }


def other_bench(args, script: str, *flags: str) -> dict:
    """Another bench script of this folder run in its own process; the JSON it writes."""
    out = args.workdir / f"{Path(script).stem}.json"
    out.unlink(missing_ok=True)
    subprocess.run([sys.executable, str(Path(__file__).parent / script), *flags, "--json-out", str(out)],
                   check=True, capture_output=True, text=True)
    return json.loads(out.read_text())


def main() -> None:
    args = parse_args()
    quiet_libraries()
    if args.arm:  # child: one arm, its JSON on the last line
        print(json.dumps(run_arm(args.arm, args.method, args.workdir / "rows.jsonl", args.steps,
                                 args.workdir / "work", args.device)))
        return
    if args.replies:  # child: batched greedy replies, JSON on the last line
        print(json.dumps(greedy_replies(args.workdir / "rows.jsonl", args.workdir / "work")))
        return
    if not (args.data / "qa.jsonl").exists():
        raise SystemExit(f"no CUAD data at {args.data} (see its README; pass --data)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible here (torch.cuda.is_available() is False)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    build_rows(args)

    def child(*flags: str, device: str = args.device) -> dict | list:
        """This script in a fresh process on `device` (CPU: no GPU visible to it); its last line's JSON."""
        env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {})}
        out = subprocess.run([sys.executable, __file__, *flags, "--device", device, "--steps", str(args.steps),
                              "--workdir", str(args.workdir), "--data", str(args.data)],
                             check=True, capture_output=True, text=True, env=env)
        return json.loads(out.stdout.strip().splitlines()[-1])

    def arm(name: str, method: str, device: str = args.device) -> dict:
        print(f"training: {method} {name} on {device} ({args.steps} steps)", flush=True)
        return child("--arm", name, "--method", method, device=device)

    if args.device == "cuda":
        result = cuda_run(args, arm, child)
        print(json.dumps(result, indent=2))
        if args.json_out:
            cuad.merge_json(args.json_out, {"cuda": result})
        return

    arms = {name: arm(name, "sft") for name in ARMS}
    trl, ours = arms["trl_default"], arms["tuneloop"]
    peak = matmul_peak_gflops()
    result = {
        "sft_speedup_vs_trl": round(ours["tokens_per_s"] / trl["tokens_per_s"], 3),
        "sft_final_loss_gap": round(abs(ours["final_loss"] - trl["final_loss"]) / trl["final_loss"], 4),
        "sft_tokens_per_s": {a: arms[a]["tokens_per_s"] for a in ARMS},
        "sft_fraction_of_matmul_peak": {a: round(peak_fraction(arms[a]["tokens_per_s"], peak), 3) for a in ARMS},
        "matmul_peak_gflops": round(peak, 1),
        "sft": arms,
        "machine": cuad.machine(),
        "command": f"python bench/speed.py --steps {args.steps} --contracts {args.contracts}"
                   + "".join(f" --{flag}" for flag in ("dpo", "demo", "serve", "ingest") if getattr(args, flag)),
    }
    if args.dpo:
        dpo = {name: arm(name, "dpo") for name in ARMS}
        result |= {"dpo_speedup_vs_trl": round(dpo["tuneloop"]["tokens_per_s"] / dpo["trl_default"]["tokens_per_s"], 3),
                   "dpo_tokens_per_s": {a: dpo[a]["tokens_per_s"] for a in ARMS}, "dpo": dpo}
    if args.demo:
        print("timing: make demo, then generation on its project", flush=True)
        result |= demo_minutes(args.workdir)
        result |= other_bench(args, "generation.py", "--project", str(args.workdir / "demo"))
    if args.serve:
        print("serving: 1 vs 8 clients (bench/serve_load.py)", flush=True)
        result |= other_bench(args, "serve_load.py", "--data", str(args.data))
    if args.ingest:
        print("ingest: adding 1 and 40 contracts (bench/ingest_speed.py)", flush=True)
        result |= other_bench(args, "ingest_speed.py", "--data", str(args.data))
    print(json.dumps({k: v for k, v in result.items() if k not in ("sft", "dpo")}, indent=2))
    for a in ARMS:
        print(f"{a}: loss curve {[round(x, 3) for x in arms[a]['loss_curve']]}")
    if args.json_out:
        cuad.merge_json(args.json_out, result)


if __name__ == "__main__":
    main()
