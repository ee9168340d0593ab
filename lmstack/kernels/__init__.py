"""Native CPU kernels, compiled with ninja on first use and cached on disk by torch.

Why JIT instead of a build step: the package stays pip-installable as pure Python, and a
machine without a compiler still works, because the loader returns None and callers fall
back to their PyTorch reference path.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from types import ModuleType

import torch

_QUANT_SOURCE = Path(__file__).with_name("quant_cpu.cpp")
_OPS_SOURCE = Path(__file__).with_name("ops_cpu.cpp")
_ALLOC_SOURCE = Path(__file__).with_name("alloc_cpu.cpp")
_TRAIN_SOURCE = Path(__file__).with_name("train_cpu.cpp")


def _has_avx2() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@functools.cache
def load_quant_kernels(portable: bool = False) -> ModuleType | None:
    """The compiled `quant_cpu` module (quantized matmuls), or None (with one warning) if it cannot
    be built. `portable=True` builds the scalar variant of the same source even on an AVX2 machine;
    tests use it to check the fallback arithmetic."""
    return _build("lmstack_quant", _QUANT_SOURCE, portable)


@functools.cache
def load_ops_kernels(portable: bool = False) -> ModuleType | None:
    """The compiled `ops_cpu` module (fused norm, gated activation, cached attention for decode), or
    None (with one warning) if it cannot be built."""
    return _build("lmstack_ops", _OPS_SOURCE, portable)


@functools.cache
def load_train_kernels(portable: bool = False) -> ModuleType | None:
    """The compiled `train_cpu` module (forward/backward pairs of RMSNorm, the gated activation and RoPE with
    the head transpose, for training under autograd), or None (with one warning) if it cannot be built."""
    return _build("lmstack_train", _TRAIN_SOURCE, portable)


@functools.cache
def load_alloc_kernels() -> ModuleType | None:
    """The compiled `alloc_cpu` module (the caching CPU allocator), or None (with one warning)."""
    return _build("lmstack_alloc", _ALLOC_SOURCE, portable=True)  # no SIMD in it


# free bytes the caching allocator may keep when it has to map a new block (its memory is at most the live
# tensors' bytes plus this)
ALLOCATOR_SLACK = 64 * 2**20
# smaller tensors stay with glibc: a mapping per 4 KiB bias or norm statistic would cost more than it saves
ALLOCATOR_MIN_BYTES = 16 * 2**10


def use_caching_allocator(slack: int = ALLOCATOR_SLACK, min_bytes: int = ALLOCATOR_MIN_BYTES) -> bool:
    """Serve this process's CPU tensors of `min_bytes` and more from lmstack's caching allocator
    (alloc_cpu.cpp): freed blocks are kept and handed to the next request of about their size instead of
    going back to glibc's heap, where a training step's mix of sizes leaves most of the heap free but
    unreturnable. Training calls this; it is process-wide and cannot be undone (tensors allocated before keep
    their own deleters), and a second call only changes the slack. Returns whether the allocator is in use
    (False where the extension cannot be built)."""
    if slack < 0:
        raise ValueError(f"slack must be >= 0 bytes, got {slack}")
    if min_bytes < 1:
        raise ValueError(f"min_bytes must be >= 1, got {min_bytes}")
    module = load_alloc_kernels()
    if module is None:
        return False
    module.install(slack, min_bytes)
    return bool(module.installed())


def empty_allocator_cache() -> int:
    """Unmap the caching allocator's free blocks (the live ones stay); the bytes given back, 0 when the
    allocator is not in use."""
    if not load_alloc_kernels.cache_info().currsize:  # never loaded, so never installed
        return 0
    module = load_alloc_kernels()
    return int(module.empty_cache()) if module is not None else 0


def _build(name: str, source: Path, portable: bool) -> ModuleType | None:
    simd = _has_avx2() and not portable
    # -fopenmp: at::parallel_for is header-inline OpenMP; without it, it silently runs serially.
    cflags = ["-O3", "-fopenmp"] + (["-mavx2", "-mfma", "-mf16c"] if simd else [])
    try:
        from torch.utils.cpp_extension import load

        return load(
            name=name + ("_avx2" if simd else "_scalar"),
            sources=[str(source)],
            extra_cflags=cflags,
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # compiler missing, headers missing, ninja missing, ...
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        warnings.warn(
            f"lmstack: native CPU kernels {source.name} unavailable ({type(e).__name__}: {first_line}); "
            "using the PyTorch reference path",
            stacklevel=3,
        )
        return None
