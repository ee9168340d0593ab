"""`lmstack finetune`'s recipe end to end on the tiny random Llama: LoRA, QLoRA, full and DPO runs write what
`LLM.load` reads back, and bad input is refused before any training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmstack.api import LLM
from lmstack.recipes.finetune import FinetuneArgs, finetune
from lmstack.train import TrainConfig

CHAT = [
    {
        "messages": [
            {"role": "user", "content": "The capital of France?"},
            {"role": "assistant", "content": "Paris."},
        ]
    },
    {"prompt": "def f(x):", "response": "return x + 1"},
    {"instruction": "Name a city.", "input": "", "output": "Paris."},
] * 4
PREFS = [{"prompt": "The capital of France?", "chosen": "Paris.", "rejected": "def f(x):"}] * 8
STEPS = TrainConfig(max_steps=3, batch_size=2, lr=1e-3, warmup_steps=1, eval_every=0, save_every=0)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def args(tiny_checkpoint: Path, tmp_path: Path, method: str, rows: list[dict] = CHAT, **kw) -> FinetuneArgs:
    data = write_jsonl(tmp_path / f"{method}.jsonl", rows)
    kw = {"targets": ["q_proj", "v_proj"], **kw}
    return FinetuneArgs(
        model=str(tiny_checkpoint), method=method, data=data, out=tmp_path / method, max_len=64, train=STEPS,
        progress=False, **kw,
    )  # fmt: skip


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_adapter_methods_save_a_loadable_adapter(tiny_checkpoint: Path, tmp_path: Path, method: str) -> None:
    result = finetune(args(tiny_checkpoint, tmp_path, method))
    assert result.steps == 3 and result.val_losses
    adapter = tmp_path / method / "adapter"
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    tuned = LLM.load(str(tiny_checkpoint), device="cpu", adapter=adapter)
    base = LLM.load(str(tiny_checkpoint), device="cpu")
    ids = base.tokenizer.encode("The capital of France?")
    assert not torch.allclose(tuned.logits(ids), base.logits(ids))  # the adapter changed something
    assert (tmp_path / method / "loss.png").exists()


def test_full_and_dpo(tiny_checkpoint: Path, tmp_path: Path) -> None:
    finetune(args(tiny_checkpoint, tmp_path, "full"))
    assert (tmp_path / "full" / "model.safetensors").exists()
    result = finetune(args(tiny_checkpoint, tmp_path, "dpo", rows=PREFS))
    assert {"reward_accuracy", "reward_margin"} <= result.history[0].keys()


def test_bad_input_is_refused_before_training(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such data file"):
        finetune(
            FinetuneArgs(
                model=str(tiny_checkpoint), method="lora", data=tmp_path / "x.jsonl", out=tmp_path / "o"
            )
        )
    with pytest.raises(ValueError, match="r \\(the rank\\) must be a positive integer"):
        finetune(args(tiny_checkpoint, tmp_path, "lora", rank=0))
    with pytest.raises(ValueError, match="match"):
        finetune(args(tiny_checkpoint, tmp_path, "lora", targets=["nothing_like_this"]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(CHAT[0]) + "\n{oops\n")
    a = args(tiny_checkpoint, tmp_path, "lora")
    a.data = bad
    with pytest.raises(ValueError, match="line 2"):
        finetune(a)
    long = args(tiny_checkpoint, tmp_path, "lora", rows=[{"prompt": "x " * 200, "response": "y"}] * 2)
    with pytest.raises(ValueError, match="longer than max_len"):
        finetune(long)
    assert not (tmp_path / "lora").exists()  # nothing written by any refused run


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--method", "lora"], False),
        (["--method", "qlora"], True),
        (["--method", "qlora", "--no-gradient-checkpointing"], False),
        (["--method", "lora", "--gradient-checkpointing"], True),
    ],
)  # fmt: skip
def test_qlora_checkpoints_by_default_on_the_command_line(argv: list[str], expected: bool) -> None:
    """`lmstack finetune --method qlora` turns gradient checkpointing on unless told not to, as PEFT does."""
    from lmstack.cli import build_parser, checkpointing_for

    parsed = build_parser().parse_args(["finetune", "-m", "m", "--data", "d.jsonl", "--out", "o", *argv])
    assert checkpointing_for(parsed.method, parsed.gradient_checkpointing) is expected
