"""PPO for language models (Schulman et al. 2017; Ziegler et al. 2019) with a leave-one-out baseline and a
KL penalty to the reference, run by the one training loop through its `stream` hook.

    each batch of prompts (the loop's data batch):
        rollout   sample k responses per prompt from the policy (LoRA on), temperature 1
                  score them: reward r; per-token KL to the reference (same weights, adapters disabled)
                  s_i = r_i - beta * KL_i                         (KL_i summed over the response's tokens)
                  A_i = s_i - mean of the other k-1 scores of its prompt, then / std over the rollout
        update    ppo_epochs passes, each in `minibatches` optimizer steps (one loop step each), of the
                  clipped surrogate  -min(rho A, clip(rho, 1 - eps, 1 + eps) A),  rho = pi / pi_old per token,
                  averaged over the minibatch's response tokens

No value head: the baseline is the leave-one-out mean of the prompt's other samples (RLOO, Ahmadian et al.
2024), which needs no critic to train and is unbiased; the advantage is one number per response, shared
by its tokens. The clipped ratio keeps several minibatch epochs per rollout from moving the policy far.

The KL estimate per token is log pi_old(y_t) - log ref(y_t) at the sampled token (an unbiased estimate of
KL(pi || ref) summed over the response). beta is `kl_coef`, or with a `kl_bound` B a barrier that
needs no state to checkpoint: beta = kl_coef * B / (B - KL) for the rollout's mean KL, growing without
limit as the KL nears the bound; a rollout past it drops the reward from its scores (s_i = -KL_i), so its
update only pulls the policy back toward the reference.

The policy runs without dropout both when sampling and in the loss, so rho compares one function at two
parameter values. Letters: N responses in a rollout, T tokens, k responses per prompt.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmstack.data.prompts import PromptExample
from lmstack.data.sft import Messages
from lmstack.generate.sampling import draw
from lmstack.lora import disable_adapters, lora_layers
from lmstack.models.transformer import Transformer
from lmstack.tokenizer import Tokenizer
from lmstack.train.losses import IGNORE, labelled_logits

Batch = dict[str, Any]


@dataclass(frozen=True)
class PPOConfig:
    samples_per_prompt: int = 4  # k: the group the leave-one-out baseline is taken over
    max_new_tokens: int = 32
    ppo_epochs: int = 2  # passes over each rollout
    minibatches: int = 2  # optimizer steps per pass
    clip: float = 0.2  # epsilon of the clipped ratio
    kl_coef: float = 0.05  # reward - kl_coef * KL(policy || reference), per response
    kl_bound: float | None = None  # nats per response: the penalty grows near it, past it only -KL counts
    normalize: bool = True  # divide advantages by their std over the rollout

    def check(self) -> PPOConfig:
        problems = []
        for name in ("samples_per_prompt", "max_new_tokens", "ppo_epochs", "minibatches"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                problems.append(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not 0 < self.clip < 1:
            problems.append(f"clip must be in (0, 1), got {self.clip}")
        if not (math.isfinite(self.kl_coef) and self.kl_coef >= 0):
            problems.append(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.kl_bound is not None and not self.kl_bound > 0:
            problems.append(f"kl_bound must be > 0 (or None for no bound), got {self.kl_bound}")
        if problems:
            raise ValueError("invalid PPOConfig: " + "; ".join(problems))
        return self

    @property
    def steps_per_rollout(self) -> int:
        return self.ppo_epochs * self.minibatches


@dataclass(frozen=True)
class Sample:
    """One response the policy wrote, as a reward function sees it."""

    prompt: Messages
    prompt_ids: list[int]
    completion_ids: list[int]  # generated tokens, the stop token included when `finished`
    text: str  # the decoded response, without the stop token
    finished: bool  # ended with a stop token (else it ran into max_new_tokens)


RewardFn = Callable[[Sequence[Sample]], Sequence[float]]


# --- cheap built-in rewards ---------------------------------------------------------------------------------
def _length(n: int) -> RewardFn:
    """1 for a response that ends (stop token) within n tokens, else 0."""
    return lambda samples: [float(s.finished and len(s.completion_ids) <= n) for s in samples]


def _contains(word: str, present: bool) -> RewardFn:
    pattern = re.compile(rf"(?<!\w){re.escape(word)}(?!\w)", re.IGNORECASE)
    return lambda samples: [float(bool(pattern.search(s.text)) == present) for s in samples]


BUILTIN_REWARDS = {
    "length:N": "1 if the response ends (stop token) within N tokens, else 0",
    "contains:WORD": "1 if the response contains WORD (case-insensitive, whole word), else 0",
    "avoid:WORD": "1 if the response does not contain WORD, else 0",
}


def builtin_reward(spec: str) -> RewardFn | None:
    """The built-in reward `spec` names (see BUILTIN_REWARDS), None if it names none; a known name with a
    bad argument is a ValueError."""
    name, sep, arg = spec.partition(":")
    if not sep or name not in ("length", "contains", "avoid"):
        return None
    if name == "length":
        if not arg.isdigit() or int(arg) < 1:
            raise ValueError(f"reward {spec!r}: length:N needs a whole number of tokens N >= 1")
        return _length(int(arg))
    if not arg.strip():
        raise ValueError(f"reward {spec!r}: {name}:WORD needs a word")
    return _contains(arg.strip(), present=name == "contains")


# --- rollouts -----------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_group(
    model: Transformer, prompt_ids: list[int], k: int, max_new_tokens: int, stop_ids: frozenset[int]
) -> list[tuple[list[int], bool]]:
    """k responses to one prompt at temperature 1, decoded together through a k-row KV cache (the rows
    share the prompt, so they need no padding): (token ids including the stop token, finished) each."""
    device = model.tok_embeddings.weight.device
    P = len(prompt_ids)
    stops = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    model.setup_caches(k, P + max_new_tokens)
    try:
        idx = torch.tensor([prompt_ids], device=device).expand(k, -1)  # (k, P)
        logits = model(idx, torch.arange(P, device=device))[:, -1]  # (k, V)
        out = torch.zeros(k, max_new_tokens, dtype=torch.long, device=device)
        length = torch.full((k,), max_new_tokens, device=device)
        done = torch.zeros(k, dtype=torch.bool, device=device)
        for t in range(max_new_tokens):
            token = draw(logits.float().softmax(-1))  # (k,)
            out[:, t] = token
            stopped = torch.isin(token, stops) & ~done
            length[stopped] = t + 1
            done |= stopped
            if bool(done.all()) or t + 1 == max_new_tokens:
                break
            logits = model(token.view(-1, 1), torch.tensor([P + t], device=device))[:, -1]  # (k, V)
    finally:
        model.clear_caches()
    rows, lengths, finished = out.tolist(), length.tolist(), done.tolist()
    return [(row[:n], f) for row, n, f in zip(rows, lengths, finished, strict=True)]


def response_logprobs(
    model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p of each labelled token (B, T-1), 0 elsewhere, and the mask; the LM head runs on the response
    positions only (`labelled_logits`)."""
    logits, targets, mask = labelled_logits(model, input_ids, labels)  # (n, V), (n,), (B, T-1)
    picked = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (n,)
    per_token = torch.zeros(mask.shape, dtype=picked.dtype, device=picked.device)
    return per_token.masked_scatter(mask, picked), mask


