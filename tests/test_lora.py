"""LoRA invariants (frozen base, merge == unmerged, merge idempotent, disabled == base), bad input, and
adapters exchanged with the real Hugging Face PEFT library on a tiny random Llama: identical logits."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lmstack.adapters import load_adapter, save_adapter
from lmstack.config import ModelConfig
from lmstack.lora import (
    LoraConfig,
    LoraLinear,
    apply_lora,
    disable_adapters,
    find_targets,
    lora_state_dict,
    merge_lora,
    trainable_parameters,
)
from lmstack.models.hf import load_hf
from lmstack.models.layers import Linear
from lmstack.models.transformer import Transformer

TINY = ModelConfig(
    name="tiny",
    vocab_size=64,
    dim=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    hidden_dim=48,
    max_seq_len=32,
    tie_embeddings=False,
)
ALL_PROJECTIONS = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]


def tiny_model(config: ModelConfig = TINY) -> Transformer:
    torch.manual_seed(0)
    return Transformer(config).eval()


def ids_for(vocab: int, batch: int = 2, seq: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def train_steps(model: torch.nn.Module, vocab: int, steps: int = 3) -> list[float]:
    """A few real AdamW steps on random next-token data (every parameter handed to the optimizer)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = ids_for(vocab, batch=4, seq=16, seed=2)
    model.train()
    losses = []
    for _ in range(steps):
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def randomize_lora(model: torch.nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


# --- invariants --------------------------------------------------------------------------------------
def test_fresh_adapter_is_the_identity_and_only_lora_trains():
    model = tiny_model()
    ids = ids_for(TINY.vocab_size)
    with torch.no_grad():
        before = model(ids)
    names = apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=ALL_PROJECTIONS))
    assert len(names) == 7 * TINY.n_layers and "output" not in names
    with torch.no_grad():
        assert torch.equal(model(ids), before)  # B starts at zero
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model)) and all(".lora_" in n for n in trainable)
    count = trainable_parameters(model)
    expected = sum(4 * (m.in_features + m.out_features) for m in model.modules() if isinstance(m, LoraLinear))
    assert count.trainable == expected and "trainable params" in str(count)


def test_training_leaves_base_weights_untouched():
    model = tiny_model()
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=ALL_PROJECTIONS, lora_dropout=0.1))
    base = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" not in n}
    lora = {n: t.clone() for n, t in lora_state_dict(model).items()}
    losses = train_steps(model, TINY.vocab_size)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if ".lora_" not in n)
    after = lora_state_dict(model)
    assert all(not torch.equal(after[n], lora[n]) for n in after if n.endswith("lora_B.weight"))


def test_merge_equals_unmerged_is_idempotent_and_unmerge_restores():
    model = tiny_model()
    apply_lora(model, LoraConfig(r=4, lora_alpha=16, target_modules=ALL_PROJECTIONS + ["output"]))
    randomize_lora(model)
    ids = ids_for(TINY.vocab_size)
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    originals = [m.base.weight.detach().clone() for m in layers]
    with torch.no_grad():
        unmerged = model(ids)
        for m in layers:
            m.merge()
        once = [m.base.weight.detach().clone() for m in layers]
        assert max_diff(model(ids), unmerged) <= 1e-5
        for m in layers:
            m.merge()  # a second merge is a no-op
        assert all(torch.equal(m.base.weight, w) for m, w in zip(layers, once, strict=True))
        for m in layers:
            m.unmerge()
        assert all(max_diff(m.base.weight, w) <= 1e-6 for m, w in zip(layers, originals, strict=True))
        assert max_diff(model(ids), unmerged) <= 1e-5
        plain = merge_lora(model)
        assert not any(isinstance(m, LoraLinear) for m in plain.modules())
        assert type(plain.layers[0].attn.wq) is Linear and type(plain.output) is Linear
        assert max_diff(plain(ids), unmerged) <= 1e-5
    assert set(plain.state_dict()) == set(tiny_model().state_dict())  # the original names again


def test_disabled_adapters_compute_the_base_model():
    model = tiny_model()
    ids = ids_for(TINY.vocab_size)
    with torch.no_grad():
        base = model(ids)
    apply_lora(model, LoraConfig(r=4, target_modules=ALL_PROJECTIONS))
    randomize_lora(model)
    with torch.no_grad():
        adapted = model(ids)
        with disable_adapters(model):
            assert torch.equal(model(ids), base)
        assert torch.equal(model(ids), adapted) and max_diff(adapted, base) > 1e-2
        model.layers[0].attn.wq.merge()
        with pytest.raises(ValueError, match="unmerge"), disable_adapters(model):
            pass


def test_dropout_is_active_only_in_training():
    model = tiny_model()
    apply_lora(model, LoraConfig(r=4, lora_dropout=0.5, target_modules=["wq"]))
    randomize_lora(model)
    ids = ids_for(TINY.vocab_size)
    with torch.no_grad():
        assert torch.equal(model(ids), model(ids))
        model.train()
        assert not torch.equal(model(ids), model(ids))


