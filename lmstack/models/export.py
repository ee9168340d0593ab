"""lmstack models written as Hugging Face checkpoints: the inverse of lmstack.models.hf.

`save_hf` writes what `LLM.load(dir)` and transformers' AutoModelForCausalLM / AutoTokenizer both read:
config.json, model.safetensors (sharded with an index past `max_shard_bytes`), tokenizer.json +
tokenizer_config.json (special tokens, BOS/EOS flags, chat template) and generation_config.json
(the stop ids).

Config keys are spelled the transformers 4.x way (`rope_theta`, `rope_scaling`, `rope_local_base_freq`),
which 5.x reads too. Nothing is written before the export is known to be exact: the config.json read back by
lmstack's own loader must give the same model (a field the architecture cannot express, such as partial
rotary on Llama, is an error naming it), and the weights must be plain float tensors under exactly the
model's names (int8/q4/NF4 modules or unmerged LoRA layers are refused: export the float model).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import nn

from lmstack.config import ModelConfig
from lmstack.models.hf import LLAMA_LAYER_NAMES, LLAMA_TOP_NAMES, config_from_hf
from lmstack.models.transformer import Transformer

if TYPE_CHECKING:
    from lmstack.tokenizer import Tokenizer

# family -> (transformers architecture, model_type)
EXPORT_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
    "gpt2": ("GPT2LMHeadModel", "gpt2"),
}
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_SHARD_BYTES = 5 * 10**9  # transformers' usual shard size
# files of an earlier export that would contradict this one (lmstack prefers chat_template.jinja)
_STALE = (
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*-of-*.safetensors",
    "chat_template.jinja",
)


# --- config ------------------------------------------------------------------------------------------
def hf_config_dict(config: ModelConfig) -> dict[str, Any]:
    """The transformers config.json of `config`; ValueError when the architecture cannot express it."""
    if config.family not in EXPORT_ARCHITECTURES:
        raise ValueError(
            f"cannot export a {config.family!r} model to Hugging Face format; lmstack exports "
            f"{', '.join(EXPORT_ARCHITECTURES)} models"
        )
    arch, model_type = EXPORT_ARCHITECTURES[config.family]
    out: dict[str, Any] = dict(
        architectures=[arch],
        model_type=model_type,
        vocab_size=config.vocab_size,
        tie_word_embeddings=config.tie_embeddings,
        **{k: config.extra[k] for k in ("bos_token_id", "eos_token_id") if k in config.extra},
    )
    out |= _gpt2_fields(config) if config.family == "gpt2" else _rope_model_fields(config)
    _check_round_trip(config, out)
    return out


def _rope_model_fields(c: ModelConfig) -> dict[str, Any]:
    """Llama, Qwen2 and Gemma 3 text: the Llama layout with per-family extras."""
    d: dict[str, Any] = dict(
        hidden_size=c.dim,
        intermediate_size=c.hidden_dim,
        num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads,
        num_key_value_heads=c.kv_heads,
        head_dim=c.hd,
        max_position_embeddings=c.max_seq_len,
        rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_base,
    )
    if c.rope_scaling != 1.0:
        d["rope_scaling"] = {"rope_type": "linear", "factor": c.rope_scaling}
    types = [
        ("sliding_attention" if c.layer_type(i) == "local" else "full_attention") for i in range(c.n_layers)
    ]
    if c.family == "llama":  # no sliding window in LlamaForCausalLM: layer types are left out (and refused)
        return d | dict(hidden_act="silu", attention_bias=c.qkv_bias, mlp_bias=c.mlp_bias)
    if c.family == "qwen2":  # q/k/v always carry a bias, o never
        local = "sliding_attention" in types
        first = types.index("sliding_attention") if local else c.n_layers
        window = dict(sliding_window=c.sliding_window, max_window_layers=first)
        return d | dict(
            hidden_act="silu", use_sliding_window=local, layer_types=types, **(window if local else {})
        )
    scalar = (c.attn_scale or c.hd**-0.5) ** -2  # Gemma 3 scales queries by query_pre_attn_scalar ** -0.5
    return d | dict(
        hidden_activation="gelu_pytorch_tanh",
        attention_bias=c.qkv_bias,
        query_pre_attn_scalar=round(scalar) if math.isclose(scalar, round(scalar)) else scalar,
        sliding_window=c.sliding_window or c.max_seq_len,
        layer_types=types,
        rope_local_base_freq=c.rope_local_base if c.rope_local_base is not None else c.rope_base,
        final_logit_softcapping=c.final_softcap,
        attn_logit_softcapping=None,  # transformers' Gemma3Attention never applies it (hf.py reads None)
    )


def _gpt2_fields(c: ModelConfig) -> dict[str, Any]:
    act = "relu" if c.mlp == "relu" else ("gelu_new" if c.gelu_approx == "tanh" else "gelu")
    return dict(
        n_embd=c.dim,
        n_layer=c.n_layers,
        n_head=c.n_heads,
        n_inner=c.hidden_dim,
        n_positions=c.max_seq_len,
        layer_norm_epsilon=c.norm_eps,
        activation_function=act,
    )


def _canonical(c: ModelConfig) -> dict[str, Any]:
    """The fields that decide the function computed, with defaults spelled out (None -> their value)."""
    d = c.to_dict()
    local = c.layer_types is not None and "local" in c.layer_types
    d |= dict(
        head_dim=c.hd,
        n_kv_heads=c.kv_heads,
        attn_scale=c.attn_scale or c.hd**-0.5,
        rotary_dim=c.rotary_dim if c.rotary_dim not in (None, c.hd) else None,
        layer_types=d["layer_types"] if local else None,
        sliding_window=c.sliding_window if local else None,
        rope_local_base=(c.rope_local_base or c.rope_base) if local else None,
    )
    for key in ("name", "extra"):
        d.pop(key)
    return d


def _check_round_trip(config: ModelConfig, hf: dict[str, Any]) -> None:
    ours, back = _canonical(config), _canonical(config_from_hf(hf, name=config.name))
    differ = [
        f"{k} (lmstack {ours[k]!r}, as read back {back[k]!r})"
        for k in ours
        if not (
            ours[k] == back[k]
            or isinstance(ours[k], float)
            and isinstance(back[k], float)
            and math.isclose(ours[k], back[k])
        )
    ]
    if differ:
        raise ValueError(
            f"{config.name}: a Hugging Face {hf['architectures'][0]} checkpoint cannot express "
            f"{'; '.join(differ)}; this model cannot be exported exactly"
        )


# --- tensor names ------------------------------------------------------------------------------------
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")


def lmstack_to_hf(state_dict: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename lmstack tensors to Hugging Face names (GPT-2: fuse q/k/v, transpose to Conv1D); a tied head is
    left out as transformers writes it. Tensors are shared, not copied, except where GPT-2 reshapes them."""
    state = {k: v for k, v in state_dict.items() if not (config.tie_embeddings and k == "output.weight")}
    if config.family == "gpt2":
        return _gpt2_to_hf(state)
    post_attn = "post_attn_norm" if config.post_norms else "mlp_norm"
    layer_map = {v: k for k, v in LLAMA_LAYER_NAMES.items() if k != "pre_feedforward_layernorm"}
    layer_map |= {post_attn: "post_attention_layernorm"}
    if config.post_norms:  # Gemma's sandwich: the pre-MLP norm has its own name
        layer_map["mlp_norm"] = "pre_feedforward_layernorm"
    top = {v: k for k, v in LLAMA_TOP_NAMES.items()}
    out, unknown = {}, []
    for name, t in state.items():
        if name in top:
            out[top[name]] = t
        elif (m := _LAYER.match(name)) and m.group(2) in layer_map:
            out[f"model.layers.{m.group(1)}.{layer_map[m.group(2)]}.{m.group(3)}"] = t
        else:
            unknown.append(name)
    _raise_unknown(unknown, config)
    return out


