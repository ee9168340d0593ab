"""PPO demonstration (issue #5): the mean reward rises while the KL to the reference stays under a bound.

smollm2-135m-instruct + LoRA, prompts from the packaged chatterbot corpus (distinct questions, each with
the system message "Answer in one short sentence."), and a cheap reward: `length:N`, 1 when the answer
ends (stop token) within N tokens, else 0. The run is the real recipe (`lmstack finetune --method ppo`,
in-process), then the base model (adapters disabled) and the tuned one are compared on held-out prompts
by the same rollout code: mean reward, share finished, KL to the reference.

    nice -n 5 .venv/bin/python eval/ppo_demo.py                    # ~15 min on 2 contended CPU cores
    .venv/bin/python eval/ppo_demo.py --rollouts 2 --held-out 2    # a quick look

Writes docs/img/ppo.png (reward and KL per step) and prints a JSON summary (also to --json if given).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

import torch

from lmstack.adapters import load_adapter
from lmstack.api import LLM
from lmstack.data.corpora import chatterbot_pairs
from lmstack.data.prompts import tokenize_prompts
from lmstack.lora import disable_adapters
from lmstack.recipes.finetune import FinetuneArgs, finetune
from lmstack.train import TrainConfig
from lmstack.train.ppo import PPOConfig, builtin_reward, plot_ppo, rollout

SYSTEM = "Answer in one short sentence."
ROOT = Path(__file__).resolve().parents[1]


def questions(n_train: int, n_held_out: int, seed: int) -> tuple[list[str], list[str]]:
    """Distinct chatterbot questions, shuffled; held-out ones are never trained on."""
    texts = sorted({c[0]["content"] for c in chatterbot_pairs() if c[0]["role"] == "user"})
    random.Random(seed).shuffle(texts)
    return texts[n_held_out : n_held_out + n_train], texts[:n_held_out]


def messages(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


def held_out_stats(args: argparse.Namespace, adapter: Path, held_out: list[str]) -> dict[str, dict]:
    """Mean reward / finished share / KL on held-out prompts: base (adapters off) vs tuned, same noise."""
    llm = LLM.load(args.model, device="cpu")
    load_adapter(llm.model, adapter, base_model_name=args.model)
    tok, template = llm.tokenizer, llm.tokenizer.chat_template
    assert template is not None
    prompts = tokenize_prompts([messages(q) for q in held_out], tok, template, 256)
    config = PPOConfig(samples_per_prompt=args.k, max_new_tokens=args.max_new_tokens, kl_coef=args.kl_coef)
    reward_fn = builtin_reward(args.reward)
    assert reward_fn is not None
    out = {}
    for name in ("base", "tuned"):
        torch.manual_seed(args.seed + 1)
        if name == "base":
            with disable_adapters(llm.model):
                batch = rollout(llm.model, prompts, reward_fn, tok, config)
        else:
            batch = rollout(llm.model, prompts, reward_fn, tok, config)
        out[name] = {
            k: round(v, 4) for k, v in batch["stats"].items() if k not in ("over_kl_bound", "kl_coef")
        }
        out[name]["examples"] = [s.text for s in batch["samples"][:: args.k][:4]]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--reward", default="length:12")
    p.add_argument("--rollouts", type=int, default=14)
    p.add_argument("--prompts-per-rollout", type=int, default=4)
    p.add_argument("--k", type=int, default=4, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--kl-coef", type=float, default=0.05)
    p.add_argument("--kl-bound", type=float, default=5.0, help="nats per response")
    p.add_argument("--held-out", type=int, default=8, help="held-out prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="1 beats 2 on shared cores (no spin-waits)")
    p.add_argument("--work", type=Path, default=Path("/tmp/lmstack_demos/ppo"))
    p.add_argument("--png", type=Path, default=ROOT / "docs" / "img" / "ppo.png")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # LoRA's initialisation happens before the loop seeds itself
    t0 = time.perf_counter()

    n_train = args.rollouts * args.prompts_per_rollout
    train_q, held_out = questions(n_train, args.held_out, args.seed)
    args.work.mkdir(parents=True, exist_ok=True)
    data = args.work / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": messages(q)}) + "\n" for q in train_q))
    ppo = PPOConfig(samples_per_prompt=args.k, max_new_tokens=args.max_new_tokens, ppo_epochs=2,
                    minibatches=2, kl_coef=args.kl_coef, kl_bound=args.kl_bound)  # fmt: skip
    config = TrainConfig(max_steps=args.rollouts * ppo.steps_per_rollout, lr=args.lr, warmup_steps=2,
                         batch_size=args.prompts_per_rollout, save_every=0, seed=args.seed)  # fmt: skip
    out = args.work / "run"
    shutil.rmtree(out, ignore_errors=True)  # a fresh run, not a resume of the last one
    result = finetune(
        FinetuneArgs(model=args.model, method="ppo", data=data, out=out, reward=args.reward, ppo=ppo,
                     train=config, rank=16, alpha=32, targets=["q_proj", "k_proj", "v_proj", "o_proj"],
                     max_len=256)
    )  # fmt: skip
    train_s = time.perf_counter() - t0
    args.png.parent.mkdir(parents=True, exist_ok=True)
    plot_ppo(result.history, args.png, kl_bound=args.kl_bound, steps_per_rollout=ppo.steps_per_rollout)

    rows = [r for r in result.history if (r["step"] - 1) % ppo.steps_per_rollout == 0]  # one per rollout
    first, last = rows[: max(1, len(rows) // 4)], rows[-max(1, len(rows) // 4) :]
    mean = lambda rs, k: round(sum(r[k] for r in rs) / len(rs), 4)  # noqa: E731
    summary = {
        "settings": {k: str(v) for k, v in vars(args).items()},
        "reward": args.reward,
        "rollouts": len(rows),
        "train_reward_first_quarter": mean(first, "reward"),
        "train_reward_last_quarter": mean(last, "reward"),
        "train_kl_max": round(max(r["kl"] for r in rows), 4),
        "train_kl_last": round(rows[-1]["kl"], 4),
        "kl_bound": args.kl_bound,
        "reward_per_rollout": [round(r["reward"], 3) for r in rows],
        "kl_per_rollout": [round(r["kl"], 3) for r in rows],
        "held_out": held_out_stats(args, out / "adapter", held_out),
        "train_seconds": round(train_s),
        "total_seconds": round(time.perf_counter() - t0),
    }
    summary["holds"] = bool(
        summary["train_reward_last_quarter"] > summary["train_reward_first_quarter"]
        and summary["train_kl_max"] < args.kl_bound
    )
    text = json.dumps(summary, indent=2, default=str)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
