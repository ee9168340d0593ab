"""The native training ops (lmstack/kernels/train_cpu.cpp) against autograd through the PyTorch code they
replace: forward values and every gradient, on both builds, then a LoRA step of a whole model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import lmstack.models.layers as layers
from lmstack.config import NAMED_CONFIGS
from lmstack.kernels import load_train_kernels
from lmstack.lora import LoraConfig, apply_lora
from lmstack.models.layers import MLP, RMSNorm, apply_rope, rope_cos_sin
from lmstack.models.transformer import Transformer

BUILDS = ["simd", "portable"]


@pytest.fixture(scope="module", params=BUILDS)
def ops(request):
    module = load_train_kernels(portable=request.param == "portable")
    if module is None:
        pytest.skip("native training ops could not be built here")
    return module


def grads(fn, *inputs):
    """fn(*inputs) and the gradients of <fn(*inputs), fixed random weights> with respect to each input."""
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * probe).sum().backward()
    return out.detach(), [t.grad for t in inputs]


@pytest.mark.parametrize("unit_offset", [False, True])
def test_rms_norm_forward_and_gradients_match_autograd(ops, unit_offset):
    x, w = torch.randn(3, 7, 100) * 2, torch.randn(100)

    def reference(x, w):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
        return x * (1.0 + w) if unit_offset else w * x

    def native(x, w):
        return layers._RMSNormFunction.apply(x, w, 1e-5, unit_offset, ops)

    (y_ref, g_ref), (y, g) = grads(reference, x, w), grads(native, x, w)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(g[0], g_ref[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g[1], g_ref[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("code", "act"), [(0, F.silu), (1, lambda a: F.gelu(a, approximate="tanh")), (2, F.gelu)]
)
def test_gated_act_forward_and_gradients_match_autograd(ops, code, act):
    a, b = torch.randn(5, 3, 203) * 4, torch.randn(5, 3, 203)  # 203: the vector loop and its scalar tail
    a[0, 0, :4] = torch.tensor([-100.0, 100.0, 0.0, -20.0])  # exp's clamped range
    (y_ref, g_ref) = grads(lambda a, b: act(a) * b, a, b)
    (y, g) = grads(lambda a, b: layers._GatedAct.apply(a, b, None, code, ops), a, b)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g[0], g_ref[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g[1], g_ref[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rotary", [64, 32, 0])  # full, partial (phi-style), none: the transpose alone
def test_rope_heads_match_apply_rope_on_the_transposed_view(ops, rotary):
    B, T, n, hs = 2, 9, 3, 64
    wide = torch.randn(B, T, 2 * n * hs)
    cos, sin = rope_cos_sin(torch.arange(T) + 5, rotary, 10_000.0) if rotary else (torch.empty(0),) * 2

    def reference(x):
        heads = x.view(B, T, n, hs).transpose(1, 2)
        return (apply_rope(heads, cos, sin) if rotary else heads).contiguous()

    def native(x):
        return layers._RopeHeads.apply(x, cos, sin, n, hs, ops)

    for x in (wide[..., : n * hs], wide[..., : n * hs].contiguous()):  # a column slice and a whole tensor
        (y_ref, g_ref), (y, g) = grads(reference, x), grads(native, x)
        assert y.is_contiguous() and y.shape == (B, n, T, hs)
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(g[0], g_ref[0])


@pytest.mark.parametrize("softcap", [0.0, 30.0, 2.0])
def test_softmax_xent_gives_the_loss_and_turns_logits_into_their_gradient(ops, softcap):
    z = torch.randn(6, 1003) * 5  # 1003: the vector loop and its scalar tail
    z[0, :3] = torch.tensor([200.0, -200.0, 90.0])  # far outside exp's range before the max is taken
    targets = torch.tensor([0, 1, 1002, 5, 7, 500])

    def reference(z):
        capped = softcap * torch.tanh(z / softcap) if softcap else z
        return F.cross_entropy(capped, targets, reduction="none")

    leaf = z.clone().requires_grad_(True)
    loss_ref = reference(leaf)
    loss_ref.sum().backward()
    block = z.clone()
    loss = ops.softmax_xent_(block, targets, softcap)
    torch.testing.assert_close(loss, loss_ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(block, leaf.grad, rtol=1e-4, atol=1e-6)


def test_chunked_loss_with_native_ops_matches_plain_cross_entropy():
    """sft_loss through the native gradient block equals F.cross_entropy on full logits, value and grad."""
    from lmstack.train.losses import sft_loss

    if load_train_kernels() is None:
        pytest.skip("native training ops could not be built here")
    torch.manual_seed(0)
    model = Transformer(tiny("qwen2.5-coder-0.5b-instruct"))
    ids = torch.randint(0, model.config.vocab_size, (2, 30))
    labels = ids.clone()
    labels[:, :7] = -100
    loss, _ = sft_loss(model, {"input_ids": ids, "labels": labels})
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(ids)[:, :-1]
    ref = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_training_ops_reject_bad_input(ops):
    with pytest.raises(RuntimeError, match="float32"):
        ops.rms_norm_fwd(torch.randn(2, 8, dtype=torch.float64), torch.ones(8), 1e-6, False)
    with pytest.raises(RuntimeError, match="act must be"):
        ops.gated_act_bwd(torch.randn(2, 4), torch.randn(2, 4), torch.randn(2, 4), 3)
    with pytest.raises(RuntimeError, match="cos and sin"):
        ops.rope_heads(torch.randn(1, 4, 8), torch.randn(3, 8), torch.randn(3, 8), 1, 8)
    with pytest.raises(RuntimeError, match="outside"):
        ops.softmax_xent_(torch.randn(2, 8), torch.tensor([0, 8]), 0.0)
    with pytest.raises(RuntimeError, match="int64"):
        ops.softmax_xent_(torch.randn(2, 8), torch.tensor([0, 1], dtype=torch.int32), 0.0)
    with pytest.raises(RuntimeError, match="grad, x and rstd"):
        ops.rms_norm_bwd(torch.randn(3, 8), torch.randn(2, 8), torch.ones(8), torch.ones(2), False)


def tiny(name: str):
    """A named architecture (SwiGLU + GQA + q/k/v biases, or GeGLU + QK-norm + unit-offset norms + sliding
    windows) at test size."""
    c = NAMED_CONFIGS[name]
    local = ("local", "global") if c.layer_types else None
    return dataclasses.replace(
        c, dim=64, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=128, vocab_size=256, n_layers=2,
        max_seq_len=64, layer_types=local, sliding_window=8 if c.sliding_window else None,
    )  # fmt: skip


@pytest.mark.parametrize("name", ["qwen2.5-coder-0.5b-instruct", "gemma-3-270m"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_step_with_native_ops_matches_pytorch_path(monkeypatch, name, checkpointing):
    """The loss and every LoRA gradient of one step agree between the native ops and PyTorch alone."""
    if load_train_kernels() is None:
        pytest.skip("native training ops could not be built here")
    config = tiny(name)
    torch.manual_seed(0)
    model = Transformer(config)
    for p in model.parameters():  # Gemma's norms start at 0 (unit offset): give every weight some value
        p.data.normal_(0, 0.3 if p.dim() == 1 else 0.05)
    targets = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    for n_, p in model.named_parameters():
        if "lora_B" in n_:
            p.data.normal_(0, 0.05)
    model.gradient_checkpointing = checkpointing
    model.train()
    ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))

    def step():
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        return loss.detach(), {n_: p.grad.clone() for n_, p in model.named_parameters() if p.requires_grad}

    native_loss, native_grads = step()
    monkeypatch.setattr(layers, "USE_FUSED_OPS", False)
    ref_loss, ref_grads = step()
    torch.testing.assert_close(native_loss, ref_loss, rtol=1e-5, atol=1e-5)
    for n_, g in ref_grads.items():
        torch.testing.assert_close(native_grads[n_], g, rtol=1e-3, atol=1e-5, msg=n_)


def test_the_native_ops_are_what_training_runs(monkeypatch):
    """Under autograd a float32 CPU norm, MLP and RoPE go through train_cpu; without grad they do not."""
    if load_train_kernels() is None:
        pytest.skip("native training ops could not be built here")
    calls: list[str] = []
    real = layers.train_ops

    def spy(x):
        ops = real(x)
        if ops is not None:
            calls.append("native")
        return ops

    monkeypatch.setattr(layers, "train_ops", spy)
    norm = RMSNorm(16)
    mlp = MLP(dataclasses.replace(tiny("qwen2.5-coder-0.5b-instruct"), dim=16, hidden_dim=32))
    x = torch.randn(2, 80, 16, requires_grad=True)  # more rows than the decode ops take
    mlp(norm(x)).sum().backward()
    assert len(calls) == 2
    with torch.no_grad():
        mlp(norm(x))
    assert len(calls) == 2


@pytest.mark.parametrize("name", ["qwen2.5-coder-0.5b-instruct", "gemma-3-270m"])
def test_checkpointing_skips_the_down_projection_matmul_and_keeps_every_gradient(monkeypatch, name):
    """Recomputing a block, the down projection's output is not computed (it only feeds the block's output)
    unless a post-norm reads it (Gemma); the gradients equal those of a step without checkpointing."""
    import lmstack.lora as lora

    config = tiny(name)
    torch.manual_seed(0)
    model = Transformer(config)
    for p in model.parameters():
        p.data.normal_(0, 0.3 if p.dim() == 1 else 0.05)
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["wq", "wv", "w1", "w2", "w3"]))
    for n_, p in model.named_parameters():
        if "lora_B" in n_:
            p.data.normal_(0, 0.05)
    model.train()
    ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    skipped: list[bool] = []
    real = lora.output_unused

    def spy(module):
        skipped.append(real(module))
        return skipped[-1]

    monkeypatch.setattr(lora, "output_unused", spy)

    def step(checkpointing: bool):
        model.gradient_checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        return loss.detach(), {n_: p.grad.clone() for n_, p in model.named_parameters() if p.requires_grad}

    plain_loss, plain = step(False)
    assert not any(skipped)
    ckpt_loss, ckpt = step(True)
    assert sum(skipped) == (config.n_layers if not config.post_norms else 0)
    torch.testing.assert_close(ckpt_loss, plain_loss)
    for n_, g in plain.items():
        torch.testing.assert_close(ckpt[n_], g, rtol=1e-5, atol=1e-7, msg=n_)
