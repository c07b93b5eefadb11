"""TRL's SFTTrainer with the LM head run only where there is a label (the answer's tokens).

A tuneloop SFT row is a ~400-token retrieval prompt and a ~20-token answer, and the loss is on the
answer only. TRL 1.16 computes it with a fused, chunked LM head; on CUDA with Triton it projects
only the labelled positions, but elsewhere (the CPU) it projects every position ("the number of
valid positions would change the tile shapes on every batch", `trl.trainer.utils.add_fused_lm_head`)
and masks the result. With a 49k-token vocabulary the head is about a fifth of a 135M model's
FLOPs per token, so on CPU most of that work is thrown away.

`CompletionHeadSFTTrainer.compute_loss` runs the decoder, keeps the hidden states of the positions
whose next token is labelled, and applies the LM head and cross-entropy to those alone. The loss
is the same number TRL computes (mean negative log-likelihood over the labelled tokens, or the
sum over `num_items_in_batch` under gradient accumulation), so the gradients are the same
(tests/test_sft_trainer.py checks both against TRL's own `compute_loss`). Everything else
(data handling, collator, optimiser, checkpoints) is SFTTrainer's. Models whose logits are scaled
or soft-capped, and evaluation calls that want the outputs, go to TRL's path unchanged.

Under DDP with several processes (Ray Train) the decoder cannot be called on its own: the
forward must go through the DistributedDataParallel wrapper, which prepares the gradient
all-reduce. There the model's own forward runs with `logits_to_keep` = the positions labelled in
any row of the batch (`labelled_logits_through_forward`), a few more than the labelled ones.

Why not TRL: its CPU path is written to keep tile shapes static for compilers (Neuron); no option
selects the compact path on CPU. This is the one method we override, in ~40 lines.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from trl import SFTTrainer

_SCALED_LOGITS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                  "logits_scaling")


def _causal_lm(model):
    """The causal LM under a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def plain_logits(causal_lm) -> bool:
    """Whether the model's logits are the LM head's output as is (no scaling, no soft-capping)."""
    config = causal_lm.config.get_text_config()
    return all(getattr(config, name, None) is None for name in _SCALED_LOGITS)


class CompletionHeadSFTTrainer(SFTTrainer):
    """SFTTrainer whose loss projects only the labelled positions through the LM head."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"][:, 1:]  # position i predicts token i + 1
        mask = labels != -100
        if isinstance(model, torch.nn.parallel.DistributedDataParallel) and torch.distributed.get_world_size() > 1:
            logits, targets = self.labelled_logits_through_forward(model, inputs, labels, mask)
        else:  # one process (a DDP wrapper of one process has nothing to all-reduce)
            model = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
            causal_lm = _causal_lm(model)
            if not plain_logits(causal_lm):
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            decoder = getattr(causal_lm, causal_lm.base_model_prefix)
            hidden = decoder(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                             position_ids=inputs.get("position_ids"), use_cache=False).last_hidden_state
            logits, targets = causal_lm.get_output_embeddings()(hidden[:, :-1][mask]), labels[mask]
        loss = F.cross_entropy(logits.float(), targets, reduction="sum")
        loss = loss / (torch.as_tensor(num_items_in_batch) if num_items_in_batch is not None
                       else mask.sum()).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as TRL: DDP averages gradients across ranks
        return loss

    @staticmethod
    def labelled_logits_through_forward(model, inputs, labels, mask):
        """(logits, targets) of the labelled positions, through the model's own forward: under DDP
        (several processes) the forward must go through the wrapper, which prepares the gradient
        all-reduce, so the decoder cannot be called alone. `logits_to_keep` takes the positions
        labelled in any row of the batch: a few more than the labelled ones, far fewer than all."""
        positions = mask.any(0).nonzero().squeeze(-1)
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"),
                       position_ids=inputs.get("position_ids"), use_cache=False, logits_to_keep=positions).logits
        kept = mask[:, positions]
        return logits[kept], labels[:, positions][kept]
