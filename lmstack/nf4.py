"""NF4, the frozen 4-bit base weight of QLoRA (Dettmers et al. 2023), as a module swap.

A weight is flattened and cut into blocks of 64; each block is divided by its absolute maximum and every
value becomes the index of the nearest of 16 NormalFloat levels (quantiles of N(0, 1) scaled to [-1, 1],
with an exact zero). Two indices share a byte, the first in the high nibble (as bitsandbytes packs them).

Double quantization: the fp32 absmax of each 64-block would cost 0.5 bits per weight, so as bitsandbytes does,
their mean is subtracted (one fp32 `offset` per tensor) and the centred scales are quantized again, blockwise
in blocks of 256, to bitsandbytes' signed 8-bit dynamic map with one fp32 absmax per 256 scales. The stored
weight then costs 4 + 8/64 + 32/(64*256) bits: about 0.516 bytes per parameter.

The weights stay frozen: forward dequantizes to the compute dtype and multiplies (QLoRA trains only the LoRA
matrices on top, see lmstack.lora). Backward dequantizes again rather than keeping the float weight
alive between forward and backward, so training holds the 4-bit weight only.

Letters: N output features, K input features, n = N*K weights, nb blocks of 64, ns blocks of 256 scales.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack.quant import quantize_model, quantize_module

BLOCK = 64  # weights per absmax scale
SCALE_BLOCK = 256  # absmax scales per second-level fp32 scale

# The 16 NF4 levels exactly as bitsandbytes (functional.get_4bit_type("nf4")) and the QLoRA paper give them.
NF4_CODE = torch.tensor(
    [
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
    ],
    dtype=torch.float32,
)


def dynamic_code() -> Tensor:
    """bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map(signed=True)`): 0, 1, and for each decade
    10^-6 .. 10^0 the midpoints of 2^i equal steps over [0.1, 1] scaled by the decade, with both signs.
    Dense near zero, so the small centred scales of double quantization keep their relative precision."""
    values = [torch.tensor([0.0, 1.0])]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1)
        means = (edges[:-1] + edges[1:]) / 2.0  # (2^i,) float32, like bitsandbytes
        values += [(10 ** (i - 6)) * means, -(10 ** (i - 6)) * means]
    return torch.cat(values).sort().values  # (256,)


SCALE_CODE = dynamic_code()


# ------------------------------------------------------------ blockwise codes ----


def quantize_blockwise(x: Tensor, code: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Flat x (n,) -> (indices of the nearest `code` value to x / absmax, uint8 (n_pad,), absmax (nb,)).

    `code` is sorted ascending in [-1, 1]; x is zero-padded to whole blocks (zeros never change an absmax).
    """
    nb = -(-x.numel() // block)
    blocks = F.pad(x.float(), (0, nb * block - x.numel())).view(nb, block)  # (nb, block)
    absmax = blocks.abs().amax(dim=1)  # (nb,)
    scaled = blocks / torch.where(absmax > 0, absmax, 1.0)[:, None]  # in [-1, 1]
    midpoints = (code[1:] + code[:-1]) / 2  # nearest level == bucket between midpoints
    idx = torch.bucketize(scaled, midpoints.to(x.device))  # (nb, block)
    return idx.to(torch.uint8).view(-1), absmax


def dequantize_blockwise(idx: Tensor, absmax: Tensor, code: Tensor, block: int) -> Tensor:
    """Inverse of `quantize_blockwise`: float32 (n_pad,)."""
    values = code.to(absmax.device)[idx.long()].view(-1, block)  # (nb, block)
    return (values * absmax.float()[:, None]).view(-1)


def pack_nibbles(idx: Tensor) -> Tensor:
    """uint8 codes (n_pad,) in [0, 16) -> bytes (n_pad/2,), the first of each pair in the high nibble."""
    pairs = idx.view(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


# ------------------------------------------------------------------- NF4 -----


def pack_nf4(weight: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """weight (N, K) -> qweight uint8 (n_pad/2,), qabsmax uint8 (nb,), absmax_scale fp32 (ns,), offset ()."""
    idx, absmax = quantize_blockwise(weight.detach().reshape(-1), NF4_CODE, BLOCK)  # (n_pad,), (nb,)
    offset = absmax.mean()
    qabsmax, absmax_scale = quantize_blockwise(absmax - offset, SCALE_CODE, SCALE_BLOCK)
    return pack_nibbles(idx), qabsmax[: absmax.numel()], absmax_scale, offset


def unpack_nf4(
    qweight: Tensor, qabsmax: Tensor, absmax_scale: Tensor, offset: Tensor, shape: tuple[int, int]
) -> Tensor:
    """The float32 weight (N, K) that `pack_nf4` stores."""
    nb = qabsmax.numel()
    padded = F.pad(qabsmax, (0, absmax_scale.numel() * SCALE_BLOCK - nb))  # whole blocks of 256
    absmax = dequantize_blockwise(padded, absmax_scale, SCALE_CODE, SCALE_BLOCK)[:nb] + offset.float()
    # each byte is a pair of levels: one lookup in the (256, 2) table of pairs with int32 indices decodes it
    # (unpacking nibbles to int64 indices first made 3x the temporaries of the float weight itself)
    pairs = F.embedding(qweight.int(), _NF4_PAIRS.to(qweight.device))  # (n_pad/2, 2)
    w = pairs.view(nb, BLOCK).mul_(absmax[:, None]).view(-1)  # (n_pad,)
    return w[: shape[0] * shape[1]].view(shape)


# byte -> (level of its high nibble, level of its low nibble), the decoding table of `unpack_nf4`
_NF4_PAIRS = torch.stack([NF4_CODE.repeat_interleave(16), NF4_CODE.repeat(16)], dim=1)  # (256, 2)


class _DequantLinear(torch.autograd.Function):
    """y = x W^T + b with W dequantized in forward and again in backward, so nothing float is saved."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: NF4Linear) -> Tensor:  # type: ignore[override]
        ctx.layer = layer
        return F.linear(x, layer.dequantize().to(x.dtype), layer.bias_as(x.dtype))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        w = ctx.layer.dequantize().to(grad.dtype)  # (N, K)
        return grad @ w, None  # the weight is frozen: no gradient for it


class NF4Linear(nn.Module):
    """A frozen nn.Linear stored in NF4 with double-quantized scales; forward in `compute_dtype`."""

    qweight: Tensor
    qabsmax: Tensor
    absmax_scale: Tensor
    offset: Tensor
    bias: Tensor | None

    def __init__(
        self,
        packed: tuple[Tensor, Tensor, Tensor, Tensor],
        in_features: int,
        out_features: int,
        bias: Tensor | None = None,
        compute_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        for name, t in zip(("qweight", "qabsmax", "absmax_scale", "offset"), packed, strict=True):
            self.register_buffer(name, t)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype = torch.float32) -> NF4Linear:
        bias = None if linear.bias is None else linear.bias.detach().to(compute_dtype).clone()
        packed = pack_nf4(linear.weight)
        return cls(packed, linear.in_features, linear.out_features, bias, compute_dtype)

    def dequantize(self) -> Tensor:
        """The float32 weight (N, K) this module multiplies by (in `compute_dtype` for the matmul)."""
        packed = (self.qweight, self.qabsmax, self.absmax_scale, self.offset)
        return unpack_nf4(*packed, (self.out_features, self.in_features))

    def bias_as(self, dtype: torch.dtype) -> Tensor | None:
        return None if self.bias is None else self.bias.to(dtype)

    def forward(self, x: Tensor) -> Tensor:  # (..., K) -> (..., N)
        y = _DequantLinear.apply(x.to(self.compute_dtype), self)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )


def stored_bytes(module: nn.Module) -> int:
    """Bytes of the buffers and parameters a module holds (what a checkpoint of it would store)."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _keep_head(name: str) -> bool:
    return name == "output"


def nf4_swap(
    skip: Callable[[str], bool] | None = _keep_head,
    compute_dtype: torch.dtype = torch.float32,
    tables_int8: bool = False,
) -> Callable[[str, nn.Linear | nn.Embedding], nn.Module | None]:
    """The `linear_swap` for loading straight into NF4 (`LLM.load(..., dtype="nf4")`): the same choice of
    layers as `quantize_model_nf4`, made one layer at a time while the checkpoint is read. `tables_int8`:
    the untied embedding table and the head become int8 rows as they load too (`quantize_tables_int8`,
    one table at a time: qwen's QLoRA load peaked at 2.0 GB with both float tables resident, 1.5 GB so)."""

    def swap(name: str, module: nn.Linear | nn.Embedding) -> nn.Module | None:
        if tables_int8 and name in _TABLES:
            return quantize_module(module, "int8")
        if not isinstance(module, nn.Linear) or (skip is not None and skip(name)):
            return None
        return NF4Linear.from_linear(module, compute_dtype)

    return swap


_TABLES = ("tok_embeddings", "output")  # the frozen tables QLoRA keeps as int8 rows


def quantize_model_nf4(
    model: nn.Module,
    skip: Callable[[str], bool] | None = _keep_head,
    compute_dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Swap every nn.Linear under `model` for an NF4Linear in place and return `model`.

    By default the LM head (`output`) stays float, as transformers keeps `lm_head` when loading in 4 bits:
    it is one matrix but the most sensitive one, and tied to the embeddings in many models. Call this
    before `apply_lora`; LoRA's own lora_A / lora_B are never quantized.
    """
    swapped: dict[int, nn.Module] = {}  # id(old) -> new, so a module reachable by two names stays one
    for name, module in list(model.named_modules(remove_duplicate=False)):
        leaf = name.rpartition(".")[2]
        if not name or leaf in ("lora_A", "lora_B") or (skip is not None and skip(name)):
            continue
        if id(module) not in swapped:
            if not isinstance(module, nn.Linear):
                continue
            swapped[id(module)] = NF4Linear.from_linear(module, compute_dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, swapped[id(module)])
    return model


def quantize_tables_int8(model: nn.Module) -> nn.Module:
    """Store the frozen embedding table and LM head of a QLoRA base as Q8_0 int8 rows (lmstack.quant: int8
    codes with an fp16 scale per 32 values, 8.5 bits), in place; returns `model`.

    With every linear layer in NF4 these two tables are most of what is left: qwen2.5-0.5b's untied
    152k x 896 embedding and head are 1,039 MiB of float32 beside 180 MiB of NF4 layers. Int8 rows keep
    them at a quarter (a GGUF's Q8_0 head comes back bit for bit; transformers keeps them in 16 bits).
    Lookups dequantize only the rows they gather; the training loss reads the head a slice of rows at a
    time (lmstack.train.losses); neither table trains. `quantize_model` packs a tied head once and keeps
    tables whose width is not a multiple of 32 float."""
    return quantize_model(model, "int8", skip=lambda name: name not in _TABLES)
