"""`lmstack finetune`: load a model, tokenize the data, pick the trainable part, run the one training loop,
save what a user loads back (a PEFT-format adapter, or the full weights).

    full   every weight trains                       -> OUT/model.safetensors + chat_template.jinja
    lora   LoRA on the target modules                 -> OUT/adapter (PEFT format)
    qlora  NF4 frozen base + LoRA                     -> OUT/adapter (PEFT format; load on the float base)
    dpo    LoRA policy vs the same weights with the adapter disabled as reference -> OUT/adapter
    reward LoRA backbone + a scalar head, pairwise loss on preference pairs  -> OUT/reward (reward_model.py)
    ppo    LoRA policy, rollouts scored by a built-in reward or a reward model, KL to the adapter-free
           reference (train/ppo.py)                                        -> OUT/adapter + OUT/ppo.png

A thin recipe: copy it to change what it does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from hashlib import sha256
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmstack.adapters import save_adapter
from lmstack.api import LLM
from lmstack.data import (
    collate,
    collate_preference,
    load_preference_jsonl,
    load_sft_jsonl,
    tokenize_preference,
    tokenize_sft,
    train_val_split,
    training_chat_template,
)
from lmstack.data.prompts import load_prompt_jsonl, tokenize_prompts
from lmstack.lora import LoraConfig, apply_lora, disable_adapters, trainable_parameters
from lmstack.train import TrainConfig, TrainResult, train
from lmstack.train.loop import use_training_allocator
from lmstack.train.losses import dpo_loss_from_logprobs, sequence_logprob, sft_loss
from lmstack.train.ppo import (
    BUILTIN_REWARDS,
    PPOConfig,
    RewardFn,
    Sample,
    builtin_reward,
    plot_ppo,
    ppo_loss_fn,
    ppo_stream,
)
from lmstack.train.reward_model import (
    RewardModel,
    RewardScorer,
    check_base,
    load_reward_model,
    read_reward_config,
    reward_loss,
    save_reward_model,
)

METHODS = ("full", "lora", "qlora", "dpo", "reward", "ppo")


@dataclass
class FinetuneArgs:
    model: str
    method: str
    data: Path
    out: Path
    val: Path | None = None
    val_fraction: float = 0.05  # held out from `data` when no `val` file is given
    max_len: int = 512
    truncate: bool = False  # cut over-long examples instead of refusing them
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    beta: float = 0.1  # DPO
    reward: str | None = None  # PPO: a built-in reward (BUILTIN_REWARDS) or a reward model folder
    ppo: PPOConfig = field(default_factory=PPOConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    cache_dir: Path | None = None
    progress: bool = True


def _dpo_loss(beta: float):
    def loss_fn(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])  # (2B, T)
        labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
        b = batch["chosen_input_ids"].shape[0]
        policy = sequence_logprob(model, ids, labels)
        with torch.no_grad(), disable_adapters(model):
            reference = sequence_logprob(model, ids, labels)
        return dpo_loss_from_logprobs(policy[:b], policy[b:], reference[:b], reference[b:], beta)

    return loss_fn


def _file_digest(path: Path) -> str:
    return sha256(path.read_bytes()).hexdigest()[:16]


def finetune(args: FinetuneArgs) -> TrainResult:
    _check(args)
    lora = None
    if args.method != "full":
        lora = LoraConfig(
            r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=args.targets
        )
    reward_fn = _reward_fn(args) if args.method == "ppo" else None  # a reward model loads before training

    # QLoRA: each linear layer becomes NF4 as it loads, so the float model is never resident as a whole;
    # and loading's temporaries come from the training allocator, so they leave no holes in glibc's heap
    use_training_allocator()
    dtype = "nf4" if args.method == "qlora" else "float32"
    llm = LLM.load(args.model, device="cpu", dtype=dtype, cache_dir=args.cache_dir)
    tok = llm.tokenizer
    template, note = training_chat_template(tok)
    if args.progress:
        print(f"chat template: {note}")

    # data -> examples (errors name the file and line before any training starts)
    if args.method == "ppo":
        examples, val_examples, batch_fn = _prompts(args, llm, template)
    elif args.method in ("dpo", "reward"):
        examples, val_examples, batch_fn = _pairs(args, tok, template)
    else:
        examples, val_examples, batch_fn = _conversations(args, tok, template)

    # the trainable part
    model: nn.Module = llm.model
    if lora is not None:
        apply_lora(model, lora)
    else:
        model.requires_grad_(True)
    if args.method == "reward":
        model = RewardModel(llm.model)  # a fresh trainable head on the LoRA'd backbone
    if args.progress:
        print(trainable_parameters(model))

    setup = {
        "model": args.model,
        "method": args.method,
        "data": _file_digest(args.data),
        "max_len": args.max_len,
    }
    config, stream, loss_fn = args.train, None, _loss(args)
    if args.method == "ppo":
        assert reward_fn is not None
        setup.update(reward=args.reward, ppo=asdict(args.ppo))
        config = _ppo_steps(args.train, args.ppo, len(examples))
        stream = ppo_stream(llm.model, reward_fn, tok, args.ppo)
    result = train(
        model, loss_fn, examples, batch_fn, config, args.out, val_data=val_examples, seq_len=args.max_len,
        setup=setup, progress=args.progress, stream=stream,
    )  # fmt: skip
    _save(args, model, llm, template, result)
    return result


def _check(args: FinetuneArgs) -> None:
    """What can be refused before loading anything."""
    if args.method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {args.method!r}")
    for p in (args.data, args.val):
        if p is not None and not Path(p).is_file():
            raise ValueError(f"{p}: no such data file")
    if args.method != "ppo":
        return
    args.ppo.check()
    if args.reward is None:
        raise ValueError(
            "ppo needs a reward: --reward with a built-in one ("
            + "; ".join(f"{k}: {v}" for k, v in BUILTIN_REWARDS.items())
            + ") or a reward model folder (lmstack finetune --method reward writes OUT/reward)"
        )
    if args.val is not None:
        raise ValueError("ppo has no validation loss: drop --val (log.jsonl records every rollout's reward)")
    if args.train.grad_accum != 1:
        raise ValueError("ppo takes grad_accum=1: its minibatches (--minibatches) set the optimizer steps")


def _loss(args: FinetuneArgs) -> Any:
    if args.method == "ppo":
        return ppo_loss_fn(args.ppo.clip)
    if args.method == "reward":
        return reward_loss
    return _dpo_loss(args.beta) if args.method == "dpo" else sft_loss


def _conversations(args: FinetuneArgs, tok: Any, template: str) -> tuple[list[Any], list[Any], Any]:
    convs = load_sft_jsonl(args.data)
    examples = tokenize_sft(convs, tok, args.max_len, truncate=args.truncate, chat_template=template)
    if args.val:
        val_convs = load_sft_jsonl(args.val)
        val = tokenize_sft(val_convs, tok, args.max_len, truncate=args.truncate, chat_template=template)
        return examples, val, collate
    return *train_val_split(examples, args.val_fraction, seed=args.train.seed), collate


def _pairs(args: FinetuneArgs, tok: Any, template: str) -> tuple[list[Any], list[Any], Any]:
    pairs = load_preference_jsonl(args.data)
    examples = tokenize_preference(pairs, tok, args.max_len, truncate=args.truncate, chat_template=template)
    batch_fn = collate_preference  # padding is never labelled, and causal attention never sees it
    if args.val:
        val_pairs = load_preference_jsonl(args.val)
        val = tokenize_preference(
            val_pairs, tok, args.max_len, truncate=args.truncate, chat_template=template
        )
        return examples, val, batch_fn
    return *train_val_split(examples, args.val_fraction, seed=args.train.seed), batch_fn


def _prompts(args: FinetuneArgs, llm: LLM, template: str) -> tuple[list[Any], list[Any], Any]:
    """PPO's data: prompts only, short enough that prompt + response fit max_len and the context window."""
    room = min(args.max_len, llm.config.max_seq_len) - args.ppo.max_new_tokens
    if room < 1:
        raise ValueError(
            f"max_new_tokens={args.ppo.max_new_tokens} leaves no room for a prompt in max_len={args.max_len} "
            f"(context window {llm.config.max_seq_len}); lower max_new_tokens or raise max_len"
        )
    prompts = tokenize_prompts(load_prompt_jsonl(args.data), llm.tokenizer, template, room)

    def batch_fn(items: list[Any]) -> dict[str, Any]:
        return {"prompts": items}

    return prompts, [], batch_fn


