"""Checkpoint loading compared with transformers: same logits, and KV-cached decode == full forward.

Fast tests use tiny random models (HF directories and GGUF files written like llama.cpp writes them); the
slow tier loads the packaged real GGUFs and compares them with transformers loading the same file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmstack.models.gguf import CorruptGGUFError, config_from_gguf, load_gguf, read_gguf
from lmstack.models.hf import config_from_hf, load_hf

HF_KINDS = ["llama", "qwen2", "gemma3", "gemma3-scaled", "gpt2"]
T = 20  # longer than the tiny Gemma sliding windows (4, 5), so local and global layers differ


def _ids(vocab: int, batch: int = 2, seq: int = T) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def incremental_logits(model: torch.nn.Module, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of `ids` (1, T) computed as a prefill and then one token at a time through the KV cache."""
    model.setup_caches(1, ids.shape[1])
    try:
        out = [model(ids[:, :prefill], torch.arange(prefill))]
        for t in range(prefill, ids.shape[1]):
            out.append(model(ids[:, t : t + 1], torch.tensor([t])))
    finally:
        model.clear_caches()
    return torch.cat(out, dim=1)


# --- Hugging Face directories ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", HF_KINDS)
def test_hf_logits_match_transformers(tiny_hf_model, kind):
    hf, path = tiny_hf_model(kind)
    model, config = load_hf(path)
    ids = _ids(config.vocab_size)
    with torch.no_grad():
        assert _max_diff(model(ids), hf(ids).logits) <= 1e-4


@pytest.mark.parametrize("kind", HF_KINDS)
def test_kv_cached_decode_equals_full_forward(tiny_hf_model, kind):
    _, path = tiny_hf_model(kind)
    model, config = load_hf(path)
    ids = _ids(config.vocab_size, batch=1)
    with torch.no_grad():
        assert _max_diff(incremental_logits(model, ids, prefill=7), model(ids)) <= 1e-4


def test_sharded_checkpoint(tiny_hf_model, tmp_path):
    hf, _ = tiny_hf_model("qwen2")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    model, config = load_hf(tmp_path / "sharded")
    ids = _ids(config.vocab_size)
    with torch.no_grad():
        assert _max_diff(model(ids), hf(ids).logits) <= 1e-4


def test_gemma3_config_from_hf_4x_keys():
    """config.json files written by transformers 4.x carry rope_theta/rope_local_base_freq/rope_scaling."""
    cfg = {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": 262144,
        "hidden_size": 640,
        "intermediate_size": 2048,
        "num_hidden_layers": 18,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "sliding_window": 512,
        "sliding_window_pattern": 6,
        "query_pre_attn_scalar": 256,
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "hidden_activation": "gelu_pytorch_tanh",
    }
    c = config_from_hf(cfg)
    assert (c.rope_base, c.rope_local_base, c.rope_scaling) == (1_000_000.0, 10000.0, 8.0)
    assert c.layer_types[:6] == ("local",) * 5 + ("global",) and c.attn_scale == 256**-0.5
    assert c.tie_embeddings and c.embed_scale == 640**0.5


def test_unsupported_architecture_lists_supported():
    with pytest.raises(ValueError, match="MistralForCausalLM.*LlamaForCausalLM.*GPT2LMHeadModel"):
        config_from_hf({"architectures": ["MistralForCausalLM"], "model_type": "mistral"})


def test_unsupported_rope_scaling_is_an_error():
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "vocab_size": 8,
        "num_attention_heads": 4,
        "num_hidden_layers": 1,
        "intermediate_size": 8,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0},
    }
    with pytest.raises(ValueError, match="llama3"):
        config_from_hf(cfg)


def test_missing_weights_are_an_error(tiny_hf_model, tmp_path):
    _, path = tiny_hf_model("llama")
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_hf(path)


# --- GGUF --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_gguf_logits_match_transformers(tiny_gguf, arch):
    """llama: Q/K rows un-permuted; gemma3: the +1 on norms removed; Q8_0 and F16 dequantized."""
    hf, path = tiny_gguf(arch)
    model, config, meta = load_gguf(path)
    assert meta["general.architecture"] == arch and len(meta["tokenizer.ggml.tokens"]) == config.vocab_size
    assert config.tie_embeddings == (arch == "gemma3")  # the llama file has output.weight, gemma's not
    ids = _ids(config.vocab_size)
    with torch.no_grad():
        assert _max_diff(model(ids), hf(ids).logits) <= 1e-4
        assert _max_diff(incremental_logits(model, ids[:1], prefill=5), model(ids[:1])) <= 1e-4


def test_gguf_cache_second_load_reads_no_gguf(tiny_gguf, tmp_path, monkeypatch):
    hf, path = tiny_gguf("gemma3")
    cache = tmp_path / "cache"
    model1, config1, meta1 = load_gguf(path, cache_dir=cache)
    (entry,) = cache.iterdir()
    assert sorted(p.name for p in entry.iterdir()) == ["config.json", "gguf_meta.json", "model.safetensors"]
    assert json.loads((entry / "config.json").read_text())["config"]["layer_types"][5] == "global"

    monkeypatch.setattr("lmstack.models.gguf.read_gguf", lambda p: pytest.fail("cache miss: GGUF parsed"))
    model2, config2, meta2 = load_gguf(path, cache_dir=cache, name="renamed")
    assert config2.name == "renamed" and config2.with_(name=config1.name) == config1 and meta2 == meta1
    ids = _ids(config1.vocab_size)
    with torch.no_grad():
        assert torch.equal(model1(ids), model2(ids))


