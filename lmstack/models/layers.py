"""Building blocks shared by every architecture: norms, positions, feed-forward.

Glossary for shape comments (used across lmstack/models):
  B batch, T new tokens in this forward, S keys visible (cached + new), C model width (dim),
  nh query heads, nkv key/value heads, hs head size, H MLP hidden width, V vocabulary.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Iterator, Sequence
from types import ModuleType

import torch
from torch import nn

from lmstack.config import ModelConfig
from lmstack.kernels import load_ops_kernels, load_train_kernels

# The native decode ops (lmstack/kernels/ops_cpu.cpp) replace chains of small PyTorch ops for inputs of at
# most this many rows: decode steps, speculative verification, engine decode batches. Prefill and training
# keep the PyTorch code below, which is also the reference the ops are tested against.
FUSED_MAX_ROWS = 64
USE_FUSED_OPS = os.environ.get("LMSTACK_FUSED_OPS", "1") != "0"  # LMSTACK_FUSED_OPS=0: PyTorch only


def fused_ops(x: torch.Tensor, rows: int | None = None) -> ModuleType | None:
    """The native op module when x is a small float32 CPU batch outside autograd, else None. `rows`
    overrides x's own row count (the engine asks with its KV cache and the step's token count)."""
    if rows is None:
        rows = x.numel() // max(x.shape[-1], 1)
    if (
        not USE_FUSED_OPS
        or x.dtype != torch.float32
        or not x.is_cpu
        or torch.is_grad_enabled()
        or rows > FUSED_MAX_ROWS
    ):
        return None
    return load_ops_kernels()


# Gradient checkpointing recomputes a block in backward only to rebuild what its ops saved. The module whose
# output feeds nothing but the block's output (the MLP's down projection, unless a post-norm follows) saves
# its input, not its output, so its own matmul is wasted there: a third of the MLP. `Transformer` names that
# module while recomputing, and LoRA's training path (lmstack.lora) skips the matmul for it.
_recompute = threading.local()


@contextlib.contextmanager
def recomputing(output_module: nn.Module | None) -> Iterator[None]:
    """Mark a checkpointed block's recomputation: `output_module`'s output will not be read."""
    previous = getattr(_recompute, "module", None)
    _recompute.module = output_module
    try:
        yield
    finally:
        _recompute.module = previous


def output_unused(module: nn.Module) -> bool:
    """Whether `module` is the output module of the block being recomputed right now."""
    return getattr(_recompute, "module", None) is module


def train_ops(x: torch.Tensor) -> ModuleType | None:
    """The native forward/backward pairs (lmstack/kernels/train_cpu.cpp) when x is a float32 CPU tensor
    under autograd (training, and its recomputation under gradient checkpointing), else None."""
    if not USE_FUSED_OPS or x.dtype != torch.float32 or not x.is_cpu or not torch.is_grad_enabled():
        return None
    return load_train_kernels()


class Linear(nn.Linear):
    """nn.Linear whose CPU forward over a few rows (2..FUSED_MAX_ROWS: speculative verification, engine
    batches) computes (W x^T)^T: MKL's x W^T path for small M costs 2.7x the one-row GEMV at 5 rows on
    this CPU, W x^T about 1.3x (measured in docs/benchmarks.md). Same parameters and state dict as
    nn.Linear; LoRA and quantization swap it like any nn.Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(x.shape[-1], 1)
        if not (1 < rows <= FUSED_MAX_ROWS and x.is_cpu and self.weight.dtype == x.dtype):
            return super().forward(x)
        y = torch.matmul(self.weight, x.reshape(rows, -1).T).T.contiguous()  # (rows, out)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def concat_linears(modules: Sequence[nn.Module]) -> nn.Module | None:
    """One module computing the outputs of `modules` side by side, or None when they cannot be fused.

    Quantized linears (lmstack.quant) provide a `concat` classmethod: one kernel call then quantizes the
    activations once and streams all the weights. Float nn.Linear stays separate (fusing would copy it).
    """
    kind = type(modules[0])
    concat = getattr(kind, "concat", None)
    if concat is None or any(type(m) is not kind for m in modules):
        return None
    return concat(list(modules))


