"""The one training loop every method shares (full fine-tuning, LoRA, QLoRA, DPO, reward model ...).

    for step in range(start, total):                       # optimizer steps
        for micro in range(grad_accum):                    # gradient accumulation
            loss, metrics = loss_fn(model, next(batches))  # the method is only this function
            (loss / grad_accum).backward()
        clip; lr = warmup + cosine(step); AdamW step
        log (JSONL + progress bar); every eval_every: validation loss; every save_every: checkpoint

`stream` may turn the stream of data batches into the batches the loss sees: PPO turns each batch of
prompts into a rollout with the current model and yields its minibatches, several epochs over them.

A checkpoint holds the trainable parameters, the optimizer, the step, the position in the data order and
every RNG state, so a resumed run continues bit for bit where the interrupted one stopped (a test checks
the loss curves match). Resuming with another configuration is refused, naming the field that differs.
"""

from __future__ import annotations

import ctypes
import gc
import json
import math
import os
import random
import resource
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from lmstack.kernels import empty_allocator_cache, use_caching_allocator

Batch = dict[str, Any]
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, dict[str, float]]]
Collate = Callable[[list[Any]], Batch]
Stream = Callable[[Iterator[Batch]], Iterator[Batch]]


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int | None = None  # optimizer steps; None: `epochs` passes over the data
    epochs: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = 1.0
    eval_every: int = 50  # steps; 0: only at the end
    eval_batches: int | None = None  # None: the whole validation set
    save_every: int = 100  # steps; 0: only at the end
    seed: int = 0
    precision: str = "auto"  # auto | float32 | bfloat16 (autocast; auto = bfloat16 on a CUDA GPU that has it)
    gradient_checkpointing: bool = False

    def check(self) -> TrainConfig:
        problems = []
        if self.max_steps is not None and self.max_steps <= 0:
            problems.append(f"max_steps must be > 0, got {self.max_steps}")
        if self.epochs <= 0:
            problems.append(f"epochs must be > 0, got {self.epochs}")
        if self.batch_size <= 0 or self.grad_accum <= 0:
            problems.append("batch_size and grad_accum must be > 0")
        if not self.lr > 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            problems.append(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.precision not in ("auto", "float32", "bfloat16"):
            problems.append(f"precision must be auto, float32 or bfloat16, got {self.precision!r}")
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))
        return self


