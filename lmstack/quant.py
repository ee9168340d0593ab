"""Weight-only quantization for CPU decode, applied as module swaps.

Decode runs one GEMV per weight matrix per token, so its speed is the number of weight
bytes streamed from memory. `quantize_model` swaps every `nn.Linear` / `nn.Embedding` for
a module holding packed weights:

- ``int8``: Q8_0-style, int8 weights with one fp16 scale per block of 32 inputs (8.5 bits
  per weight). Per-block rather than per-channel scales because real weight rows have
  outliers: on heavy-tailed (Student-t, 3 dof) weights per-channel int8 has 2.6 % relative
  error, per-block 0.8 %, for 6 % more bytes.
- ``q4``: Q4_1-style, 4-bit codes q in [0, 15] with an fp16 scale and fp16 min per block
  (w = scale * q + min, 5 bits per weight). The min costs 11 % more bytes than symmetric
  Q4_0 but cuts the error from 8.6 % to 7.8 % on Gaussian and 12.8 % to 10.1 % on
  heavy-tailed weights, and unsigned codes need no sign trick in the integer dot product.

Both formats multiply by quantizing activations to int8 per block of 32 (as llama.cpp's
Q8_0) and taking integer dot products per block in the C++ kernel
(`lmstack.kernels.load_quant_kernels`). The PyTorch reference here does exactly the same
math and is the fallback when the kernel cannot be built; off-CPU tensors never touch the
kernel and use dequantize + `F.linear`. At prefill sizes (more than `PREFILL_MIN_ROWS`
rows) dequantizing a tile of rows and calling sgemm beats integer dot products.

Letters: M activation rows, N output features, K input features, Kp K padded to the
packing width, nb blocks of 32 per row.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack.kernels import load_quant_kernels

QuantDType = Literal["int8", "q4"]
BLOCK = 32  # inputs per quantization block, for weights and activations alike
# From this many rows up, dequantize tiles + sgemm. Measured on 2 Zen 3 cores: integer dots
# beat MKL sgemm on 896x4864 up to ~128 rows for q4 (int8 further), so only long prompts switch.
PREFILL_MIN_ROWS = 128
_TILE_ELEMS = 1 << 20  # dequantized weights per prefill tile (4 MiB float32, stays in cache)
_PACK_ELEMS = 1 << 22  # weights packed per chunk: bounds the float temporaries (16 MiB each)


# ---------------------------------------------------------------- packing ----
#
# Packed codes are (ceil(N/G), chunks, G, 32): G = ROW_GROUP consecutive rows are interleaved
# 32 bytes at a time, so the kernel's 4-row tile reads one contiguous stream (rows are only
# 448-896 bytes long, too short for the hardware prefetcher to follow 4 of them; ~1.5x on
# 896-wide layers). Scales (and q4 mins) stay row-major (N, nb), fp16 bits in int16 tensors.

ROW_GROUP = 4


def _f32(f16_bits: Tensor) -> Tensor:
    """Scales are int16 tensors holding fp16 bits, so `model.to(torch.bfloat16)`, which
    converts every floating buffer, cannot round them; this reads them as float32."""
    return f16_bits.view(torch.float16).float()


def _row_chunks(n_rows: int, row_len: int, budget: int) -> list[slice]:
    step = max(1, budget // max(row_len, 1))
    return [slice(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]


def _interleave_rows(codes: Tensor) -> Tensor:
    """(N, chunks, 32) -> (ceil(N/G), chunks, G, 32), zero padding rows."""
    n, chunks, _ = codes.shape
    if n % ROW_GROUP:  # (F.pad copies even when it adds nothing)
        codes = F.pad(codes, (0, 0, 0, 0, 0, -n % ROW_GROUP))
    return codes.view(-1, ROW_GROUP, chunks, BLOCK).transpose(1, 2).contiguous()


def _deinterleave_rows(qweight: Tensor, n_rows: int) -> Tensor:
    """(Ng, chunks, G, 32) -> (N, chunks, 32)."""
    return qweight.transpose(1, 2).reshape(-1, qweight.shape[1], BLOCK)[:n_rows]


def pack_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(N, K) float -> qweight int8 (ceil(N/G), K/32, G, 32) in [-127, 127], scales (N, K/32)."""
    n, k = weight.shape
    # the padding rows of the interleaved layout from the start: one copy of the codes fewer than padding
    # afterwards (136 MiB for qwen's embedding table)
    codes = torch.zeros(n + -n % ROW_GROUP, k // BLOCK, BLOCK, dtype=torch.int8, device=weight.device)
    scales = torch.empty(n, k // BLOCK, dtype=torch.int16, device=weight.device)
    for rows in _row_chunks(n, k, _PACK_ELEMS):
        wb = weight[rows].float().view(-1, k // BLOCK, BLOCK)  # (n, nb, 32)
        d = (wb.abs().amax(-1) / 127).half()  # (n, nb); codes use the rounded scale
        inv = torch.where(d > 0, 1.0 / d.float(), 0.0)
        q = wb.mul(inv[..., None]).round_().clamp_(-127, 127)  # in place: packing is memory bound
        codes[rows], scales[rows] = q.to(torch.int8), d.view(torch.int16)
    return _interleave_rows(codes), scales


def pack_q4(weight: Tensor, importance: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(N, K) float -> qweight uint8 (ceil(N/G), Kp/64, G, 32), scales, mins (N, Kp/32).

    Kp is K rounded up to 64 (padding weights are 0). Byte j of a row's chunk p holds
    element 64p + j in its low nibble and 64p + 32 + j in its high nibble, so the kernel
    gets two whole blocks from one 256-bit load with a mask and a shift. `importance` (K,)
    weights each input column's error when fitting scales (see `fit_q4_blocks`).
    """
    n, k = weight.shape
    kp = -(-k // (2 * BLOCK)) * 2 * BLOCK
    imp = None
    if importance is not None:
        if importance.shape != (k,):
            raise ValueError(
                f"importance must have one weight per input column ({k}), got {tuple(importance.shape)}"
            )
        imp = (
            F.pad(importance.detach().float().clamp_min(0), (0, kp - k)).view(kp // BLOCK, BLOCK).contiguous()
        )
    codes = torch.empty(n, kp // (2 * BLOCK), BLOCK, dtype=torch.uint8, device=weight.device)
    scales = torch.empty(n, kp // BLOCK, dtype=torch.int16, device=weight.device)
    mins = torch.empty_like(scales)
    for rows in _row_chunks(n, kp, _PACK_ELEMS // 4):
        wb = weight[rows].float()
        wb = (wb if kp == k else F.pad(wb, (0, kp - k))).view(-1, kp // BLOCK, BLOCK)  # (n, nb, 32)
        ext = load_quant_kernels() if wb.is_cpu else None
        if ext is not None:  # the same search in C++, ~20x faster
            fitted = ext.q4_fit_blocks(
                wb.reshape(-1, BLOCK), list(R_STEPS), imp if imp is not None else _NONE
            )
            d, m = (t.view(wb.shape[:2]) for t in fitted)
        else:
            d, m = fit_q4_blocks(wb, imp)  # (n, nb) fp16
        q = _q4_round(wb, d.float()[..., None], m.float()[..., None]).to(torch.uint8)
        q = q.view(q.shape[0], -1, 2, BLOCK)  # (n, nb/2, 2, 32)
        codes[rows] = q[:, :, 1].bitwise_left_shift(4).bitwise_or_(q[:, :, 0])
        scales[rows], mins[rows] = d.view(torch.int16), m.view(torch.int16)
    return _interleave_rows(codes), scales, mins


_NONE = torch.empty(0)
# Candidate grids per block for `fit_q4_blocks`: 15 + r levels across [min, max], r in R_STEPS.
R_STEPS = tuple(-1.0 + 0.25 * i for i in range(9))


def _q4_round(wb: Tensor, d: Tensor, m: Tensor) -> Tensor:
    """Codes round((w - m) / d) in [0, 15], as float; d = 0 blocks get code 0."""
    inv = torch.where(d > 0, 1.0 / d, 0.0)
    return (wb - m).mul_(inv).round_().clamp_(0, 15)


def fit_q4_blocks(wb: Tensor, importance: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Scale d and min m (fp16, (n, nb)) per block of wb (n, nb, 32) for w ~ d q + m, q in [0, 15].

    Min/max scaling spends the grid on the block's extremes; like llama.cpp's k-quants, this also tries
    grids slightly finer and coarser than that (`R_STEPS`), refits d and m to each candidate's codes by
    least squares, and keeps whichever reconstructs the block with the least squared error. On the
    Qwen2.5 0.5B weights that cuts the q4 error by ~25 % against min/max alone. `importance` (nb, 32),
    one weight per input column (e.g. the mean squared activation it multiplies), weights the error.
    """
    w = torch.ones_like(wb) if importance is None else importance.expand_as(wb)
    lo, hi = wb.amin(-1, keepdim=True), wb.amax(-1, keepdim=True)  # (n, nb, 1)
    span = (hi - lo).clamp_min(1e-20)
    best_d, best_m = ((hi - lo) / 15).half(), lo.half()
    rec = _q4_round(wb, best_d.float(), best_m.float()).mul_(best_d.float()).add_(best_m.float())
    best_err = rec.sub_(wb).square_().mul_(w).sum(-1, keepdim=True)
    sw, sx = w.sum(-1, keepdim=True), (w * wb).sum(-1, keepdim=True)
    for r in R_STEPS:
        q = (wb - lo).mul_((15 + r) / span).round_().clamp_(0, 15)
        wq = w * q
        sq, sqq, sqx = (
            wq.sum(-1, keepdim=True),
            (wq * q).sum(-1, keepdim=True),
            (wq * wb).sum(-1, keepdim=True),
        )
        det = sw * sqq - sq * sq  # > 0 unless every code is equal
        ok = det > 0
        d = torch.where(ok, (sw * sqx - sq * sx) / det.where(ok, 1.0), 0.0).half()
        m = torch.where(ok, (sqq * sx - sq * sqx) / det.where(ok, 1.0), lo).half()
        rec = _q4_round(wb, d.float(), m.float()).mul_(d.float()).add_(m.float())
        err = rec.sub_(wb).square_().mul_(w).sum(-1, keepdim=True)
        better = (err < best_err) & (d > 0)
        best_d, best_m, best_err = (
            best_d.where(~better, d),
            best_m.where(~better, m),
            err.where(better, best_err),
        )
    return best_d[..., 0], best_m[..., 0]


def _int8_codes(qweight: Tensor, n_rows: int) -> Tensor:
    """Packed int8 -> row-major codes (N, nb, 32)."""
    return _deinterleave_rows(qweight, n_rows)


def _q4_codes(qweight: Tensor, n_rows: int) -> Tensor:
    """Packed q4 -> row-major codes (N, Kp/32, 32) in [0, 15]."""
    pairs = _deinterleave_rows(qweight, n_rows)[:, :, None]  # (N, nb/2, 1, 32)
    return torch.cat([pairs & 0x0F, pairs >> 4], dim=2).view(n_rows, -1, BLOCK)


def _gather_rows(qweight: Tensor, rows: Tensor) -> Tensor:
    """Packed codes of the given rows, row-major (L, chunks, 32)."""
    group = qweight.shape[2]
    return qweight[rows // group, :, rows % group]


def dequantize_int8(qweight: Tensor, scales: Tensor, rows: Tensor | None = None) -> Tensor:
    """Packed int8 -> float32 (N, K), or only `rows` (L,) -> (L, K)."""
    if rows is None:
        codes = _int8_codes(qweight, scales.shape[0])
    else:
        codes, scales = _gather_rows(qweight, rows), scales[rows]
    return (codes.float() * _f32(scales)[..., None]).flatten(1)


def dequantize_q4(
    qweight: Tensor, scales: Tensor, mins: Tensor, in_features: int, rows: Tensor | None = None
) -> Tensor:
    """Packed q4 -> float32 (N, in_features), or only `rows`; padding columns dropped."""
    if rows is None:
        codes = _q4_codes(qweight, scales.shape[0])
    else:
        pairs = _gather_rows(qweight, rows)[:, :, None]  # (L, nb/2, 1, 32)
        codes = torch.cat([pairs & 0x0F, pairs >> 4], dim=2).view(len(rows), -1, BLOCK)
        scales, mins = scales[rows], mins[rows]
    w = codes.float() * _f32(scales)[..., None] + _f32(mins)[..., None]
    return w.flatten(1)[:, :in_features]


# -------------------------------------------------------------- reference ----


def quantize_activations(x: Tensor, padded_in: int) -> tuple[Tensor, Tensor, Tensor]:
    """(M, K) float32 -> xq int8 (M, Kp), dx (M, Kp/32), xs = dx * sum(xq) (M, Kp/32).

    Bit-exact with the kernel: codes are round-half-even(x * (127 / amax)).
    """
    m, k = x.shape
    xb = F.pad(x, (0, padded_in - k)).view(m, -1, BLOCK)  # (M, nb, 32)
    amax = xb.abs().amax(-1)  # (M, nb)
    # a tensor numerator: `127.0 / amax` would compute 127 * (1 / amax) and round differently
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, 0.0)
    q = torch.round(xb * inv[..., None])  # (M, nb, 32), integer-valued
    d = amax / 127
    return q.to(torch.int8).view(m, padded_in), d, d * q.sum(-1)


def int8_linear_reference(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    """The kernel's math in PyTorch: (M, K) float32 -> (M, N) float32.

    Per block, integer codes are multiplied in float32, which is exact (|sum| < 2**24),
    then scaled by dw * dx, the same product the kernel forms.
    """
    n, k = scales.shape[0], scales.shape[1] * BLOCK
    xq, dx, _ = quantize_activations(x, k)
    xb, wb = xq.view(-1, k // BLOCK, BLOCK), _int8_codes(qweight, n)
    d = _f32(scales)  # (N, nb)
    y = torch.zeros(x.shape[0], n, device=x.device)
    for b in range(k // BLOCK):
        dot = xb[:, b].float() @ wb[:, b].float().T  # (M, N) integers
        y += dot * (d[:, b] * dx[:, b, None])
    return y if bias is None else y + bias


def q4_linear_reference(
    x: Tensor, qweight: Tensor, scales: Tensor, mins: Tensor, bias: Tensor | None
) -> Tensor:
    """The kernel's math in PyTorch: (M, K) float32 -> (M, N) float32.

    sum_i (d q_i + m) x_i = d dx <q, xq> + m (dx sum(xq)); the second term uses xs.
    """
    n, kp = scales.shape[0], scales.shape[1] * BLOCK
    xq, dx, xs = quantize_activations(x, kp)
    xb, codes = xq.view(-1, kp // BLOCK, BLOCK), _q4_codes(qweight, n)
    d, mn = _f32(scales), _f32(mins)  # (N, nb)
    y = torch.zeros(x.shape[0], n, device=x.device)
    corr = xs @ mn.T  # (M, N)
    for b in range(kp // BLOCK):
        dot = xb[:, b].float() @ codes[:, b].float().T  # (M, N) integers
        y += dot * (d[:, b] * dx[:, b, None])
    y += corr
    return y if bias is None else y + bias


# ---------------------------------------------------------------- routing ----


def _check_features(x: Tensor, in_features: int, who: str) -> None:
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"{who} expects input (..., {in_features}), got shape {tuple(x.shape)}")


def _tiled_dequant_linear(x: Tensor, n_out: int, dequant_rows: Callable[[Tensor], Tensor]) -> Tensor:
    """(M, K) @ dequant(W).T, one cache-sized tile of rows at a time (prefill)."""
    step = max(64, _TILE_ELEMS // x.shape[1])
    tiles = []
    for n0 in range(0, n_out, step):
        rows = torch.arange(n0, min(n0 + step, n_out), device=x.device)
        tiles.append(F.linear(x, dequant_rows(rows)))  # (M, tile)
    return torch.cat(tiles, dim=1)


def _is_decode_size(x: Tensor, in_features: int) -> bool:
    """CPU input small enough for the integer kernel (prefill sizes go to sgemm), outside autograd: a frozen
    quantized layer that gradients flow through (QLoRA's int8 head) multiplies float activations."""
    return x.is_cpu and x.numel() < PREFILL_MIN_ROWS * in_features and not _needs_grad(x)


def _needs_grad(x: Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def _general_forward(
    x: Tensor,
    module: Int8Linear | Q4Linear,
    reference_matmul: Callable[[Tensor], Tensor],
    dequant_rows: Callable[[Tensor], Tensor],
) -> Tensor:
    """Every case but the kernel's decode fast path: off-CPU, prefill sizes, no kernel."""
    bias = module.bias
    if not x.is_cpu:  # never hand a CUDA tensor to the CPU kernel
        w = module.dequantize().to(x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))
    x2 = x.reshape(-1, module.in_features).float().contiguous()  # (M, K)
    if x2.shape[0] >= PREFILL_MIN_ROWS or _needs_grad(x):
        y = _tiled_dequant_linear(x2, module.out_features, dequant_rows)
        y = y if bias is None else y + bias
    else:
        y = reference_matmul(x2)  # (M, N)
    return y.view(*x.shape[:-1], module.out_features).to(x.dtype)


# ---------------------------------------------------------------- modules ----


def _linear_repr(m: Int8Linear | Q4Linear) -> str:
    return f"in_features={m.in_features}, out_features={m.out_features}, bias={m.bias is not None}"


def _float_bias(bias: Tensor | None) -> Tensor | None:
    return None if bias is None else bias.detach().float().clone()


def _concat_buffers(modules: list, names: tuple[str, ...]) -> tuple[list[Tensor], Tensor | None] | None:
    """Packed buffers of same-shaped quantized linears stacked along output channels (one module whose
    output is theirs side by side), or None if they cannot stack: different input widths, or an output
    count that does not fill whole row groups."""
    first = modules[0]
    if any(m.in_features != first.in_features or m.out_features % ROW_GROUP for m in modules):
        return None
    stacked = [torch.cat([getattr(m, name) for m in modules]) for name in names]
    if all(m.bias is None for m in modules):
        return stacked, None
    biases = [m.bias if m.bias is not None else torch.zeros(m.out_features) for m in modules]
    return stacked, torch.cat(biases)


class Int8Linear(nn.Module):
    """nn.Linear with Q8_0-packed weights; forward returns x.dtype."""

    qweight: Tensor
    scales: Tensor
    bias: Tensor | None

    def __init__(self, qweight: Tensor, scales: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = scales.shape[0], scales.shape[1] * BLOCK
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        _check_block_multiple(linear.in_features, "Int8Linear")
        return cls(*pack_int8(linear.weight.detach()), _float_bias(linear.bias))

    @classmethod
    def concat(cls, modules: list[Int8Linear]) -> Int8Linear | None:
        """One module whose output is the modules' outputs side by side (fused q/k/v, gate/up)."""
        bufs = _concat_buffers(modules, ("qweight", "scales"))
        if bufs is None:
            return None
        (qweight, scales), bias = bufs
        return cls(qweight, scales, bias)

    def forward(self, x: Tensor) -> Tensor:
        _check_features(x, self.in_features, "Int8Linear")
        ext = load_quant_kernels()
        if ext is not None and _is_decode_size(x, self.in_features):  # the hot path: one C++ call
            return ext.q8_linear(x, self.qweight, self.scales, self.bias)
        return _general_forward(x, self, self._reference_matmul, self._dequant_rows)

    def _reference_matmul(self, x: Tensor) -> Tensor:
        return int8_linear_reference(x, self.qweight, self.scales, self.bias)

    def _dequant_rows(self, rows: Tensor) -> Tensor:
        ext = load_quant_kernels()
        if ext is None:
            return dequantize_int8(self.qweight, self.scales, rows)
        return ext.q8_dequant_rows(self.qweight, self.scales, rows)

    def dequantize(self) -> Tensor:
        """float32 (out, in) weight: for tests, export, and the off-CPU path."""
        return dequantize_int8(self.qweight, self.scales)

    def dequantize_rows(self, start: int, stop: int) -> Tensor:
        """float32 rows [start, stop) of the weight, (stop - start, in): a head read a slice at a time."""
        return self._dequant_rows(torch.arange(start, stop, device=self.scales.device))

    def extra_repr(self) -> str:
        return _linear_repr(self)


class Q4Linear(nn.Module):
    """nn.Linear with Q4_1-packed weights; forward returns x.dtype."""

    qweight: Tensor
    scales: Tensor
    mins: Tensor
    bias: Tensor | None

    def __init__(
        self, qweight: Tensor, scales: Tensor, mins: Tensor, in_features: int, bias: Tensor | None = None
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = scales.shape[0], in_features
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("mins", mins)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Q4Linear:
        _check_block_multiple(linear.in_features, "Q4Linear")
        packed = pack_q4(linear.weight.detach())
        return cls(*packed, in_features=linear.in_features, bias=_float_bias(linear.bias))

    @classmethod
    def concat(cls, modules: list[Q4Linear]) -> Q4Linear | None:
        """One module whose output is the modules' outputs side by side (fused q/k/v, gate/up)."""
        bufs = _concat_buffers(modules, ("qweight", "scales", "mins"))
        if bufs is None:
            return None
        (qweight, scales, mins), bias = bufs
        return cls(qweight, scales, mins, in_features=modules[0].in_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        _check_features(x, self.in_features, "Q4Linear")
        ext = load_quant_kernels()
        if ext is not None and _is_decode_size(x, self.in_features):  # the hot path: one C++ call
            return ext.q4_linear(x, self.qweight, self.scales, self.mins, self.bias)
        return _general_forward(x, self, self._reference_matmul, self._dequant_rows)

    def _reference_matmul(self, x: Tensor) -> Tensor:
        return q4_linear_reference(x, self.qweight, self.scales, self.mins, self.bias)

    def _dequant_rows(self, rows: Tensor) -> Tensor:
        ext = load_quant_kernels()
        if ext is None:
            return dequantize_q4(self.qweight, self.scales, self.mins, self.in_features, rows)
        return ext.q4_dequant_rows(self.qweight, self.scales, self.mins, rows, self.in_features)

    def dequantize(self) -> Tensor:
        """float32 (out, in) weight: for tests, export, and the off-CPU path."""
        return dequantize_q4(self.qweight, self.scales, self.mins, self.in_features)

    def extra_repr(self) -> str:
        return _linear_repr(self)


class Int8Embedding(nn.Module):
    """nn.Embedding with Q8_0-packed rows; lookups dequantize only the gathered rows."""

    qweight: Tensor
    scales: Tensor
    row_dtype: Tensor

    def __init__(self, qweight: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = scales.shape[0], scales.shape[1] * BLOCK
        # Rows come back in this empty buffer's dtype: it starts as the original weight's and
        # follows model.to(dtype) like any floating buffer would.
        self.register_buffer("row_dtype", torch.empty(0, dtype=dtype), persistent=False)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> Int8Embedding:
        _check_block_multiple(embedding.embedding_dim, "Int8Embedding")
        return cls(*pack_int8(embedding.weight.detach()), dtype=embedding.weight.dtype)

    def forward(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1).long()
        ext = load_quant_kernels()
        if ids.device.type == "cpu" and ext is not None:
            rows = ext.q8_dequant_rows(self.qweight, self.scales, flat.contiguous())
        else:
            rows = dequantize_int8(self.qweight, self.scales, flat)
        return rows.view(*ids.shape, self.embedding_dim).to(self.row_dtype.dtype)

    def dequantize(self) -> Tensor:
        return dequantize_int8(self.qweight, self.scales)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class Q4Embedding(nn.Module):
    """nn.Embedding with Q4_1-packed rows; lookups dequantize only the gathered rows."""

    qweight: Tensor
    scales: Tensor
    mins: Tensor
    row_dtype: Tensor

    def __init__(
        self,
        qweight: Tensor,
        scales: Tensor,
        mins: Tensor,
        embedding_dim: int,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = scales.shape[0], embedding_dim
        self.register_buffer("row_dtype", torch.empty(0, dtype=dtype), persistent=False)  # see Int8Embedding
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("mins", mins)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> Q4Embedding:
        _check_block_multiple(embedding.embedding_dim, "Q4Embedding")
        packed = pack_q4(embedding.weight.detach())
        return cls(*packed, embedding_dim=embedding.embedding_dim, dtype=embedding.weight.dtype)

    def forward(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1).long()
        ext = load_quant_kernels()
        if ids.device.type == "cpu" and ext is not None:
            packed = (self.qweight, self.scales, self.mins)
            rows = ext.q4_dequant_rows(*packed, flat.contiguous(), self.embedding_dim)
        else:
            rows = dequantize_q4(self.qweight, self.scales, self.mins, self.embedding_dim, flat)
        return rows.view(*ids.shape, self.embedding_dim).to(self.row_dtype.dtype)

    def dequantize(self) -> Tensor:
        return dequantize_q4(self.qweight, self.scales, self.mins, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


# ------------------------------------------------------------------- swap ----


def _check_block_multiple(features: int, who: str) -> None:
    if features % BLOCK:
        raise ValueError(f"{who} needs a feature count that is a multiple of {BLOCK}, got {features}")


def _is_swappable(module: nn.Module) -> bool:
    """Linears/embeddings whose rows split into whole 32-blocks; others stay float.

    MultiheadAttention reads out_proj.weight directly, and max_norm embeddings rewrite
    their float weights in forward, so those stay float too.
    """
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return False
    if isinstance(module, nn.Linear):
        return module.in_features % BLOCK == 0
    if isinstance(module, nn.Embedding):
        return module.embedding_dim % BLOCK == 0 and module.max_norm is None
    return False


def quantize_module(module: nn.Linear | nn.Embedding, dtype: QuantDType) -> nn.Module | None:
    """One linear layer or embedding table quantized on its own (a loader's swap), or None where
    `quantize_model` would keep it float (width not a multiple of 32, ...)."""
    return _quantized(module, dtype, {}, set()) if _is_swappable(module) else None


def _quantized(
    module: nn.Linear | nn.Embedding, dtype: QuantDType, packed: dict[int, tuple], shared: set[int]
) -> nn.Module:
    """One swapped module; a weight in `shared` (ids of weights several modules hold: a tied head) packs
    once, memoized in `packed` with the weight itself, so that its id cannot be reused meanwhile."""
    weight = module.weight
    p = packed.get(id(weight)) if id(weight) in shared else None
    if p is None:
        p = pack_int8(weight.detach()) if dtype == "int8" else pack_q4(weight.detach())
        if id(weight) in shared:
            packed[id(weight)] = (*p, weight)
    if isinstance(module, nn.Embedding):
        if dtype == "int8":
            return Int8Embedding(p[0], p[1], dtype=weight.dtype)
        return Q4Embedding(p[0], p[1], p[2], embedding_dim=module.embedding_dim, dtype=weight.dtype)
    bias = _float_bias(module.bias)
    if dtype == "int8":
        return Int8Linear(p[0], p[1], bias=bias)
    return Q4Linear(p[0], p[1], p[2], in_features=module.in_features, bias=bias)


def quantize_model(
    model: nn.Module,
    dtype: QuantDType,
    skip: Callable[[str], bool] | None = None,
) -> nn.Module:
    """Swap every nn.Linear / nn.Embedding under `model` in place and return `model`.

    `skip(name)` keeps a module float (e.g. ``lambda n: n == "lm_head"``). Modules whose
    input width is not a multiple of 32 stay float rather than being padded: the padding
    would cost a copy of every activation and such layers are rare. A weight Parameter
    shared by several modules (tied embedding / LM head) is packed once and its buffers are
    shared, so tying does not double memory. The root module itself is never swapped.
    """
    valid = get_args(QuantDType)
    if dtype not in valid:
        raise ValueError(f"unknown quantization dtype {dtype!r}; valid: {', '.join(map(repr, valid))}")
    packed: dict[int, tuple] = {}
    swapped: dict[int, nn.Module] = {}  # id(old) -> new, so a module used twice stays one
    # names, not modules: a float table is freed as soon as its module is swapped (with qwen's two
    # 544 MiB tables, holding both until the end made the load peak 0.5 GB higher); a module or weight
    # reachable twice stays alive until its last name is swapped, so the ids below stay unambiguous
    names = [name for name, _ in model.named_modules(remove_duplicate=False)]
    holders = Counter(id(m.weight) for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding)))
    shared = {w for w, n in holders.items() if n > 1}
    for name in names:
        if not name or (skip is not None and skip(name)):
            continue
        module = model.get_submodule(name)
        if id(module) not in swapped:
            if not isinstance(module, (nn.Linear, nn.Embedding)) or not _is_swappable(module):
                continue
            swapped[id(module)] = _quantized(module, dtype, packed, shared)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, swapped[id(module)])
        del module
    return model