def collate_samples(samples: Sequence[Sample], pad_id: int = 0) -> Batch:
    """Prompt + response right-padded to one length: input_ids, labels (the response only) (N, T)."""
    T = max(len(s.prompt_ids) + len(s.completion_ids) for s in samples)
    input_ids = torch.full((len(samples), T), pad_id, dtype=torch.long)  # (N, T)
    labels = torch.full((len(samples), T), IGNORE, dtype=torch.long)
    for row, s in enumerate(samples):
        ids = s.prompt_ids + s.completion_ids
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, len(s.prompt_ids) : len(ids)] = torch.tensor(s.completion_ids)
    return {"input_ids": input_ids, "labels": labels}


def advantages(scores: torch.Tensor, k: int, normalize: bool = True) -> torch.Tensor:
    """Leave-one-out advantages (N,) of scores (N,) in consecutive groups of k (one group per prompt):
    A_i = s_i - mean of the group's other scores; with k = 1 the baseline is the rollout mean."""
    if k > 1:
        groups = scores.view(-1, k)  # (N / k, k)
        adv = (groups - (groups.sum(-1, keepdim=True) - groups) / (k - 1)).view(-1)
    else:
        adv = scores - scores.mean()
    if normalize and adv.numel() > 1:
        adv = adv / (adv.std() + 1e-6)
    return adv