def _ppo_steps(config: TrainConfig, ppo: PPOConfig, n_prompts: int) -> TrainConfig:
    """Steps and checkpoints on rollout boundaries (a checkpoint mid-rollout could not resume it)."""
    per = ppo.steps_per_rollout
    rollouts = math.ceil(config.max_steps / per) if config.max_steps else None
    if rollouts is None:
        rollouts = max(1, math.ceil(config.epochs * math.ceil(n_prompts / config.batch_size)))
    save_every = math.ceil(config.save_every / per) * per if config.save_every else 0
    return replace(config, max_steps=rollouts * per, save_every=save_every)


def _reward_fn(args: FinetuneArgs) -> RewardFn:
    """--reward as a function of the samples: a built-in one, or a reward model folder trained on this
    very base model (loaded onto a second copy of it; the policy's tokenizer renders what it scores)."""
    assert args.reward is not None
    if (fn := builtin_reward(args.reward)) is not None:
        return fn
    if not Path(args.reward).is_dir():
        raise ValueError(
            f"unknown reward {args.reward!r}: not a built-in one ({', '.join(BUILTIN_REWARDS)}) nor a reward "
            "model folder (lmstack finetune --method reward writes OUT/reward)"
        )
    scorer = load_reward_scorer(args.reward, model=args.model, cache_dir=args.cache_dir)

    def score(samples: Sequence[Sample]) -> list[float]:
        return scorer([s.prompt for s in samples], [s.text for s in samples])

    return score


