"""Perplexity of a causal LM over a long token stream, in overlapping windows (the HF "stride" method).

Each window scores only the tokens the previous window did not, so every token after the first is scored
exactly once, with up to `window - stride` tokens of left context.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lmstack.models.transformer import Transformer


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # tokens scored


@torch.inference_mode()
def perplexity(
    model: Transformer, ids: Sequence[int], *, window: int = 512, stride: int = 256, progress: bool = True
) -> PerplexityResult:
    if len(ids) < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    if not 0 < stride <= window:
        raise ValueError(f"need 0 < stride <= window; got stride={stride}, window={window}")
    max_len = model.config.max_seq_len
    if window > max_len:
        raise ValueError(f"window={window} exceeds the model's context window of {max_len}")
    device = next(b for b in list(model.parameters()) + list(model.buffers())).device
    all_ids = torch.tensor(list(ids), dtype=torch.long, device=device)
    total_nll, scored, prev_end = 0.0, 0, 1  # token 0 has no context and is never scored
    starts = range(0, len(ids) - 1, stride)
    for start in tqdm(starts, desc="perplexity", unit="win", disable=not progress):
        end = min(start + window, len(ids))
        chunk = all_ids[start:end][None]  # (1, T)
        logits = model(chunk)[0].float()  # (T, V)
        first = max(prev_end, start + 1)  # first target position not yet scored
        targets = all_ids[first:end]
        preds = logits[first - start - 1 : end - start - 1]
        total_nll += F.cross_entropy(preds, targets, reduction="sum").item()
        scored += len(targets)
        prev_end = end
        if end == len(ids):
            break
    nll = total_nll / scored
    return PerplexityResult(math.exp(nll), nll, scored)
