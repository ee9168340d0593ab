"""Hugging Face checkpoints (config.json + *.safetensors) adapted to lmstack at the load boundary.

`config_from_hf` turns a transformers config.json into a `ModelConfig` (both the 4.x keys such as
`rope_theta` / `rope_scaling` and the 5.x `rope_parameters` dict are read); `hf_to_lmstack` renames (and for
GPT-2 splits and transposes) the tensors. Nothing here knows about transformers' Python classes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from lmstack.config import LayerType, ModelConfig
from lmstack.models.loading import LinearSwap, build_model
from lmstack.models.transformer import Transformer

SUPPORTED_HF_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Gemma3ForCausalLM", "GPT2LMHeadModel")
_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3", "gpt2": "gpt2"}


# --- config ------------------------------------------------------------------------------------------
def config_from_hf(cfg: dict[str, Any], name: str | None = None) -> ModelConfig:
    """The lmstack config of a transformers config.json; ValueError for anything we cannot run exactly."""
    family = _family(cfg)
    name = name or Path(str(cfg.get("_name_or_path") or "")).name or cfg.get("model_type", family)
    extra = {k: cfg[k] for k in ("bos_token_id", "eos_token_id") if cfg.get(k) is not None}
    if family == "gpt2":
        return _gpt2_config(cfg, name, extra)
    dim, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or dim // n_heads
    base, scaling, local_base = _rope(cfg, family)
    common: dict[str, Any] = dict(
        name=name,
        family=family,
        vocab_size=cfg["vocab_size"],
        dim=dim,
        n_layers=cfg["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        head_dim=head_dim if head_dim * n_heads != dim else None,
        hidden_dim=cfg["intermediate_size"],
        max_seq_len=cfg.get("max_position_embeddings", 2048),
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_base=base,
        rope_scaling=scaling,
        rope_local_base=local_base,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", family == "gemma3")),
        extra=extra,
    )
    if family == "gemma3":
        return ModelConfig(**common, **_gemma3_fields(cfg, head_dim))
    layer_types = _layer_types(cfg)
    attn_bias = bool(cfg.get("attention_bias", False))
    return ModelConfig(
        **common,
        mlp="swiglu",
        qkv_bias=family == "qwen2" or attn_bias,
        out_bias=attn_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        layer_types=layer_types,
        sliding_window=cfg.get("sliding_window") if layer_types else None,
    )


def _family(cfg: dict[str, Any]) -> str:
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else None
    family = _MODEL_TYPES.get(cfg.get("model_type", ""))
    if family is None or (arch is not None and arch not in SUPPORTED_HF_ARCHITECTURES):
        raise ValueError(
            f"unsupported Hugging Face architecture {arch or cfg.get('model_type')!r}; lmstack loads "
            f"{', '.join(SUPPORTED_HF_ARCHITECTURES)}"
        )
    if cfg.get("hidden_act", cfg.get("hidden_activation", "silu")) not in ("silu", "gelu_pytorch_tanh"):
        raise ValueError(f"unsupported activation {cfg.get('hidden_act')!r} for {family}")
    return family


def _rope(cfg: dict[str, Any], family: str) -> tuple[float, float, float | None]:
    """(global base, global linear scaling, local base) from 4.x or 5.x style keys."""
    params = cfg.get("rope_parameters")
    if params and "full_attention" in params:  # 5.x, per layer type (Gemma 3)
        glob, local = params["full_attention"], params.get("sliding_attention") or {}
    elif params:  # 5.x, one set for every layer
        glob, local = params, {}
    else:  # 4.x
        glob = dict(cfg.get("rope_scaling") or {}, rope_theta=cfg.get("rope_theta", 10000.0))
        local = {"rope_theta": cfg["rope_local_base_freq"]} if "rope_local_base_freq" in cfg else {}
    kind = glob.get("rope_type", glob.get("type", "default"))
    if kind not in ("default", "linear"):
        raise ValueError(f"{family}: RoPE scaling {kind!r} is not supported (only linear)")
    if local.get("rope_type", "default") != "default":
        raise ValueError(f"{family}: scaled RoPE on sliding-window layers is not supported")
    scaling = float(glob.get("factor", 1.0)) if kind == "linear" else 1.0
    local_base = local.get("rope_theta")
    if family == "gemma3" and local_base is None:
        local_base = 10000.0  # the Gemma3TextConfig default, absent from some config.json files
    return float(glob.get("rope_theta", 10000.0)), scaling, local_base


def _layer_types(cfg: dict[str, Any]) -> tuple[LayerType, ...] | None:
    types = cfg.get("layer_types")
    if not types and cfg.get("use_sliding_window"):  # Qwen2 in 4.x: layers from max_window_layers slide
        n, first = cfg["num_hidden_layers"], cfg.get("max_window_layers", 0)
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    if not types or all(t == "full_attention" for t in types):
        return None
    return tuple("local" if t == "sliding_attention" else "global" for t in types)


def _gemma3_fields(cfg: dict[str, Any], head_dim: int) -> dict[str, Any]:
    n_layers = cfg["num_hidden_layers"]
    pattern = cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6
    types = _layer_types(cfg) or tuple(
        "global" if (i + 1) % pattern == 0 else "local" for i in range(n_layers)
    )
    return dict(
        norm_unit_offset=True,
        post_norms=True,
        mlp="geglu",
        gelu_approx="tanh",
        qk_norm=True,
        qkv_bias=bool(cfg.get("attention_bias", False)),
        out_bias=bool(cfg.get("attention_bias", False)),
        attn_scale=float(cfg.get("query_pre_attn_scalar", head_dim)) ** -0.5,
        # transformers' Gemma3Attention never applies attn_logit_softcapping (Gemma 3 dropped it), so neither
        # do we: the reference the checkpoints were validated against is what we match
        attn_softcap=None,
        final_softcap=cfg.get("final_logit_softcapping"),
        sliding_window=cfg["sliding_window"],
        layer_types=types,
        embed_scale=cfg["hidden_size"] ** 0.5,
    )


def _gpt2_config(cfg: dict[str, Any], name: str, extra: dict[str, Any]) -> ModelConfig:
    act = cfg.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu", "relu"):
        raise ValueError(f"gpt2: activation {act!r} is not supported")
    if cfg.get("scale_attn_by_inverse_layer_idx"):
        raise ValueError("gpt2: scale_attn_by_inverse_layer_idx is not supported")
    dim = cfg["n_embd"]
    return ModelConfig(
        name=name,
        family="gpt2",
        vocab_size=cfg["vocab_size"],
        dim=dim,
        n_layers=cfg["n_layer"],
        n_heads=cfg["n_head"],
        hidden_dim=cfg.get("n_inner") or 4 * dim,
        max_seq_len=cfg["n_positions"],
        norm="layernorm",
        norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
        mlp="relu" if act == "relu" else "gelu",
        gelu_approx="none" if act == "gelu" else "tanh",
        positions="learned",
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        extra=extra,
    )


# --- tensor names ------------------------------------------------------------------------------------
_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.+)\.(weight|bias)$")
LLAMA_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn.wq",
    "self_attn.k_proj": "attn.wk",
    "self_attn.v_proj": "attn.wv",
    "self_attn.o_proj": "attn.wo",
    "self_attn.q_norm": "attn.q_norm",
    "self_attn.k_norm": "attn.k_norm",
    "pre_feedforward_layernorm": "mlp_norm",
    "post_feedforward_layernorm": "post_mlp_norm",
    "mlp.gate_proj": "mlp.w1",
    "mlp.up_proj": "mlp.w3",
    "mlp.down_proj": "mlp.w2",
}
LLAMA_TOP_NAMES = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_IGNORED = ("rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")


def hf_to_lmstack(state_dict: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename HF tensors to lmstack names; unknown names are an error, never silently dropped."""
    if config.family == "gpt2":
        return _gpt2_to_lmstack(state_dict, config)
    # Llama/Qwen call the pre-MLP norm post_attention_layernorm; Gemma's sandwich uses it after attention
    layer_map = dict(
        LLAMA_LAYER_NAMES, post_attention_layernorm="post_attn_norm" if config.post_norms else "mlp_norm"
    )
    out, unknown = {}, []
    for name, t in state_dict.items():
        if name.endswith(_IGNORED):
            continue
        if name in LLAMA_TOP_NAMES:
            out[LLAMA_TOP_NAMES[name]] = t
        elif (m := _LAYER.match(name)) and m.group(2) in layer_map:
            out[f"layers.{m.group(1)}.{layer_map[m.group(2)]}.{m.group(3)}"] = t
        else:
            unknown.append(name)
    _raise_unknown(unknown, config)
    return out


