"""Decode-matmul micro-benchmark: one token's worth of Qwen2.5-0.5B matmuls per backend.

A "token" is 24 layers of q, k, v, o, gate, up, down plus the LM head (896 -> 151936),
each layer with its own weights so nothing stays in cache, as in real decode. Printed
tok/s are upper bounds for whole-model decode (attention, norms and sampling excluded).

    python bench/kernels.py --threads 2 --iters 10 [--rows 1] [--skip-float]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack.quant import Int8Linear, Q4Linear

HIDDEN, FFN, KV, VOCAB, LAYERS = 896, 4864, 128, 151936, 24
# (name, in, out, bias)
LAYER_SHAPES = [
    ("q", HIDDEN, HIDDEN, True),
    ("k", HIDDEN, KV, True),
    ("v", HIDDEN, KV, True),
    ("o", HIDDEN, HIDDEN, False),
    ("gate", HIDDEN, FFN, False),
    ("up", HIDDEN, FFN, False),
    ("down", FFN, HIDDEN, False),
]


def token_shapes() -> list[tuple[int, int, bool]]:
    shapes = [(k, n, b) for _ in range(LAYERS) for _, k, n, b in LAYER_SHAPES]
    return shapes + [(HIDDEN, VOCAB, False)]


def float_matmuls(linears: list[nn.Linear]) -> list[Callable[[Tensor], Tensor]]:
    return [lambda x, lin=lin: F.linear(x, lin.weight, lin.bias) for lin in linears]


def int8pack_matmuls(linears: list[nn.Linear]) -> list[Callable[[Tensor], Tensor]]:
    """torch._weight_int8pack_mm: per-channel int8 weights, float activations."""
    out = []
    for lin in linears:
        w = lin.weight.detach()
        s = w.abs().amax(1).clamp_min(1e-8) / 127  # (N,)
        q = torch.round(w / s[:, None]).to(torch.int8)
        b = lin.bias

        def mm(x: Tensor, q: Tensor = q, s: Tensor = s, b: Tensor | None = b) -> Tensor:
            y = torch._weight_int8pack_mm(x, q, s)
            return y if b is None else y + b

        out.append(mm)
    return out


def module_matmuls(linears: list[nn.Linear], cls: type[Int8Linear] | type[Q4Linear]) -> list[nn.Module]:
    return [cls.from_linear(lin) for lin in linears]


def time_token(matmuls: list[Callable[[Tensor], Tensor]], rows: int, iters: int) -> float:
    """Median seconds for one pass over all matmuls with (rows, in) float32 inputs."""
    inputs = {k: torch.randn(rows, k) for k in (HIDDEN, FFN)}
    shapes = token_shapes()

    def one_token() -> None:
        for mm, (k, _, _) in zip(matmuls, shapes, strict=True):
            mm(inputs[k])

    one_token()  # warm-up: page in weights, build kernels
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        one_token()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--rows", type=int, default=1, help="activation rows per matmul (1 = decode)")
    p.add_argument("--skip-float", action="store_true", help="skip float32 and int8pack (saves 2.5 GB)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    with torch.no_grad():
        linears = [nn.Linear(k, n, bias=b) for k, n, b in token_shapes()]
        for lin in linears:
            nn.init.normal_(lin.weight, std=0.02)
        backends: dict[str, Callable[[], list]] = {
            "ours int8": lambda: module_matmuls(linears, Int8Linear),
            "ours q4": lambda: module_matmuls(linears, Q4Linear),
        }
        if not args.skip_float:
            backends = {
                "float32 F.linear": lambda: float_matmuls(linears),
                "torch int8pack_mm": lambda: int8pack_matmuls(linears),
                **backends,
            }
        results = {}
        for name, build in backends.items():
            matmuls = build()
            results[name] = time_token(matmuls, args.rows, args.iters)
            del matmuls

    base = results.get("float32 F.linear")
    print(f"threads={args.threads} rows={args.rows} iters={args.iters} (Qwen2.5-0.5B decode matmuls)")
    print(f"{'backend':<20} {'ms/token':>9} {'tok/s':>8} {'vs fp32':>8}")
    for name, t in results.items():
        ratio = f"{base / t:7.2f}x" if base else "       -"
        print(f"{name:<20} {t * 1e3:9.2f} {args.rows / t:8.2f} {ratio}")


if __name__ == "__main__":
    main()