def kl_coefficient(mean_kl: float, config: PPOConfig) -> float:
    """beta for a rollout whose responses average `mean_kl` nats: kl_coef without a bound, else the barrier
    kl_coef * B / (B - KL), infinite at and past the bound B."""
    if config.kl_bound is None or mean_kl <= 0:
        return config.kl_coef
    if mean_kl >= config.kl_bound:
        return math.inf
    return config.kl_coef * config.kl_bound / (config.kl_bound - mean_kl)


def rollout(
    model: Transformer,
    prompts: Sequence[PromptExample],
    reward_fn: RewardFn,
    tokenizer: Tokenizer,
    config: PPOConfig,
) -> Batch:
    """Sample, score and take the log-probs every update of this rollout needs; see the module docstring."""
    if not lora_layers(model):
        raise ValueError("PPO's reference is the model with its LoRA adapters disabled: apply_lora first")
    was = model.training
    model.eval()
    try:
        samples = []
        for p in prompts:
            for ids, finished in sample_group(
                model, p.input_ids, config.samples_per_prompt, config.max_new_tokens, tokenizer.stop_ids
            ):
                text = tokenizer.decode(ids[:-1] if finished else ids)
                samples.append(Sample(p.messages, p.input_ids, ids, text, finished))
        device = model.tok_embeddings.weight.device
        rewards = _rewards(reward_fn, samples).to(device)
        batch = {k: v.to(device) for k, v in collate_samples(samples).items()}
        with torch.no_grad():
            old, mask = response_logprobs(model, batch["input_ids"], batch["labels"])  # (N, T-1)
            with disable_adapters(model):
                ref, _ = response_logprobs(model, batch["input_ids"], batch["labels"])
    finally:
        model.train(was)
    kl = (old - ref).sum(-1)  # (N,) nats per response; both are 0 off the response
    beta = kl_coefficient(float(kl.mean()), config)
    over = math.isinf(beta)
    scores = -kl if over else rewards - beta * kl
    batch["old_logprobs"] = old
    batch["advantages"] = advantages(scores, config.samples_per_prompt, config.normalize)
    batch["stats"] = {
        "reward": float(rewards.mean()),
        "kl": float(kl.mean()),
        "response_tokens": float(mask.sum(-1).float().mean()),
        "finished": sum(s.finished for s in samples) / len(samples),
        "kl_coef": beta if not over else -1.0,  # -1: past the bound
        "over_kl_bound": float(over),
    }
    batch["samples"] = samples
    return batch


def _rewards(reward_fn: RewardFn, samples: list[Sample]) -> torch.Tensor:
    values = list(reward_fn(samples))
    if len(values) != len(samples):
        raise ValueError(f"the reward function returned {len(values)} rewards for {len(samples)} responses")
    rewards = torch.tensor([float(v) for v in values], dtype=torch.float32)  # (N,)
    if not torch.isfinite(rewards).all():
        raise ValueError(f"the reward function returned a non-finite reward: {values}")
    return rewards


def minibatch(batch: Batch, rows: torch.Tensor) -> Batch:
    labels = batch["labels"][rows]
    return {
        "input_ids": batch["input_ids"][rows],
        "labels": labels,
        "old_logprobs": batch["old_logprobs"][rows],
        "advantages": batch["advantages"][rows],
        "stats": batch["stats"],
        "n_tokens": int((labels != IGNORE).sum()),
    }


