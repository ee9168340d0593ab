"""The native decode ops (lmstack/kernels/ops_cpu.cpp) against the PyTorch code they replace, and the
fused q/k/v and gate/up projections against the separate modules."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import lmstack.models.layers as layers
from lmstack.config import NAMED_CONFIGS
from lmstack.kernels import load_ops_kernels
from lmstack.models.attention import KVCache, attend, attention_mask
from lmstack.models.layers import MLP, RMSNorm, apply_rope, rope_cos_sin
from lmstack.models.transformer import Transformer
from lmstack.quant import Int8Linear, Q4Linear, quantize_model

BUILDS = ["simd", "portable"]


@pytest.fixture(scope="module", params=BUILDS)
def ops(request):
    module = load_ops_kernels(portable=request.param == "portable")
    if module is None:
        pytest.skip("native ops could not be built here")
    return module


@pytest.mark.parametrize("unit_offset", [False, True])
def test_rms_norm_matches_module(ops, unit_offset):
    norm = RMSNorm(96, eps=1e-5, unit_offset=unit_offset)
    norm.weight.data.normal_()
    x = torch.randn(3, 5, 96)
    ref = norm(x)  # autograd on: the PyTorch path
    torch.testing.assert_close(ops.rms_norm(x, norm.weight.detach(), 1e-5, unit_offset), ref)
    strided = torch.randn(7, 200)[:, 10:106]  # rows with a stride, as a column slice
    torch.testing.assert_close(ops.rms_norm(strided, norm.weight.detach(), 1e-5, unit_offset), norm(strided))


@pytest.mark.parametrize(
    ("code", "act"), [(0, F.silu), (1, lambda a: F.gelu(a, approximate="tanh")), (2, F.gelu)]
)
def test_gated_act_matches_pytorch(ops, code, act):
    h = torch.randn(4, 2, 2 * 80) * 3
    a, b = h.split(80, dim=-1)  # strided views, as after a fused gate/up projection
    torch.testing.assert_close(ops.gated_act(a, b, code), act(a) * b)


def test_ops_reject_bad_input(ops):
    with pytest.raises(RuntimeError, match="float32"):
        ops.rms_norm(torch.randn(2, 8, dtype=torch.float64), torch.ones(8, dtype=torch.float64), 1e-6, False)
    with pytest.raises(RuntimeError, match="act must be"):
        ops.gated_act(torch.randn(2, 4), torch.randn(2, 4), 7)
    x = torch.randn(2, 3, 4, 8)[:, :, :, :4]  # rows of a 4-D slice are not evenly spaced
    with pytest.raises(RuntimeError, match="evenly spaced"):
        ops.rms_norm(x.transpose(1, 2), torch.ones(4), 1e-6, False)


def reference_attention(q, k, v, cache, input_pos, rope, scale, softcap, window):
    """The PyTorch path of Attention.forward: (B, T, n*hs) inputs -> (B, T, nh*hs)."""
    B, T, _ = q.shape
    hs = cache.k.shape[-1]
    q, k, v = (t.reshape(B, T, -1, hs).transpose(1, 2) for t in (q, k, v))
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    kv_len = int(input_pos.max()) + 1
    k, v = cache.update(input_pos, k, v, kv_len)
    mask = attention_mask(input_pos, torch.arange(kv_len), window)
    return attend(q, k, v, mask, scale, softcap).transpose(1, 2).reshape(B, T, -1)


@pytest.mark.parametrize(
    ("nh", "nkv", "rotary", "softcap", "window"),
    [
        (4, 4, 16, None, None),
        (6, 2, 16, None, None),
        (4, 1, 8, 30.0, None),
        (4, 2, 0, None, 5),
        (4, 2, 16, 20.0, 3),
    ],
)
@pytest.mark.parametrize("T", [1, 4])
def test_cached_attention_matches_reference(ops, nh, nkv, rotary, softcap, window, T):
    torch.manual_seed(0)
    B, hs, S = 2, 16, 32
    ref_cache, fast_cache = (
        KVCache(B, nkv, S, hs, torch.float32, "cpu"),
        KVCache(B, nkv, S, hs, torch.float32, "cpu"),
    )
    for cache in (ref_cache, fast_cache):  # some earlier context in both caches
        cache.k[:, :, :10].copy_(torch.randn(B, nkv, 10, hs, generator=torch.Generator().manual_seed(1)))
        cache.v[:, :, :10].copy_(torch.randn(B, nkv, 10, hs, generator=torch.Generator().manual_seed(2)))
    qkv = torch.randn(B, T, (nh + 2 * nkv) * hs)
    q, k, v = qkv.split([nh * hs, nkv * hs, nkv * hs], dim=-1)  # strided views of one projection
    input_pos = torch.arange(10, 10 + T)
    rope = rope_cos_sin(input_pos, rotary, 10000.0) if rotary else None
    ref = reference_attention(q, k, v, ref_cache, input_pos, rope, 0.3, softcap, window)
    cos, sin = rope if rope is not None else (torch.empty(0), torch.empty(0))
    out = ops.cached_attention(
        q, k, v, fast_cache.k, fast_cache.v, input_pos, cos, sin, 0.3, softcap or 0.0, window or 0
    )
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(fast_cache.k, ref_cache.k, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fast_cache.v, ref_cache.v)


def test_cached_attention_rejects_positions_outside_the_cache(ops):
    cache = KVCache(1, 1, 4, 8, torch.float32, "cpu")
    q = torch.randn(1, 1, 8)
    with pytest.raises(RuntimeError, match="outside the KV cache"):
        ops.cached_attention(
            q, q, q, cache.k, cache.v, torch.tensor([4]), torch.empty(0), torch.empty(0), 1.0, 0.0, 0
        )


def tiny(name: str):
    c = NAMED_CONFIGS[name]
    if name in ("gpt2-tiny", "llama-tiny"):
        return c
    local = ("local", "local", "global", "local") if c.layer_types else None
    return dataclasses.replace(
        c, dim=64, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=128, vocab_size=256, n_layers=4,
        max_seq_len=256, layer_types=local, sliding_window=8 if c.sliding_window else None,
    )  # fmt: skip


@pytest.mark.parametrize("quant", [None, "int8", "q4"])
@pytest.mark.parametrize("name", ["qwen2.5-coder-0.5b-instruct", "gemma-3-270m", "gpt2-tiny", "llama-tiny"])
def test_decode_with_native_ops_matches_pytorch_path(monkeypatch, name, quant):
    """Prefill, single-token decode steps and a multi-token (speculative) step, ops on vs off."""
    if load_ops_kernels() is None:
        pytest.skip("native ops could not be built here")
    torch.manual_seed(0)
    model = Transformer(tiny(name)).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    if quant is not None:
        quantize_model(model, quant)
        model.fuse_projections()
    ids = torch.randint(0, model.config.vocab_size, (2, 20))
    outs = []
    for fused in (False, True):
        monkeypatch.setattr(layers, "USE_FUSED_OPS", fused)
        model.setup_caches(2, 64)
        with torch.inference_mode():
            logits = [model(ids[:, :12], torch.arange(12))]
            logits += [model(ids[:, i : i + 1], torch.tensor([i])) for i in range(12, 17)]
            logits.append(model(ids[:, 17:20], torch.arange(17, 20)))
        outs.append(torch.cat(logits, dim=1))
    scale = outs[0].abs().max()
    # Quantized models quantize activations to int8: a 1e-7 change in a norm's output can flip a code,
    # which moves the logits by ~1e-3 relative; float models must agree to rounding.
    assert (outs[1] - outs[0]).abs().max() <= (1e-5 if quant is None else 2e-2) * scale


@pytest.mark.parametrize("cls", [Int8Linear, Q4Linear])
def test_concat_computes_the_modules_side_by_side(cls):
    torch.manual_seed(0)
    linears = [torch.nn.Linear(64, n, bias=b) for n, b in ((32, True), (8, False), (8, True))]
    mods = [cls.from_linear(lin) for lin in linears]
    fused = cls.concat(mods)
    x = torch.randn(3, 64)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), torch.cat([m(x) for m in mods], dim=-1))
    assert cls.concat([mods[0], cls.from_linear(torch.nn.Linear(64, 6))]) is None  # 6 rows: not whole groups
    assert cls.concat([mods[0], cls.from_linear(torch.nn.Linear(96, 8))]) is None  # other input width


def test_fuse_projections_keeps_mixed_formats_apart():
    model = Transformer(tiny("qwen2.5-coder-0.5b-instruct")).eval()
    quantize_model(model, "q4", skip=lambda n: n.endswith("attn.wv"))
    quantize_model(model, "int8")
    model.fuse_projections()
    attn, mlp = model.layers[0].attn, model.layers[0].mlp
    assert attn.wqkv is None and isinstance(attn.wqk, Q4Linear) and isinstance(attn.wv, Int8Linear)
    assert attn.wq is None and isinstance(mlp.w13, Q4Linear) and mlp.w1 is None


def test_float_mlp_is_not_fused():
    mlp = MLP(tiny("llama-tiny"))
    mlp.fuse_projections()
    assert mlp.w13 is None and mlp.w1 is not None


@pytest.mark.parametrize(("softcap", "window"), [(None, None), (25.0, None), (None, 6)])
def test_paged_attention_matches_gather_and_sdpa(ops, softcap, window):
    """Three requests in one flattened batch -- two decodes and a 5-token prefill chunk -- over shuffled
    blocks of a paged cache, against the engine's PyTorch path (gather through the block table + SDPA)."""
    from lmstack.engine.runner import _Span, paged_attention, plan_reads

    torch.manual_seed(0)
    nh, nkv, hs, bs, num_blocks = 6, 2, 16, 4, 24
    k_cache, v_cache = torch.randn(num_blocks, bs, nkv, hs), torch.randn(num_blocks, bs, nkv, hs)
    blocks = torch.randperm(num_blocks).tolist()
    spans = [  # (rows, first position, block table): lengths 13, 9 (5 new) and 1
        _Span(0, 1, 12, blocks[0:4]),
        _Span(1, 6, 4, blocks[4:7]),
        _Span(6, 7, 0, blocks[7:8]),
    ]
    q = torch.randn(7, nh, hs)
    ref = paged_attention(q, k_cache, v_cache, plan_reads(spans, window, bs, "cpu"), 0.25, softcap)
    nb = max(len(s.block_ids) for s in spans)
    table = torch.tensor([s.block_ids + [0] * (nb - len(s.block_ids)) for s in spans])
    starts, lens = torch.tensor([0, 1, 6, 7]), torch.tensor([s.seq_len for s in spans])
    got = ops.paged_attention(q, k_cache, v_cache, table, starts, lens, 0.25, softcap or 0.0, window or 0)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    with pytest.raises(RuntimeError, match="block table width"):
        ops.paged_attention(q, k_cache, v_cache, table[:, :1].contiguous(), starts, lens, 0.25, 0.0, 0)


