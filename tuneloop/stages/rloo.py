"""`tuneloop train align --method rloo`: a reward model on the preference pairs, then RLOO against it.

TRL 1.x ships no PPO trainer; RLOO (REINFORCE Leave-One-Out, Ahmadian et al. 2024) is its
maintained reward-model RL method. Two phases, both LoRA on the student's base model:

1. Reward model: `AutoModelForSequenceClassification(num_labels=1)` from the base model folder with
   a new LoRA (task_type SEQ_CLS, so the score head is trained and saved too), trained by
   `trl.RewardTrainer` (Bradley-Terry loss) on the same conversational rows DPO uses
   (`prompt` messages + `chosen` / `rejected`). Its accuracy on those pairs
   (reward(chosen) > reward(rejected)) is recorded. Saved in the artifact's `reward_model/`.
   It trains where the policy does (`compute.engine`: this process or Ray Train workers).
2. RLOO: `trl.RLOOTrainer` continues the champion's adapter (as the other methods; TRL copies the
   loaded adapter into a frozen "ref" adapter, so the KL reference is the champion), samples
   `align.num_generations` answers of at most `align.max_completion_length` tokens per prompt (the
   pairs' prompts) and scores them with the reward model (LoRA merged, frozen). KL coefficient:
   TRL's RLOO default 0.05.

Resume: the trained reward model is kept in artifacts/.work/<run>/reward_model until the run ends, so
a killed run skips phase 1; phase 2 resumes from its last complete checkpoint.
"""
from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, PrinterCallback

from tuneloop.config import AlignSettings, LoraSettings, Project
from tuneloop.models.local import load_tokenizer, pick_device, pick_dtype
from tuneloop.progress import Reporter
from tuneloop.safety import safe_rmtree
from tuneloop.stages.align_data import AlignData
from tuneloop.stages.common import train_losses
from tuneloop.stages.methods import METHODS, RLOO_KL_BETA
from tuneloop.stages.policy import load_policy, lora_config
from tuneloop.stages.training import (
    Run,
    Trained,
    alignment_meta,
    build_trainer,
    estimated_steps,
    train_args,
    train_model,
)

REWARD_DIR = "reward_model"
RLOO = METHODS["rloo"]


def _reward_tokenizer(model_dir: Path):
    tok = load_tokenizer(model_dir)
    tok.padding_side = "right"  # the score is read at the last non-pad token
    return tok


def _seq_cls_model(model_dir: Path, tokenizer, dtype: torch.dtype):
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=1, dtype=dtype)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


# --------------------------------------------------------------------------- phase 1: the reward model