def ppo_stream(
    model: Transformer, reward_fn: RewardFn, tokenizer: Tokenizer, config: PPOConfig
) -> Callable[[Iterator[Batch]], Iterator[Batch]]:
    """The training loop's `stream`: each data batch {"prompts": [PromptExample]} becomes one rollout and
    ppo_epochs x minibatches loss batches, rows shuffled per pass (loop RNG, so a resumed run repeats)."""
    config = config.check()

    def stream(prompt_batches: Iterator[Batch]) -> Iterator[Batch]:
        for data in prompt_batches:
            batch = rollout(model, data["prompts"], reward_fn, tokenizer, config)
            n = batch["input_ids"].shape[0]
            if n < config.minibatches:
                raise ValueError(f"a rollout of {n} responses cannot be split into {config.minibatches} "
                                 "minibatches; use more prompts per batch or fewer minibatches")  # fmt: skip
            for _ in range(config.ppo_epochs):
                for rows in torch.randperm(n).tensor_split(config.minibatches):
                    yield minibatch(batch, rows)

    return stream


# --- the loss -----------------------------------------------------------------------------------------------
def clipped_surrogate(
    logprobs: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-mean of -min(rho A, clip(rho) A) over the response tokens; logprobs, old, mask (N, T-1), adv
    (N,). Metrics: share of tokens whose ratio was clipped, and KL(old || new) by the k3 estimator."""
    log_ratio = (logprobs - old) * mask
    ratio = log_ratio.exp()  # (N, T-1)
    a = adv[:, None]  # (N, 1)
    surrogate = torch.min(ratio * a, ratio.clamp(1 - clip, 1 + clip) * a)
    n = mask.sum().clamp(min=1)
    loss = -(surrogate * mask).sum() / n
    with torch.no_grad():
        clipped = ((ratio - 1).abs() > clip) & mask
        approx_kl = ((ratio - 1) - log_ratio) * mask
    return loss, {"clip_frac": float(clipped.sum() / n), "approx_kl": float(approx_kl.sum() / n)}


@contextmanager
def no_dropout(model: nn.Module) -> Iterator[None]:
    """Dropout layers in eval mode, the rest as it was (gradient checkpointing still needs training mode)."""
    layers = [m for m in model.modules() if isinstance(m, nn.Dropout) and m.training]
    for m in layers:
        m.eval()
    try:
        yield
    finally:
        for m in layers:
            m.train()


def ppo_loss_fn(clip: float) -> Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, float]]]:
    def loss_fn(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        with no_dropout(model):  # rho compares the same function the rollout sampled from
            logprobs, mask = response_logprobs(model, batch["input_ids"], batch["labels"])
        loss, metrics = clipped_surrogate(logprobs, batch["old_logprobs"], batch["advantages"], mask, clip)
        return loss, {**batch["stats"], **metrics}

    return loss_fn


# --- the plot -----------------------------------------------------------------------------------------------
def plot_ppo(
    history: list[dict[str, Any]], path: Path, *, kl_bound: float | None = None, steps_per_rollout: int = 1
) -> Path | None:
    """Mean reward (left axis) and KL to the reference (right axis), one point per rollout (at its first
    step: every step of a rollout logs the same numbers), as a PNG; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in history if "reward" in r and (r["step"] - 1) % steps_per_rollout == 0]
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["reward"] for r in rows], "o-", color="tab:blue", ms=3, label="mean reward")
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward", color="tab:blue")
    ax.grid(alpha=0.3)
    kl_ax = ax.twinx()
    kl_ax.plot(steps, [r["kl"] for r in rows], "s-", color="tab:red", ms=3, label="KL to reference")
    if kl_bound is not None:
        kl_ax.axhline(kl_bound, color="tab:red", ls="--", lw=1, label=f"KL bound {kl_bound:g}")
    kl_ax.set_ylabel("KL to reference (nats / response)", color="tab:red")
    handles = ax.get_legend_handles_labels()[0] + kl_ax.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