def lr_at(step: int, total: int, config: TrainConfig) -> float:
    """Linear warmup to `lr`, then a cosine down to lr * min_lr_ratio at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(total - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class BatchOrder:
    """Batches in a seeded order per epoch; its state (epoch, index) is all a resume needs."""

    def __init__(self, data: Sequence[Any], batch_size: int, seed: int, collate: Collate) -> None:
        if len(data) == 0:
            raise ValueError("no training examples")
        self.data, self.batch_size, self.seed, self.collate = data, batch_size, seed, collate
        self.epoch, self.index = 0, 0
        self._order = self._permutation()

    def __iter__(self) -> BatchOrder:
        return self

    def _permutation(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.data), generator=g).tolist()

    def __next__(self) -> Batch:
        if self.index >= len(self._order):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._permutation()
        ids = self._order[self.index : self.index + self.batch_size]
        self.index += len(ids)
        return self.collate([self.data[i] for i in ids])

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._permutation()


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


# --- memory -------------------------------------------------------------------------------------------------
def estimate_peak_bytes(model: nn.Module, config: TrainConfig, seq_len: int) -> int:
    """Weights + gradients and AdamW moments of the trainable part + activations kept for backward.

    Activations: per layer and token about 18 x dim floats for a pre-norm block (inputs of the norms,
    q/k/v/o, the MLP's three projections at hidden width, counted as 2 x dim each) plus the B x T x V
    logits and their gradient; with gradient checkpointing only the block inputs stay."""
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    train = sum(p.numel() for p in trainable(model).values()) * 4 * 3  # grad + 2 moments, float32
    cfg = getattr(model, "config", None)
    dim = getattr(cfg, "dim", 1024)
    layers = getattr(cfg, "n_layers", 12)
    hidden = getattr(cfg, "hidden_dim", 4 * dim) or 4 * dim
    vocab = getattr(cfg, "vocab_size", 32000)
    tokens = config.batch_size * seq_len
    per_layer = (dim if config.gradient_checkpointing else 12 * dim + 3 * hidden) * 4
    activations = tokens * (layers * per_layer + 3 * vocab * 4)
    return int(weights + train + activations)


def available_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil is pinned
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def use_training_allocator() -> bool:
    """Serve this process's CPU tensors from lmstack's caching allocator (lmstack.kernels), which keeps a
    step's freed blocks for the next step instead of leaving them cut up in glibc's heap: on smollm2-135m
    with checkpointing a step's peak went from ~1.4 to ~0.9 GB, flat from step to step. Call it before
    loading the model (`lmstack finetune` does), so loading's temporaries do not fragment the heap either;
    `train()` calls it in any case. LMSTACK_CPU_ALLOCATOR=system keeps glibc's. Returns whether the caching
    allocator is in use."""
    choice = os.environ.get("LMSTACK_CPU_ALLOCATOR", "caching")
    if choice not in ("caching", "system"):
        raise ValueError(f"LMSTACK_CPU_ALLOCATOR must be 'caching' or 'system', got {choice!r}")
    return choice == "caching" and use_caching_allocator()


def prepare_memory(model: nn.Module) -> bool:
    """Before the first step of a CPU model: hand what loading freed back to the system (the caching
    allocator's free blocks and glibc's heap, malloc_trim), then `use_training_allocator`. Returns whether
    the caching allocator is in use."""
    if any(p.device.type != "cpu" for p in model.parameters()):
        return False
    gc.collect()
    empty_allocator_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    return use_training_allocator()


# --- checkpoints --------------------------------------------------------------------------------------------
def _fingerprint(model: nn.Module, config: TrainConfig, extra: dict[str, Any]) -> dict[str, Any]:
    shapes = {name: list(p.shape) for name, p in trainable(model).items()}
    return {"train": asdict(config), "trainable": shapes, **extra}


def _check_same(saved: dict[str, Any], now: dict[str, Any], where: Path) -> None:
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and key == "train":
            for f in sorted(set(a) | set(b)):
                if json.dumps(a.get(f)) != json.dumps(b.get(f)):
                    raise ValueError(
                        f"the checkpoint in {where} was made with {f}={a.get(f)!r}, this run has "
                        f"{f}={b.get(f)!r}; resume with the same settings or use another output folder"
                    )
        elif json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
            raise ValueError(
                f"the checkpoint in {where} belongs to another setup ({key} differs: the model, method or "
                "trainable parameters changed); use another output folder"
            )


def save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    order: BatchOrder,
    fingerprint: dict[str, Any],
    history: list[dict[str, Any]],
) -> None:
    """Written to a temporary folder and renamed over the old one: a crash never leaves half a checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({k: v.detach().cpu() for k, v in trainable(model).items()}, tmp / "trainable.pt")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    rng = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    torch.save(rng, tmp / "rng.pt")
    state = {"step": step, "order": order.state(), "fingerprint": fingerprint, "history": history}
    (tmp / "state.json").write_text(json.dumps(state))
    old = path.with_name(path.name + ".old")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    order: BatchOrder,
    fingerprint: dict[str, Any],
) -> tuple[int, list[dict[str, Any]]]:
    state = json.loads((path / "state.json").read_text())
    _check_same(state["fingerprint"], fingerprint, path)
    params = trainable(model)
    saved = torch.load(path / "trainable.pt", map_location="cpu")
    with torch.no_grad():
        for name, value in saved.items():
            params[name].copy_(value)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu"))
    rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=False)
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    order.restore(state["order"])
    return int(state["step"]), list(state["history"])


# --- the loop -----------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per step (+ val rows)
    seconds: float = 0.0
    estimated_peak_bytes: int = 0
    measured_peak_bytes: int = 0
    out_dir: Path | None = None

    @property
    def train_losses(self) -> list[float]:
        return [r["loss"] for r in self.history if "loss" in r]

    @property
    def val_losses(self) -> list[tuple[int, float]]:
        return [(r["step"], r["val_loss"]) for r in self.history if "val_loss" in r]