# --- targets and bad input ---------------------------------------------------------------------------
def test_lmstack_and_hugging_face_names_select_the_same_modules():
    model = tiny_model()

    def targets(t):
        return find_targets(model, LoraConfig(target_modules=t))

    assert targets(["q_proj", "down_proj"]) == targets(["wq", "w2"]) == targets(["attn.wq", "mlp.down_proj"])
    assert targets(["q_proj", "down_proj"]) == [
        "layers.0.attn.wq",
        "layers.0.mlp.w2",
        "layers.1.attn.wq",
        "layers.1.mlp.w2",
    ]
    assert targets(r"model\.layers\.1\.self_attn\.(q|v)_proj") == ["layers.1.attn.wq", "layers.1.attn.wv"]
    assert targets(r"layers\.0\.mlp\.w[13]") == ["layers.0.mlp.w1", "layers.0.mlp.w3"]
    assert targets(["lm_head"]) == targets(["output"]) == ["output"]
    assert "output" not in targets("all-linear") and len(targets("all-linear")) == 14


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=0), "r \\(the rank\\) must be a positive"),
        (dict(r=-2), "r \\(the rank\\) must be a positive"),
        (dict(lora_alpha=0), "lora_alpha must be positive"),
        (dict(lora_dropout=1.0), "lora_dropout must lie in \\[0, 1\\)"),
        (dict(lora_dropout=-0.1), "lora_dropout"),
        (dict(target_modules=[]), "target_modules is empty"),
        (dict(bias="all"), "bias='all' is not supported"),
    ],
)
def test_invalid_config_is_an_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kwargs)


def test_targets_matching_nothing_name_what_exists():
    model = tiny_model()
    with pytest.raises(
        ValueError, match=r"'query'.*matches no linear.*wq \(q_proj\).*w2 \(down_proj\).*output"
    ):
        apply_lora(model, LoraConfig(target_modules=["query"]))
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())  # nothing changed


def test_tied_head_and_double_application_are_refused():
    tied = tiny_model(TINY.with_(tie_embeddings=True))
    with pytest.raises(ValueError, match="output.weight is tied to tok_embeddings.weight"):
        apply_lora(tied, LoraConfig(target_modules=["output"]))
    model = tiny_model()
    apply_lora(model, LoraConfig(target_modules=["wq"]))
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, LoraConfig(target_modules=["wv"]))


# --- PEFT format, checked with the real peft library -------------------------------------------------
@pytest.fixture
def peft():
    return pytest.importorskip("peft")


@pytest.mark.parametrize(
    "targets", [["wq", "k_proj", "wv", "wo", "w1", "w2", "w3", "output"], r"layers\.1\.(attn\.wv|mlp\.w2)"]
)
def test_lmstack_adapter_loads_in_peft_with_identical_logits(peft, tiny_hf_model, tmp_path, targets):
    hf, path = tiny_hf_model("llama")
    model, config = load_hf(path)
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=targets))
    randomize_lora(model)  # every B nonzero, so every module's update shows in the logits
    adapter = save_adapter(model, tmp_path / "adapter", base_model_name=str(path))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.PeftModel.from_pretrained(hf, adapter).eval()
    ids = ids_for(config.vocab_size)
    with torch.no_grad():
        assert max_diff(model(ids), peft_model(ids).logits) <= 1e-4
        with peft_model.disable_adapter():
            assert max_diff(model(ids), peft_model(ids).logits) > 1e-2  # the adapter matters
    # the keys PEFT itself writes (its "auto" would add lm_head's base weight when lm_head is a target)
    saved = set(peft.utils.get_peft_model_state_dict(peft_model, save_embedding_layers=False))
    assert set(load_file(adapter / "adapter_model.safetensors")) == saved
    assert peft_model.peft_config["default"].r == 4 and peft_model.peft_config["default"].lora_alpha == 8


@pytest.mark.parametrize(
    "kind, targets, n_wrapped",
    [("llama", ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"], 5), ("qwen2", "all-linear", 7)],
)
def test_peft_adapter_loads_in_lmstack_with_identical_logits(
    peft, tiny_hf_model, tmp_path, kind, targets, n_wrapped
):
    hf, path = tiny_hf_model(kind)
    peft_config = peft.LoraConfig(
        r=4, lora_alpha=16, lora_dropout=0.1, target_modules=targets, task_type="CAUSAL_LM"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(hf, peft_config)
    randomize_lora(peft_model, seed=5)
    peft_model.save_pretrained(tmp_path / "peft-adapter")
    peft_model.eval()

    model, config = load_hf(path)
    names = load_adapter(model, tmp_path / "peft-adapter")
    assert len(names) == n_wrapped * config.n_layers
    ids = ids_for(config.vocab_size)
    with torch.no_grad():
        assert max_diff(model(ids), peft_model(ids).logits) <= 1e-4
        with disable_adapters(model), peft_model.disable_adapter():
            assert max_diff(model(ids), peft_model(ids).logits) <= 1e-4


@pytest.fixture
def llama_adapter(tiny_hf_model, tmp_path) -> tuple[ModelConfig, Path]:
    """A saved lmstack adapter on the tiny Llama (2 layers), base model name "tiny-llama"."""
    _, path = tiny_hf_model("llama")
    model, config = load_hf(path)
    apply_lora(model, LoraConfig(r=4, target_modules=["q_proj", "w2"]))
    randomize_lora(model)
    return config, save_adapter(model, tmp_path / "adapter", base_model_name="tiny-llama")


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(n_layers=3), "no tensors for 4 targeted weights.*layers.2.attn.wq.lora_A"),
        (dict(n_layers=1), "tensors for modules this model has no target for"),
        (dict(hidden_dim=96), "shape mismatches.*mlp.down_proj.lora_A.weight: \\(4, 112\\) vs \\(4, 96\\)"),
    ],
)
def test_adapter_for_a_different_base_model_is_refused_whole(llama_adapter, change, message):
    config, adapter = llama_adapter
    other = tiny_model(config.with_(**change))
    with pytest.raises(ValueError, match="different base model.*" + message):
        load_adapter(other, adapter)
    assert not any(isinstance(m, LoraLinear) for m in other.modules())  # nothing half-applied
    assert all(p.requires_grad for p in other.parameters())


