"""NF4 (QLoRA's frozen 4-bit base): exact code values, round-trip error bounds against float and a plain
per-block int4 reference, bytes per parameter, forward == dequantized matmul, and LoRA training on top."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmstack.config import ModelConfig
from lmstack.lora import LoraConfig, LoraLinear, apply_lora, merge_lora
from lmstack.models.transformer import Transformer
from lmstack.nf4 import (
    BLOCK,
    NF4_CODE,
    SCALE_BLOCK,
    SCALE_CODE,
    NF4Linear,
    dequantize_blockwise,
    pack_nf4,
    quantize_blockwise,
    quantize_model_nf4,
    stored_bytes,
    unpack_nf4,
)

# Table 1 / appendix E of the QLoRA paper, as bitsandbytes ships them (functional.get_4bit_type("nf4"))
PAPER_NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]


def gaussian(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.02


def linear_with(weight: torch.Tensor, bias: bool = False) -> torch.nn.Linear:
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
    with torch.no_grad():
        linear.weight.copy_(weight)
    return linear


def rel_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return ((approx - exact).norm() / exact.norm()).item()


def int4_absmax_reference(w: torch.Tensor) -> torch.Tensor:
    """Symmetric int4 per block of 64 with a float absmax (levels -7..7): the plain uniform baseline."""
    blocks = w.reshape(-1, BLOCK)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    return (torch.round(blocks / absmax * 7).clamp(-7, 7) * absmax / 7).view_as(w)


# --- the codes ----------------------------------------------------------------------------------------
def test_nf4_levels_are_the_papers_exactly():
    assert NF4_CODE.dtype == torch.float32
    assert torch.equal(NF4_CODE, torch.tensor(PAPER_NF4, dtype=torch.float32))
    # values that are exactly levels (times a block absmax of 1) come back as their own index
    idx, absmax = quantize_blockwise(NF4_CODE, NF4_CODE, 16)
    assert torch.equal(idx, torch.arange(16, dtype=torch.uint8)) and absmax.item() == 1.0
    assert torch.equal(dequantize_blockwise(idx, absmax, NF4_CODE, 16), NF4_CODE)


def test_scale_code_is_bitsandbytes_signed_dynamic_map():
    assert SCALE_CODE.shape == (256,) and torch.equal(SCALE_CODE, SCALE_CODE.sort().values)
    assert SCALE_CODE.unique().numel() == 256 and {0.0, 1.0} <= set(SCALE_CODE.tolist())
    positive = SCALE_CODE[SCALE_CODE > 0]
    assert positive.numel() == 128 and positive.min().item() == pytest.approx(5.5e-7)  # 1e-6 * (0.1 + 1) / 2
    assert SCALE_CODE.min().item() == pytest.approx(-(1 + 1 - 0.9 / 64) / 2)  # no -1: the extra value is +1


# --- round trip -------------------------------------------------------------------------------------
def test_round_trip_error_on_gaussian_weights():
    w = gaussian(256, 512)
    qweight, qabsmax, absmax_scale, offset = pack_nf4(w)
    nf4 = unpack_nf4(qweight, qabsmax, absmax_scale, offset, tuple(w.shape))
    idx, absmax = quantize_blockwise(w.reshape(-1), NF4_CODE, BLOCK)
    single = dequantize_blockwise(idx, absmax, NF4_CODE, BLOCK).view_as(w)  # fp32 scales, no double quant

    assert rel_error(nf4, w) < 0.095  # measured 0.092
    assert rel_error(nf4, w) < 0.9 * rel_error(int4_absmax_reference(w), w)  # int4: 0.108
    assert rel_error(nf4, w) < 1.01 * rel_error(single, w)  # double quantization costs < 1 %

    # per element: half the widest gap between levels, plus the error of the double-quantized scale
    padded = F.pad(qabsmax, (0, absmax_scale.numel() * SCALE_BLOCK - qabsmax.numel()))
    scales = dequantize_blockwise(padded, absmax_scale, SCALE_CODE, SCALE_BLOCK)[: absmax.numel()] + offset
    assert ((scales - absmax).abs() / absmax).max() < 0.01
    half_gap = (NF4_CODE[1:] - NF4_CODE[:-1]).max() / 2
    bound = absmax * half_gap + (scales - absmax).abs()  # (nb,)
    err = (nf4 - w).reshape(-1, BLOCK).abs()  # (nb, 64)
    assert (err <= bound[:, None] * (1 + 1e-5)).all()


def test_shapes_that_do_not_fill_blocks_round_trip():
    w = gaussian(37, 70, seed=1)  # 2590 weights: a partial 64-block, a partial 256-block of scales
    layer = NF4Linear.from_linear(linear_with(w))
    assert layer.dequantize().shape == (37, 70) and rel_error(layer.dequantize(), w) < 0.1
    zeros = NF4Linear.from_linear(linear_with(torch.zeros(8, 64)))
    assert torch.equal(zeros.dequantize(), torch.zeros(8, 64))


def test_bytes_per_parameter():
    layer = NF4Linear.from_linear(linear_with(gaussian(256, 512)))
    per_param = stored_bytes(layer) / (256 * 512)
    assert 0.5 < per_param <= 0.52  # 4 bits + 8/64 bits of scale + 32/(64 * 256) bits
    assert (
        layer.qweight.dtype == layer.qabsmax.dtype == torch.uint8 and layer.qweight.numel() == 256 * 512 // 2
    )


# --- the module -------------------------------------------------------------------------------------
def test_forward_is_the_dequantized_matmul_exactly_and_backward_reaches_the_input():
    layer = NF4Linear.from_linear(linear_with(gaussian(48, 96), bias=True))
    x = torch.randn(2, 5, 96, requires_grad=True)
    y = layer(x)
    assert torch.equal(y, F.linear(x, layer.dequantize(), layer.bias))
    y.square().sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    F.linear(x_ref, layer.dequantize(), layer.bias).square().sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-6)
    assert not list(layer.parameters())  # nothing in it can train


TINY = ModelConfig(
    name="tiny",
    vocab_size=64,
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    hidden_dim=128,
    max_seq_len=32,
    tie_embeddings=False,
)


def tiny_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(TINY).eval()


def test_quantize_model_swaps_every_linear_but_the_head():
    model = tiny_model()
    ids = torch.randint(0, TINY.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(ids)
        quantize_model_nf4(model)
        logits = model(ids)
    linears = {
        n: type(m) for n, m in model.named_modules() if n.endswith(("wq", "wk", "wv", "wo", "w1", "w2", "w3"))
    }
    assert len(linears) == 14 and set(linears.values()) == {NF4Linear}
    assert type(model.output) is not NF4Linear
    assert rel_error(logits, reference) < 0.1


def test_qlora_trains_while_the_nf4_codes_stay_unchanged():
    model = quantize_model_nf4(tiny_model())
    frozen = {n: b.clone() for n, b in model.named_buffers()}
    apply_lora(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    assert all(isinstance(m.base, NF4Linear) for m in model.modules() if isinstance(m, LoraLinear))
    ids = torch.randint(0, TINY.vocab_size, (4, 17), generator=torch.Generator().manual_seed(2))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    model.train()
    losses = []
    for _ in range(12):
        logits = model(ids[:, :-1])  # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, TINY.vocab_size), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < 0.5 * losses[0], losses  # memorizes a fixed batch through the adapters alone
    buffers = dict(model.named_buffers())
    assert len(frozen) == 14 * 4  # qweight, qabsmax, absmax_scale, offset per NF4 linear
    for name, before in frozen.items():  # now under the LoRA wrapper: layers.0.attn.wq.base.qweight
        module, _, buffer = name.rpartition(".")
        assert torch.equal(buffers[f"{module}.base.{buffer}"], before), name

    with pytest.raises(ValueError, match="NF4Linear base in place.*merge_lora"):
        model.layers[0].attn.wq.merge()
    with torch.no_grad():
        adapted = model(ids)
        plain = merge_lora(model)  # dequantized float weights + B A
        assert not any(isinstance(m, NF4Linear | LoraLinear) for m in plain.modules())
        assert (plain(ids) - adapted).abs().max() <= 1e-4


def test_loading_straight_into_nf4_equals_quantizing_after_loading(tiny_gguf, tmp_path):
    """LLM.load(dtype="nf4") swaps each linear layer as it is read (from the cached conversion, one float
    weight at a time): the same NF4 codes and logits as loading float and then quantize_model_nf4."""
    from lmstack.models.gguf import load_gguf
    from lmstack.models.loading import SafetensorsReader
    from lmstack.nf4 import nf4_swap

    _, path = tiny_gguf("llama")
    cache = tmp_path / "cache"
    after, _, _ = load_gguf(path, cache_dir=cache)  # writes the cached conversion
    quantize_model_nf4(after)
    (entry,) = cache.iterdir()
    reader = SafetensorsReader(entry / "model.safetensors")
    assert reader.shape("tok_embeddings.weight") == reader["tok_embeddings.weight"].shape
    streamed, _, _ = load_gguf(path, cache_dir=cache, linear_swap=nf4_swap())
    assert set(dict(streamed.named_buffers())) == set(dict(after.named_buffers()))
    for name, t in after.state_dict().items():
        assert torch.equal(streamed.state_dict()[name], t), name
    assert not any(t.is_meta for t in [*streamed.parameters(), *streamed.buffers()])
    ids = torch.randint(0, streamed.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (streamed(ids) - after(ids)).abs().max().item() < 1e-6  # the same weights; BLAS order aside


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_int8_tables_keep_a_quarter_of_the_float_tables(tied):
    """quantize_tables_int8 (QLoRA's frozen embedding and head, LLM.load(dtype="nf4")): Q8_0 rows at 8.5
    bits per value, one shared copy when tied, logits within int8 rounding of the float model's."""
    from lmstack.nf4 import quantize_tables_int8
    from lmstack.quant import Int8Embedding, Int8Linear

    torch.manual_seed(0)
    model = Transformer(TINY.with_(tie_embeddings=tied)).eval()
    ids = torch.randint(0, TINY.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    float_bytes = stored_bytes(model.tok_embeddings) + (0 if tied else stored_bytes(model.output))
    with torch.no_grad():
        reference = model(ids)
        quantize_tables_int8(model)
        logits = model(ids)
    assert isinstance(model.tok_embeddings, Int8Embedding) and isinstance(model.output, Int8Linear)
    codes = {id(model.tok_embeddings.qweight), id(model.output.qweight)}
    assert len(codes) == (1 if tied else 2)
    tables = [
        model.tok_embeddings.qweight,
        model.tok_embeddings.scales,
        model.output.qweight,
        model.output.scales,
    ]
    int8_bytes = sum(t.numel() * t.element_size() for t in {id(t): t for t in tables}.values())
    assert int8_bytes <= float_bytes * 8.5 / 32 * 1.01
    assert rel_error(logits, reference) < 0.02


@pytest.mark.parametrize("tied", [False, True])
def test_loading_into_qlora_quantizes_the_tables_as_they_load(tied):
    """build_model with nf4_swap(tables_int8=True) (what LLM.load(dtype="nf4") runs) gives exactly the model
    of loading float and then quantizing: NF4 linears, int8 tables (a tied table after loading, shared)."""
    from lmstack.models.loading import build_model
    from lmstack.nf4 import nf4_swap, quantize_model_nf4, quantize_tables_int8
    from lmstack.quant import Int8Embedding, Int8Linear

    torch.manual_seed(0)
    cfg = TINY.with_(tie_embeddings=tied)
    state = {k: v.clone() for k, v in Transformer(cfg).state_dict().items()}
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    swapped = quantize_tables_int8(build_model(cfg, dict(state), linear_swap=nf4_swap(tables_int8=True)))
    after = build_model(cfg, dict(state))
    after = quantize_tables_int8(quantize_model_nf4(after))
    assert isinstance(swapped.tok_embeddings, Int8Embedding) and isinstance(swapped.output, Int8Linear)
    assert isinstance(swapped.layers[0].attn.wq, NF4Linear)
    assert (swapped.tok_embeddings.qweight is swapped.output.qweight) == tied
    with torch.no_grad():
        torch.testing.assert_close(swapped(ids), after(ids), rtol=0, atol=0)
