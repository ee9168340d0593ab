"""LoRA adapters served beside their base model over one copy of the base weights (vLLM's multi-LoRA).

`adapter_view(base, path)` returns a model computing base + adapter that shares every weight with `base`:
the containers (the Transformer, its layer list, each Block, Attention and MLP) are shallow copies of a few
hundred bytes each, and each adapted linear becomes a LoraLinear around the *same* base module (float, int8
or q4) with the adapter's A and B unmerged. `base` itself is not changed, so base and adapters serve side by
side, each view with its own engine (own KV cache and scheduler).

Quantized models fuse q/k/v (or q/k) and gate/up into one module (`fuse_projections`). Adapted projections
that were fused share one FusedLoraLinear around the fused module: the fused base still runs as one call,
A is stacked over them (R, K) and each one's B (N_i, r) adds into its own output rows: the same function as
separate LoRAs, and the same bytes (no zero blocks).

Letters: N output features, K input features, r rank (R: ranks stacked in one fused module).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack.adapters import read_adapter
from lmstack.lora import LoraConfig, LoraLinear, QuantLinear
from lmstack.models.attention import Attention
from lmstack.models.layers import MLP
from lmstack.models.transformer import Block, Transformer

M = TypeVar("M", bound=nn.Module)
# fused module -> the projections it computes, in output order (see Attention/MLP.fuse_projections)
FUSED = {"wqkv": ("wq", "wk", "wv"), "wqk": ("wq", "wk"), "w13": ("w1", "w3")}


def adapter_view(base: Transformer, path: str | Path, base_model_name: str | None = None) -> Transformer:
    """`base` with the PEFT adapter in `path` applied unmerged, sharing all of `base`'s weights.

    The adapter is checked against `base`'s architecture (and `base_model_name`, when both name a model)
    exactly as `lmstack.adapters.load_adapter` checks it; a mismatch is a ValueError."""
    with torch.device("meta"):  # the unfused layout the adapter's names and shapes refer to
        skeleton = Transformer(base.config)
    config, tensors = read_adapter(skeleton, path, base_model_name)
    view = _shell(base)
    groups: dict[tuple[str, str], list[str]] = {}  # (owner, module computing it) -> adapted projections
    for target in dict.fromkeys(k.rpartition(".lora_")[0] for k in tensors):
        parent, _, leaf = target.rpartition(".")
        groups.setdefault((parent, _computing(view.get_submodule(parent), leaf)), []).append(leaf)
    for (owner_name, module_name), leaves in groups.items():
        owner = view.get_submodule(owner_name)
        prefix = f"{owner_name}." if owner_name else ""
        A = [tensors[f"{prefix}{leaf}.lora_A.weight"] for leaf in leaves]  # (r, K) each
        B = {leaf: tensors[f"{prefix}{leaf}.lora_B.weight"] for leaf in leaves}  # (N_i, r) each
        lora = _lora_module(owner, module_name, A, B, config)
        setattr(owner, module_name, lora)
    return view


def _shell(base: Transformer) -> Transformer:
    """A copy of `base` down to each Attention and MLP that holds the very same leaf modules and tensors;
    replacing a module in the copy leaves `base` as it was. KV caches are the copy's own (none yet)."""
    view = _shallow(base)
    view.layers = _shallow(base.layers)
    for i, layer in enumerate(base.layers):
        assert isinstance(layer, Block)
        block = _shallow(layer)
        block.attn, block.mlp = _shallow(layer.attn), _shallow(layer.mlp)
        view.layers[i] = block
    view.clear_caches()
    return view


def _shallow(module: M) -> M:
    out = copy.copy(module)
    out._modules = dict(module._modules)  # setattr on the copy must not reach the original's children
    out._parameters, out._buffers = dict(module._parameters), dict(module._buffers)
    return out


def _computing(owner: nn.Module, leaf: str) -> str:
    """The name of the module in `owner` that computes projection `leaf`: itself, or the fused one."""
    if getattr(owner, leaf, None) is not None:
        return leaf
    for fused, parts in FUSED.items():
        if leaf in parts and getattr(owner, fused, None) is not None:
            return fused
    raise ValueError(f"no module of {type(owner).__name__} computes {leaf}")


def _rows(owner: nn.Module, module_name: str) -> dict[str, slice]:
    """Output rows of each projection within the fused module `module_name` of `owner`."""
    if isinstance(owner, Attention):
        sizes = {"wq": owner.nh * owner.hs, "wk": owner.nkv * owner.hs, "wv": owner.nkv * owner.hs}
    else:
        assert isinstance(owner, MLP)
        sizes = {"w1": owner.hidden, "w3": owner.hidden}
    rows, start = {}, 0
    for part in FUSED[module_name]:
        rows[part] = slice(start, start + sizes[part])
        start += sizes[part]
    return rows


def _lora_module(
    owner: nn.Module, module_name: str, A: list[Tensor], B: dict[str, Tensor], config: LoraConfig
) -> nn.Module:
    """A LoraLinear around `owner.<module_name>`, or a FusedLoraLinear when that module is fused."""
    module = getattr(owner, module_name)
    assert isinstance(module, nn.Linear | QuantLinear)
    if module_name in FUSED:
        rows = _rows(owner, module_name)
        return FusedLoraLinear(module, [rows[leaf] for leaf in B], torch.cat(A), list(B.values()), config)
    lora = LoraLinear(module, config.r, config.lora_alpha).eval()
    with torch.no_grad():
        lora.lora_A.weight.copy_(A[0])  # (r, K)
        lora.lora_B.weight.copy_(B[next(iter(B))])  # (N, r)
    return lora


class FusedLoraLinear(nn.Module):
    """One LoRA per projection over a module that computes several (fused q/k/v, gate/up). The base runs
    once; A is stacked (R, K), so one matmul serves every adapted projection; each projection's B_i adds
    (alpha / r) B_i h_i to its own output rows. No zero blocks are stored for the projections left out."""

    def __init__(
        self, base: nn.Linear | QuantLinear, rows: list[slice], A: Tensor, B: list[Tensor], config: LoraConfig
    ) -> None:
        super().__init__()
        self.base, self.rows, self.r, self.scaling = base, rows, config.r, config.scaling
        self.in_features, self.out_features = base.in_features, base.out_features
        # float32 at least, as LoraLinear: quantized bases compute in float32
        if isinstance(base, nn.Linear):
            dtype, device = torch.promote_types(base.weight.dtype, torch.float32), base.weight.device
        else:
            dtype, device = torch.float32, base.qweight.device
        self.lora_A = nn.Parameter(A.to(device, dtype), requires_grad=False)  # (R, K)
        self.lora_B = nn.ParameterList(  # (N_i, r) each
            nn.Parameter(b.to(device, dtype), requires_grad=False) for b in B
        )

    def forward(self, x: Tensor) -> Tensor:  # (..., K) -> (..., N)
        y = self.base(x)  # (..., N), a fresh tensor: the updates go in place
        h = F.linear(x.to(self.lora_A.dtype), self.lora_A) * self.scaling  # (..., R)
        for rows, b, part in zip(self.rows, self.lora_B, h.split(self.r, dim=-1), strict=True):
            y[..., rows] += F.linear(part, b).to(y.dtype)  # (..., N_i)
        return y


def lora_bytes(view: nn.Module) -> int:
    """Memory the view adds to its base: its adapters' A and B (the shells are a few KB)."""
    return sum(p.numel() * p.element_size() for n, p in view.named_parameters() if ".lora_" in n)
