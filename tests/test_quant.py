"""Quantized linear/embedding: the C++ kernel against the PyTorch reference, quantization error, swaps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmstack.kernels import load_quant_kernels
from lmstack.quant import (
    PREFILL_MIN_ROWS,
    R_STEPS,
    Int8Embedding,
    Int8Linear,
    Q4Embedding,
    Q4Linear,
    dequantize_int8,
    dequantize_q4,
    fit_q4_blocks,
    int8_linear_reference,
    pack_int8,
    pack_q4,
    q4_linear_reference,
    quantize_activations,
    quantize_model,
)

# (in, out) of qwen2.5-0.5b (q/o, k/v, gate/up, down), smollm2-135m and gemma-3-270m
REAL_SHAPES = [(896, 896), (896, 128), (896, 4864), (4864, 896), (576, 1536), (1536, 576), (640, 1024)]


@pytest.fixture(scope="module")
def ext():
    module = load_quant_kernels()
    if module is None:
        pytest.skip("quantized CPU kernels could not be built here")
    return module


def _weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 0.02


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _kernel_and_reference(ext, dtype: str, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None):
    if dtype == "int8":
        packed = pack_int8(w)
        return ext.q8_linear(x, *packed, bias), int8_linear_reference(x, *packed, bias)
    packed = pack_q4(w)
    return ext.q4_linear(x, *packed, bias), q4_linear_reference(x, *packed, bias)


@pytest.mark.parametrize("k", [64, 96, 896, 4864])
def test_activation_quantization_is_bit_exact(ext, k):
    # many blocks: a rounding mismatch (e.g. 127 * (1 / amax) vs 127 / amax) shows up ~1 in 3 * 10^6 values
    x = (
        torch.randn(1024, k, generator=torch.Generator().manual_seed(k))
        * torch.logspace(-3, 2, 1024)[:, None]
    )
    x[1, :32] = 0  # an all-zero block must give scale 0, not NaN
    padded = -(-k // 64) * 64
    for got, want in zip(ext.quantize_activations(x, padded), quantize_activations(x, padded), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", ["int8", "q4"])
@pytest.mark.parametrize("m", [1, 3, 8, 64])
@pytest.mark.parametrize("k,n", REAL_SHAPES)
def test_kernel_matches_reference(ext, dtype, m, k, n):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    bias = torch.randn(n) if n == 128 else None
    got, want = _kernel_and_reference(ext, dtype, x, _weight(n, k), bias)
    # integer dots are exact in both; only the float accumulation order differs
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("dtype", ["int8", "q4"])
@pytest.mark.parametrize("k,n", [(96, 7), (32, 1), (160, 33), (64, 6)])
def test_kernel_odd_shapes(ext, dtype, k, n):
    """Tails: rows not a multiple of the tile or row group, q4 padding (K % 64 == 32), one block."""
    for m in (1, 2, 5):
        x, w, bias = torch.randn(m, k), _weight(n, k), torch.randn(n)
        got, want = _kernel_and_reference(ext, dtype, x, w, bias)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["int8", "q4"])
def test_kernel_matches_reference_lm_head(ext, dtype):
    got, want = _kernel_and_reference(ext, dtype, torch.randn(1, 896), _weight(151936, 896), None)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


@pytest.mark.slow
def test_portable_build_matches_reference():
    """The scalar build (non-AVX2 machines) computes the same numbers."""
    portable = load_quant_kernels(portable=True)
    if portable is None:
        pytest.skip("portable kernels could not be built here")
    assert portable.simd == "scalar"
    for dtype in ("int8", "q4"):
        for m in (1, 5):
            got, want = _kernel_and_reference(portable, dtype, torch.randn(m, 640), _weight(1024, 640), None)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize(
    ("pack", "unpack", "bound"), [("int8", dequantize_int8, 0.01), ("q4", dequantize_q4, 0.12)]
)
def test_dequantize_error_is_small(pack, unpack, bound):
    w = _weight(512, 896)
    w[3, 100] = 0.5  # an outlier only hurts its own block
    if pack == "int8":
        err = _rel(unpack(*pack_int8(w)), w)
    else:
        err = _rel(unpack(*pack_q4(w), 896), w)
    assert err < bound


def _fit_error(wb, d, m):
    d, m = d.float()[..., None], m.float()[..., None]
    codes = torch.where(d > 0, ((wb - m) / d).round().clamp(0, 15), 0.0)
    return (codes * d + m - wb).square().sum(-1)  # (n, nb)


def test_q4_fit_beats_min_max_and_kernel_matches_reference(ext):
    torch.manual_seed(0)  # unseeded, one draw in many broke a bound (seen in a batch run)
    wb = torch.distributions.StudentT(3.0).sample((256, 28, 32)) * 0.02  # heavy-tailed, like real rows
    wb[0, 0] = 0.0  # a constant block
    wb[0, 1] = torch.linspace(-1, 1, 32)  # a block min/max already fits exactly
    d, m = fit_q4_blocks(wb)
    lo, hi = wb.amin(-1), wb.amax(-1)
    minmax = _fit_error(wb, ((hi - lo) / 15).half(), lo.half())
    err = _fit_error(wb, d, m)
    assert (err <= minmax * (1 + 1e-6) + 1e-12).all()  # never worse than min/max, block by block
    assert err.sum() < 0.85 * minmax.sum()  # and clearly better overall
    kd, km = ext.q4_fit_blocks(wb.reshape(-1, 32), list(R_STEPS), torch.empty(0))
    kernel_err = _fit_error(wb, kd.view(d.shape), km.view(m.shape))
    torch.testing.assert_close(kernel_err.sum(), err.sum(), rtol=1e-3, atol=0)  # ties may break differently
    assert _fit_error(wb[:1, :1], d[:1, :1], m[:1, :1]).item() == 0.0


def test_q4_importance_weights_the_fit(ext):
    torch.manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((64, 96)) * 0.02
    importance = torch.rand(96) ** 4  # a few columns matter, most barely do
    weighted_err = lambda wq: ((wq - w).square() * importance).sum()  # noqa: E731
    plain = dequantize_q4(*pack_q4(w), 96)
    fitted = dequantize_q4(*pack_q4(w, importance), 96)
    assert weighted_err(fitted) < 0.9 * weighted_err(plain)
    imp = F.pad(importance, (0, 32)).view(-1, 32)  # 96 inputs pad to 128: 4 blocks
    wb = F.pad(w, (0, 32)).view(64, 4, 32)
    d, m = fit_q4_blocks(wb, imp)
    kd, km = ext.q4_fit_blocks(wb.reshape(-1, 32), list(R_STEPS), imp)
    torch.testing.assert_close(
        _fit_error(wb, kd.view(d.shape), km.view(m.shape)).sum(),
        _fit_error(wb, d, m).sum(),
        rtol=1e-3,
        atol=0,
    )  # ties may break differently
    with pytest.raises(ValueError, match="one weight per input column"):
        pack_q4(w, torch.ones(95))


def test_q4_padding_roundtrip():
    w = _weight(8, 96)  # 96 inputs pack to 128
    qweight, scales, mins = pack_q4(w)
    assert qweight.shape == (2, 2, 4, 32) and scales.shape == (8, 4)
    assert dequantize_q4(qweight, scales, mins, 96).shape == (8, 96)


@pytest.mark.parametrize("cls", [Int8Linear, Q4Linear])
@pytest.mark.parametrize("m", [1, 3, PREFILL_MIN_ROWS + 5])
def test_linear_module_matches_float(cls, m):
    """Decode sizes take the integer kernel, prefill sizes the dequantize + sgemm tiles."""
    lin = nn.Linear(896, 128)
    q = cls.from_linear(lin)
    x = torch.randn(2, m, 896)
    y = q(x)
    assert y.shape == (2, m, 128) and y.dtype == torch.float32
    want = F.linear(x, q.dequantize(), q.bias)  # same weights; only activation rounding differs
    assert _rel(y, want) < 0.02
    assert _rel(y, lin(x).detach()) < (0.03 if cls is Int8Linear else 0.15)


@pytest.mark.parametrize("cls", [Int8Linear, Q4Linear])
def test_without_compiler_modules_use_the_reference(ext, cls, monkeypatch):
    """A machine that cannot build the kernel gets the same numbers from PyTorch."""
    q = cls.from_linear(nn.Linear(640, 1024))
    x = torch.randn(2, 3, 640)
    want = q(x)
    monkeypatch.setattr("lmstack.quant.load_quant_kernels", lambda: None)
    torch.testing.assert_close(q(x), want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
    emb = (Int8Embedding if cls is Int8Linear else Q4Embedding).from_embedding(nn.Embedding(50, 64))
    torch.testing.assert_close(emb(torch.tensor([3, 49])), emb.dequantize()[[3, 49]])


@pytest.mark.parametrize("cls", [Int8Linear, Q4Linear])
def test_linear_module_bfloat16(cls):
    q = cls.from_linear(nn.Linear(640, 1024, bias=False))
    x = torch.randn(3, 640)
    y = q(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert _rel(y.float(), q(x)) < 0.02


@pytest.mark.parametrize("cls", [Int8Embedding, Q4Embedding])
def test_embedding_module(cls):
    emb = nn.Embedding(300, 640)
    q = cls.from_embedding(emb)
    ids = torch.tensor([[0, 5, 299], [7, 7, 1]])
    rows = q(ids)
    assert rows.shape == (2, 3, 640)
    torch.testing.assert_close(rows, q.dequantize()[ids])
    assert _rel(rows, emb(ids).detach()) < (0.01 if cls is Int8Embedding else 0.12)


@pytest.mark.parametrize("dtype", ["int8", "q4"])
def test_dequantize_rows_matches_full(ext, dtype):
    w, rows = _weight(13, 128), torch.tensor([12, 0, 5, 5])
    if dtype == "int8":
        packed = pack_int8(w)
        full, torch_rows = dequantize_int8(*packed), dequantize_int8(*packed, rows)
        kernel_rows = ext.q8_dequant_rows(*packed, rows)
    else:
        packed = pack_q4(w)
        full, torch_rows = dequantize_q4(*packed, 128), dequantize_q4(*packed, 128, rows)
        kernel_rows = ext.q4_dequant_rows(*packed, rows, 128)
    torch.testing.assert_close(torch_rows, full[rows], rtol=0, atol=0)
    torch.testing.assert_close(kernel_rows, full[rows], rtol=0, atol=0)


def test_embedding_keeps_weight_dtype():
    q = Int8Embedding.from_embedding(nn.Embedding(10, 64).bfloat16())
    assert q(torch.tensor([1, 2])).dtype == torch.bfloat16


class _TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 64)
        self.mlp = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
        self.odd = nn.Linear(40, 64)  # 40 inputs: not a whole number of blocks, stays float
        self.lm_head = nn.Linear(64, 100, bias=False)
        self.lm_head.weight = self.embed.weight  # tied

    def forward(self, ids: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        return self.lm_head(h + self.mlp(h) + self.odd(extra))


@pytest.mark.parametrize("dtype", ["int8", "q4"])
def test_quantize_model_swaps_and_shares_tied_weights(dtype):
    torch.manual_seed(0)
    model = _TinyLM()
    ids, extra = torch.randint(0, 100, (2, 5)), torch.randn(2, 5, 40)
    with torch.no_grad():
        want = model(ids, extra)
    assert quantize_model(model, dtype) is model

    linear, embedding = (Int8Linear, Int8Embedding) if dtype == "int8" else (Q4Linear, Q4Embedding)
    assert isinstance(model.embed, embedding) and isinstance(model.lm_head, linear)
    assert all(isinstance(model.mlp[i], linear) for i in (0, 2))
    assert type(model.odd) is nn.Linear
    assert model.lm_head.qweight is model.embed.qweight and model.lm_head.scales is model.embed.scales
    # the tied buffer is stored once
    storages = {b.untyped_storage().data_ptr() for b in model.buffers()}
    assert len(storages) == len(list(model.buffers()))
    with torch.no_grad():
        got = model(ids, extra)
    assert _rel(got, want) < (0.03 if dtype == "int8" else 0.2)


def test_quantized_model_survives_dtype_cast():
    """model.to(bfloat16) after quantizing converts floating buffers; packed scales must not round."""
    torch.manual_seed(0)
    model = quantize_model(_TinyLM(), "q4")
    scales = model.lm_head.scales.clone()
    ids, extra = torch.randint(0, 100, (1, 3)), torch.randn(1, 3, 40)
    with torch.no_grad():
        want = model(ids, extra)
        model.to(torch.bfloat16)
        got = model(ids, extra.bfloat16())
    assert torch.equal(model.lm_head.scales, scales)
    assert model.embed(ids).dtype == torch.bfloat16 and got.dtype == torch.bfloat16
    assert _rel(got.float(), want) < 0.05


@pytest.mark.parametrize("dtype", ["int8", "q4"])
def test_off_cpu_path_never_calls_the_cpu_kernel(dtype):
    """Stand-in for CUDA (none here): on the meta device the kernel would raise, torch ops don't."""
    model = quantize_model(_TinyLM(), dtype).to("meta")
    out = model(torch.zeros(2, 5, dtype=torch.long, device="meta"), torch.zeros(2, 5, 40, device="meta"))
    assert out.shape == (2, 5, 100) and out.device.type == "meta"


def test_quantize_model_skip():
    model = _TinyLM()
    quantize_model(model, "int8", skip=lambda name: name == "mlp.2")
    assert isinstance(model.mlp[0], Int8Linear) and type(model.mlp[2]) is nn.Linear


def test_wrong_in_features_names_shapes():
    q = Int8Linear.from_linear(nn.Linear(64, 32))
    with pytest.raises(ValueError, match=r"\(\.\.\., 64\).*\(3, 96\)"):
        q(torch.randn(3, 96))


def test_unknown_dtype_lists_valid_ones():
    with pytest.raises(ValueError, match="'int8', 'q4'"):
        quantize_model(nn.Sequential(nn.Linear(32, 32)), "int4")  # type: ignore[arg-type]


def test_from_linear_rejects_partial_blocks():
    with pytest.raises(ValueError, match="multiple of 32"):
        Q4Linear.from_linear(nn.Linear(40, 8))