class RMSNorm(nn.Module):
    """RMS normalization computed in float32; `unit_offset` gives Gemma's (1 + w) scaling."""

    def __init__(self, dim: int, eps: float = 1e-6, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        evenly_spaced_rows = x.dim() <= 2 or x.is_contiguous()  # what the native op reads
        if evenly_spaced_rows and self.weight.dtype == torch.float32 and (ops := fused_ops(x)) is not None:
            return ops.rms_norm(x, self.weight, self.eps, self.unit_offset)
        if self.weight.dtype == torch.float32 and (ops := train_ops(x)) is not None:
            return _RMSNormFunction.apply(x, self.weight, self.eps, self.unit_offset, ops)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (xf * (1.0 + self.weight.float())).type_as(x)
        return self.weight * xf.type_as(x)


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm as one native pass each way, saving x and one 1/rms per row (composed of ops, autograd keeps x,
    the normalized x and the statistics, and replays ~8 elementwise passes in backward)."""

    @staticmethod
    def forward(ctx, x, weight, eps, unit_offset, ops):  # type: ignore[override]
        x = x.contiguous()
        y, rstd = ops.rms_norm_fwd(x, weight.contiguous(), eps, unit_offset)  # (..., C), (rows,)
        ctx.save_for_backward(x, weight, rstd)
        ctx.unit_offset, ctx.ops = unit_offset, ops
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, weight, rstd = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = ctx.ops.rms_norm_bwd(grad, x, weight, rstd, ctx.unit_offset)
        if ctx.needs_input_grad[1]:  # full fine-tuning: sum over rows of grad * normalized x
            normed = x.reshape(-1, x.shape[-1]) * rstd[:, None]
            grad_w = (grad.reshape(-1, x.shape[-1]) * normed).sum(0)
        return grad_x, grad_w, None, None, None


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
        self.hidden = H
        self.gated = config.mlp in ("swiglu", "geglu")
        self.w1 = Linear(C, H, bias=bias)
        self.w2 = Linear(H, C, bias=bias)
        self.w3 = Linear(C, H, bias=bias) if self.gated else None
        self.w13: nn.Module | None = None  # w1 and w3 fused by `fuse_projections`
        self.act: nn.Module
        if config.mlp == "swiglu":
            self.act = nn.SiLU()
        elif config.mlp == "relu":
            self.act = nn.ReLU()
        else:
            self.act = nn.GELU(approximate=config.gelu_approx)
        # the native op's code for the gate activation
        self.act_code = {"swiglu": 0, "geglu": 1 if config.gelu_approx == "tanh" else 2}.get(config.mlp)

    def fuse_projections(self) -> None:
        """Compute gate and up projections in one call when their modules can be concatenated."""
        if self.w3 is not None and self.w13 is None and (w13 := concat_linears([self.w1, self.w3])):
            self.w13 = w13
            self.w1 = self.w3 = None  # type: ignore[assignment]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C)
        if self.w13 is not None:
            a, b = self.w13(x).split(self.hidden, dim=-1)  # (B, T, H) each
        else:
            a, b = self.w1(x), (self.w3(x) if self.w3 is not None else None)  # (B, T, H)
        if b is None:
            return self.w2(self.act(a))
        if self.act_code is not None and (ops := fused_ops(a)) is not None:
            return self.w2(ops.gated_act(a, b, self.act_code))
        if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
            # training: keeps a and b only
            ops = train_ops(a) if self.act_code is not None else None
            return self.w2(_GatedAct.apply(a, b, self.act, self.act_code, ops))
        return self.w2(self.act(a) * b)  # (B, T, C)


class _GatedAct(torch.autograd.Function):
    """act(a) * b that saves only a and b for backward and recomputes act(a) there; composed of ops it
    would also keep act(a), one more (B, T, H) tensor per layer (the largest activations of a block)."""

    @staticmethod
    def forward(ctx, a, b, act, code, ops):  # type: ignore[override]
        """`ops` (the native training ops, with `code` the activation's number there) or None: PyTorch."""
        if ops is not None:
            a, b = a.contiguous(), b.contiguous()
        ctx.save_for_backward(a, b)
        ctx.act, ctx.code, ctx.ops = act, code, ops
        return ops.gated_act_fwd(a, b, code) if ops is not None else act(a).mul_(b)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        a, b = ctx.saved_tensors
        if ctx.ops is not None:
            grad_a, grad_b = ctx.ops.gated_act_bwd(grad.contiguous(), a, b, ctx.code)
            return grad_a, grad_b, None, None, None
        with torch.enable_grad():
            a_ = a.detach().requires_grad_(True)
            act_a = ctx.act(a_)
            (grad_a,) = torch.autograd.grad(act_a, a_, grad * b)
        return grad_a, grad * act_a.detach(), None, None, None


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


def rope_heads(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n: int, hs: int) -> torch.Tensor:
    """x (B, T, n*hs) -> (B, n, T, hs) contiguous with RoPE applied: what `apply_rope` on the head-transposed
    view computes, in one native pass each way under autograd (see `train_ops`), else in PyTorch."""
    B, T, _ = x.shape
    if (ops := train_ops(x)) is not None and cos.dtype == torch.float32 and x.stride(-1) == 1:
        return _RopeHeads.apply(x, cos.contiguous(), sin.contiguous(), n, hs, ops)
    return apply_rope(x.view(B, T, n, hs).transpose(1, 2), cos, sin).contiguous()


class _RopeHeads(torch.autograd.Function):
    """The head transpose and the rotation in one pass; backward rotates the gradient back (saves nothing
    but the tables)."""

    @staticmethod
    def forward(ctx, x, cos, sin, n, hs, ops):  # type: ignore[override]
        if x.stride(0) != x.shape[1] * x.stride(1):  # rows not evenly spaced: make them so
            x = x.contiguous()
        ctx.save_for_backward(cos, sin)
        ctx.ops = ops
        return ops.rope_heads(x, cos, sin, n, hs)  # (B, n, T, hs)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        cos, sin = ctx.saved_tensors
        return ctx.ops.rope_heads_bwd(grad.contiguous(), cos, sin), None, None, None, None, None


def sinusoidal_embedding(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """The fixed sin/cos position table of "Attention Is All You Need", (T, dim)."""
    half = dim // 2
    inv = torch.exp(-math.log(10000.0) * torch.arange(half, device=positions.device).float() / half)
    ang = positions.float()[:, None] * inv[None, :]  # (T, dim/2)
    return torch.cat([ang.sin(), ang.cos()], dim=-1)