def test_long_context_attention_shares_work_and_matches(ops):
    """Enough keys that the op splits its heads over helper threads; same numbers as the reference."""
    torch.manual_seed(0)
    B, nh, nkv, hs, S = 1, 8, 2, 64, 2100
    ref_cache, fast_cache = (
        KVCache(B, nkv, S, hs, torch.float32, "cpu"),
        KVCache(B, nkv, S, hs, torch.float32, "cpu"),
    )
    for cache in (ref_cache, fast_cache):
        cache.k[:, :, :2048].copy_(torch.randn(B, nkv, 2048, hs, generator=torch.Generator().manual_seed(1)))
        cache.v[:, :, :2048].copy_(torch.randn(B, nkv, 2048, hs, generator=torch.Generator().manual_seed(2)))
    q, k, v = torch.randn(B, 2, nh * hs), torch.randn(B, 2, nkv * hs), torch.randn(B, 2, nkv * hs)
    input_pos = torch.tensor([2048, 2049])
    rope = rope_cos_sin(input_pos, hs, 10000.0)
    ref = reference_attention(q, k, v, ref_cache, input_pos, rope, hs**-0.5, None, None)
    out = ops.cached_attention(q, k, v, fast_cache.k, fast_cache.v, input_pos, *rope, hs**-0.5, 0.0, 0)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("rows", [1, 5, 64, 65])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_small_batches_match_nn_linear(rows, bias):
    from lmstack.models.layers import Linear

    torch.manual_seed(0)
    ours = Linear(48, 40, bias=bias)
    ref = torch.nn.Linear(48, 40, bias=bias)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(1, rows, 48)
    torch.testing.assert_close(ours(x), ref(x))
    assert ours(x).is_contiguous() and ours(x).shape == (1, rows, 40)
