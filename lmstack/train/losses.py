"""Losses of the fine-tuning methods, each a `(model, batch) -> (loss, metrics)` for `train.loop.train`.

Batches follow the Hugging Face convention: `labels` align with `input_ids` and are -100 where no loss is
taken (prompt tokens, padding); the shift (position t predicts token t + 1) happens here.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.models.layers import Linear, train_ops
from lmstack.quant import Int8Linear

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
    head = getattr(model, "head", None)
    if not (callable(getattr(model, "forward_hidden", None)) and callable(head)):  # another causal LM
        targets = labels[:, 1:]
        mask = targets != IGNORE
        return model(input_ids)[:, :-1][mask], targets[mask], mask  # full logits, then select
    hidden, targets, mask = labelled_hidden(model, input_ids, labels)
    return head(hidden), targets, mask  # (N, V)


def labelled_hidden(
    model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The final hidden states where a labelled token is predicted (N, C), those targets (N,) and the
    (B, T-1) mask that places them; for models with `forward_hidden` (lmstack's Transformer)."""
    targets = labels[:, 1:]
    mask = targets != IGNORE
    hidden = model.forward_hidden(input_ids)[:, :-1]  # type: ignore[operator]  # (B, T-1, C)
    return hidden[mask], targets[mask], mask


class _ChunkedHeadCE(torch.autograd.Function):
    """mean_i CE(softcap(h_i W^T), t_i) without ever holding the (N, V) logits (Liger's fused linear
    cross-entropy): the tokens go through the head in chunks, and each chunk's gradient with respect to h
    (and to W when it trains) is computed right there, since the loss is the end of the graph. Backward
    only scales those by the incoming gradient. Memory: a (chunk, V) block instead of ~3 x (N, V) float32
    (logits, their float copy and their gradient), 600 MiB for 1024 tokens of a 49k-word vocabulary.
    W is a float tensor, or a frozen int8 head (QLoRA's, lmstack.nf4.quantize_tables_int8), which
    `_int8_head_ce` reads a slice of vocabulary at a time instead."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        h: torch.Tensor,
        w: torch.Tensor | Int8Linear,
        targets: torch.Tensor,
        softcap: float | None,
        chunk: int,
        ops: Any = None,
    ) -> torch.Tensor:
        """`ops`: the native training ops (lmstack.models.layers.train_ops), which turn a float32 logits block
        into its gradient in one pass, or None."""
        n = h.shape[0]
        grad_w = None
        if isinstance(w, Int8Linear):
            total, grad_h = _int8_head_ce(h, w, targets, softcap)
        else:
            grad_h = torch.empty_like(h)  # (N, C)
            if ctx.needs_input_grad[1]:
                grad_w = torch.zeros_like(w, dtype=torch.float32)  # (V, C)
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for i in range(0, n, chunk):
                capped = None
                hc, tc = h[i : i + chunk], targets[i : i + chunk]  # (c, C), (c,)
                z = (hc @ w.T).float()  # (c, V)
                if ops is not None:  # native: z becomes d loss_i / d z in place, in one pass
                    total += ops.softmax_xent_(z, tc.contiguous(), softcap or 0.0).sum()
                    g = e = z
                else:
                    if softcap is not None:
                        capped = z.div_(softcap).tanh_()  # (c, V), kept for the gradient
                        z = softcap * capped
                    picked = z.gather(1, tc[:, None]).squeeze(1)  # (c,)
                    top = z.amax(dim=1, keepdim=True)  # (c, 1)
                    e = z.sub_(top).exp_()  # in place from here on: one (c, V) block per chunk
                    denom = e.sum(dim=1, keepdim=True)
                    total += (top.squeeze(1) + denom.squeeze(1).log() - picked).sum()  # logsumexp - z_target
                    g = e.div_(denom)  # softmax; d loss_i / d z = softmax - onehot
                    g[torch.arange(len(tc), device=g.device), tc] -= 1.0
                    if capped is not None:
                        g.mul_(capped.square_().neg_().add_(1.0))  # through cap * tanh(z / cap): 1 - tanh^2
                grad_h[i : i + chunk] = (g.to(w.dtype) @ w).div_(n).to(h.dtype)  # / n: the mean
                if grad_w is not None:
                    grad_w.addmm_(g.T, hc.float(), alpha=1.0 / n)
                del z, e, g, capped  # the next chunk's (c, V) logits must not meet this one's
        ctx.save_for_backward(grad_h, grad_w if grad_w is not None else torch.empty(0))
        ctx.has_grad_w = grad_w is not None
        ctx.w_dtype = w.dtype if isinstance(w, torch.Tensor) else torch.float32
        return total / n

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        gw = (grad_w * grad).to(ctx.w_dtype) if ctx.has_grad_w else None
        return grad_h * grad.to(grad_h.dtype), gw, None, None, None, None


# logits of one vocabulary slice of an int8 head, for all tokens at once: 8 MiB of float32, with between
# INT8_SLICE_MIN_ROWS and INT8_SLICE_MAX_ROWS rows of the head per slice (28 MiB dequantized at width 896)
INT8_SLICE_LOGITS = 2**21
INT8_SLICE_MIN_ROWS, INT8_SLICE_MAX_ROWS = 256, 8192


def _int8_head_ce(
    h: torch.Tensor, w: Int8Linear, targets: torch.Tensor, softcap: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the N tokens' CE, its gradient / N with respect to h (N, C)) for a frozen int8 head, read
    a slice of vocabulary rows at a time in two passes: the first takes each token's logsumexp online
    (running max and rescaled sum, as flash attention does), the second recomputes each slice's logits
    and adds softmax - onehot times the slice's rows to the gradient. Every token goes through a slice
    together, so the head is dequantized twice per step rather than twice per (c, V) chunk (0.6 of a 7.7 s
    smollm2 QLoRA step went to dequantizing), and no (c, V) block exists: the logits held are
    (N, INT8_SLICE_LOGITS / N), 8 MiB, where the chunked block was 48 MiB. The price: one more
    (N, C) x (C, V) product per step."""
    n, vocab = h.shape[0], w.out_features
    hf = h.detach().float()  # (N, C)
    step = min(INT8_SLICE_MAX_ROWS, max(INT8_SLICE_MIN_ROWS, INT8_SLICE_LOGITS // max(n, 1)))
    slices = [(v, min(v + step, vocab)) for v in range(0, vocab, step)]
    tokens = torch.arange(n, device=h.device)

    def logits(v: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(rows (s, C), logits (N, s), tanh(z / cap) or None, which tokens' targets fall in the slice)"""
        rows = w.dequantize_rows(v, stop)  # float32
        z = hf @ rows.T
        capped = None
        if softcap is not None:
            capped = z.div_(softcap).tanh_()
            z = softcap * capped
        return rows, z, capped, (targets >= v) & (targets < stop)

    top = torch.full((n,), -torch.inf, device=h.device)  # running max (N,)
    denom = torch.zeros(n, device=h.device)  # running sum of exp(z - top) (N,)
    picked = torch.zeros(n, device=h.device)  # each token's target logit (N,)
    for v, stop in slices:
        rows, z, capped, inside = logits(v, stop)
        del rows, capped
        picked[inside] = z[tokens[inside], targets[inside] - v]
        new_top = torch.maximum(top, z.amax(dim=1))
        denom.mul_((top - new_top).exp_()).add_(z.sub_(new_top[:, None]).exp_().sum(dim=1))
        top = new_top
        del z
    lse = top + denom.log()  # (N,)
    total = (lse - picked).sum()

    grad_h = torch.zeros_like(hf)  # (N, C)
    for v, stop in slices:
        rows, z, capped, inside = logits(v, stop)
        g = z.sub_(lse[:, None]).exp_()  # this slice of the softmax over the whole vocabulary (N, s)
        g[tokens[inside], targets[inside] - v] -= 1.0  # d CE / d z = softmax - onehot
        if capped is not None:
            g.mul_(capped.square_().neg_().add_(1.0))  # through cap * tanh(z / cap)
        grad_h.addmm_(g, rows)
        del rows, z, g, capped
    return total, grad_h.div_(n).to(h.dtype)


# logits per chunk of the chunked loss: 32 MiB of float32, and at least CHUNK_MIN_TOKENS rows so that each
# chunk's two head matmuls stay compute-bound (fewer rows re-read the whole (V, C) head for little work:
# 27-token chunks of qwen's 152k-word head made the loss 3x slower than unchunked). With checkpointing the
# logits block is the largest thing a step allocates: 128 MiB blocks put 100 MiB on smollm2's peak.
CHUNK_LOGITS = 2**23
CHUNK_MIN_TOKENS = 256


def _plain_head(model: nn.Module) -> tuple[torch.Tensor | Int8Linear, float | None] | None:
    """(head weight (V, C) or frozen int8 head, final softcap) when the LM head is a plain bias-free linear
    layer (possibly tied to the embeddings) or QLoRA's int8 head, so the chunked loss applies; None for
    anything else (a LoRA'd head...)."""
    output, config = getattr(model, "output", None), getattr(model, "config", None)
    if not callable(getattr(model, "forward_hidden", None)):
        return None
    softcap = getattr(config, "final_softcap", None)
    if isinstance(output, Int8Linear) and output.bias is None:
        return output, softcap
    if type(output) not in (nn.Linear, Linear):
        return None
    assert isinstance(output, nn.Linear)
    if output.bias is not None:
        return None
    return output.weight, softcap


def sft_loss(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean next-token cross-entropy over the labelled (assistant) tokens of the batch; through the
    chunked head (`_ChunkedHeadCE`) when the model's head allows it, equal to the plain path (a test)."""
    input_ids, labels = batch["input_ids"], batch["labels"]
    if not (labels[:, 1:] != IGNORE).any():
        raise ValueError("a batch has no labelled tokens (every label is -100); check the data's masking")
    head = _plain_head(model)
    if head is None or not torch.is_grad_enabled():
        logits, targets, _ = labelled_logits(model, input_ids, labels)
        return F.cross_entropy(logits.float(), targets), {}
    weight, softcap = head
    hidden, targets, _ = labelled_hidden(model, input_ids, labels)  # (N, C), (N,)
    vocab = weight.shape[0] if isinstance(weight, torch.Tensor) else weight.out_features
    chunk = max(CHUNK_MIN_TOKENS, CHUNK_LOGITS // vocab)
    ops = train_ops(hidden) if isinstance(weight, torch.Tensor) and weight.dtype == torch.float32 else None
    return _ChunkedHeadCE.apply(hidden, weight, targets, softcap, chunk, ops), {}


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
