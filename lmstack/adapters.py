"""LoRA adapters on disk in Hugging Face PEFT's format, so PEFT + transformers and lmstack share them.

A directory holds `adapter_config.json` (PEFT's LoraConfig fields) and `adapter_model.safetensors` with the
keys PEFT's `get_peft_model_state_dict` writes for a transformers causal LM: the module's Hugging Face path
under `base_model.model.`, then `lora_A.weight` (r, K) or `lora_B.weight` (N, r), e.g.
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`. Names are translated here, at the file
boundary; the model keeps lmstack names. Llama-layout families only (llama, qwen2, gemma3): GPT-2 fuses q, k
and v in one Conv1D, where one LoRA is not three.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmstack.lora import (
    HF_FAMILIES,
    LoraConfig,
    LoraLinear,
    apply_lora,
    find_targets,
    hf_module_name,
    lora_layers,
    model_family,
)
from lmstack.nf4 import NF4Linear

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# PEFT options that change the function an adapter computes; lmstack reads adapters that leave them off
_UNSUPPORTED = (
    "use_dora",
    "use_rslora",
    "fan_in_fan_out",
    "lora_bias",
    "modules_to_save",
    "layers_to_transform",
    "rank_pattern",
    "alpha_pattern",
    "exclude_modules",
    "target_parameters",
    "trainable_token_indices",
    "layer_replication",
)


def save_adapter(model: nn.Module, path: str | Path, base_model_name: str | None = None) -> Path:
    """Write the LoRA layers of `model` as a PEFT adapter directory; returns the directory."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to save; apply_lora first")
    r, alpha, dropout = _shared_hyperparameters(layers)
    hf_names = {name: _hf_name(model, name) for name in layers}
    tensors = {}
    for name, layer in layers.items():
        key = PREFIX + hf_names[name]
        tensors[f"{key}.lora_A.weight"] = layer.lora_A.weight.detach().contiguous()  # (r, K)
        tensors[f"{key}.lora_B.weight"] = layer.lora_B.weight.detach().contiguous()  # (N, r)
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name,
        "revision": None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": _target_modules(model, list(hf_names.values())),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def _hf_name(model: nn.Module, name: str) -> str:
    hf = hf_module_name(name, model_family(model))
    if hf is None:
        raise ValueError(
            f"{name} has no Hugging Face PEFT name for a {model_family(model) or 'non-lmstack'} model; "
            f"PEFT adapters are written for {', '.join(HF_FAMILIES)} models"
        )
    return hf


def _shared_hyperparameters(layers: dict[str, LoraLinear]) -> tuple[int, float, float]:
    """(r, alpha, dropout), which PEFT's config holds once for all layers."""
    seen = {
        (m.r, m.lora_alpha, m.dropout.p if isinstance(m.dropout, nn.Dropout) else 0.0)
        for m in layers.values()
    }
    if len(seen) > 1:
        raise ValueError(
            f"LoRA layers differ in (r, alpha, dropout): {sorted(seen)}; PEFT's format holds one"
        )
    return seen.pop()


def _target_modules(model: nn.Module, hf_names: list[str]) -> list[str] | str:
    """PEFT's short form (leaf names, e.g. ["q_proj", "v_proj"]) when it selects exactly these modules,
    otherwise a regex naming each one (a LoRA on some layers only)."""
    leaves = {n.rpartition(".")[2] for n in hf_names}
    family = model_family(model)
    selected = {
        hf
        for name, m in model.named_modules()
        if isinstance(m, LoraLinear | nn.Linear | NF4Linear) and (hf := hf_module_name(name, family))
        if hf.rpartition(".")[2] in leaves
    }
    if selected == set(hf_names):
        return sorted(leaves)
    return "(" + "|".join(re.escape(n) for n in sorted(hf_names)) + ")"


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    file = Path(path) / CONFIG_NAME
    if not file.exists():
        raise FileNotFoundError(f"{path} is not a PEFT adapter directory: it has no {CONFIG_NAME}")
    return json.loads(file.read_text())


def load_adapter(model: nn.Module, path: str | Path, base_model_name: str | None = None) -> list[str]:
    """Apply the PEFT LoRA adapter in `path` to `model` (in place) and return the names it wraps.

    Everything is checked before the model changes: an adapter for another base model (a different
    `base_model_name_or_path` when both are known, modules this model lacks or leaves uncovered, other
    shapes) is a ValueError and the model stays as it was.
    """
    if lora_layers(model):
        raise ValueError("the model already has LoRA layers; merge_lora it before loading another adapter")
    config, tensors = read_adapter(model, path, base_model_name)
    names = apply_lora(model, config)
    with torch.no_grad():
        for key, t in tensors.items():
            model.get_parameter(key).copy_(t)
    return names