def test_adapter_base_model_name_is_checked(llama_adapter):
    config, adapter = llama_adapter
    model = tiny_model(config)
    with pytest.raises(ValueError, match="trained on 'tiny-llama', not on 'other-model'"):
        load_adapter(model, adapter, base_model_name="other-model")
    assert load_adapter(model, adapter, base_model_name="tiny-llama")


def test_unsupported_adapters_are_clear_errors(llama_adapter, tmp_path):
    import json

    config, adapter = llama_adapter
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ValueError, match="does not implement: use_dora"):
        load_adapter(tiny_model(config), adapter)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(tiny_model(config), tmp_path / "nowhere")
    gpt2 = tiny_model(TINY.with_(family="gpt2"))
    apply_lora(gpt2, LoraConfig(target_modules=["wq"]))
    with pytest.raises(ValueError, match="no Hugging Face PEFT name.*gpt2"):
        save_adapter(gpt2, tmp_path / "gpt2-adapter")


def test_llm_load_merges_an_adapter(tiny_checkpoint, tmp_path) -> None:
    from lmstack.api import LLM

    llm = LLM.load(str(tiny_checkpoint), device="cpu")
    apply_lora(llm.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(5)
    for name, p in llm.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    ids = [1, 5, 9, 3, 7]
    with torch.no_grad():
        expected = llm.model(torch.tensor([ids]))[0]
    save_adapter(llm.model, tmp_path / "adapter", base_model_name=str(tiny_checkpoint))
    merged = LLM.load(str(tiny_checkpoint), device="cpu", adapter=tmp_path / "adapter")
    torch.testing.assert_close(merged.logits(ids), expected, atol=1e-5, rtol=0)
    assert not lora_state_dict(merged.model)  # merged: plain linears, nothing left to run at inference
    int8 = LLM.load(str(tiny_checkpoint), device="cpu", adapter=tmp_path / "adapter", dtype="int8")
    assert (int8.logits(ids) - expected).abs().max() < 0.05 * expected.abs().max()


# --- the fused training path (one autograd node per LoRA layer) -------------------------------------------
@pytest.mark.parametrize("base_kind", ["float", "nf4", "bias"])
def test_fused_training_path_equals_composed_modules(base_kind):
    """LoraLinear trains through _LoraFunction (saving only x and x A^T); its output and the gradients of
    x, A and B equal the module composition that inference and dropout use."""
    from lmstack.nf4 import NF4Linear

    torch.manual_seed(0)
    base: torch.nn.Module = torch.nn.Linear(24, 40, bias=base_kind == "bias")
    if base_kind == "nf4":
        base = NF4Linear.from_linear(base)
    layer = LoraLinear(base, r=4, alpha=8)
    randomize_lora(layer)
    x = torch.randn(3, 5, 24, requires_grad=True)
    g = torch.randn(3, 5, 40)

    def run(fused: bool) -> list[torch.Tensor]:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        if not fused:  # what forward does when the fused path does not apply
            y = layer.base(x) + layer.lora_B(layer.lora_A(x)) * layer.scaling
        else:
            assert layer._fused_training_path(x)
            y = layer(x)
        (y * g).sum().backward()
        grads = [x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad]
        return [y.detach(), *(g.clone() for g in grads)]

    for fused, composed in zip(run(True), run(False), strict=True):
        assert max_diff(fused, composed) < 1e-5


def test_fused_path_is_not_used_without_grad_disabled_or_with_dropout():
    layer = LoraLinear(torch.nn.Linear(8, 8), r=2, alpha=4)
    x = torch.randn(2, 8)
    with torch.no_grad():
        assert not layer._fused_training_path(x)
    layer.disabled = True
    assert not layer._fused_training_path(x)
    layer.disabled = False
    assert layer._fused_training_path(x)
    assert not LoraLinear(torch.nn.Linear(8, 8), r=2, alpha=4, dropout=0.1)._fused_training_path(x)