def test_truncated_gguf_is_a_clear_error_and_caches_nothing(tiny_gguf, tmp_path):
    _, path = tiny_gguf("llama")
    data = path.read_bytes()
    cache = tmp_path / "cache"
    for cut in (3, 200, len(data) // 2, len(data) - 10):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(CorruptGGUFError, match=f"{bad.name}.*corrupt or truncated.*reinstall"):
            load_gguf(bad, cache_dir=cache)
    assert not cache.exists() or list(cache.iterdir()) == []


def test_unsupported_gguf_architecture(tiny_gguf):
    _, path = tiny_gguf("llama")
    meta, tensors = read_gguf(path)
    with pytest.raises(ValueError, match="'falcon'.*llama, qwen2, gemma3"):
        config_from_gguf({**meta, "general.architecture": "falcon"}, tensors.keys())


# --- the packaged real models (slow) -----------------------------------------------------------------
PROMPTS = [
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "The three most important ideas in thermodynamics are",
    "Q: What is 17 * 23?\nA:",
    "Il était une fois, dans un petit village de Provence,",
    "SELECT name, COUNT(*) FROM orders JOIN customers ON",
]


def greedy(step, ids: list[int], n: int) -> list[int]:
    """n greedy tokens; `step(new_ids, start)` returns the last logits after feeding new_ids at start."""
    out, logits = [], step(ids, 0)
    for _ in range(n):
        out.append(int(logits.argmax()))
        logits = step([out[-1]], len(ids) + len(out) - 1)
    return out


def lmstack_step(model):
    def step(new: list[int], start: int) -> torch.Tensor:
        return model(torch.tensor([new]), torch.arange(start, start + len(new)))[0, -1]

    return step


def hf_step(model):
    state = {}

    def step(new: list[int], start: int) -> torch.Tensor:
        out = model(torch.tensor([new]), past_key_values=state.get("past") if start else None, use_cache=True)
        state["past"] = out.past_key_values
        return out.logits[0, -1]

    return step


@pytest.fixture(
    scope="module", params=["qwen2.5-coder-0.5b-instruct", "gemma-3-270m", "smollm2-135m-instruct"]
)
def real_pair(request, model_cache_dir):
    """(lmstack LoadedModel, transformers model, transformers tokenizer) over the same packaged GGUF."""
    transformers = pytest.importorskip("transformers")
    from lmstack.hub import ModelNotFoundError, load_model

    try:
        loaded = load_model(request.param, cache_dir=model_cache_dir)
    except ModelNotFoundError as e:
        pytest.skip(str(e))
    path: Path = loaded.resolved.path
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    yield loaded, transformers_from_gguf(path), tok


def transformers_from_gguf(path: Path) -> torch.nn.Module:
    """transformers' own GGUF loading (config, dequantization, Q/K un-permutation, Gemma norm shift).

    `from_pretrained(gguf_file=...)` does exactly this but insists on `accelerate`, which lmstack does not
    depend on; these are the same transformers functions it calls, minus the device-map machinery.
    """
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    assert set(missing) <= tied and not unexpected, (missing, unexpected)
    return model.eval()


@pytest.mark.slow
def test_real_gguf_logits_match_transformers(real_pair):
    loaded, hf, tok = real_pair
    worst = 0.0
    with torch.no_grad():
        for prompt in PROMPTS[:3]:
            ids = torch.tensor([tok(prompt)["input_ids"]])
            worst = max(worst, _max_diff(loaded.model(ids), hf(ids).logits))
    print(f"{loaded.config.name}: max |logits diff| vs transformers = {worst:.2e}")
    assert worst <= 5e-3


@pytest.mark.slow
def test_real_gguf_greedy_matches_transformers(real_pair):
    """64 greedy tokens on 5 prompts, the issue's check, for the 0.5B and gemma-3-270m; smollm2 (same
    Llama layout as neither) keeps its logits check only: 53 s of the suite's 20-minute budget."""
    loaded, hf, tok = real_pair
    if loaded.config.name.startswith("smollm2"):
        pytest.skip("greedy equality is checked on qwen and gemma; smollm2 has its logits check")
    n = 64
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tok(prompt)["input_ids"]
            loaded.model.setup_caches(1, len(ids) + n)
            ours = greedy(lmstack_step(loaded.model), ids, n)
            loaded.model.clear_caches()
            assert ours == greedy(hf_step(hf), ids, n), f"{loaded.config.name} diverged on {prompt!r}"


def test_a_rewritten_gguf_replaces_its_stale_conversion(tiny_gguf, tmp_path):
    """A GGUF written again (new mtime) gets a new cache entry and the old one, gigabytes for a real
    model that nothing reads any more, is deleted; another file's entry stays."""
    import os

    _, path = tiny_gguf("llama")
    _, other = tiny_gguf("gemma3")
    cache = tmp_path / "cache"
    load_gguf(path, cache_dir=cache)
    load_gguf(other, cache_dir=cache)
    before = {p.name for p in cache.iterdir()}
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    load_gguf(path, cache_dir=cache)
    after = {p.name for p in cache.iterdir()}
    assert len(before) == len(after) == 2

    def named(names: set[str], stem: str) -> list[str]:
        return [n for n in names if n.startswith(stem)]

    assert named(before, "tiny-gemma3") == named(after, "tiny-gemma3")  # another file's entry stays
    assert named(before, "tiny-llama") != named(after, "tiny-llama")  # a new entry, the old one gone