def read_adapter(
    model: nn.Module, path: str | Path, base_model_name: str | None = None
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The adapter in `path` checked against `model` (as `load_adapter` checks it; the model is not
    changed and may live on the meta device): its LoraConfig and its tensors in lmstack names
    ("layers.0.attn.wq.lora_A.weight": (r, K), "...lora_B.weight": (N, r))."""
    if model_family(model) not in HF_FAMILIES:
        raise ValueError(
            f"PEFT adapters load into {', '.join(HF_FAMILIES)} models, not {model_family(model)}"
        )
    config = _lora_config(read_adapter_config(path), base_model_name)
    weights_file = Path(path) / WEIGHTS_NAME
    if not weights_file.exists():
        raise FileNotFoundError(f"{path} has no {WEIGHTS_NAME} (lmstack reads safetensors adapters only)")
    tensors = _lmstack_tensors(model, find_targets(model, config), load_file(str(weights_file)), config.r)
    return config, tensors


def _model_key(name: str) -> str:
    """A model name as lmstack and the hub both spell it: `Qwen/Qwen2.5-Coder-0.5B-Instruct`, a path to its
    folder or GGUF file, and `qwen2.5-coder-0.5b-instruct` are the same model."""
    stem = Path(str(name).rstrip("/")).name.lower()
    return stem.removesuffix(".gguf")


def _lora_config(raw: dict[str, Any], base_model_name: str | None) -> LoraConfig:
    if raw.get("peft_type") != "LORA":
        raise ValueError(f"not a LoRA adapter: peft_type is {raw.get('peft_type')!r}")
    used = [k for k in _UNSUPPORTED if raw.get(k)] + (["bias"] if raw.get("bias", "none") != "none" else [])
    if used:
        raise ValueError(f"the adapter uses PEFT options lmstack does not implement: {', '.join(used)}")
    saved_base = raw.get("base_model_name_or_path")
    if saved_base and base_model_name and _model_key(saved_base) != _model_key(base_model_name):
        raise ValueError(
            f"the adapter was trained on {saved_base!r}, not on {base_model_name!r} (a different base model)"
        )
    targets = raw.get("target_modules")
    if not isinstance(targets, list | str):
        raise ValueError(f"target_modules must be a list of names or a regex, got {targets!r}")
    return LoraConfig(
        r=raw["r"],
        lora_alpha=raw["lora_alpha"],
        lora_dropout=raw.get("lora_dropout", 0.0),
        target_modules=targets,
    )


def _lmstack_tensors(
    model: nn.Module, targets: list[str], tensors: dict[str, torch.Tensor], r: int
) -> dict[str, torch.Tensor]:
    """PEFT keys -> lmstack parameter names ("layers.0.attn.wq.lora_A.weight"), every mismatch an error."""
    by_hf = {hf_module_name(n, model_family(model)): n for n in targets}
    out, unknown, wrong = {}, [], []
    for key, t in tensors.items():
        module, _, kind = key.removeprefix(PREFIX).rpartition(".lora_")
        name = by_hf.get(module)
        if name is None or kind not in ("A.weight", "B.weight"):
            unknown.append(key)
            continue
        base = model.get_submodule(name)
        expected = (r, base.in_features) if kind == "A.weight" else (base.out_features, r)
        if tuple(t.shape) != expected:
            wrong.append(f"{key}: {tuple(t.shape)} vs {expected}")
        out[f"{name}.lora_{kind}"] = t
    missing = [
        f"{n}.lora_{k}" for n in targets for k in ("A.weight", "B.weight") if f"{n}.lora_{k}" not in out
    ]
    problems = []
    if unknown:
        problems.append(
            f"{len(unknown)} tensors for modules this model has no target for (e.g. {unknown[:3]})"
        )
    if missing:
        problems.append(f"no tensors for {len(missing)} targeted weights (e.g. {missing[:3]})")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches (e.g. {wrong[:3]})")
    if problems:
        raise ValueError(
            "the adapter does not fit this model (an adapter for a different base model?): "
            + "; ".join(problems)
        )
    return out
