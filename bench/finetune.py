"""LoRA fine-tuning step time and peak memory: lmstack vs Hugging Face transformers + PEFT, and QLoRA vs LoRA.

For each model, every configuration trains on the same random token batch (B x T), with the same LoRA rank,
alpha and target modules, in float32 on the CPU: AdamW over the LoRA matrices, loss = next-token
cross-entropy over every token, gradient clipping at 1.0 (both stacks' trainers clip by default). A step is
forward + backward + clip + optimizer step; `--warmup` steps are dropped, `--steps` are timed.

Each configuration runs in a fresh subprocess (this script with `--one CONFIG`), so one's memory cannot
pollute another's. Memory is the process's peak resident set (Linux VmHWM, what getrusage's ru_maxrss
reports), nothing subtracted: `peak` covers the whole process, loading included, as a user running a
fine-tune sees it; `train peak` is reset after the model is set up and covers the training steps only.
lmstack rows do what `lmstack finetune` does: tensors come from lmstack's caching CPU allocator from before
loading on, and before the first step what loading freed goes back to the system (`prepare_memory`); PEFT
rows run on glibc's allocator, as transformers' Trainer does.

The peer is the same weights: lmstack loads its packaged model and the transformers model
(LlamaForCausalLM / Qwen2ForCausalLM, SDPA attention) is built on the meta device from a config derived from
lmstack's and then takes lmstack's tensors under their Hugging Face names (lmstack.models.export, the inverse
of lmstack.models.hf's mapping), sharing storage, so nothing is downloaded and no second copy exists. Once per
model an equivalence check copies lmstack's LoRA matrices into PEFT's and compares the loss before and
after one optimizer step: the two stacks must agree to 1e-4, so the timings compare the same computation.

    .venv/bin/python bench/finetune.py --threads 2 --batch 4 --seq 256 --steps 10 --warmup 2 \
        --json bench/results/finetune.json

Configurations: lmstack-lora, peft-lora, lmstack-qlora (NF4 base, lmstack.nf4, each linear layer quantized
as it loads, as `lmstack finetune --method qlora` does), and peft-qlora where bitsandbytes is importable (no
lmstack or bench dependency; its CPU build works): transformers loads a Hugging Face folder written from the
same tensors into a temporary directory with BitsAndBytesConfig NF4 + double quantization, as a QLoRA user
would. `--checkpointing 1` turns on gradient checkpointing in every configuration alike.
Targets (issue #5): lmstack LoRA <= 0.8x PEFT LoRA in step time and in peak memory; QLoRA peak <= 0.6x LoRA's.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

CONFIGS = ("lmstack-lora", "peft-lora", "lmstack-qlora", "peft-qlora")
HF_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
SHARED_ARGS = (
    "batch", "seq", "steps", "warmup", "threads", "rank", "alpha", "targets", "seed", "checkpointing",
)  # fmt: skip
MIB = 2**20


# --- memory: the kernel's high-water mark of this process's resident set ------------------------------------
def peak_rss() -> int:
    """Bytes; VmHWM is what getrusage(RUSAGE_SELF).ru_maxrss reports, but resettable (reset_peak)."""
    status = Path("/proc/self/status")
    if status.exists():
        return int(re.search(r"VmHWM:\s+(\d+) kB", status.read_text()).group(1)) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux units; macOS reports bytes


def current_rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def file_rss() -> int | None:
    """Bytes of the resident set that are file pages (memory-mapped weights, libraries); None off Linux."""
    status = Path("/proc/self/status")
    found = re.search(r"RssFile:\s+(\d+) kB", status.read_text()) if status.exists() else None
    return int(found.group(1)) * 1024 if found else None


def reset_peak() -> bool:
    """Restart the high-water mark at the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# --- the models ---------------------------------------------------------------------------------------------
