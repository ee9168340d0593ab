"""x W^T at training and prefill shapes: PyTorch's default CPU path (MKL sgemm, W transposed) against
oneDNN's inner product, which lmstack.models.layers.linear_nt picks for 128 rows and more.

For each shape (rows M, in K, out N) both kernels run alternately, best of `--repeats`, and the script
prints GFLOP/s and the ratio; the backward product g W (no transpose, what grad_input costs) is printed
beside them for reference. Float32, results equal to ~1e-6 relative (checked on every shape).

    .venv/bin/python bench/matmul.py --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from lmstack.models.layers import linear_nt

SHAPES = {  # (M, K, N): 4 x 256 tokens through qwen2.5-0.5b's projections and head slices
    "q/o 896->896": (1024, 896, 896),
    "k/v 896->128": (1024, 896, 128),
    "gate/up 896->4864": (1024, 896, 4864),
    "down 4864->896": (1024, 4864, 896),
    "head slice 896->37984": (512, 896, 37984),
}


def best_of(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, best of {args.repeats}, GFLOP/s")
    print("| shape | M x K x N | MKL x W^T | oneDNN x W^T | oneDNN speed-up | MKL g W (backward) |")
    print("|---|---|---:|---:|---:|---:|")
    for name, (m, k, n) in SHAPES.items():
        print(row(name, m, k, n, args.repeats))


def row(name: str, m: int, k: int, n: int, repeats: int) -> str:
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    grad = torch.randn(m, n, generator=g)
    ref, got = F.linear(x, w), linear_nt(x, w)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max(), name
    gflop = 2 * m * k * n / 1e9
    mkl = best_of(lambda: F.linear(x, w), repeats)
    onednn = best_of(lambda: linear_nt(x, w), repeats)
    backward = best_of(lambda: grad @ w, repeats)
    return (
        f"| {name} | {m} x {k} x {n} | {gflop / mkl:.0f} | {gflop / onednn:.0f} | {mkl / onednn:.2f}x "
        f"| {gflop / backward:.0f} |"
    )


if __name__ == "__main__":
    main()
