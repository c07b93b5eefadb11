"""The SFT trainer's loss runs the LM head on labelled positions only, and equals TRL's."""
from __future__ import annotations

import pytest
import torch
from trl import SFTTrainer

from tuneloop.config import LoraSettings, SFTSettings
from tuneloop.programs.rag import Passage, build_messages
from tuneloop.stages.methods import METHODS
from tuneloop.stages.policy import load_policy
from tuneloop.stages.sft_trainer import CompletionHeadSFTTrainer
from tuneloop.stages.training import build_trainer, trl_rows


def _rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        passages = [Passage(i, "a.md", "The agreement is governed by the laws of Delaware. " * (1 + i % 3))]
        rows.append({"prompt": build_messages(f"What law governs agreement {i}?", passages),
                     "completion": [{"role": "assistant", "content": "the laws of Delaware" + " indeed" * (i % 2)}]})
    return rows


def _loss_and_grads(trainer, compute_loss, batch, num_items):
    trainer.model.zero_grad()
    loss = compute_loss(trainer, trainer.model, dict(batch), num_items_in_batch=num_items)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("num_items", [None, 7])  # plain mean, and a sum over gradient-accumulated tokens
def test_the_loss_and_gradients_equal_trls(tiny_model_dir, tmp_path, num_items):
    policy = load_policy(tiny_model_dir, None, LoraSettings(dropout=0.0), "fp32")  # dropout: other masks per pass
    trainer = build_trainer(METHODS["sft"], policy, trl_rows(_rows(6), METHODS["sft"]), SFTSettings(batch_size=3),
                            tmp_path)
    assert isinstance(trainer, CompletionHeadSFTTrainer)
    with torch.no_grad():  # a trained adapter: lora_B starts at zero, which leaves lora_A without gradient
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(0))
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["labels"] == -100).sum() > (batch["labels"] != -100).sum()  # mostly prompt and padding
    ours, our_grads = _loss_and_grads(trainer, CompletionHeadSFTTrainer.compute_loss, batch, num_items)
    trl, trl_grads = _loss_and_grads(trainer, SFTTrainer.compute_loss, batch, num_items)
    assert ours.item() == pytest.approx(trl.item(), rel=1e-5)
    assert our_grads.keys() == trl_grads.keys() and our_grads  # the LoRA weights
    assert all(grad.abs().max() > 0 for grad in our_grads.values())
    for name, grad in our_grads.items():
        assert torch.allclose(grad, trl_grads[name], rtol=1e-4, atol=1e-6), name


def test_the_head_sees_only_the_labelled_positions(tiny_model_dir, tmp_path):
    policy = load_policy(tiny_model_dir, None, LoraSettings(), "fp32")
    trainer = build_trainer(METHODS["sft"], policy, trl_rows(_rows(4), METHODS["sft"]), SFTSettings(batch_size=4),
                            tmp_path)
    batch = next(iter(trainer.get_train_dataloader()))
    seen = []
    head = trainer.model.get_base_model().get_output_embeddings()
    hook = head.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    try:
        CompletionHeadSFTTrainer.compute_loss(trainer, trainer.model, dict(batch))
    finally:
        hook.remove()
    assert seen == [int((batch["labels"][:, 1:] != -100).sum())]


def test_the_loss_through_the_models_forward_equals_trls(tiny_model_dir, tmp_path):
    """The path taken under DDP with several workers (the forward through the wrapper, `logits_to_keep`
    the positions labelled in any row): the same loss and gradients as TRL's."""
    policy = load_policy(tiny_model_dir, None, LoraSettings(dropout=0.0), "fp32")
    trainer = build_trainer(METHODS["sft"], policy, trl_rows(_rows(6), METHODS["sft"]), SFTSettings(batch_size=3),
                            tmp_path)
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(0))
    batch = next(iter(trainer.get_train_dataloader()))

    def through_forward(trainer_, model, inputs, num_items_in_batch=None):
        labels = inputs["labels"][:, 1:]
        mask = labels != -100
        logits, targets = CompletionHeadSFTTrainer.labelled_logits_through_forward(model, inputs, labels, mask)
        assert logits.shape[0] == int(mask.sum())  # one row of logits per labelled token
        return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum") / mask.sum()

    ours, our_grads = _loss_and_grads(trainer, through_forward, batch, None)
    trl, trl_grads = _loss_and_grads(trainer, SFTTrainer.compute_loss, batch, None)
    assert ours.item() == pytest.approx(trl.item(), rel=1e-5)
    assert our_grads.keys() == trl_grads.keys() and our_grads
    for name, grad in our_grads.items():
        assert torch.allclose(grad, trl_grads[name], rtol=1e-4, atol=1e-6), name
