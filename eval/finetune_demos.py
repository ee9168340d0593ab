"""Three fine-tuning demonstrations of issue #5, each measured before and after on held-out prompts.

    gemma-eot  LoRA SFT of the base model gemma-3-270m (it rambles when chatted with) on chatterbot-corpus
               Q/A: held-out loss, and the share of 50 held-out answers that stop at the training template's
               end-of-turn token within 64 new tokens (greedy) instead of running into the cap.
    qwen-json  LoRA SFT teaches qwen2.5-coder-0.5b-instruct to answer every question as one JSON object
               {"topic": ..., "answer": ...} (the chatterbot file's category and its answer), without being
               asked: adherence (parses, exactly those keys, string values) on 50 held-out prompts, for the
               base model plain, the base model told the format in a system prompt, and the adapter.
    dpo        DPO (LoRA) of smollm2-135m-instruct on pairs built from chatterbot-corpus (chosen: the answer
               to the prompt, rejected: the answer to another prompt): held-out reward accuracy, the share of
               pairs where beta * (log pi - log ref) of chosen beats rejected.

Each demo builds its JSONL from the packaged corpora (seed 0; a held-out prompt shares no user text, compared
case- and punctuation-blind, with any training conversation), measures "before", runs `lmstack finetune`
in a subprocess (what a user runs; its wall time is load + tokenize + train + save), measures "after", and
writes eval/results/<demo>.json and docs/img/<demo>.png (before/after bars, loss curves).

    nice -n 5 .venv/bin/python eval/finetune_demos.py gemma-eot     # ~15 min training + ~5 min evaluation
    nice -n 5 .venv/bin/python eval/finetune_demos.py qwen-json
    nice -n 5 .venv/bin/python eval/finetune_demos.py dpo
    .venv/bin/python eval/finetune_demos.py dpo --steps 2 --prompts 4 --json /tmp/x.json --plot /tmp/x.png

Training folders (checkpoints, log.jsonl, loss.png, the adapter) go to out/finetune-demos/<demo>, wiped
first: the loop resumes from a checkpoint it finds, and a demo starts from the base model.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lmstack.api import LLM
from lmstack.data import (
    Conversation,
    PreferencePair,
    collate,
    collate_preference,
    tokenize_messages,
    tokenize_preference,
    tokenize_sft,
    training_chat_template,
)
from lmstack.data.corpora import alternate, chatterbot_pairs, preference_pairs_from
from lmstack.generate import GenerationResult
from lmstack.train.loop import evaluate
from lmstack.train.losses import sequence_logprob, sft_loss

ROOT = Path(__file__).resolve().parents[1]
RESULTS, IMG, WORK = ROOT / "eval" / "results", ROOT / "docs" / "img", ROOT / "out" / "finetune-demos"
Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Recipe:
    """The `lmstack finetune` options of one demo (the CLI's flags, by name)."""

    model: str
    method: str
    steps: int
    batch_size: int
    lr: float
    max_len: int
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    warmup_steps: int = 10
    eval_every: int = 50
    beta: float = 0.1


GEMMA = Recipe("gemma-3-270m", "lora", 50, 8, lr=1e-3, max_len=128, rank=16, alpha=32, eval_every=25)
QWEN = Recipe("qwen2.5-coder-0.5b-instruct", "lora", 60, 4, lr=5e-4, max_len=160, eval_every=30)
DPO = Recipe("smollm2-135m-instruct", "dpo", 60, 8, lr=5e-4, max_len=160, eval_every=30, beta=0.1)
JSON_KEYS = ("topic", "answer")
JSON_SYSTEM = (
    'Answer with one JSON object and nothing else, with exactly two string keys: "topic" (one or two words '
    'naming the subject) and "answer" (your reply).'
)


# --- data -------------------------------------------------------------------------------------------------
def chatterbot_with_topics() -> list[tuple[str, Messages]]:
    """chatterbot-corpus conversations (as `chatterbot_pairs`, same order) with their file's category."""
    import chatterbot_corpus.corpus as corpus
    import yaml

    out = []
    for path in sorted((Path(corpus.DATA_DIRECTORY) / "english").glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        topic = str((data.get("categories") or [path.stem])[0])
        for conversation in data.get("conversations") or []:
            turns = [str(text).strip() for text in conversation if text is not None and str(text).strip()]
            if messages := alternate(turns):
                out.append((topic, messages))
    return out


def text_key(text: str) -> str:
    """Prompts compared case- and punctuation-blind ("What is AI?" == "what is ai")."""
    return re.sub(r"\W+", " ", text.casefold()).strip()


def split_heldout(
    convs: Sequence[Messages], n: int, seed: int, eligible: Callable[[Messages], bool]
) -> tuple[list[int], list[int]]:
    """Indices (train, held-out): `n` distinct eligible single-turn prompts drawn at random, one
    conversation each; training keeps every conversation none of whose user turns is a held-out prompt."""
    first: dict[str, int] = {}
    for i, c in enumerate(convs):
        if len(c) == 2 and eligible(c):
            first.setdefault(text_key(c[0]["content"]), i)
    keys = sorted(first)
    random.Random(seed).shuffle(keys)
    if len(keys) < n:
        raise ValueError(f"only {len(keys)} eligible prompts, {n} asked for")
    held = set(keys[:n])
    heldout = [first[k] for k in keys[:n]]
    train = [
        i
        for i, c in enumerate(convs)
        if not any(m["role"] == "user" and text_key(m["content"]) in held for m in c)
    ]
    return train, heldout


def fits(llm: LLM, template: str, messages: Messages, max_len: int) -> bool:
    ids = tokenize_messages(messages, llm.tokenizer, chat_template=template).input_ids
    return len(ids) <= max_len


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


# --- training through the CLI -----------------------------------------------------------------------------
def finetune_command(recipe: Recipe, data: Path, val: Path, out: Path) -> list[str]:
    r = recipe
    flags = {
        "--method": r.method, "--data": data, "--val": val, "--out": out, "--max-steps": r.steps,
        "--batch-size": r.batch_size, "--lr": r.lr, "--warmup-steps": r.warmup_steps,
        "--eval-every": r.eval_every, "--save-every": 0, "--max-len": r.max_len, "--rank": r.rank,
        "--alpha": r.alpha,
    }  # fmt: skip
    if r.method == "dpo":
        flags["--beta"] = r.beta
    cmd = ["lmstack", "finetune", "-m", r.model]
    for flag, value in flags.items():
        cmd += [
            flag,
            str(value.relative_to(ROOT) if isinstance(value, Path) and value.is_relative_to(ROOT) else value),
        ]
    return [*cmd, "--targets", *r.targets]


def run_finetune(cmd: list[str]) -> dict[str, Any]:
    """Run `lmstack finetune` (the console script next to this interpreter); wall time and machine load.

    OpenMP's threads spin while they wait by default; on cores another job also uses, a spinning thread
    holds the core the other one needs, and a gemma-3-270m step took 6x as long (33 s, not 6 s, measured
    beside one busy process). PASSIVE puts them to sleep instead: 6.7 s there, as with one thread."""
    exe = Path(sys.executable).with_name("lmstack")
    wait = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
    command = f"OMP_WAIT_POLICY={wait} {shlex.join(cmd)}"
    print("$", command, flush=True)
    load_before, t0 = os.getloadavg(), time.perf_counter()
    subprocess.run([str(exe), *cmd[1:]], cwd=ROOT, check=True, env={**os.environ, "OMP_WAIT_POLICY": wait})
    seconds = time.perf_counter() - t0
    return {
        "command": command,
        "wall_seconds": round(seconds, 1),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def read_log(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def release(llm: LLM) -> None:
    """Free a loaded model before the training subprocess needs the memory."""
    del llm.model
    gc.collect()


# --- measures ---------------------------------------------------------------------------------------------
def heldout_loss(llm: LLM, convs: Sequence[Messages], template: str, max_len: int, batch_size: int) -> float:
    """Mean assistant-token loss on held-out conversations, batched as the training loop's validation."""
    data = [Conversation(c, f"held-out {i}") for i, c in enumerate(convs)]
    examples = tokenize_sft(data, llm.tokenizer, max_len, chat_template=template)
    batches = [collate(examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)]
    return evaluate(llm.model, sft_loss, batches)


def answers(
    model: str,
    adapter: Path | None,
    dtype: str,
    template: str,
    prompts: Sequence[Messages],
    max_new: int,
    desc: str,
) -> tuple[list[GenerationResult], float]:
    """Greedy answers from the model as `lmstack chat -m MODEL --adapter DIR --dtype DTYPE` serves it (the
    adapter merged into the float weights, then quantized), rendered with `template`; and the seconds."""
    llm = LLM.load(model, device="cpu", dtype=dtype, adapter=adapter)
    assert llm.tokenizer.chat_template in (None, template), "the adapter carries another template"
    llm.tokenizer.chat_template = template
    t0 = time.perf_counter()
    results = [
        llm.complete(p, max_new_tokens=max_new, temperature=0.0)
        for p in tqdm(prompts, desc=desc, unit="prompt")
    ]
    seconds = time.perf_counter() - t0
    release(llm)
    return results, round(seconds, 1)


def loss_with(model: str, adapter: Path, convs: Sequence[Messages], template: str, recipe: Recipe) -> float:
    """Held-out loss of the float32 model, adapter merged (the recipe logs it unmerged: they agree)."""
    llm = LLM.load(model, device="cpu", adapter=adapter)
    loss = heldout_loss(llm, convs, template, recipe.max_len, recipe.batch_size)
    release(llm)
    return loss


def ends_with(results: Sequence[GenerationResult], token_id: int) -> float:
    """Share of generations that stopped by emitting `token_id` (not by reaching max_new_tokens)."""
    done = [r.finish_reason == "stop" and r.token_ids[-1] == token_id for r in results]
    return sum(done) / len(done)


def parse_json_answer(text: str, keys: Sequence[str], fenced: bool = False) -> dict[str, str] | None:
    """The answer as {key: str} when it is one JSON object with exactly `keys`, each a non-empty string;
    fenced=True also accepts it inside a ``` / ```json fence (how chat models often show JSON)."""
    text = text.strip()
    if fenced and (m := re.fullmatch(r"```(?:json)?\s*\n?(.*?)\n?```", text, re.S)):
        text = m.group(1).strip()
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or sorted(value) != sorted(keys):
        return None
    if not all(isinstance(v, str) and v.strip() for v in value.values()):
        return None
    return value


def adherence(results: Sequence[GenerationResult], keys: Sequence[str], fenced: bool = False) -> float:
    return sum(parse_json_answer(r.text, keys, fenced) is not None for r in results) / len(results)


@torch.no_grad()
def pair_logprobs(model: torch.nn.Module, examples: Sequence[Any], batch_size: int) -> torch.Tensor:
    """(N, 2) summed log-probs of each pair's chosen and rejected response under `model`."""
    rows = []
    for i in range(0, len(examples), batch_size):
        b = collate_preference(examples[i : i + batch_size])
        ids = torch.cat([b["chosen_input_ids"], b["rejected_input_ids"]])  # (2B, T)
        labels = torch.cat([b["chosen_labels"], b["rejected_labels"]])
        logp = sequence_logprob(model, ids, labels)  # (2B,)
        n = b["chosen_input_ids"].shape[0]
        rows.append(torch.stack([logp[:n], logp[n:]], dim=1))  # (B, 2)
    return torch.cat(rows)


def reward_accuracy(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> dict[str, float]:
    """DPO's implicit rewards beta * (log pi - log ref) per side, (N, 2) each: the share of pairs whose
    chosen reward is higher (ties count half, so an untrained policy, equal to the reference, scores 0.5)."""
    reward = beta * (policy - reference)  # (N, 2)
    margin = reward[:, 0] - reward[:, 1]
    wins, ties = float((margin > 0).float().mean()), float((margin == 0).float().mean())
    return {
        "reward_accuracy": wins + 0.5 * ties,
        "strict_wins": wins,
        "ties": ties,
        "mean_margin": float(margin.mean()),
    }


# --- the chart --------------------------------------------------------------------------------------------
def plot(path: Path, title: str, bars: dict[str, float], ylabel: str, target: float, log: list[dict]) -> None:
    """Before/after bars (with the target line) next to the training and validation loss curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(8.4, 3.2), gridspec_kw={"width_ratios": [1, 1.4]})
    colors = ["#9e9e9e"] * (len(bars) - 1) + ["#2a7ab9"]
    names, values = list(bars), list(bars.values())
    left.bar(range(len(bars)), values, color=colors)
    left.set_xticks(range(len(bars)), names, fontsize=8)
    for i, v in enumerate(values):
        left.text(i, v + 0.02, f"{v:.2f}", ha="center", fontsize=8)
    left.axhline(target, color="#d62728", ls="--", lw=1, label=f"target {target:g}")
    left.set_ylim(0, 1.1)
    left.set_ylabel(ylabel, fontsize=8)
    left.legend(fontsize=7, loc="upper left")
    train_rows = [r for r in log if "loss" in r]
    val_rows = [r for r in log if "val_loss" in r]
    right.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], lw=0.8, label="train")
    right.plot([r["step"] for r in val_rows], [r["val_loss"] for r in val_rows], "o-", ms=3, label="held-out")
    right.set_xlabel("step", fontsize=8)
    right.set_ylabel("loss", fontsize=8)
    right.grid(alpha=0.3)
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def finish(
    name: str, args: argparse.Namespace, result: dict[str, Any], bars: dict[str, float], loss0: float, **chart
) -> None:
    """Write the JSON and the chart; the held-out curve starts at `loss0`, the loss before training."""
    json_path = args.json or RESULTS / f"{name}.json"
    png_path = args.plot or IMG / f"{name}.png"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    log = [{"step": 0, "val_loss": loss0}, *read_log(Path(result["out"]))]
    plot(png_path, log=log, bars=bars, **chart)
    print(json.dumps({k: v for k, v in result.items() if k not in ("answers", "out")}, indent=1))
    print(f"wrote {json_path} and {png_path}")


def with_steps(recipe: Recipe, steps: int | None) -> Recipe:
    if steps is None:
        return recipe
    return Recipe(**{**asdict(recipe), "steps": steps, "eval_every": min(recipe.eval_every, steps)})


# --- gemma-eot ----------------------------------------------------------------------------------------------
def gemma_data(
    llm: LLM, template: str, recipe: Recipe, n: int, work: Path
) -> tuple[Path, Path, list[Messages]]:
    """Training conversations that fit max_len tokens; `n` held-out prompts whose reference answer is short
    (<= 160 characters, ~40 tokens), so a right-sized answer fits the 64-token cap with room."""
    convs = chatterbot_pairs()
    train, held = split_heldout(convs, n, seed=0, eligible=lambda c: len(c[1]["content"]) <= 160)
    train_convs = [convs[i] for i in train if fits(llm, template, convs[i], recipe.max_len)]
    held_convs = [convs[i] for i in held]
    data = write_jsonl(work / "train.jsonl", [{"messages": c} for c in train_convs])
    val = write_jsonl(work / "val.jsonl", [{"messages": c} for c in held_convs])
    dropped = len(train) - len(train_convs)
    print(
        f"{len(train_convs)} training conversations ({dropped} over max_len left out), {len(held)} held out"
    )
    return data, val, held_convs


def gemma_summary(results: Sequence[GenerationResult], end_id: int, loss: float, seconds: float) -> dict:
    return {
        "heldout_loss": round(loss, 4),
        "ends_at_end_of_turn": ends_with(results, end_id),
        "any_stop_token": sum(r.finish_reason == "stop" for r in results) / len(results),
        "mean_new_tokens": sum(r.completion_tokens for r in results) / len(results),
        "generation_seconds": seconds,
    }


def demo_gemma(args: argparse.Namespace) -> None:
    recipe, work = with_steps(GEMMA, args.steps), fresh(args.work / "gemma-eot")
    llm = LLM.load(recipe.model, device="cpu")
    template, note = training_chat_template(llm.tokenizer)
    end_id = llm.tokenizer.eos_id  # the training template closes assistant turns with EOS ('<eos>')
    assert end_id is not None and "eos_token" in template, note
    end_token = llm.tokenizer.id_to_token(end_id)
    data, val, held = gemma_data(llm, template, recipe, args.prompts, work)
    loss = heldout_loss(llm, held, template, recipe.max_len, recipe.batch_size)
    release(llm)
    prompts = [c[:1] for c in held]  # "before" sees exactly the prompt the adapter is served with
    results, seconds = answers(recipe.model, None, args.dtype, template, prompts, 64, "before")
    before = gemma_summary(results, end_id, loss, seconds)
    run = run_finetune(finetune_command(recipe, data, val, work / "run"))
    adapter = work / "run" / "adapter"
    loss = loss_with(recipe.model, adapter, held, template, recipe)
    tuned, seconds = answers(recipe.model, adapter, args.dtype, template, prompts, 64, "after")
    after = gemma_summary(tuned, end_id, loss, seconds)
    result = {
        "demo": "gemma-eot", "template": note, "end_of_turn": end_token, "max_new_tokens": 64,
        "generation_dtype": args.dtype, "prompts": len(held), "recipe": asdict(recipe), "training": run,
        "log_val_loss": [r["val_loss"] for r in read_log(work / "run") if "val_loss" in r],
        "before": before, "after": after, "target": ">= 0.8 of answers end at the end-of-turn token",
        "answers": [{"prompt": c[0]["content"], "reference": c[1]["content"], "before": b.text,
                     "after": a.text} for c, b, a in zip(held, results, tuned, strict=True)],
        "out": str(work / "run"),
    }  # fmt: skip
    bars = {"base": before["ends_at_end_of_turn"], "LoRA SFT": after["ends_at_end_of_turn"]}
    title = (
        f"gemma-3-270m LoRA SFT: {run['wall_seconds'] / 60:.1f} min of training on {os.cpu_count()} CPU cores"
    )
    ylabel = f"held-out answers ending at {end_token}"
    finish("gemma-eot", args, result, bars, before["heldout_loss"], title=title, ylabel=ylabel, target=0.8)


# --- qwen-json ----------------------------------------------------------------------------------------------
def as_json(topic: str, answer: str) -> str:
    return json.dumps({"topic": topic, "answer": answer}, ensure_ascii=False)


def qwen_data(recipe: Recipe, n: int, work: Path, llm: LLM) -> tuple[Path, Path, list[tuple[str, Messages]]]:
    """Single-turn Q/A whose answer is at most 240 characters, at most two answers per prompt (chatterbot's
    tech-support file repeats ten prompts ~100 times each); assistant turns rewritten as the JSON object."""
    items = [(t, c) for t, c in chatterbot_with_topics() if len(c) == 2 and len(c[1]["content"]) <= 240]
    train, held = split_heldout([c for _, c in items], n, seed=0, eligible=lambda c: True)
    template = llm.tokenizer.chat_template or ""
    seen: dict[str, int] = {}
    rows = []
    for i in train:
        topic, (user, assistant) = items[i]
        key = text_key(user["content"])
        if seen.setdefault(key, 0) < 2:
            messages = [user, {"role": "assistant", "content": as_json(topic, assistant["content"])}]
            if fits(llm, template, messages, recipe.max_len):
                seen[key] += 1
                rows.append({"messages": messages})
    held_items = [items[i] for i in held]
    val_rows = [{"messages": [c[0], {"role": "assistant", "content": as_json(t, c[1]["content"])}]}
                for t, c in held_items]  # fmt: skip
    print(f"{len(rows)} training conversations, {len(held_items)} held-out prompts")
    return write_jsonl(work / "train.jsonl", rows), write_jsonl(work / "val.jsonl", val_rows), held_items


def qwen_summary(results: Sequence[GenerationResult], topics: Sequence[str], seconds: float) -> dict:
    parsed = [parse_json_answer(r.text, JSON_KEYS) for r in results]
    right_topic = [
        p is not None and p["topic"].casefold() == t.casefold() for p, t in zip(parsed, topics, strict=True)
    ]
    return {
        "adherence": adherence(results, JSON_KEYS),
        "adherence_fenced_ok": adherence(results, JSON_KEYS, fenced=True),
        "topic_matches_corpus": sum(right_topic) / len(results),
        "cut_at_cap": sum(r.finish_reason == "length" for r in results) / len(results),
        "generation_seconds": seconds,
    }


def demo_qwen(args: argparse.Namespace) -> None:
    recipe, work = with_steps(QWEN, args.steps), fresh(args.work / "qwen-json")
    llm = LLM.load(recipe.model, device="cpu")
    template = llm.tokenizer.chat_template or ""
    data, val, held = qwen_data(recipe, args.prompts, work, llm)
    val_convs = [json.loads(line)["messages"] for line in val.read_text().splitlines()]
    loss_before = heldout_loss(llm, val_convs, template, recipe.max_len, recipe.batch_size)
    release(llm)
    prompts, topics = [c[:1] for _, c in held], [t for t, _ in held]
    told = [[{"role": "system", "content": JSON_SYSTEM}, *p] for p in prompts]
    base, s0 = answers(recipe.model, None, args.dtype, template, prompts, 128, "base")
    asked, s1 = answers(recipe.model, None, args.dtype, template, told, 128, "base + system prompt")
    run = run_finetune(finetune_command(recipe, data, val, work / "run"))
    adapter = work / "run" / "adapter"
    loss_after = loss_with(recipe.model, adapter, val_convs, template, recipe)
    tuned, s2 = answers(recipe.model, adapter, args.dtype, template, prompts, 128, "after")
    outputs = (base, asked, tuned)
    summaries = [qwen_summary(r, topics, s) for r, s in ((base, s0), (asked, s1), (tuned, s2))]
    result = {
        "demo": "qwen-json", "keys": list(JSON_KEYS), "system_prompt_of_asked": JSON_SYSTEM,
        "max_new_tokens": 128, "generation_dtype": args.dtype, "prompts": len(held), "recipe": asdict(recipe),
        "training": run, "heldout_loss": {"before": round(loss_before, 4), "after": round(loss_after, 4)},
        "before": summaries[0], "before_asked_in_system_prompt": summaries[1], "after": summaries[2],
        "answers": [{"prompt": p[0]["content"], "topic": t, "base": a.text, "asked": b.text, "after": c.text}
                    for p, t, a, b, c in zip(prompts, topics, *outputs, strict=True)],
        "out": str(work / "run"),
    }  # fmt: skip
    bars = dict(
        zip(("base", "base + system\nprompt", "LoRA SFT"), (s["adherence"] for s in summaries), strict=True)
    )
    title = f"qwen2.5-coder-0.5b-instruct answers as JSON {{topic, answer}}: {len(held)} held-out prompts"
    ylabel = "held-out answers that are the JSON"
    finish("qwen-json", args, result, bars, loss_before, title=title, ylabel=ylabel, target=0.8)


# --- dpo --------------------------------------------------------------------------------------------------
def pair_row(p: PreferencePair) -> dict[str, Any]:
    return {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}


def dpo_data(n: int, work: Path) -> tuple[Path, Path, list[PreferencePair]]:
    """Single-turn Q/A with answers of at most 240 characters, one conversation per distinct prompt (the
    first), `n` prompts held out; each side draws its rejected answers from its own conversations only."""
    convs = [c for c in chatterbot_pairs() if len(c) == 2 and len(c[1]["content"]) <= 240]
    train, held = split_heldout(convs, n, seed=0, eligible=lambda c: True)
    firsts: dict[str, int] = {}
    for i in train:
        firsts.setdefault(text_key(convs[i][0]["content"]), i)
    train_pairs = preference_pairs_from([convs[i] for i in firsts.values()], seed=0)
    held_pairs = preference_pairs_from([convs[i] for i in held], seed=1)
    print(f"{len(train_pairs)} training pairs, {len(held_pairs)} held-out pairs")
    data = write_jsonl(work / "train.jsonl", [pair_row(p) for p in train_pairs])
    return data, write_jsonl(work / "val.jsonl", [pair_row(p) for p in held_pairs]), held_pairs


def demo_dpo(args: argparse.Namespace) -> None:
    from lmstack.adapters import load_adapter
    from lmstack.lora import disable_adapters

    recipe, work = with_steps(DPO, args.steps), fresh(args.work / "dpo")
    data, val, held = dpo_data(args.prompts, work)
    run = run_finetune(finetune_command(recipe, data, val, work / "run"))
    llm = LLM.load(recipe.model, device="cpu")
    template, _ = training_chat_template(llm.tokenizer)
    examples = tokenize_preference(held, llm.tokenizer, recipe.max_len, chat_template=template)
    reference = pair_logprobs(llm.model, examples, recipe.batch_size)  # (N, 2)
    before = reward_accuracy(reference, reference, recipe.beta)  # step 0: the policy is the reference
    load_adapter(llm.model, work / "run" / "adapter", base_model_name=recipe.model)
    policy = pair_logprobs(llm.model, examples, recipe.batch_size)
    with disable_adapters(llm.model):
        assert torch.equal(pair_logprobs(llm.model, examples, recipe.batch_size), reference)
    after = reward_accuracy(policy, reference, recipe.beta)
    log = read_log(work / "run")
    val_losses = [r["val_loss"] for r in log if "val_loss" in r]
    result = {
        "demo": "dpo", "pairs": len(examples), "recipe": asdict(recipe), "training": run,
        "before": before, "after": after,
        "reference_prefers_chosen": float((reference[:, 0] > reference[:, 1]).float().mean()),
        "heldout_dpo_loss": {"before": 0.6931, "after": round(val_losses[-1], 4) if val_losses else None},
        "target": "held-out reward accuracy > 0.8", "out": str(work / "run"),
    }  # fmt: skip
    bars = {"step 0\n(= reference)": before["reward_accuracy"], "DPO (LoRA)": after["reward_accuracy"]}
    title = f"smollm2-135m-instruct DPO: reward accuracy on {len(examples)} held-out pairs"
    finish("dpo", args, result, bars, 0.6931, title=title, ylabel="held-out reward accuracy", target=0.8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="demo", required=True)
    for name, func, prompts in (
        ("gemma-eot", demo_gemma, 50),
        ("qwen-json", demo_qwen, 50),
        ("dpo", demo_dpo, 150),
    ):
        p = sub.add_parser(name)
        p.add_argument(
            "--steps", type=int, default=None, help="override the recipe's optimizer steps (smoke runs)"
        )
        p.add_argument("--prompts", type=int, default=prompts, help="held-out prompts (dpo: pairs)")
        p.add_argument(
            "--dtype", default="int8", choices=["float32", "bfloat16", "int8"], help="for generation"
        )
        p.add_argument("--work", type=Path, default=WORK, help="training folders go under here")
        p.add_argument("--json", type=Path, default=None, help=f"default eval/results/{name}.json")
        p.add_argument("--plot", type=Path, default=None, help=f"default docs/img/{name}.png")
        p.set_defaults(func=func)
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.prompts < 2:
        parser.error(f"--prompts must be >= 2, got {args.prompts}")
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
