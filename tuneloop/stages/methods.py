"""The training methods, one table entry each, like TRL's config/trainer pair per method.

An entry names the TRL config and trainer classes, the kind of rows the method trains on, the
model its KL term compares with, and the method's own config fields (read from its settings
section: `sft` for SFT and DAPT, `align` for the alignment methods). Everything a method shares
with the others (output folder, optimiser, checkpoints, device) is `training.train_args`.

Hyperparameters follow the papers: beta 0.1 for DPO/KTO and lambda 0.1 for ORPO (`align.beta`),
the KL coefficient 0.04 for GRPO (DeepSeekMath) and TRL's RLOO default 0.05. The classes are
named, not imported: TRL takes seconds to import and most commands never train.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

GRPO_KL_BETA = 0.04  # DeepSeekMath's GRPO KL coefficient (TRL's own default is 0: no reference)
RLOO_KL_BETA = 0.05  # TRL's RLOO default KL coefficient

# The row columns each data kind hands to TRL.
DataKind = Literal["completions", "text", "pairs", "unpaired", "prompts"]
TRL_COLUMNS: dict[str, tuple[str, ...]] = {
    "completions": ("prompt", "completion"),  # SFT: loss on the answer only
    "text": ("text",),  # DAPT: loss on every token
    "pairs": ("prompt", "chosen", "rejected"),  # DPO, ORPO; RLOO's reward model (its prompts feed RLOO)
    "unpaired": ("prompt", "completion", "label"),  # KTO: desirable / undesirable answers
    "prompts": ("prompt", "reference", "question", "excerpts"),  # GRPO: what its reward reads
}


# SFT and DAPT: TRL's SFTTrainer with the LM head run on labelled positions only (`stages/sft_trainer.py`)
_SFT_TRAINER = "tuneloop.stages.sft_trainer:CompletionHeadSFTTrainer"


def _load(dotted: str) -> Any:
    module, _, name = dotted.partition(":")
    return getattr(importlib.import_module(module), name)


def _sft_options(s) -> dict:
    return {"max_length": s.max_length, "lr_scheduler_type": "cosine", "warmup_steps": 0.03,
            "dataset_num_proc": None}


def _dapt_options(s) -> dict:  # plain language modelling on the rows' "text"
    return {**_sft_options(s), "dataset_text_field": "text", "packing": False, "completion_only_loss": False,
            "assistant_only_loss": False}


def _sampling_options(beta: float) -> Callable[[Any], dict]:
    return lambda s: {"beta": beta, "num_generations": s.num_generations,
                      "max_completion_length": s.max_completion_length}


@dataclass(frozen=True)
class Method:
    name: str
    config: str  # "module:Class" of its TRL config
    trainer: str  # "module:Class" of its TRL trainer
    data: DataKind
    reference: Literal["champion", "none"]  # the KL term's model: the run's parent, or none at all
    options: Callable[[Any], dict]  # the method's own config fields, from its settings section
    label: str  # the progress bar's label
    sampling: bool = False  # one step = batch_size prompts x num_generations sampled answers
    padding_side: str = "right"  # left for methods that generate

    def classes(self) -> tuple[type, type]:
        """The TRL (config, trainer) classes."""
        return _load(self.config), _load(self.trainer)

    def reference_note(self, parent_name: str) -> str:
        """What the artifact's meta says about the reference model."""
        if self.reference == "none":
            return f"none ({self.name.upper()} is reference-free)"
        return f"champion {parent_name}"


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("sft", "trl:SFTConfig", _SFT_TRAINER, "completions", "none", _sft_options,
           "fine-tuning (LoRA SFT)"),
    Method("dapt", "trl:SFTConfig", _SFT_TRAINER, "text", "none", _dapt_options,
           "domain-adaptive pre-training (LoRA)"),
    Method("dpo", "trl:DPOConfig", "trl:DPOTrainer", "pairs", "champion",
           lambda s: {"beta": s.beta, "max_length": s.max_length}, "aligning (DPO, LoRA)"),
    Method("orpo", "trl.experimental.orpo:ORPOConfig", "trl.experimental.orpo:ORPOTrainer", "pairs", "none",
           lambda s: {"beta": s.beta, "max_length": s.max_length, "max_completion_length": s.max_completion_length},
           "aligning (ORPO, LoRA)"),
    Method("kto", "trl:KTOConfig", "trl:KTOTrainer", "unpaired", "champion",
           lambda s: {"beta": s.beta, "max_length": s.max_length}, "aligning (KTO, LoRA)"),
    Method("grpo", "trl:GRPOConfig", "trl:GRPOTrainer", "prompts", "champion", _sampling_options(GRPO_KL_BETA),
           "aligning (GRPO, LoRA)", sampling=True, padding_side="left"),
    Method("rloo", "trl:RLOOConfig", "trl:RLOOTrainer", "pairs", "champion", _sampling_options(RLOO_KL_BETA),
           "aligning (RLOO, LoRA)", sampling=True, padding_side="left"),
)}
ALIGN_METHODS = ("dpo", "orpo", "kto", "grpo", "rloo")  # `tuneloop train align --method`
PAIR_METHODS = tuple(m for m in ALIGN_METHODS if METHODS[m].data == "pairs")  # trained on preference pairs