def load_lmstack(name: str, nf4: bool = False) -> nn.Module:
    """The packaged model's float32 weights, without a tokenizer (the same loader for every configuration);
    `nf4`: each linear layer quantized to NF4 as it loads and the embedding and head stored as int8 rows,
    as `lmstack finetune --method qlora` (LLM.load(dtype="nf4")) loads it."""
    from lmstack.api import default_home
    from lmstack.hub import load_model
    from lmstack.nf4 import nf4_swap, quantize_tables_int8

    swap = nf4_swap(tables_int8=True) if nf4 else None
    model = load_model(name, dtype=torch.float32, cache_dir=default_home(), linear_swap=swap).model
    return (quantize_tables_int8(model) if nf4 else model).train()


def hf_config(cfg: Any) -> Any:
    """The transformers config of an lmstack config: the config.json lmstack.models.export writes."""
    import transformers

    from lmstack.models.export import hf_config_dict

    d = hf_config_dict(cfg)
    return transformers.AutoConfig.for_model(d.pop("model_type"), **d, use_cache=False)


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """lmstack's tensors under Hugging Face names; the tensors themselves are shared, not copied."""
    from lmstack.models.export import lmstack_to_hf

    return lmstack_to_hf({k: t.detach() for k, t in model.state_dict(keep_vars=True).items()}, model.config)


def to_transformers(model: nn.Module) -> nn.Module:
    """A transformers model computing with exactly the tensors of lmstack `model` (built on meta: no init)."""
    from transformers import AutoModelForCausalLM

    config = hf_config(model.config)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    state = hf_state_dict(model)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if config.tie_word_embeddings:
        hf.lm_head.weight = hf.model.embed_tokens.weight
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=config)  # its buffers were left on meta
    assert not any(t.is_meta for t in [*hf.parameters(), *hf.buffers()]), "a tensor stayed on meta"
    return hf.train()


def peft_model(hf: nn.Module, args: argparse.Namespace) -> nn.Module:
    import peft

    config = peft.LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=0.0,
        target_modules=args.targets.split(","),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(hf, config)


def lmstack_lora(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    from lmstack.lora import LoraConfig, apply_lora

    apply_lora(model, LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=args.targets.split(",")))
    return model


def lmstack_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    from lmstack.train.losses import sft_loss

    return sft_loss(model, {"input_ids": ids, "labels": ids})[0]


def hf_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def setup(config: str, name: str, args: argparse.Namespace) -> tuple[nn.Module, Any, int]:
    """(trainable model, loss function, bytes of the frozen base weights) for one configuration."""
    from lmstack.nf4 import stored_bytes

    if config == "peft-qlora":
        return setup_peft_qlora(name, args)
    model = load_lmstack(name, nf4=config == "lmstack-qlora")
    if config == "peft-lora":
        hf = to_transformers(model)
        del model
        gc.collect()
        return peft_model(hf, args), hf_loss, stored_bytes(hf)
    base = stored_bytes(model)
    return lmstack_lora(model, args), lmstack_loss, base


