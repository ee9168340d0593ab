"""Causal self-attention (MHA/GQA/MQA, sliding window, QK-norm, soft-capping) and its KV cache."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.config import ModelConfig
from lmstack.models.layers import (
    FUSED_MAX_ROWS,
    Linear,
    RMSNorm,
    apply_rope,
    concat_linears,
    fused_ops,
    rope_heads,
    train_ops,
)

# attention window -> boolean mask (T, S), or None for plain causal attention over the same T positions
MaskFn = Callable[[int | None], torch.Tensor | None]


class KVCache(nn.Module):
    """Keys and values of one layer for up to `max_seq_len` positions.

    Lifecycle: created by `Transformer.setup_caches`, written by `update` at explicit positions, reset by
    `Transformer.clear_caches`. It never decides what to keep: the caller passes positions.
    """

    k: torch.Tensor  # (B, nkv, max_seq_len, hs)
    v: torch.Tensor

    def __init__(self, batch: int, n_kv: int, max_seq_len: int, hs: int, dtype: torch.dtype, device) -> None:
        super().__init__()
        shape = (batch, n_kv, max_seq_len, hs)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[2]

    def update(
        self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nkv, T, hs) at input_pos (T,); return the first kv_len cached positions."""
        self.k.index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
        return self.k[:, :, :kv_len], self.v[:, :, :kv_len]  # (B, nkv, S, hs)

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows (beam search keeps the cache of the surviving beams)."""
        self.k.copy_(self.k.index_select(0, index))
        self.v.copy_(self.v.index_select(0, index))


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Boolean (T, S) mask: key position s is visible from query position p if s <= p and p - s < window."""
    mask = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        mask &= (q_pos[:, None] - k_pos[None, :]) < window
    return mask


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.nh, self.nkv, self.hs = config.n_heads, config.kv_heads, config.hd
        C = config.dim
        self.wq = Linear(C, self.nh * self.hs, bias=config.qkv_bias)
        self.wk = Linear(C, self.nkv * self.hs, bias=config.qkv_bias)
        self.wv = Linear(C, self.nkv * self.hs, bias=config.qkv_bias)
        self.wo = Linear(self.nh * self.hs, C, bias=config.out_bias)
        self.q_norm = RMSNorm(self.hs, config.norm_eps, config.norm_unit_offset) if config.qk_norm else None
        self.k_norm = RMSNorm(self.hs, config.norm_eps, config.norm_unit_offset) if config.qk_norm else None
        self.scale = config.attn_scale if config.attn_scale is not None else self.hs**-0.5
        self.softcap = config.attn_softcap
        self.window = config.window(layer_idx)
        self.use_rope = config.positions == "rope"
        self.kv_cache: KVCache | None = None
        # set by `fuse_projections`: q, k, v (or q, k) from one module
        self.wqkv: nn.Module | None = None
        self.wqk: nn.Module | None = None

    def fuse_projections(self) -> None:
        """Compute q, k, v (or q and k, when v is stored differently) in one call where possible."""
        if self.wqkv is not None or self.wqk is not None:
            return
        if fused := concat_linears([self.wq, self.wk, self.wv]):
            self.wqkv = fused
            self.wq = self.wk = self.wv = None  # type: ignore[assignment]
        elif fused := concat_linears([self.wq, self.wk]):
            self.wqk = fused
            self.wq = self.wk = None  # type: ignore[assignment]

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (..., C) -> q (..., nh*hs), k and v (..., nkv*hs), whichever modules hold the weights."""
        nq, nk = self.nh * self.hs, self.nkv * self.hs
        if self.wqkv is not None:
            q, k, v = self.wqkv(x).split([nq, nk, nk], dim=-1)
            return q, k, v
        if self.wqk is not None:
            q, k = self.wqk(x).split([nq, nk], dim=-1)
            return q, k, self.wv(x)
        return self.wq(x), self.wk(x), self.wv(x)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C)
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        input_pos: torch.Tensor,  # (T,)
        mask_for: MaskFn,
        kv_len: int,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.project(x)  # (B, T, nh*hs), (B, T, nkv*hs) x2
        if self.q_norm is not None and self.k_norm is not None:
            q = self.q_norm(q.reshape(-1, self.hs)).view(B, T, -1)  # per head
            k = self.k_norm(k.reshape(-1, self.hs)).view(B, T, -1)
        cache = self.kv_cache
        if cache is not None and T <= FUSED_MAX_ROWS and cache.k.dtype == torch.float32:
            if (ops := fused_ops(q)) is not None:  # decode: rope + cache write + attention in one call
                cos, sin = rope if self.use_rope and rope is not None else (_NO_ROPE, _NO_ROPE)
                y = ops.cached_attention(
                    q,
                    k,
                    v,
                    cache.k,
                    cache.v,
                    input_pos,
                    cos,
                    sin,
                    self.scale,
                    self.softcap or 0.0,
                    self.window or 0,
                )
                return self.wo(y)  # (B, T, C)
        v = v.view(B, T, self.nkv, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        if self.use_rope and rope is not None and cache is None and train_ops(x) is not None:
            # training: the head transpose and the rotation in one native pass each way
            q, k = rope_heads(q, *rope, self.nh, self.hs), rope_heads(k, *rope, self.nkv, self.hs)
        else:
            q = q.view(B, T, self.nh, self.hs).transpose(1, 2)  # (B, nh, T, hs)
            k = k.view(B, T, self.nkv, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
            if self.use_rope and rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(input_pos, k, v, kv_len)  # (B, nkv, S, hs)
        y = attend(q, k, v, mask_for(self.window), self.scale, self.softcap)  # (B, nh, T, hs)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.nh * self.hs))  # (B, T, C)


_NO_ROPE = torch.empty(0)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    softcap: float | None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v with a boolean mask (T, S), or causal over T == S positions when mask is
    None (SDPA's flash kernel then, which keeps no (T, S) matrix); k, v may have fewer (grouped) heads."""
    if softcap is None:
        if mask is None:
            # (B, nh, T, hs)-contiguous inputs: the flash kernel's backward ran 25% faster on them than on
            # the head-transposed views of the projections (qwen, 4 x 256 tokens)
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    if mask is None:
        positions = torch.arange(q.shape[2], device=q.device)
        mask = attention_mask(positions, positions, None)
    # soft-capping needs the logits, which SDPA does not expose: the explicit path
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # (B, nh, S, hs)
    att = (q @ k.transpose(-2, -1)).float() * scale  # (B, nh, T, S)
    att = softcap * torch.tanh(att / softcap)
    att = att.masked_fill(~mask, float("-inf")).softmax(-1).to(q.dtype)
    return att @ v  # (B, nh, T, hs)
