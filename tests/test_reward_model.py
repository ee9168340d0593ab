"""The reward model: the pairwise loss against hand-computed values, the head reads the last real token
whatever the padding, a tiny random model learns a synthetic preference through the one training loop,
and a saved reward model scores exactly like the one in memory; bad folders are refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lmstack.api import LLM
from lmstack.config import ModelConfig
from lmstack.data import Example, PreferenceExample, collate_preference
from lmstack.lora import LoraConfig, apply_lora, lora_layers
from lmstack.models.transformer import Transformer
from lmstack.recipes.finetune import FinetuneArgs, finetune, load_reward_scorer
from lmstack.train import TrainConfig, train
from lmstack.train.reward_model import (
    RewardModel,
    RewardScorer,
    pairwise_loss,
    reward_loss,
    save_reward_model,
)

TINY = ModelConfig(
    name="tiny", vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=32,
    tie_embeddings=False,
)  # fmt: skip
PREFS = [
    {"prompt": "The capital of France?", "chosen": "Paris.", "rejected": "def f(x):"},
    {"prompt": "def f(x):", "chosen": "return x + 1", "rejected": "Paris."},
] * 4


def test_pairwise_loss_matches_a_hand_computed_example() -> None:
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])  # margins 1 and -2
    loss, metrics = pairwise_loss(chosen, rejected)
    expected = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(2))) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert metrics == pytest.approx(
        {"accuracy": 0.5, "margin": -0.5, "reward_chosen": 0.5, "reward_rejected": 1.0}
    )


def test_the_head_reads_the_last_real_token_whatever_the_padding() -> None:
    torch.manual_seed(0)
    model = RewardModel(Transformer(TINY)).eval()
    a, b = torch.randint(0, 64, (1, 5)), torch.randint(0, 64, (1, 9))
    padded = torch.zeros(2, 9, dtype=torch.long)
    padded[0, :5], padded[1] = a[0], b[0]
    together = model(padded, torch.tensor([5, 9]))  # (2,)
    with torch.no_grad():
        hidden = model.backbone.forward_hidden(a)  # (1, 5, C)
        by_hand = hidden[0, -1] @ model.score.weight[0] + model.score.bias[0]
        assert torch.allclose(model.backbone.head(hidden), model.backbone(a))  # forward == head(hidden)
    assert torch.allclose(together[0], by_hand, atol=1e-6)
    assert torch.allclose(together[1], model(b, torch.tensor([9]))[0], atol=1e-6)


def synthetic_pairs(n: int, seed: int) -> list[PreferenceExample]:
    """Chosen responses draw their tokens from the low half of the vocabulary, rejected from the high half."""
    g = torch.Generator().manual_seed(seed)

    def side(prompt: list[int], lo: int) -> Example:
        response = torch.randint(lo, lo + 32, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g)
        return Example(prompt + response.tolist(), [-100] * len(prompt) + response.tolist())

    pairs = []
    for _ in range(n):
        prompt = torch.randint(0, 64, (4,), generator=g).tolist()
        pairs.append(PreferenceExample(side(prompt, 0), side(prompt, 32)))
    return pairs


def accuracy(model: RewardModel, pairs: list[PreferenceExample]) -> float:
    with torch.no_grad():
        return reward_loss(model.eval(), collate_preference(pairs))[1]["accuracy"]


def test_a_tiny_model_learns_a_synthetic_preference(tmp_path: Path) -> None:
    torch.manual_seed(0)
    backbone = Transformer(TINY)
    apply_lora(backbone, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    model = RewardModel(backbone)
    held_out = synthetic_pairs(32, seed=1)
    before = accuracy(model, held_out)
    config = TrainConfig(max_steps=30, batch_size=8, lr=1e-2, warmup_steps=2, eval_every=0, save_every=0)
    result = train(model, reward_loss, synthetic_pairs(64, 0), collate_preference, config, tmp_path,
                   progress=False)  # fmt: skip
    assert {"accuracy", "margin"} <= result.history[0].keys()
    assert result.train_losses[-1] < result.train_losses[0]
    assert accuracy(model, held_out) >= 0.9 > before


def scorer_in_memory(tiny_checkpoint: Path) -> tuple[RewardScorer, str]:
    """A reward model on the tiny Llama with a random (not zero) adapter and head."""
    llm = LLM.load(str(tiny_checkpoint), device="cpu")
    apply_lora(llm.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(llm.model).values():
            layer.lora_B.weight.normal_(std=0.1)
    model = RewardModel(llm.model).eval()
    template = llm.tokenizer.chat_template
    assert template is not None
    return RewardScorer(model, llm.tokenizer, template), template


def test_a_saved_reward_model_scores_like_the_one_in_memory(tiny_checkpoint: Path, tmp_path: Path) -> None:
    scorer, template = scorer_in_memory(tiny_checkpoint)
    save_reward_model(scorer.model, tmp_path / "rm", str(tiny_checkpoint), template)
    loaded = load_reward_scorer(tmp_path / "rm")
    prompts = [[{"role": "user", "content": "The capital of France?"}]] * 3
    responses = ["Paris.", "def f(x):", "return x + 1 and some more words"]
    expected = scorer(prompts, responses)
    assert len(set(expected)) == 3
    assert loaded(prompts, responses) == expected  # bit for bit


def test_the_recipe_trains_and_saves_a_reward_model(tiny_checkpoint: Path, tmp_path: Path) -> None:
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PREFS))
    config = TrainConfig(max_steps=4, batch_size=2, lr=1e-2, warmup_steps=1, eval_every=0, save_every=0)
    args = FinetuneArgs(model=str(tiny_checkpoint), method="reward", data=data, out=tmp_path / "out",
                        targets=["q_proj", "v_proj"], max_len=64, train=config, progress=False)  # fmt: skip
    result = finetune(args)
    assert result.steps == 4 and "accuracy" in result.history[0] and result.val_losses
    folder = tmp_path / "out" / "reward"
    assert {p.name for p in folder.iterdir()} >= {
        "reward.json",
        "reward_head.safetensors",
        "adapter_config.json",
    }
    scores = load_reward_scorer(folder)([[{"role": "user", "content": "def f(x):"}]], ["return x + 1"])
    assert len(scores) == 1 and math.isfinite(scores[0])

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "chosen": "y"}) + "\n")
    args.data = bad
    with pytest.raises(ValueError, match="line 1: missing 'rejected'"):
        finetune(args)


def test_bad_reward_model_folders_are_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a reward model folder.*--method reward"):
        load_reward_scorer(tmp_path)
    scorer, template = scorer_in_memory(tiny_checkpoint)
    save_reward_model(scorer.model, tmp_path / "rm", "some-other-model", template)
    with pytest.raises(ValueError, match="trained on 'some-other-model'"):
        load_reward_scorer(tmp_path / "rm", model=str(tiny_checkpoint))