def setup_peft_qlora(name: str, args: argparse.Namespace) -> tuple[nn.Module, Any, int]:
    """transformers' own 4-bit path: from_pretrained with bitsandbytes NF4 (double quantization), as a
    QLoRA user runs it, so the float weights are never all resident (read from a folder written first)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.utils import logging

    from lmstack.nf4 import stored_bytes

    logging.disable_progress_bar()

    folder = Path(args.hf_dir)
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    hf = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=quant, dtype=torch.float32, attn_implementation="sdpa", device_map="cpu"
    )
    # no peft.prepare_model_for_kbit_training: it turns on gradient checkpointing, which no other row uses,
    # and casts the remaining weights to float32, which they already are
    return peft_model(hf.train(), args), hf_loss, stored_bytes(hf)


def token_batch(vocab: int, args: argparse.Namespace) -> torch.Tensor:
    g = torch.Generator().manual_seed(args.seed)
    return torch.randint(0, vocab, (args.batch, args.seq), generator=g)  # (B, T)


def train_steps(model: nn.Module, loss_fn: Any, ids: torch.Tensor, n: int) -> tuple[list[float], list[float]]:
    """n optimizer steps; (seconds per step, loss per step)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    times, losses = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        loss = loss_fn(model, ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    return times, losses


def run_one(config: str, name: str, args: argparse.Namespace) -> dict:
    """One configuration in this (fresh) process: set up, train, report times and memory."""
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    if config.startswith("lmstack"):  # what `lmstack finetune` does before it loads the model
        from lmstack.train.loop import use_training_allocator

        use_training_allocator()
    model, loss_fn, base_bytes = setup(config, name, args)
    if args.checkpointing:  # every row alike: recompute each block in backward, keep only block inputs
        if config.startswith("peft"):
            model.get_base_model().gradient_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing = True
    if config.startswith("lmstack"):  # what lmstack.train.loop.train does before its first step
        from lmstack.train.loop import prepare_memory

        prepare_memory(model)
    setup_s = time.perf_counter() - t0
    gc.collect()
    ids = token_batch(model.config.vocab_size, args)  # lmstack's ModelConfig or the transformers config
    peak_setup, rss_ready = peak_rss(), current_rss()
    resettable = reset_peak()
    times, losses = train_steps(model, loss_fn, ids, args.warmup + args.steps)
    timed = times[args.warmup :]
    peak_train = peak_rss() if resettable else None
    file_bytes = file_rss()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "model": name,
        "config": config,
        "step_ms_median": 1e3 * statistics.median(timed),
        "step_ms_mean": 1e3 * statistics.mean(timed),
        "step_ms": [1e3 * t for t in timed],
        "losses": losses,
        "peak_rss_mib": max(peak_setup, peak_train or 0) / MIB,
        "train_peak_rss_mib": peak_train / MIB if peak_train else None,
        "rss_before_training_mib": rss_ready / MIB,
        "file_rss_after_training_mib": file_bytes / MIB if file_bytes is not None else None,
        "weights_mib": base_bytes / MIB,
        "trainable_params": trainable,
        "setup_s": setup_s,
        "checkpointing": bool(args.checkpointing),
    }


# --- equivalence: the same computation in both stacks ------------------------------------------------------
def check_equivalence(name: str, args: argparse.Namespace) -> dict:
    """lmstack LoRA and PEFT LoRA with identical (random, B != 0) adapters on the same base tensors: the loss
    before and after one AdamW step, and the largest logit difference."""
    from lmstack.lora import hf_module_name, lora_layers

    model = load_lmstack(name)
    hf = to_transformers(model)  # shares the base tensors (frozen in both)
    lmstack_lora(model, args)
    peft = peft_model(hf, args)
    g = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        for lname, layer in lora_layers(model).items():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.02)
            theirs = peft.base_model.model.get_submodule(hf_module_name(lname, model.config.family))
            theirs.lora_A["default"].weight.copy_(layer.lora_A.weight)
            theirs.lora_B["default"].weight.copy_(layer.lora_B.weight)
    ids = token_batch(model.config.vocab_size, args)
    with torch.no_grad():
        logits_diff = float((model(ids) - peft(input_ids=ids, use_cache=False).logits).abs().max())
    _, ours = train_steps(model, lmstack_loss, ids, 2)
    _, theirs = train_steps(peft, hf_loss, ids, 2)
    worst = max(abs(a - b) for a, b in zip(ours, theirs, strict=True))
    return {
        "model": name,
        "lmstack_losses": ours,
        "peft_losses": theirs,
        "max_loss_diff": worst,
        "max_logits_diff": logits_diff,
        "same": worst <= 1e-4,
    }


# --- the driver: one subprocess per configuration ----------------------------------------------------------
def child(args: argparse.Namespace, one: str, model: str, extra: tuple[str, ...] = ()) -> dict | None:
    shared = [f"--{k}={getattr(args, k)}" for k in SHARED_ARGS]
    cmd = [sys.executable, __file__, "--one", one, "--models", model, *shared, *extra]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        print(f"  {model} {one}: failed (exit {proc.returncode})\n{proc.stdout[-2000:]}", flush=True)
        return None
    return json.loads(lines[-1].removeprefix("RESULT "))


def write_hf_folder(name: str, folder: Path) -> None:
    """The float model in Hugging Face format (for transformers' own 4-bit loading), written once."""
    from lmstack.models.export import save_hf

    model: Any = load_lmstack(name)  # a Transformer
    save_hf(model, None, folder)
    gc.collect()


