"""LoRA (Hu et al. 2021) as a module swap: y = base(x) + (alpha / r) * B A dropout(x).

`apply_lora` walks `named_modules` and wraps each targeted linear in a `LoraLinear`; the base stays frozen
(a float nn.Linear, or an NF4Linear for QLoRA) and only A (r, K) and B (N, r) train. B starts at zero, so a
fresh adapter leaves the model's function unchanged. Names, defaults and initialisation follow Hugging Face
PEFT, so adapters move between the two (lmstack.adapters).

Targets are matched the way PEFT matches them: a list entry selects modules whose full name equals it or
ends with "." + entry; a string is a regex that must match a whole name. Both the lmstack name and the
Hugging Face name of each module are tried, so `q_proj` and `wq` both select the attention queries.

Letters: N output features, K input features, r rank.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack.models.hf import LLAMA_LAYER_NAMES, LLAMA_TOP_NAMES
from lmstack.models.layers import Linear, output_unused
from lmstack.nf4 import NF4Linear
from lmstack.quant import Int8Linear, Q4Linear

QuantLinear = NF4Linear | Int8Linear | Q4Linear  # frozen bases a LoRA wraps unmerged (QLoRA, serving)


@dataclass(frozen=True)
class LoraConfig:
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    # module names (lmstack or Hugging Face), a regex over full names, or "all-linear" (all but the head)
    target_modules: list[str] | str = field(default_factory=lambda: ["wq", "wv"])
    bias: Literal["none"] = "none"

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.r, int) or self.r <= 0:
            problems.append(f"r (the rank) must be a positive integer, got {self.r!r}")
        if self.lora_alpha <= 0:
            problems.append(f"lora_alpha must be positive, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            problems.append(f"lora_dropout must lie in [0, 1), got {self.lora_dropout!r}")
        if not self.target_modules:
            problems.append("target_modules is empty")
        if self.bias != "none":
            problems.append(f"bias={self.bias!r} is not supported (only 'none': biases stay frozen)")
        if problems:
            raise ValueError("invalid LoraConfig: " + "; ".join(problems))

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r


class LoraLinear(nn.Module):
    """A frozen linear plus a trainable low-rank update. `disabled` gives back the base function (DPO's
    reference model without a second copy of the weights); `merge` folds B A into a float base weight."""

    def __init__(self, base: nn.Linear | QuantLinear, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.lora_alpha, self.scaling = r, alpha, alpha / r
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # at least float32, as PEFT keeps adapters of a bf16/fp16 base: tiny updates survive the optimizer
        base_dtype = base.weight.dtype if isinstance(base, nn.Linear) else _compute_dtype(base)
        dtype = torch.promote_types(base_dtype, torch.float32)
        device = base.weight.device if isinstance(base, nn.Linear) else base.qweight.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)  # (r, K)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)  # (N, r)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's init
        nn.init.zeros_(self.lora_B.weight)
        self.disabled = False
        self.merged = False
        self.train(base.training)  # an adapter put into an eval model must not start dropping out

    def forward(self, x: Tensor) -> Tensor:  # (..., K) -> (..., N)
        if self._fused_training_path(x):
            return _LoraFunction.apply(x, self.lora_A.weight, self.lora_B.weight, self)
        y = self.base(x)
        if self.merged:
            if self.disabled:
                raise RuntimeError("a merged LoRA layer cannot be disabled: unmerge it first")
            return y
        if self.disabled:
            return y
        h = self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype)))  # (..., r)
        return y + (self.lora_B(h) * self.scaling).to(y.dtype)

    def _fused_training_path(self, x: Tensor) -> bool:
        """Training through `_LoraFunction`: with grad on, an active adapter without dropout, over a float
        base of x's dtype or an NF4 base (QLoRA)."""
        if not torch.is_grad_enabled() or self.merged or self.disabled:
            return False
        if isinstance(self.dropout, nn.Dropout):
            return False
        if x.dtype != self.lora_A.weight.dtype:
            return False
        base = self.base
        return isinstance(base, NF4Linear) or (isinstance(base, nn.Linear) and base.weight.dtype == x.dtype)

    def delta_weight(self) -> Tensor:
        """(alpha / r) B A: what merging adds to the base weight, (N, K) float32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merge(self) -> None:
        """Add B A into a float base weight (idempotent). An NF4 base cannot absorb it in place
        (re-quantizing the sum would lose most of the update and could not be undone): use `merge_lora`,
        which dequantizes."""
        if self.merged:
            return
        base = self._float_base("merge")
        with torch.no_grad():
            base.weight += self.delta_weight().to(base.weight.dtype)
        self.merged = True

    def unmerge(self) -> None:
        """Subtract B A again (restores the base weight up to float rounding)."""
        if not self.merged:
            return
        base = self._float_base("unmerge")
        with torch.no_grad():
            base.weight -= self.delta_weight().to(base.weight.dtype)
        self.merged = False

    def _float_base(self, verb: str) -> nn.Linear:
        if not isinstance(self.base, nn.Linear):
            raise ValueError(
                f"cannot {verb} LoRA into a {type(self.base).__name__} base in place; "
                "merge_lora(model) returns a model with dequantized float weights instead"
            )
        return self.base

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, merged={self.merged}, disabled={self.disabled}"


class _LoraFunction(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T as one autograd node that keeps only x and h = x A^T (..., r).

    Composed of modules, autograd also keeps what the frozen base and the two small matmuls save on their
    own (the base keeps its input, an NF4 base its dequantized weight, B keeps h, the scaling its product):
    per layer about twice the activations this needs. The frozen W gets no gradient; an NF4 W is
    dequantized again in backward rather than kept."""

    @staticmethod
    def forward(ctx, x: Tensor, a: Tensor, b: Tensor, layer: LoraLinear) -> Tensor:  # type: ignore[override]
        base, s = layer.base, layer.scaling
        x2 = x.reshape(-1, x.shape[-1])  # (M, K)
        h = x2 @ a.T  # (M, r)
        ctx.save_for_backward(x2, h, a, b)
        ctx.layer = layer
        n = b.shape[0]
        if output_unused(layer):  # a checkpointed block's recomputation reads only what is saved, not y
            return x2.new_empty(*x.shape[:-1], n)
        w: Tensor
        bias: Tensor | None
        if isinstance(base, NF4Linear):
            w, bias = base.dequantize().to(x.dtype), base.bias_as(x.dtype)
        else:
            w, bias = cast(Tensor, base.weight), cast(Tensor | None, base.bias)
        y = F.linear(x2, w, bias).addmm_(h, b.T, alpha=s)  # x W^T + b + s h B^T: (M, N)
        return y.view(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x2, h, a, b = ctx.saved_tensors
        layer = ctx.layer
        base, s = layer.base, layer.scaling
        g = grad.reshape(-1, grad.shape[-1])  # (M, N)
        # the thin products read g (M, N) row by row: (b^T g^T)^T and (h^T g)^T run in about 0.6x and 0.5x
        # the time of g b and g^T h with MKL here (a (N, M) operand transposed is strided reads)
        gh = (b.T @ g.T).T.mul_(s)  # (M, r): d loss / d h
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            w = base.dequantize().to(g.dtype) if isinstance(base, NF4Linear) else base.weight
            grad_x = torch.addmm(gh @ a, g, w).view(*grad.shape[:-1], x2.shape[1])  # g W + gh A
        if ctx.needs_input_grad[1]:
            grad_a = gh.T @ x2  # (r, K)
        if ctx.needs_input_grad[2]:
            grad_b = (h.T @ g).T.mul_(s)  # (N, r)
        return grad_x, grad_a, grad_b, None


def _compute_dtype(base: QuantLinear) -> torch.dtype:
    """NF4 computes in its `compute_dtype`; int8 and q4 (lmstack.quant, served bases) in the input's."""
    return base.compute_dtype if isinstance(base, NF4Linear) else torch.float32


# --- naming -------------------------------------------------------------------------------------
_TO_HF_LAYER = {v: k for k, v in LLAMA_LAYER_NAMES.items()}  # "attn.wq" -> "self_attn.q_proj"
_TO_HF_TOP = {v.removesuffix(".weight"): k.removesuffix(".weight") for k, v in LLAMA_TOP_NAMES.items()}
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
HF_FAMILIES = ("llama", "qwen2", "gemma3")  # Hugging Face layouts with one module per projection


def hf_module_name(name: str, family: str | None) -> str | None:
    """The Hugging Face name of lmstack module `name` for the Llama-layout families (llama, qwen2, gemma3):
    "layers.0.attn.wq" -> "model.layers.0.self_attn.q_proj"; None otherwise (GPT-2 fuses q, k, v)."""
    if family not in HF_FAMILIES:
        return None
    if (m := _LAYER.match(name)) and m.group(2) in _TO_HF_LAYER:
        return f"model.layers.{m.group(1)}.{_TO_HF_LAYER[m.group(2)]}"
    return _TO_HF_TOP.get(name)


def model_family(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "family", None)


def _matches(target: list[str] | str, name: str) -> bool:
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Names of the linears `config.target_modules` selects; ValueError listing the candidates if none."""
    family = model_family(model)
    candidates = _candidate_linears(model)
    if config.target_modules == "all-linear":  # PEFT's shorthand: every linear except the LM head
        return [n for n in candidates if n != "output"]
    names = [
        n
        for n in candidates
        if _matches(config.target_modules, n)
        or _matches(config.target_modules, hf_module_name(n, family) or "")
    ]
    if not names:
        leaves: dict[str, str] = {}
        for n in candidates:
            hf = hf_module_name(n, family)
            leaves.setdefault(n.rpartition(".")[2], f" ({hf.rpartition('.')[2]})" if hf else "")
        available = ", ".join(f"{k}{v}" for k, v in leaves.items())
        raise ValueError(
            f"target_modules={config.target_modules!r} matches no linear layer; the model has: {available}"
        )
    return names


def _candidate_linears(model: nn.Module) -> list[str]:
    """Float or NF4 linears, outside any existing LoraLinear (whose base, A and B are linears too)."""
    inside_lora = {
        f"{n}.{child}"
        for n, m in model.named_modules()
        if isinstance(m, LoraLinear)
        for child in ("base", "lora_A", "lora_B")
    }
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear | NF4Linear) and name and name not in inside_lora
    ]


# --- model-level operations -------------------------------------------------------------------------
def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def apply_lora(model: nn.Module, config: LoraConfig) -> list[str]:
    """Wrap the targeted linears of `model` in LoraLinear, in place; freeze every other parameter.

    Returns the names replaced. Errors (nothing matched, LoRA already applied, a target whose weight is tied
    to another module) are raised before anything changes.
    """
    if existing := lora_layers(model):
        raise ValueError(
            f"the model already has LoRA layers ({next(iter(existing))}, ...); merge_lora it first"
        )
    names = find_targets(model, config)
    _check_untied(model, names)
    model.requires_grad_(False)
    for name in names:
        parent, _, child = name.rpartition(".")
        base = model.get_submodule(name)
        assert isinstance(base, nn.Linear | NF4Linear)
        setattr(
            model.get_submodule(parent),
            child,
            LoraLinear(base, config.r, config.lora_alpha, config.lora_dropout),
        )
    return names


def _check_untied(model: nn.Module, names: list[str]) -> None:
    """Merging adds B A to the base weight in place: a weight shared with another module (tied embeddings)
    would change that module too, so such targets are refused."""
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    for name in names:
        weight = getattr(model.get_submodule(name), "weight", None)
        if weight is not None and len(owners.get(id(weight), [])) > 1:
            others = [o for o in owners[id(weight)] if o != f"{name}.weight"]
            raise ValueError(f"{name}.weight is tied to {others[0]}; LoRA on a tied weight is not supported")


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter alone, in lmstack names ("layers.0.attn.wq.lora_A.weight": (r, K), ...)."""
    out = {}
    for name, layer in lora_layers(model).items():
        out[f"{name}.lora_A.weight"] = layer.lora_A.weight.detach()
        out[f"{name}.lora_B.weight"] = layer.lora_B.weight.detach()
    return out


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoraLinear by a plain float linear holding base + (alpha / r) B A, in place; returns
    `model`, which then has no LoRA modules and its original parameter names (an NF4 base comes back
    dequantized to float). Parameters stay frozen as apply_lora left them."""
    for name, layer in lora_layers(model).items():
        if isinstance(layer.base, nn.Linear):
            layer.merge()
            plain: nn.Module = layer.base
        else:
            plain = _dequantized_merge(layer)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, plain)
    return model


def _dequantized_merge(layer: LoraLinear) -> Linear:
    assert isinstance(layer.base, NF4Linear)
    weight = layer.base.dequantize() + layer.delta_weight().to(layer.base.qweight.device)  # (N, K) float32
    bias = layer.base.bias
    linear = Linear(layer.in_features, layer.out_features, bias=bias is not None, device=weight.device)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False)
    return linear


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes its base function (e.g. DPO's reference log-probs)."""
    layers = list(lora_layers(model).values())
    if merged := [layer for layer in layers if layer.merged]:
        raise ValueError(f"{len(merged)} LoRA layers are merged; unmerge them before disabling adapters")
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, previous, strict=True):
            layer.disabled = was


@dataclass(frozen=True)
class ParameterCount:
    trainable: int
    total: int  # NF4 weights count as the parameters they stand for

    def __str__(self) -> str:
        share = 100 * self.trainable / max(self.total, 1)
        return f"trainable params: {self.trainable:,} of {self.total:,} ({share:.3f}%)"


def trainable_parameters(model: nn.Module) -> ParameterCount:
    params = list(model.parameters())  # shared (tied) parameters once
    nf4 = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, NF4Linear))
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return ParameterCount(trainable, sum(p.numel() for p in params) + nf4)
