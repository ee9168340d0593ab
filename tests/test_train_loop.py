"""The one training loop on a tiny random model: it learns, a resumed run reproduces the uninterrupted loss
curve bit for bit, bad resumes and impossible memory are refused, and the losses match hand computations."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lmstack.config import ModelConfig
from lmstack.lora import LoraConfig, apply_lora, disable_adapters
from lmstack.models.transformer import Transformer
from lmstack.train import TrainConfig, lr_at, train
from lmstack.train.losses import IGNORE, dpo_loss_from_logprobs, sequence_logprob, sft_loss

TINY = ModelConfig(
    name="tiny", vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=32,
    tie_embeddings=False,
)  # fmt: skip


def tiny_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(TINY)


def examples(n: int = 24, seq: int = 16) -> list[dict[str, torch.Tensor]]:
    """A learnable task: three fixed sequences whose second half repeats the first; only it is labelled."""
    g = torch.Generator().manual_seed(3)
    halves = [torch.randint(0, TINY.vocab_size, (seq // 2,), generator=g) for _ in range(3)]
    out = []
    for i in range(n):
        half = halves[i % 3]
        ids = torch.cat([half, half])
        labels = ids.clone()
        labels[: seq // 2] = IGNORE
        out.append({"input_ids": ids, "labels": labels})
    return out


def collate(items: list[dict[str, torch.Tensor]]) -> dict:
    labels = torch.stack([x["labels"] for x in items])
    return {"input_ids": torch.stack([x["input_ids"] for x in items]), "labels": labels,
            "n_tokens": int((labels != IGNORE).sum())}  # fmt: skip


CFG = TrainConfig(max_steps=12, batch_size=4, lr=3e-3, warmup_steps=2, eval_every=4, save_every=4, seed=1)


def test_learns_logs_and_plots(tmp_path: Path) -> None:
    data = examples()
    result = train(
        tiny_model(), sft_loss, data[:20], collate, CFG, tmp_path, val_data=data[20:], progress=False
    )
    losses = result.train_losses
    assert len(losses) == 12 and losses[-1] < losses[0] * 0.9
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert rows == result.history and [s for s, _ in result.val_losses] == [4, 8, 12]
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert {"lr", "grad_norm", "tokens_per_s"} <= rows[0].keys()
    assert result.estimated_peak_bytes > 0 and result.measured_peak_bytes > 0


def test_resume_reproduces_the_uninterrupted_run(tmp_path: Path) -> None:
    data = examples()
    whole = train(tiny_model(), sft_loss, data, collate, CFG, tmp_path / "a", progress=False)
    model_a = whole
    first = train(tiny_model(), sft_loss, data, collate, CFG, tmp_path / "b", stop_after=5, progress=False)
    assert first.steps == 5
    resumed_model = tiny_model()  # a fresh process would rebuild the model the same way
    rest = train(resumed_model, sft_loss, data, collate, CFG, tmp_path / "b", progress=False)
    assert rest.steps == 12
    assert rest.train_losses == model_a.train_losses  # bit for bit
    log = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log if "loss" in r] == whole.train_losses


def test_resume_with_another_config_is_refused(tmp_path: Path) -> None:
    data = examples()
    train(tiny_model(), sft_loss, data, collate, CFG, tmp_path, stop_after=4, progress=False)
    before = (tmp_path / "checkpoint" / "state.json").read_text()
    other = TrainConfig(**{**CFG.__dict__, "lr": 1e-3})
    with pytest.raises(ValueError, match=r"made with lr=0.003, this run has lr=0.001"):
        train(tiny_model(), sft_loss, data, collate, other, tmp_path, progress=False)
    lora = tiny_model()
    apply_lora(lora, LoraConfig(r=2, target_modules=["wq"]))
    with pytest.raises(ValueError, match="belongs to another setup"):
        train(lora, sft_loss, data, collate, CFG, tmp_path, progress=False)
    assert (tmp_path / "checkpoint" / "state.json").read_text() == before  # nothing overwritten


def test_bad_settings_and_memory_refusal(tmp_path: Path) -> None:
    data = examples()
    with pytest.raises(MemoryError, match="lower batch_size"):
        train(tiny_model(), sft_loss, data, collate, CFG, tmp_path, memory_limit=1000, progress=False)
    with pytest.raises(ValueError, match="max_steps must be > 0"):
        train(tiny_model(), sft_loss, data, collate, TrainConfig(max_steps=0), tmp_path, progress=False)
    frozen = tiny_model().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(frozen, sft_loss, data, collate, CFG, tmp_path, progress=False)
    unlabeled = [{**x, "labels": torch.full_like(x["labels"], IGNORE)} for x in data]
    with pytest.raises(ValueError, match="no labelled tokens"):
        train(tiny_model(), sft_loss, unlabeled, collate, CFG, tmp_path / "u", progress=False)
    assert not (tmp_path / "checkpoint").exists()


def test_schedule_warmup_then_cosine() -> None:
    c = TrainConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    assert [lr_at(s, 20, c) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, 20, c) == pytest.approx(1.0)
    assert lr_at(12, 20, c) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(20, 20, c) == pytest.approx(0.1)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    batch = collate(examples(4))
    grads = []
    for on in (False, True):
        model = tiny_model()
        model.gradient_checkpointing = on
        model.train()
        loss, _ = sft_loss(model, batch)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-6)


def test_dpo_loss_matches_a_hand_computed_example() -> None:
    pc, pr = torch.tensor([-4.0, -3.0]), torch.tensor([-6.0, -2.0])
    rc, rr = torch.tensor([-5.0, -3.5]), torch.tensor([-5.0, -2.5])
    loss, m = dpo_loss_from_logprobs(pc, pr, rc, rr, beta=0.5)
    # pair 1: 0.5 * ((-4 + 5) - (-6 + 5)) = 1.0; pair 2: 0.5 * ((-3 + 3.5) - (-2 + 2.5)) = 0.0
    expected = (math.log1p(math.exp(-1.0)) + math.log(2.0)) / 2
    assert float(loss) == pytest.approx(expected)
    assert m["reward_accuracy"] == 0.5 and m["reward_margin"] == pytest.approx(0.5)


def test_reference_logprobs_are_the_adapter_free_model() -> None:
    model = tiny_model()
    batch = collate(examples(2))
    base = sequence_logprob(model, batch["input_ids"], batch["labels"])
    apply_lora(model, LoraConfig(r=2, target_modules=["wq", "wv"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    with torch.no_grad(), disable_adapters(model):
        ref = sequence_logprob(model, batch["input_ids"], batch["labels"])
    policy = sequence_logprob(model, batch["input_ids"], batch["labels"])
    torch.testing.assert_close(ref, base.detach())
    assert not torch.allclose(policy, base)


def test_labelled_logits_equal_the_full_forward_at_labelled_positions() -> None:
    from lmstack.train.losses import labelled_logits, token_logprobs

    model = tiny_model().eval()
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (3, 12))
    labels = ids.clone()
    labels[:, :5] = IGNORE  # a prompt
    labels[1, 9:] = IGNORE  # padding
    full = model(ids)[:, :-1]
    logits, targets, mask = labelled_logits(model, ids, labels)
    assert torch.allclose(logits, full[mask], atol=1e-5) and torch.equal(targets, labels[:, 1:][mask])
    picked, _ = token_logprobs(model(ids), labels)
    assert torch.allclose(sequence_logprob(model, ids, labels), picked.sum(-1), atol=1e-5)


@pytest.mark.parametrize(
    "setup",
    ["lora", "full-tied", "softcap", "qlora-int8-head", "qlora-int8-tied", "qlora-int8-softcap"],
    ids=lambda s: {"lora": "lora-head-frozen", "full-tied": "full-tied-head-trains"}.get(s, s),
)
def test_chunked_head_loss_equals_plain_cross_entropy(setup: str, monkeypatch) -> None:
    """sft_loss's chunked head (no (N, V) logits kept) gives the loss and every gradient of the plain path:
    a frozen head, a trained head tied to the embeddings, a final logit soft-cap (gemma-2 style), and
    QLoRA's int8 head (untied, sharing the tied embedding's codes, and soft-capped), read a few vocabulary
    rows at a time in two passes."""
    from lmstack.nf4 import quantize_model_nf4, quantize_tables_int8
    from lmstack.quant import Int8Embedding, Int8Linear
    from lmstack.train import losses

    softcap = 5.0 if setup in ("softcap", "qlora-int8-softcap") else None
    config = TINY.with_(tie_embeddings=setup in ("full-tied", "qlora-int8-tied"), final_softcap=softcap)
    torch.manual_seed(0)
    model = Transformer(config)
    if setup.startswith("qlora"):
        quantize_tables_int8(quantize_model_nf4(model))
        assert isinstance(model.tok_embeddings, Int8Embedding) and isinstance(model.output, Int8Linear)
        if setup == "qlora-int8-tied":
            assert model.output.qweight is model.tok_embeddings.qweight  # one copy of the codes
        monkeypatch.setattr(losses, "INT8_SLICE_MIN_ROWS", 24)  # 64 rows: slices of 24, 24, 16
        monkeypatch.setattr(losses, "INT8_SLICE_LOGITS", 1)
    if setup != "full-tied" and setup != "softcap":
        apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert losses._plain_head(model) is not None  # the chunked path applies
    batch = collate(examples(6, seq=16))
    monkeypatch.setattr(losses, "CHUNK_MIN_TOKENS", 5)  # 5-token chunks: several, the last one shorter
    monkeypatch.setattr(losses, "CHUNK_LOGITS", 5 * config.vocab_size)

    def loss_and_grads(chunked: bool) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        if chunked:
            loss = sft_loss(model, batch)[0]
        else:
            logits, targets, _ = losses.labelled_logits(model, batch["input_ids"], batch["labels"])
            loss = torch.nn.functional.cross_entropy(logits.float(), targets)
        (3.0 * loss).backward()  # a non-unit incoming gradient
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_c, grads_c = loss_and_grads(True)
    loss_p, grads_p = loss_and_grads(False)
    assert abs(loss_c - loss_p) < 1e-5
    assert grads_c.keys() == grads_p.keys() and grads_c
    for name, g in grads_p.items():
        assert (grads_c[name] - g).abs().max().item() < 1e-5 * max(1.0, g.abs().max().item()), name