_GPT2_TOP = {
    "tok_embeddings.weight": "wte.weight",
    "pos_embeddings.weight": "wpe.weight",
    "norm.weight": "ln_f.weight",
    "norm.bias": "ln_f.bias",
}
_GPT2_LAYER = {"attn_norm": "ln_1", "mlp_norm": "ln_2", "attn.wo": "attn.c_proj", "mlp.w1": "mlp.c_fc"}
_GPT2_LAYER["mlp.w2"] = "mlp.c_proj"


def _gpt2_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPT-2 keeps Conv1D weights as (in, out) and q, k, v in one c_attn: concatenate and transpose."""
    out, unknown = {}, []
    n_layers = 1 + max((int(m.group(1)) for k in state if (m := _LAYER.match(k))), default=-1)
    for i in range(n_layers):
        for kind in ("weight", "bias"):
            parts = [state.pop(f"layers.{i}.attn.{p}.{kind}", None) for p in ("wq", "wk", "wv")]
            if all(p is not None for p in parts):
                fused = torch.cat(parts, dim=0)  # type: ignore[arg-type]  # (3C, C) or (3C,)
                out[f"transformer.h.{i}.attn.c_attn.{kind}"] = (
                    fused.t().contiguous() if kind == "weight" else fused
                )
    for name, t in state.items():
        if name == "output.weight":
            out["lm_head.weight"] = t
        elif name in _GPT2_TOP:
            out[f"transformer.{_GPT2_TOP[name]}"] = t
        elif (m := _LAYER.match(name)) and m.group(2) in _GPT2_LAYER:
            linear = m.group(3) == "weight" and m.group(2) not in ("attn_norm", "mlp_norm")
            out[f"transformer.h.{m.group(1)}.{_GPT2_LAYER[m.group(2)]}.{m.group(3)}"] = (
                t.t().contiguous() if linear else t  # Linear (out, in) -> Conv1D (in, out)
            )
        else:
            unknown.append(name)
    _raise_unknown(unknown, None)
    return out


def _raise_unknown(unknown: list[str], config: ModelConfig | None) -> None:
    if unknown:
        family = config.family if config else "gpt2"
        raise ValueError(f"{len(unknown)} tensors have no Hugging Face {family} name (e.g. {unknown[:4]})")


# --- checks on the model -----------------------------------------------------------------------------
def check_float_model(model: nn.Module, config: ModelConfig) -> None:
    """The model holds plain float weights under exactly the names `Transformer(config)` has."""
    with torch.device("meta"):
        expected = set(Transformer(config).state_dict())
    state = model.state_dict()
    extra = sorted(set(state) - expected)
    if any(".lora_" in k for k in extra):
        raise ValueError(
            "the model has unmerged LoRA layers; merge them first (lmstack.lora.merge_lora, or "
            "`lmstack merge --adapter DIR`)"
        )
    odd = extra + sorted(k for k in expected & set(state) if not state[k].is_floating_point())
    missing = sorted(expected - set(state))
    if odd or missing:
        modules = dict.fromkeys(k.rpartition(".")[0] for k in odd + missing)
        found = [
            f"{type(model.get_submodule(m)).__name__} at {m}" for m in list(modules)[:3] if _has(model, m)
        ]
        raise ValueError(
            f"the model holds quantized or fused weights ({', '.join(found) or odd[:3] or missing[:3]}); "
            "Hugging Face export takes float weights: load the model with dtype float32 or bfloat16, export "
            "it, and quantize after loading the export"
        )


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


# --- writing -----------------------------------------------------------------------------------------
def save_hf(
    model: Transformer,
    tokenizer: Tokenizer | None,
    out_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Write `model` (and its tokenizer, when given) as a Hugging Face checkpoint in `out_dir`.

    Files of an earlier export in `out_dir` that would contradict this one (other weight shards, an index,
    chat_template.jinja) are removed; other files are left alone. Returns the directory."""
    if dtype not in EXPORT_DTYPES.values():
        raise ValueError(f"export dtype must be one of {', '.join(EXPORT_DTYPES)}; got {dtype}")
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    config = model.config
    hf = hf_config_dict(config)
    check_float_model(model, config)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    tensors = {k: t.to("cpu", dtype).contiguous() for k, t in lmstack_to_hf(state, config).items()}
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    generation = _generation_config(tokenizer, config)
    hf |= {k: generation[k] for k in ("bos_token_id",) if k in generation}
    if tokenizer is not None and tokenizer.eos_id is not None:
        hf["eos_token_id"] = tokenizer.eos_id

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for pattern in _STALE:
        for f in out.glob(pattern):
            f.unlink()
    _write_weights(tensors, out, max_shard_bytes)
    _write_json(out / "config.json", hf)
    _write_json(out / "generation_config.json", generation)
    if tokenizer is not None:
        (out / "tokenizer.json").write_text(hf_tokenizer_backend(tokenizer).to_str(), encoding="utf-8")
        _write_json(out / "tokenizer_config.json", _tokenizer_config(tokenizer, config))
    return out


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_weights(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors + the index transformers and lmstack read."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, file)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    _write_json(
        out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map}
    )


