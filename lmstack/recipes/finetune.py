"""`lmstack finetune`: load a model, tokenize the data, pick the trainable part, run the one training loop,
save what a user loads back (a PEFT-format adapter, or the full weights).

    full   every weight trains                       -> OUT/model.safetensors + chat_template.jinja
    lora   LoRA on the target modules                 -> OUT/adapter (PEFT format)
    qlora  NF4 frozen base + LoRA                     -> OUT/adapter (PEFT format; load on the float base)
    dpo    LoRA policy vs the same weights with the adapter disabled as reference -> OUT/adapter

A thin recipe: copy it to change what it does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
from lmstack.lora import LoraConfig, apply_lora, disable_adapters, trainable_parameters
from lmstack.nf4 import quantize_model_nf4
from lmstack.train import TrainConfig, TrainResult, train
from lmstack.train.losses import dpo_loss_from_logprobs, sequence_logprob, sft_loss

METHODS = ("full", "lora", "qlora", "dpo")


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
    if args.method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {args.method!r}")
    for p in (args.data, args.val):
        if p is not None and not Path(p).is_file():
            raise ValueError(f"{p}: no such data file")
    lora = None
    if args.method != "full":
        lora = LoraConfig(
            r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout, target_modules=args.targets
        )

    llm = LLM.load(args.model, device="cpu", cache_dir=args.cache_dir)
    tok = llm.tokenizer
    template, note = training_chat_template(tok)
    if args.progress:
        print(f"chat template: {note}")

    # data -> examples (errors name the file and line before any training starts)
    val_examples: list[Any]
    if args.method == "dpo":
        pairs = load_preference_jsonl(args.data)
        examples: list[Any] = tokenize_preference(
            pairs, tok, args.max_len, truncate=args.truncate, chat_template=template
        )
        val_pairs = load_preference_jsonl(args.val) if args.val else None
        if val_pairs is not None:
            val_examples = tokenize_preference(
                val_pairs, tok, args.max_len, truncate=args.truncate, chat_template=template
            )
        else:
            examples, val_examples = train_val_split(examples, args.val_fraction, seed=args.train.seed)

        def batch_fn(items: list[Any]) -> dict[str, Any]:
            return collate_preference(items)  # padding is never labelled, and causal attention never sees it

        loss_fn = _dpo_loss(args.beta)
    else:
        convs = load_sft_jsonl(args.data)
        examples = tokenize_sft(convs, tok, args.max_len, truncate=args.truncate, chat_template=template)
        if args.val:
            val_convs = load_sft_jsonl(args.val)
            val_examples = tokenize_sft(
                val_convs, tok, args.max_len, truncate=args.truncate, chat_template=template
            )
        else:
            examples, val_examples = train_val_split(examples, args.val_fraction, seed=args.train.seed)

        def batch_fn(items: list[Any]) -> dict[str, Any]:
            return collate(items)

        loss_fn = sft_loss

    # the trainable part
    model = llm.model
    if args.method == "qlora":
        quantize_model_nf4(model)
    if lora is not None:
        apply_lora(model, lora)
    else:
        model.requires_grad_(True)
    if args.progress:
        print(trainable_parameters(model))

    setup = {
        "model": args.model,
        "method": args.method,
        "data": _file_digest(args.data),
        "max_len": args.max_len,
    }
    result = train(
        model, loss_fn, examples, batch_fn, args.train, args.out, val_data=val_examples, seq_len=args.max_len,
        setup=setup, progress=args.progress,
    )  # fmt: skip

    out = Path(args.out)
    if lora is not None:
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
    return result
