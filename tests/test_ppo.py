"""PPO: advantages and the clipped surrogate against hand-computed values, the built-in rewards, rollout
invariants on the tiny Llama (KV-cached sampling == full-forward sampling, old log-probs == the policy's,
KL == policy minus the adapter-free reference), a run through the one training loop that raises the reward
and resumes bit for bit, and the recipe's refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmstack.api import LLM
from lmstack.data.prompts import tokenize_prompts
from lmstack.generate.sampling import draw
from lmstack.lora import LoraConfig, apply_lora, disable_adapters, lora_layers
from lmstack.recipes.finetune import FinetuneArgs, finetune
from lmstack.train import TrainConfig, train
from lmstack.train.losses import token_logprobs
from lmstack.train.ppo import (
    PPOConfig,
    Sample,
    advantages,
    builtin_reward,
    clipped_surrogate,
    kl_coefficient,
    ppo_loss_fn,
    ppo_stream,
    rollout,
    sample_group,
)
from lmstack.train.reward_model import RewardModel, save_reward_model

QUESTIONS = ["The capital of France?", "def f(x):", "Name a city.", "Hello"]


def test_leave_one_out_advantages_by_hand() -> None:
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert advantages(scores, 2, normalize=False).tolist() == [-1.0, 1.0, -3.0, 3.0]
    by_hand = [1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3, 6 - 6 / 3]  # each minus the mean of the other three
    assert torch.allclose(advantages(scores, 4, normalize=False), torch.tensor(by_hand))
    assert advantages(scores, 1, normalize=False).tolist() == [-2.0, -1.0, 0.0, 3.0]  # minus the mean
    raw = torch.tensor([-1.0, 1.0, -3.0, 3.0])
    assert torch.allclose(advantages(scores, 2), raw / (20 / 3) ** 0.5)  # divided by the (unbiased) std


def test_clipped_surrogate_by_hand() -> None:
    old = torch.zeros(2, 2)
    new = torch.log(torch.tensor([[1.5, 0.5], [1.5, 0.5]])).requires_grad_(True)  # ratios
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 2, dtype=torch.bool)
    loss, metrics = clipped_surrogate(new, old, adv, mask, clip=0.2)
    # A=+1: min(1.5, 1.2) = 1.2, min(0.5, 0.8) = 0.5;  A=-1: min(-1.5, -1.2) = -1.5, min(-0.5, -0.8) = -0.8
    assert float(loss.detach()) == pytest.approx(-(1.2 + 0.5 - 1.5 - 0.8) / 4)
    assert metrics["clip_frac"] == 1.0
    loss.backward()
    assert new.grad is not None
    # the clipped branch carries no gradient; the unclipped one d(-rho A / 4)/d log rho = -rho A / 4
    assert torch.allclose(new.grad, torch.tensor([[0.0, -0.5 / 4], [1.5 / 4, 0.0]]))
    masked, _ = clipped_surrogate(new.detach(), old, adv, torch.tensor([[True, False], [False, False]]), 0.2)
    assert float(masked) == pytest.approx(-1.2)  # the mean over response tokens only


def sample(text: str, n: int, finished: bool) -> Sample:
    return Sample([{"role": "user", "content": "q"}], [1], list(range(n)), text, finished)


def test_builtin_rewards() -> None:
    samples = [sample("Yes, Paris.", 3, True), sample("paris is big", 5, True), sample("No", 2, False)]
    assert list(builtin_reward("length:3")(samples)) == [1.0, 0.0, 0.0]  # the third never ended
    assert list(builtin_reward("contains:Paris")(samples)) == [1.0, 1.0, 0.0]
    assert list(builtin_reward("avoid:paris")(samples)) == [0.0, 0.0, 1.0]
    assert list(builtin_reward("contains:par")(samples)) == [0.0, 0.0, 0.0]  # whole words only
    assert builtin_reward("sentiment") is None and builtin_reward("./models:v2") is None
    for bad in ("length:0", "length:x", "contains:"):
        with pytest.raises(ValueError, match=bad):
            builtin_reward(bad)


def policy(tiny_checkpoint: Path, perturb: float = 0.05) -> LLM:
    """The tiny Llama with LoRA on every linear and the output head; B ~ N(0, perturb^2), or 0."""
    llm = LLM.load(str(tiny_checkpoint), device="cpu")
    torch.manual_seed(0)  # LoRA's A initialisation
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "output"]
    apply_lora(llm.model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    if perturb:
        torch.manual_seed(1)
        with torch.no_grad():
            for layer in lora_layers(llm.model).values():
                layer.lora_B.weight.normal_(std=perturb)
    return llm


def prompts(llm: LLM) -> list:
    template = llm.tokenizer.chat_template
    assert template is not None
    return tokenize_prompts(
        [[{"role": "user", "content": q}] for q in QUESTIONS], llm.tokenizer, template, 64
    )


def test_cached_sampling_draws_what_full_forwards_draw(tiny_checkpoint: Path) -> None:
    llm = policy(tiny_checkpoint)
    model, ids = llm.model.eval(), prompts(llm)[0].input_ids
    stops = frozenset({2})
    torch.manual_seed(5)
    cached = sample_group(model, ids, 3, 6, stops)
    torch.manual_seed(5)
    rows, done = [list(ids) for _ in range(3)], [False] * 3
    with torch.no_grad():
        for _ in range(6):  # one full forward per token, the same noise
            tokens = draw(model(torch.tensor(rows))[:, -1].float().softmax(-1)).tolist()
            for r, t in enumerate(tokens):
                if not done[r]:
                    rows[r].append(t)
                    done[r] = t in stops
            if all(done):
                break
    assert cached == [(row[len(ids) :], d) for row, d in zip(rows, done, strict=True)]


def test_rollout_log_probs_kl_and_first_ratio(tiny_checkpoint: Path) -> None:
    llm = policy(tiny_checkpoint)
    model, tok = llm.model.train(), llm.tokenizer
    config = PPOConfig(samples_per_prompt=2, max_new_tokens=6, kl_coef=0.1, normalize=False)
    torch.manual_seed(0)
    batch = rollout(model, prompts(llm)[:2], lambda s: [float(len(x.text)) for x in s], tok, config)
    samples, scores = batch["samples"], []
    assert len(samples) == 4 and model.training  # the mode is restored
    for row, s in enumerate(samples):
        n = len(s.prompt_ids) + len(s.completion_ids)
        ids = torch.tensor([s.prompt_ids + s.completion_ids])
        labelled = batch["labels"][row] != -100
        assert labelled.sum() == len(s.completion_ids) and not labelled[: len(s.prompt_ids)].any()
        assert s.finished == (s.completion_ids[-1] in tok.stop_ids)
        with torch.no_grad():
            alone, _ = token_logprobs(model(ids), batch["labels"][row : row + 1, :n])  # no padding
            with disable_adapters(model):
                ref, _ = token_logprobs(model(ids), batch["labels"][row : row + 1, :n])
        assert torch.allclose(batch["old_logprobs"][row, : n - 1], alone[0], atol=1e-5)
        scores.append(len(s.text) - 0.1 * float((alone - ref).sum()))  # reward - kl_coef * KL
    assert batch["stats"]["kl"] != 0.0
    expected = advantages(torch.tensor(scores), 2, normalize=False)
    assert torch.allclose(batch["advantages"], expected, atol=1e-4)
    loss_fn = ppo_loss_fn(0.2)
    mini = {k: batch[k] for k in ("input_ids", "labels", "old_logprobs", "advantages", "stats")}
    _, metrics = loss_fn(model, mini)
    assert metrics["clip_frac"] == 0.0 and abs(metrics["approx_kl"]) < 1e-6  # ratio 1 before any update


def test_over_the_kl_bound_the_reward_is_dropped(tiny_checkpoint: Path) -> None:
    llm = policy(tiny_checkpoint, perturb=0.5)  # far from the reference
    config = PPOConfig(samples_per_prompt=2, max_new_tokens=6, kl_coef=0.1, kl_bound=1e-6, normalize=False)
    torch.manual_seed(0)
    batch = rollout(
        llm.model, prompts(llm)[:2], lambda s: [5.0 * i for i in range(len(s))], llm.tokenizer, config
    )
    assert batch["stats"]["over_kl_bound"] == 1.0 and batch["stats"]["reward"] == 7.5
    labelled = batch["labels"][:, 1:] != -100
    with torch.no_grad(), disable_adapters(llm.model):
        ref, _ = token_logprobs(llm.model(batch["input_ids"]), batch["labels"])
    kl = ((batch["old_logprobs"] - ref) * labelled).sum(-1)
    assert torch.allclose(batch["advantages"], advantages(-kl, 2, normalize=False), atol=1e-5)


def test_the_kl_coefficient_grows_as_a_barrier_near_the_bound() -> None:
    assert kl_coefficient(3.0, PPOConfig(kl_coef=0.1)) == 0.1  # no bound: fixed
    bounded = PPOConfig(kl_coef=0.1, kl_bound=4.0)
    assert kl_coefficient(-0.5, bounded) == 0.1  # a negative estimate counts as no KL
    assert kl_coefficient(2.0, bounded) == pytest.approx(0.2)  # 0.1 * 4 / (4 - 2)
    assert kl_coefficient(3.0, bounded) == pytest.approx(0.4)
    assert kl_coefficient(4.0, bounded) == float("inf")


def token_share(samples: list[Sample]) -> list[float]:
    """A dense reward the tiny model can learn: the share of response tokens with an id below 100."""
    return [sum(i < 100 for i in s.completion_ids) / len(s.completion_ids) for s in samples]


def run_ppo(tiny_checkpoint: Path, out: Path, steps: int, stop_after: int | None = None) -> list[dict]:
    llm = policy(tiny_checkpoint, perturb=0.0)
    config = PPOConfig(samples_per_prompt=4, max_new_tokens=8, kl_coef=0.01)
    train_config = TrainConfig(max_steps=steps, batch_size=4, lr=1e-2, warmup_steps=1, eval_every=0,
                               save_every=config.steps_per_rollout)  # fmt: skip
    stream = ppo_stream(llm.model, token_share, llm.tokenizer, config)
    result = train(
        llm.model, ppo_loss_fn(config.clip), prompts(llm), lambda items: {"prompts": items}, train_config,
        out, stream=stream, progress=False, stop_after=stop_after,
    )  # fmt: skip
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in result.history]


def test_ppo_raises_the_reward_of_a_tiny_model(tiny_checkpoint: Path, tmp_path: Path) -> None:
    history = run_ppo(tiny_checkpoint, tmp_path, steps=60)
    rollouts = [r for r in history if (r["step"] - 1) % 4 == 0]  # the first minibatch of each rollout
    first, last = rollouts[:3], rollouts[-3:]
    mean = lambda rows: sum(r["reward"] for r in rows) / len(rows)  # noqa: E731
    assert mean(last) > mean(first) + 0.2
    assert all(r["kl"] >= 0 for r in last) and max(r["clip_frac"] for r in history) > 0


def test_a_resumed_ppo_run_repeats_the_uninterrupted_one(tiny_checkpoint: Path, tmp_path: Path) -> None:
    whole = run_ppo(tiny_checkpoint, tmp_path / "whole", steps=8)
    run_ppo(tiny_checkpoint, tmp_path / "cut", steps=8, stop_after=4)  # stops on the rollout boundary
    assert run_ppo(tiny_checkpoint, tmp_path / "cut", steps=8) == whole


# --- the recipe -------------------------------------------------------------------------------------------
def ppo_args(tiny_checkpoint: Path, tmp_path: Path, **kw) -> FinetuneArgs:
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUESTIONS))
    train_config = TrainConfig(max_steps=3, batch_size=2, lr=1e-2, warmup_steps=1, save_every=0)
    defaults = dict(
        model=str(tiny_checkpoint), method="ppo", data=data, out=tmp_path / "out", max_len=64,
        targets=["q_proj", "v_proj"], train=train_config, progress=False,
        ppo=PPOConfig(samples_per_prompt=2, max_new_tokens=6),
    )  # fmt: skip
    return FinetuneArgs(**{**defaults, **kw})  # type: ignore[arg-type]


def test_the_recipe_runs_ppo_with_a_builtin_reward_or_a_reward_model(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    result = finetune(ppo_args(tiny_checkpoint, tmp_path, reward="length:4"))
    assert result.steps == 4  # 3 steps rounded up to whole rollouts of 2 epochs x 2 minibatches
    out = tmp_path / "out"
    assert (out / "adapter" / "adapter_config.json").exists() and (out / "ppo.png").stat().st_size > 1000
    assert {"reward", "kl", "clip_frac", "response_tokens"} <= result.history[0].keys()

    llm = LLM.load(str(tiny_checkpoint), device="cpu")
    apply_lora(llm.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    assert llm.tokenizer.chat_template is not None
    save_reward_model(
        RewardModel(llm.model), tmp_path / "rm", str(tiny_checkpoint), llm.tokenizer.chat_template
    )
    result = finetune(ppo_args(tiny_checkpoint, tmp_path, reward=str(tmp_path / "rm"), out=tmp_path / "o2"))
    assert result.steps == 4 and all(r["reward"] != 0 for r in result.history)


def test_the_recipe_refuses_bad_ppo_input(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ppo needs a reward: --reward.*length:N"):
        finetune(ppo_args(tiny_checkpoint, tmp_path))
    with pytest.raises(ValueError, match="unknown reward 'sentiment'"):
        finetune(ppo_args(tiny_checkpoint, tmp_path, reward="sentiment"))
    with pytest.raises(ValueError, match="length:N needs a whole number"):
        finetune(ppo_args(tiny_checkpoint, tmp_path, reward="length:many"))
    with pytest.raises(ValueError, match="grad_accum=1"):
        finetune(ppo_args(tiny_checkpoint, tmp_path, reward="length:4", train=TrainConfig(grad_accum=2)))
    with pytest.raises(ValueError, match="clip must be in"):
        finetune(ppo_args(tiny_checkpoint, tmp_path, reward="length:4", ppo=PPOConfig(clip=1.5)))
    with pytest.raises(ValueError, match="leaves no room for a prompt"):
        finetune(ppo_args(tiny_checkpoint, tmp_path, reward="length:4", ppo=PPOConfig(max_new_tokens=64)))
    llm = LLM.load(str(tiny_checkpoint), device="cpu")
    apply_lora(llm.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    assert llm.tokenizer.chat_template is not None
    save_reward_model(
        RewardModel(llm.model), tmp_path / "rm", "smollm2-135m-instruct", llm.tokenizer.chat_template
    )
    with pytest.raises(ValueError, match="trained on 'smollm2-135m-instruct'"):
        finetune(ppo_args(tiny_checkpoint, tmp_path, reward=str(tmp_path / "rm")))
    assert not (tmp_path / "out").exists()  # nothing written by any refused run
