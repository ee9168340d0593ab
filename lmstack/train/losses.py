"""Losses of the fine-tuning methods, each a `(model, batch) -> (loss, metrics)` for `train.loop.train`.

Batches follow the Hugging Face convention: `labels` align with `input_ids` and are -100 where no loss is
taken (prompt tokens, padding); the shift (position t predicts token t + 1) happens here.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, T, V), labels (B, T) -> log p(label_t | <t) for t >= 1 (B, T-1), and the labelled mask."""
    targets = labels[:, 1:]
    mask = targets != IGNORE
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return picked * mask, mask


def labelled_logits(
    model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The LM head applied only where a labelled token is predicted: logits (N, V), targets (N,), and the
    (B, T-1) mask that places them. The head is most of a small model's compute (gemma-3-270m: 168M of its
    268M weights sit in the 262k-word output layer) and prompt tokens are most of a chat batch's positions.
    Equal to the full forward's logits at those positions (a test checks)."""
    targets = labels[:, 1:]
    mask = targets != IGNORE
    forward_hidden, head = getattr(model, "forward_hidden", None), getattr(model, "head", None)
    if not (callable(forward_hidden) and callable(head)):  # another causal LM: full logits, then select
        return model(input_ids)[:, :-1][mask], targets[mask], mask
    hidden = forward_hidden(input_ids)[:, :-1]  # (B, T-1, C)
    return head(hidden[mask]), targets[mask], mask  # (N, V)


def sft_loss(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean next-token cross-entropy over the labelled (assistant) tokens of the batch."""
    logits, targets, _ = labelled_logits(model, batch["input_ids"], batch["labels"])
    if targets.numel() == 0:
        raise ValueError("a batch has no labelled tokens (every label is -100); check the data's masking")
    return F.cross_entropy(logits.float(), targets), {}


def sequence_logprob(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of log p over each sequence's labelled tokens: (B,)."""
    logits, targets, mask = labelled_logits(model, input_ids, labels)
    picked = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (N,)
    per_token = torch.zeros(mask.shape, dtype=picked.dtype, device=picked.device).masked_scatter(mask, picked)
    return per_token.sum(-1)


def dpo_loss_from_logprobs(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DPO (Rafailov et al. 2023): -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), batch mean.

    Rewards are the beta-scaled log-ratios; accuracy is the share of pairs whose chosen reward is higher."""
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen - rejected).mean()
    chosen, rejected = chosen.detach(), rejected.detach()
    metrics = {
        "reward_chosen": float(chosen.mean()),
        "reward_rejected": float(rejected.mean()),
        "reward_margin": float((chosen - rejected).mean()),
        "reward_accuracy": float((chosen > rejected).float().mean()),
    }
    return loss, metrics