def build_reward_trainer(model_dir: Path, rows: list[dict], s: AlignSettings, lora: LoraSettings, work_dir: Path):
    """The LoRA reward model's (RewardTrainer, tokenizer) on `rows` ({prompt, chosen, rejected})."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    device = pick_device()
    dtype = pick_dtype(device, s.precision)
    tokenizer = _reward_tokenizer(model_dir)
    torch.manual_seed(s.seed)  # the new score head is random
    model = _seq_cls_model(model_dir, tokenizer, dtype)
    args = RewardConfig(max_length=s.max_length, **{**train_args(s, work_dir, device, dtype), "save_strategy": "no"})
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                            processing_class=tokenizer, peft_config=lora_config(lora, "SEQ_CLS"))
    trainer.remove_callback(PrinterCallback)
    return trainer, tokenizer


def load_reward_model(model_dir: Path, adapter_dir: Path, dtype: torch.dtype = torch.float32):
    """The saved reward model with its LoRA merged, frozen, in eval mode; and its tokenizer."""
    from peft import PeftModel

    tokenizer = _reward_tokenizer(model_dir)
    model = PeftModel.from_pretrained(_seq_cls_model(model_dir, tokenizer, dtype), str(adapter_dir))
    model = model.merge_and_unload().eval()
    model.requires_grad_(False)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def reward_scores(model, tokenizer, prompt: list[dict], completions: list[list[dict]]) -> list[float]:
    """Rewards of `completions` after `prompt`, with the text RLOOTrainer builds (chat template)."""
    from trl.data_utils import apply_chat_template

    device = next(model.parameters()).device
    out = []
    for completion in completions:  # one at a time: no padding
        text = apply_chat_template({"messages": prompt + completion}, tokenizer)["text"]
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(device)
        with torch.no_grad():
            out.append(model(**ids).logits[0, 0].float().item())
    return out


def reward_accuracy(model, tokenizer, rows: list[dict]) -> float:
    """Share of rows whose chosen answer gets a higher reward than the rejected one."""
    wins = 0
    for r in rows:
        chosen, rejected = reward_scores(model, tokenizer, r["prompt"], [r["chosen"], r["rejected"]])
        wins += chosen > rejected
    return wins / len(rows) if rows else 0.0


def _reward_phase(model_dir: Path, rows: list[dict], s: AlignSettings, lora: LoraSettings, work_dir: Path,
                  reporter: Reporter, project: Project) -> dict:
    """Train (or, after a kill, reuse) the reward model in work_dir/reward_model, where the policy
    trains too (this process or Ray Train workers); its accuracy is measured here; return its info."""
    out = work_dir / REWARD_DIR
    info_path = out / "reward_info.json"
    if info_path.is_file():
        reporter.log(f"reusing the reward model trained before the interruption ({out})")
        return json.loads(info_path.read_text(encoding="utf-8"))
    reporter.log(f"training the reward model on {len(rows)} preference pairs")
    tmp = work_dir / "reward_train"
    build = partial(build_reward_trainer, model_dir, rows, s, lora)
    finished = train_model(build, tmp, "reward model", estimated_steps(len(rows), s), reporter, project)
    model, tokenizer = load_reward_model(model_dir, finished.folder, pick_dtype(pick_device(), s.precision))
    accuracy = reward_accuracy(model, tokenizer, rows)
    losses = train_losses(finished.log_history)
    info = {"accuracy": accuracy, "n_pairs": len(rows), "global_step": finished.global_step,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None}
    (finished.folder / "reward_info.json").write_text(json.dumps(info, indent=2))  # written last: marks it complete
    safe_rmtree(out, inside=work_dir, ignore_errors=True)
    finished.folder.rename(out)
    safe_rmtree(tmp, inside=work_dir, ignore_errors=True)
    reporter.log(f"reward model accuracy on the training pairs: {accuracy:.2f}")
    return info


# --------------------------------------------------------------------------- phase 2: RLOO


def build_rloo_trainer(model_dir: Path, parent_adapter: Path | None, prompts: list[dict], reward_model,
                       reward_tokenizer, s: AlignSettings, lora: LoraSettings, work_dir: Path):
    """RLOOTrainer on `prompts` ({"prompt": messages}) continuing `parent_adapter`, rewarded by `reward_model`."""
    # As in align: continuing the champion's adapter, TRL copies it as the frozen "ref".
    policy = load_policy(model_dir, parent_adapter, lora, s.precision, padding_side=RLOO.padding_side)
    reward_model.to(policy.device)
    trainer = build_trainer(RLOO, policy, prompts, s, work_dir, reward_funcs=[reward_model],
                            reward_processing_classes=[reward_tokenizer])
    return trainer, policy.tokenizer


def _build_policy_trainer(model_dir: Path, parent_adapter: Path | None, prompts: list[dict], reward_dir: Path,
                          s: AlignSettings, lora: LoraSettings, work_dir: Path):
    """Phase 2's (trainer, tokenizer), the reward model loaded from `reward_dir` (where the run
    trains: in this process, or in each Ray Train worker)."""
    reward_model, reward_tok = load_reward_model(model_dir, reward_dir, pick_dtype(pick_device(), s.precision))
    return build_rloo_trainer(model_dir, parent_adapter, prompts, reward_model, reward_tok, s, lora, work_dir)


def train_rloo(run: Run, data: AlignData, work_dir: Path, reporter: Reporter) -> Trained:
    """Both phases; the trained policy, with the reward model as an extra artifact folder (reward_model/)."""
    s, lora = run.project.settings.align, run.project.settings.lora
    rows = data.trl_rows()
    reward_info = _reward_phase(run.model_dir, rows, s, lora, work_dir, reporter, run.project)
    prompts = list({json.dumps(r["prompt"], sort_keys=True): {"prompt": r["prompt"]} for r in rows}.values())
    build = partial(_build_policy_trainer, run.model_dir, run.parent_adapter, prompts, work_dir / REWARD_DIR, s, lora)
    finished = train_model(build, work_dir / "rloo", RLOO.label, estimated_steps(len(prompts), s), reporter,
                           run.project)
    rewards = [h["reward"] for h in finished.log_history if "reward" in h]

    def copy_reward_model(tmp: Path) -> None:
        shutil.copytree(work_dir / REWARD_DIR, tmp / REWARD_DIR)

    hyperparams = {**s.model_dump(), "method": "rloo", "data": data.summary(), "kl_beta": RLOO_KL_BETA,
                   "n_prompts": len(prompts), "reward_model": {**reward_info, "path": REWARD_DIR},
                   "reward_model_accuracy": reward_info["accuracy"],
                   "first_reward": rewards[0] if rewards else None, "last_reward": rewards[-1] if rewards else None}
    return Trained(finished, data.rows, alignment_meta(run, hyperparams, finished), copy_reward_model)
