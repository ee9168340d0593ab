"""lmstack's caching CPU allocator (lmstack/kernels/alloc_cpu.cpp). Installing it is process-wide and final,
so each check runs in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from lmstack.kernels import use_caching_allocator


def run(code: str) -> str:
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_freed_blocks_are_reused_and_memory_stays_bounded():
    out = run(
        """
        import torch
        from lmstack.kernels import load_alloc_kernels, use_caching_allocator
        assert use_caching_allocator(slack=8 * 2**20)
        k = load_alloc_kernels()
        assert k.installed()
        small = torch.ones(10)  # below 16 KiB: the default allocator, as before
        for _ in range(20):  # the same sizes again and again, as training steps allocate
            a = torch.full((1024, 1024), 2.0)  # 4 MiB
            b = torch.full((3, 1024, 1024), 3.0)  # 12 MiB
            assert float((a.sum() + b.sum()) / 2**20) == 2 * 1 + 3 * 3  # values written, not stale
            del a, b
        s = k.stats()
        assert s["misses"] == 2 and s["hits"] == 38, s  # mapped twice, then reused
        assert s["peak_mapped"] == 16 * 2**20 and s["free"] == 16 * 2**20, s
        # a size nothing fits: the free blocks beyond the 8 MiB slack are unmapped before mapping more
        c = torch.empty(20 * 2**20 // 4)
        s = k.stats()
        assert s["mapped"] <= 8 * 2**20 + 20 * 2**20 and s["unmapped"] >= 1, s
        del c
        assert k.empty_cache() == 20 * 2**20 and k.stats()["mapped"] == 0
        # a miss gives back no more than it takes: one new size does not unmap the blocks others reuse
        blocks = [torch.empty(2**20) for _ in range(12)]  # 12 x 4 MiB
        del blocks
        d = torch.empty(5 * 2**20 // 4)  # 5 MiB: nothing fits, two 4 MiB blocks go
        s = k.stats()
        assert s["free"] == 10 * 4 * 2**20 and s["mapped"] == 45 * 2**20, s
        print("ok", float(small.sum()))
        """
    )
    assert out.split() == ["ok", "10.0"]


def test_mid_sized_blocks_share_size_steps_and_only_similar_big_blocks_make_room():
    out = run(
        """
        import torch
        from lmstack.kernels import load_alloc_kernels, use_caching_allocator
        assert use_caching_allocator(slack=0)
        k = load_alloc_kernels()
        # 16 KiB - 1 MiB rounds up to 8 steps per power of two: 17,000 and 20,000 bytes share a 20 KiB block
        a = torch.empty(17_000, dtype=torch.uint8)
        del a
        b = torch.empty(20_000, dtype=torch.uint8)
        s = k.stats()
        assert s["misses"] == 1 and s["hits"] == 1 and s["mapped"] == 20 * 2**10, s
        del b
        # a 12 MiB block and the 20 KiB one are free; a 1.5 MiB miss (slack 0) unmaps neither: the big one
        # is more than twice its size, and mid-sized blocks wait for empty_cache
        big = torch.empty(3 * 2**20)
        del big
        c = torch.empty(3 * 2**19 // 4)
        s = k.stats()
        assert s["unmapped"] == 0 and s["free"] == 12 * 2**20 + 20 * 2**10, s
        del c
        # a 7 MiB miss may take the 12 MiB block's place (and the 1.5 MiB one's): free drops to what fits
        d = torch.empty(7 * 2**20 // 4)
        s = k.stats()
        assert s["unmapped"] >= 1 and s["free"] < 12 * 2**20, s
        del d
        assert k.empty_cache() > 0 and k.stats()["mapped"] == 0
        print("ok")
        """
    )
    assert out.split() == ["ok"]


def test_a_training_step_is_the_same_on_either_allocator():
    """The same tiny model and batch: loss and every gradient identical with glibc's allocator and with
    lmstack's (the caching allocator hands back dirty memory; nothing may rely on fresh zeros)."""
    code = """
        import sys, torch
        from lmstack.config import ModelConfig
        from lmstack.models.transformer import Transformer
        from lmstack.lora import LoraConfig, apply_lora
        from lmstack.train.losses import sft_loss
        from lmstack.train.loop import prepare_memory
        torch.manual_seed(0)
        cfg = ModelConfig(name="t", vocab_size=5000, dim=256, n_layers=2, n_heads=4, n_kv_heads=2,
                          hidden_dim=1024, max_seq_len=512)
        model = Transformer(cfg).train()
        apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        print("caching", prepare_memory(model))
        ids = torch.randint(0, 5000, (4, 256), generator=torch.Generator().manual_seed(1))
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            loss, _ = sft_loss(model, {"input_ids": ids, "labels": ids})
            loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        print(repr(float(loss)), repr(float(grads.double().square().sum())))
    """
    import os

    env_system = {**os.environ, "LMSTACK_CPU_ALLOCATOR": "system"}
    caching = run(code).split()
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env_system
    )
    assert r.returncode == 0, r.stderr[-3000:]
    system = r.stdout.split()
    assert caching[:2] == ["caching", "True"] and system[:2] == ["caching", "False"]
    assert caching[2:] == system[2:]


def test_negative_slack_and_an_unknown_allocator_are_refused(monkeypatch):
    from torch import nn

    from lmstack.train.loop import prepare_memory

    with pytest.raises(ValueError, match="slack must be >= 0"):
        use_caching_allocator(slack=-1)
    with pytest.raises(ValueError, match="min_bytes must be >= 1"):
        use_caching_allocator(min_bytes=0)
    monkeypatch.setenv("LMSTACK_CPU_ALLOCATOR", "glibc")
    with pytest.raises(ValueError, match="must be 'caching' or 'system', got 'glibc'"):
        prepare_memory(nn.Linear(2, 2))