def _autocast(model: nn.Module, precision: str) -> Any:
    device = next(model.parameters()).device
    bf16 = precision == "bfloat16" or (
        precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    if not bf16:
        return nullcontext()  # CPUs without bf16 units run float32 faster than emulated bf16
    return torch.autocast(device.type, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate(model: nn.Module, loss_fn: LossFn, batches: Iterator[Batch] | Sequence[Batch]) -> float:
    was = model.training
    model.eval()
    total, n = 0.0, 0
    for batch in batches:
        loss, _ = loss_fn(model, batch)
        total, n = total + float(loss), n + 1
    model.train(was)
    return total / max(n, 1)


def train(
    model: nn.Module,
    loss_fn: LossFn,
    train_data: Sequence[Any],
    collate: Collate,
    config: TrainConfig,
    out_dir: str | Path,
    *,
    val_data: Sequence[Any] = (),
    seq_len: int = 512,  # for the memory estimate
    setup: dict[str, Any] | None = None,  # what else a resume must match (model name, method ...)
    stop_after: int | None = None,  # stop (as if interrupted) after this many steps of this run (tests)
    progress: bool = True,
    memory_limit: int | None = None,  # bytes; default: what the machine has available
    stream: Stream | None = None,  # data batches -> loss batches (PPO: prompts -> rollout minibatches)
) -> TrainResult:
    config = config.check()
    out = Path(out_dir)
    params = trainable(model)
    if not params:
        raise ValueError("the model has no trainable parameters (everything is frozen)")
    estimate = estimate_peak_bytes(model, config, seq_len)
    limit = memory_limit if memory_limit is not None else available_bytes()
    if progress:
        print(f"estimated peak memory {estimate / 2**30:.2f} GiB (available {limit / 2**30:.1f} GiB)")
    if estimate > limit:
        raise MemoryError(
            f"training needs about {estimate / 2**30:.1f} GiB but {limit / 2**30:.1f} GiB are available; "
            "lower batch_size or the sequence length, use LoRA/QLoRA, or turn on gradient checkpointing"
        )
    prepare_memory(model)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    np.random.seed(config.seed)
    if hasattr(model, "gradient_checkpointing"):
        setattr(model, "gradient_checkpointing", config.gradient_checkpointing)  # noqa: B010
    elif config.gradient_checkpointing:
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")

    order = BatchOrder(train_data, config.batch_size, config.seed, collate)
    batches = stream(order) if stream is not None else order  # a stream pulls from `order` lazily
    steps_per_epoch = math.ceil(len(train_data) / (config.batch_size * config.grad_accum))
    total = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    decay = [p for p in params.values() if p.ndim >= 2]
    no_decay = [p for p in params.values() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=config.betas,
    )  # fmt: skip
    fingerprint = _fingerprint(model, config, setup or {})
    ckpt = out / "checkpoint"
    step, history = 0, list[dict[str, Any]]()
    if (ckpt / "state.json").exists():
        step, history = load_checkpoint(ckpt, model, optimizer, order, fingerprint)
    out.mkdir(parents=True, exist_ok=True)
    log = (out / "log.jsonl").open("w")  # rewritten from the checkpoint's history: no rows past it
    for row in history:
        log.write(json.dumps(row) + "\n")

    def val_batches() -> Iterator[Batch]:
        n = len(val_data)
        limit_batches = config.eval_batches
        for b, i in enumerate(range(0, n, config.batch_size)):
            if limit_batches is not None and b >= limit_batches:
                return
            yield collate([val_data[j] for j in range(i, min(i + config.batch_size, n))])

    def record(row: dict[str, Any]) -> None:
        history.append(row)
        log.write(json.dumps(row) + "\n")
        log.flush()

    model.train()
    t0 = time.perf_counter()
    bar = tqdm(total=total, initial=step, disable=not progress, unit="step", desc="train")
    done_here = 0
    try:
        while step < total:
            t_step = time.perf_counter()
            tokens, loss_sum, metrics_sum = 0, 0.0, dict[str, float]()
            for _ in range(config.grad_accum):
                batch = next(batches)
                with _autocast(model, config.precision):
                    loss, metrics = loss_fn(model, batch)
                (loss / config.grad_accum).backward()
                loss_sum += float(loss.detach()) / config.grad_accum
                tokens += int(batch.get("n_tokens", 0))
                for k, v in metrics.items():
                    metrics_sum[k] = metrics_sum.get(k, 0.0) + v / config.grad_accum
            norm = (
                float(torch.nn.utils.clip_grad_norm_(list(params.values()), config.max_grad_norm))
                if config.max_grad_norm
                else 0.0
            )
            lr = lr_at(step, total, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            done_here += 1
            dt = time.perf_counter() - t_step
            row = {"step": step, "loss": loss_sum, "lr": lr, "grad_norm": norm, "tokens": tokens,
                   "tokens_per_s": tokens / max(dt, 1e-9), **metrics_sum}  # fmt: skip
            record(row)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
            last = step == total
            if val_data and ((config.eval_every and step % config.eval_every == 0) or last):
                val = evaluate(model, loss_fn, val_batches())
                record({"step": step, "val_loss": val})
                bar.write(f"step {step}: val_loss {val:.4f}")
            if (config.save_every and step % config.save_every == 0) or last:
                save_checkpoint(ckpt, model, optimizer, step, order, fingerprint, history)
            if stop_after is not None and done_here >= stop_after and not last:
                save_checkpoint(ckpt, model, optimizer, step, order, fingerprint, history)
                break
    finally:
        bar.close()
        log.close()
        empty_allocator_cache()  # the next step would have reused the free blocks; training is over
    result = TrainResult(step, history, time.perf_counter() - t0, estimate, peak_rss_bytes(), out)
    if progress:
        print(f"measured peak memory {result.measured_peak_bytes / 2**30:.2f} GiB (process RSS)")
    plot_losses(history, out / "loss.png")
    return result


def plot_losses(history: list[dict[str, Any]], path: Path) -> Path | None:
    """Training loss per step and validation loss, as a PNG (None when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    train_rows = [r for r in history if "loss" in r]
    val_rows = [r for r in history if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], label="train", lw=1)
    if val_rows:
        ax.plot([r["step"] for r in val_rows], [r["val_loss"] for r in val_rows], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