def bench_model(name: str, args: argparse.Namespace) -> tuple[list[dict], dict | None]:
    """Every configuration `args.rounds` times, in the given order on even rounds and reversed on odd ones
    (this machine's speed drifts within minutes: alternating cancels a trend), merged per configuration."""
    eq = None if args.skip_check else child(args, "equivalence", name)
    if eq is not None:
        print(
            f"  {name} equivalence: loss lmstack {eq['lmstack_losses']} vs PEFT {eq['peft_losses']}, "
            f"max |diff| {eq['max_loss_diff']:.2e} (logits {eq['max_logits_diff']:.2e}) "
            f"{'same' if eq['same'] else 'DIFFERENT'}",
            flush=True,
        )
    configs = args.configs.split(",")
    runs: dict[str, list[dict]] = {}
    missing: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="lmstack-bench-hf-") as tmp:
        for round_ in range(args.rounds):
            for config in configs if round_ % 2 == 0 else configs[::-1]:
                if config in missing:
                    continue
                extra: tuple[str, ...] = ()
                r: dict | None = None
                if config == "peft-qlora" and importlib.util.find_spec("bitsandbytes") is None:
                    reason = "bitsandbytes is not installed"
                else:
                    if config == "peft-qlora":
                        folder = Path(tmp) / "hf"
                        if not folder.exists():
                            write_hf_folder(name, folder)
                        extra = ("--hf-dir", str(folder))
                    r, reason = child(args, config, name, extra), "failed"
                if r is None:
                    missing[config] = {"model": name, "config": config, "missing": reason}
                    print(f"  {name} {config}: skipped ({reason})", flush=True)
                    continue
                runs.setdefault(config, []).append(r)
                losses = [round(x, 4) for x in r["losses"]]
                print(
                    f"  {name} {config} (round {round_ + 1}/{args.rounds}): step {r['step_ms_median']:.0f} "
                    f"ms (median), peak {r['peak_rss_mib']:.0f} MiB, losses {losses}",
                    flush=True,
                )
    rows = [missing[c] if c in missing else merge_rounds(runs[c]) for c in configs]
    return rows, eq


def merge_rounds(results: list[dict]) -> dict:
    """One configuration's rounds as one row: step time is the median over every timed step of every round,
    peak memory the median of the rounds' peaks; each round's own median and peak are kept beside."""
    merged = dict(results[0])
    steps = [t for r in results for t in r["step_ms"]]
    merged |= {
        "rounds": len(results),
        "step_ms": steps,
        "step_ms_median": statistics.median(steps),
        "step_ms_mean": statistics.mean(steps),
        "round_step_ms_median": [r["step_ms_median"] for r in results],
        "round_peak_rss_mib": [r["peak_rss_mib"] for r in results],
        "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in results),
    }
    trains = [r["train_peak_rss_mib"] for r in results if r["train_peak_rss_mib"]]
    merged["train_peak_rss_mib"] = statistics.median(trains) if len(trains) == len(results) else None
    return merged


def ratios(rows: list[dict]) -> None:
    """Add ratios vs PEFT LoRA (time, memory) and QLoRA vs LoRA of the same stack, per model."""
    by = {(r["model"], r["config"]): r for r in rows if "missing" not in r}
    for r in by.values():
        peer = by.get((r["model"], "peft-lora"))
        if peer:
            r["time_vs_peft_lora"] = r["step_ms_median"] / peer["step_ms_median"]
            r["memory_vs_peft_lora"] = r["peak_rss_mib"] / peer["peak_rss_mib"]
        lora = by.get((r["model"], r["config"].replace("qlora", "lora")))
        if r["config"].endswith("qlora") and lora:
            r["qlora_vs_lora_memory"] = r["peak_rss_mib"] / lora["peak_rss_mib"]
            if r["train_peak_rss_mib"] and lora["train_peak_rss_mib"]:
                r["qlora_vs_lora_train_memory"] = r["train_peak_rss_mib"] / lora["train_peak_rss_mib"]