def load_reward_scorer(
    path: str | Path, *, model: str | None = None, cache_dir: Path | None = None
) -> RewardScorer:
    """The reward model in `path` as a function (prompts as messages, responses) -> scores. `model`: the
    base model it must have been trained on (default: the one its reward.json names)."""
    base = model or read_reward_config(path)["base_model"]
    check_base(path, base)  # before loading anything
    llm = LLM.load(base, device="cpu", cache_dir=cache_dir)
    reward_model = load_reward_model(path, llm.model, base)
    template = (Path(path) / "chat_template.jinja").read_text()
    return RewardScorer(reward_model, llm.tokenizer, template)


def _save(args: FinetuneArgs, model: nn.Module, llm: LLM, template: str, result: TrainResult) -> None:
    out = Path(args.out)
    tok = llm.tokenizer
    if isinstance(model, RewardModel):
        save_reward_model(model, out / "reward", args.model, template)
    elif args.method != "full":
        save_adapter(model, out / "adapter", base_model_name=args.model)
        if tok.chat_template is None:  # a base model trained on the default template is served with it
            (out / "adapter" / "chat_template.jinja").write_text(template)
    else:
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if llm.config.tie_embeddings:
            state.pop("output.weight", None)
        save_file(state, str(out / "model.safetensors"))
        (out / "chat_template.jinja").write_text(template)
    if args.method == "ppo":
        plot_ppo(
            result.history,
            out / "ppo.png",
            kl_bound=args.ppo.kl_bound,
            steps_per_rollout=args.ppo.steps_per_rollout,
        )
