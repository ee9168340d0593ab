"""Building blocks shared by every architecture: norms, positions, feed-forward.

Glossary for shape comments (used across lmstack/models):
  B batch, T new tokens in this forward, S keys visible (cached + new), C model width (dim),
  nh query heads, nkv key/value heads, hs head size, H MLP hidden width, V vocabulary.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmstack.config import ModelConfig


class RMSNorm(nn.Module):
    """RMS normalization computed in float32; `unit_offset` gives Gemma's (1 + w) scaling."""

    def __init__(self, dim: int, eps: float = 1e-6, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (xf * (1.0 + self.weight.float())).type_as(x)
        return self.weight * xf.type_as(x)


def make_norm(config: ModelConfig, dim: int | None = None) -> nn.Module:
    dim = dim or config.dim
    if config.norm == "layernorm":
        return nn.LayerNorm(dim, eps=config.norm_eps)
    return RMSNorm(dim, config.norm_eps, config.norm_unit_offset)


class MLP(nn.Module):
    """Plain (w2 act(w1 x)) or gated (w2 (act(w1 x) * w3 x)) feed-forward."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        C, H, bias = config.dim, config.hidden_dim, config.mlp_bias
        self.gated = config.mlp in ("swiglu", "geglu")
        self.w1 = nn.Linear(C, H, bias=bias)
        self.w2 = nn.Linear(H, C, bias=bias)
        self.w3 = nn.Linear(C, H, bias=bias) if self.gated else None
        self.act: nn.Module
        if config.mlp == "swiglu":
            self.act = nn.SiLU()
        elif config.mlp == "relu":
            self.act = nn.ReLU()
        else:
            self.act = nn.GELU(approximate=config.gelu_approx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C)
        h = self.act(self.w1(x))  # (B, T, H)
        if self.w3 is not None:
            h = h * self.w3(x)
        return self.w2(h)  # (B, T, C)


def rope_cos_sin(
    positions: torch.Tensor, rotary_dim: int, base: float, scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for the given positions, (T, rotary_dim), in float32 (the HF convention)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, device=positions.device).float() / rotary_dim))
    freqs = torch.outer(positions.float() / scaling, inv_freq)  # (T, rotary_dim/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (T, rotary_dim)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rotary_dim channels of x (B, nh, T, hs) by half-split ("NeoX") pairs."""
    rd = cos.shape[-1]
    xr, xpass = x[..., :rd], x[..., rd:]
    x1, x2 = xr.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    out = (xr.float() * cos + rotated * sin).type_as(x)
    return torch.cat([out, xpass], dim=-1) if xpass.numel() else out


def sinusoidal_embedding(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """The fixed sin/cos position table of "Attention Is All You Need", (T, dim)."""
    half = dim // 2
    inv = torch.exp(-math.log(10000.0) * torch.arange(half, device=positions.device).float() / half)
    ang = positions.float()[:, None] * inv[None, :]  # (T, dim/2)
    return torch.cat([ang.sin(), ang.cos()], dim=-1)