def print_table(rows: list[dict]) -> None:
    def x(v: float | None) -> str:
        return f"{v:.2f}x" if v is not None else "-"

    print(
        "\n| model | config | step ms (median) | peak RSS MiB | train peak MiB | weights MiB | "
        "time vs PEFT LoRA | memory vs PEFT LoRA | QLoRA/LoRA memory |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "missing" in r:
            print(f"| {r['model']} | {r['config']} | {r['missing']} | | | | | | |")
            continue
        train_peak = f"{r['train_peak_rss_mib']:.0f}" if r["train_peak_rss_mib"] else "-"
        print(
            f"| {r['model']} | {r['config']} | {r['step_ms_median']:.0f} | {r['peak_rss_mib']:.0f} | "
            f"{train_peak} | {r['weights_mib']:.0f} | {x(r.get('time_vs_peft_lora'))} | "
            f"{x(r.get('memory_vs_peft_lora'))} | {x(r.get('qlora_vs_lora_memory'))} |"
        )


def verdicts(rows: list[dict]) -> list[dict]:
    """The issue's three targets per model: PASS / FAIL / n/a (a configuration missing)."""
    by = {(r["model"], r["config"]): r for r in rows if "missing" not in r}
    checks = [
        ("lmstack-lora", "time_vs_peft_lora", 0.8, "lmstack LoRA step time <= 0.8x PEFT LoRA"),
        ("lmstack-lora", "memory_vs_peft_lora", 0.8, "lmstack LoRA peak memory <= 0.8x PEFT LoRA"),
        ("lmstack-qlora", "qlora_vs_lora_memory", 0.6, "lmstack QLoRA peak memory <= 0.6x lmstack LoRA"),
    ]
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for config, key, limit, text in checks:
            value = by.get((model, config), {}).get(key)
            verdict = "n/a" if value is None else ("PASS" if value <= limit else "FAIL")
            shown = f"{value:.2f}x" if value is not None else "missing"
            print(f"{verdict}  {model}: {text} ({shown})")
            out.append({"model": model, "target": text, "ratio": value, "verdict": verdict})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m-instruct,qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocator, first-call costs)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--targets", default=HF_TARGETS, help="LoRA target modules (Hugging Face names)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--checkpointing", type=int, choices=(0, 1), default=0,
        help="1: gradient checkpointing in every configuration (the QLoRA recipe's setting)",
    )  # fmt: skip
    ap.add_argument(
        "--rounds", type=int, default=1,
        help="run every configuration this many times, alternating the order; rows merge the rounds",
    )  # fmt: skip
    ap.add_argument("--skip-check", action="store_true", help="skip the lmstack == PEFT loss check")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--one", choices=[*CONFIGS, "equivalence"], help=argparse.SUPPRESS)  # subprocess mode
    ap.add_argument("--hf-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    torch.set_num_threads(args.threads)

    if args.one:
        name = args.models
        result = check_equivalence(name, args) if args.one == "equivalence" else run_one(args.one, name, args)
        print("RESULT " + json.dumps(result), flush=True)
        return

    print(
        f"batch {args.batch}  seq {args.seq}  steps {args.steps} (+{args.warmup} warm-up)  "
        f"threads {args.threads}  float32 CPU  gradient checkpointing {'on' if args.checkpointing else 'off'}"
        f"\nLoRA rank {args.rank}  alpha {args.alpha:g}  on {args.targets}"
    )
    rows, checks = [], []
    for name in args.models.split(","):
        model_rows, eq = bench_model(name, args)
        rows += model_rows
        checks += [eq] if eq else []
    ratios(rows)
    print_table(rows)
    print()
    targets = verdicts(rows)
    if args.json:
        keys = ("batch", "seq", "steps", "warmup", "threads", "rank", "alpha", "checkpointing", "rounds")
        meta = {k: getattr(args, k) for k in keys}
        meta |= {"targets": args.targets, "torch": torch.__version__}
        meta["machine"] = platform.processor() or platform.machine()
        for lib in ("transformers", "peft", "bitsandbytes"):
            spec = importlib.util.find_spec(lib)
            meta[lib] = __import__(lib).__version__ if spec else None
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"meta": meta, "equivalence": checks, "results": rows, "targets": targets}
        args.json.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