# --- tokenizer ---------------------------------------------------------------------------------------
def hf_tokenizer_backend(tokenizer: Tokenizer) -> Any:
    """A copy of the `tokenizers.Tokenizer` whose post-processor adds BOS/EOS as lmstack's `encode` does
    (lmstack adds them itself, so its backend may not), for transformers' encode(add_special_tokens=True)."""
    import tokenizers
    from tokenizers import processors

    backend = tokenizers.Tokenizer.from_str(tokenizer.backend.to_str())
    probe = "Hello world"
    if backend.encode(probe).ids == tokenizer.encode(probe):
        return backend
    specials = [
        (token, i)
        for i, on in ((tokenizer.bos_id, tokenizer.add_bos), (tokenizer.eos_id, tokenizer.add_eos))
        if on and i is not None and (token := tokenizer.id_to_token(i)) is not None
    ]
    bos = [t for t, i in specials if i == tokenizer.bos_id and tokenizer.add_bos][:1]
    eos = [t for t, i in specials if i == tokenizer.eos_id and tokenizer.add_eos][:1]
    template = (
        processors.TemplateProcessing(
            single=[*bos, "$A", *eos],
            pair=[*bos, "$A", *eos, *(f"{t}:1" for t in bos), "$B:1", *(f"{t}:1" for t in eos)],
            special_tokens=list(dict.fromkeys(specials)),
        )
        if specials
        else None
    )
    existing = backend.post_processor
    if isinstance(existing, processors.ByteLevel):  # keep its offset trimming
        backend.post_processor = processors.Sequence([existing, template]) if template else existing
    else:
        backend.post_processor = template
    return backend


def _tokenizer_config(tokenizer: Tokenizer, config: ModelConfig) -> dict[str, Any]:
    out: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # reads tokenizer.json as is, whatever the family
        "add_bos_token": tokenizer.add_bos,
        "add_eos_token": tokenizer.add_eos,
        "model_max_length": config.max_seq_len,
        "clean_up_tokenization_spaces": False,
    }
    for key, i in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id)):
        if i is not None and (token := tokenizer.id_to_token(i)) is not None:
            out[key] = token
    if tokenizer.chat_template is not None:
        out["chat_template"] = tokenizer.chat_template
    return out


def _generation_config(tokenizer: Tokenizer | None, config: ModelConfig) -> dict[str, Any]:
    """BOS and every id lmstack stops on (EOS first), so transformers' generate stops where lmstack does."""
    if tokenizer is None:
        return {k: config.extra[k] for k in ("bos_token_id", "eos_token_id") if k in config.extra}
    out: dict[str, Any] = {} if tokenizer.bos_id is None else {"bos_token_id": tokenizer.bos_id}
    first = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    stops = first + sorted(tokenizer.stop_ids - set(first))
    if stops:
        out["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    return out