_GPT2_LAYER = re.compile(
    r"^h\.(\d+)\.(ln_1|ln_2|attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.(weight|bias)$"
)
_GPT2_NAMES = {
    "ln_1": "attn_norm",
    "ln_2": "mlp_norm",
    "attn.c_proj": "attn.wo",
    "mlp.c_fc": "mlp.w1",
    "mlp.c_proj": "mlp.w2",
}
_GPT2_TOP = {
    "wte.weight": "tok_embeddings.weight",
    "wpe.weight": "pos_embeddings.weight",
    "ln_f.weight": "norm.weight",
    "ln_f.bias": "norm.bias",
    "lm_head.weight": "output.weight",
}


def _gpt2_to_lmstack(state_dict: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """GPT-2 stores Conv1D weights as (in, out) and q/k/v fused in c_attn: transpose and split them."""
    out, unknown = {}, []
    for full_name, t in state_dict.items():
        name = full_name.removeprefix("transformer.")
        if name.endswith(_IGNORED):
            continue
        if name in _GPT2_TOP:
            out[_GPT2_TOP[name]] = t
        elif m := _GPT2_LAYER.match(name):
            i, part, kind = m.groups()
            t = t.t() if kind == "weight" and part not in ("ln_1", "ln_2") else t  # Conv1D -> Linear
            if part == "attn.c_attn":
                for proj, chunk in zip(("wq", "wk", "wv"), t.chunk(3, dim=0), strict=True):
                    out[f"layers.{i}.attn.{proj}.{kind}"] = chunk.contiguous()
            else:
                out[f"layers.{i}.{_GPT2_NAMES[part]}.{kind}"] = t.contiguous()
        else:
            unknown.append(full_name)
    _raise_unknown(unknown, config)
    return out


def _raise_unknown(unknown: list[str], config: ModelConfig) -> None:
    if unknown:
        raise ValueError(
            f"{len(unknown)} checkpoint tensors have no place in lmstack's {config.family} model "
            f"(e.g. {unknown[:4]}); is this a {config.family} checkpoint?"
        )


# --- files -------------------------------------------------------------------------------------------
def safetensors_files(path: Path) -> list[Path]:
    """The shard files of an HF directory, from model.safetensors.index.json when the model is sharded."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / s for s in shards]
    else:
        files = sorted(path.glob("*.safetensors"))
    missing = [str(f) for f in files if not f.exists()]
    if not files or missing:
        raise FileNotFoundError(
            f"{path} has no complete set of .safetensors weights (missing: {missing or 'all'}); lmstack "
            "reads safetensors only: re-download the checkpoint or convert it with save_pretrained"
        )
    return files


def read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    state_dict: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            for key in sf.keys():
                state_dict[key] = sf.get_tensor(key)
    return state_dict


def load_hf(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    name: str | None = None,
    linear_swap: LinearSwap | None = None,
) -> tuple[Transformer, ModelConfig]:
    """Load an HF directory (config.json + safetensors, sharded or not) as an lmstack `Transformer`.

    `linear_swap` (see `build_model`) swaps the linear layers as they load; the float checkpoint is read
    whole first here (the name mapping works on the full state dict)."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory: it has no config.json")
    config = config_from_hf(json.loads(config_file.read_text()), name=name or path.name)
    state_dict = hf_to_lmstack(read_safetensors(safetensors_files(path)), config)
    return build_model(config, state_dict, device, dtype, linear_swap), config
