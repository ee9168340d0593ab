"""A reward model: the transformer's final hidden state at the last real token -> one scalar (Ouyang et al.
2022), trained on preference pairs with the pairwise (Bradley-Terry) loss -log sigmoid(r_chosen - r_rejected).

On disk a reward model is a folder next to nothing else:

    reward.json              {"format": "lmstack-reward", "base_model": NAME, "dim": C}
    adapter_config.json      the backbone's LoRA adapter, PEFT format (lmstack.adapters)
    adapter_model.safetensors
    reward_head.safetensors  the scalar head: weight (1, C), bias (1,)
    chat_template.jinja      the template the pairs were rendered with; scoring renders the same way

Letters: B batch, T tokens, C model width.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from lmstack.adapters import load_adapter, save_adapter
from lmstack.data.sft import Messages, tokenize_messages
from lmstack.models.transformer import Transformer
from lmstack.tokenizer import Tokenizer

FORMAT = "lmstack-reward"
CONFIG_NAME = "reward.json"
HEAD_NAME = "reward_head.safetensors"
TEMPLATE_NAME = "chat_template.jinja"


class RewardModel(nn.Module):
    """A backbone (LoRA'd or not) and a trainable linear head (C -> 1) on the last non-pad position."""

    def __init__(self, backbone: Transformer) -> None:
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config  # the training loop's memory estimate reads it
        p = backbone.tok_embeddings.weight
        self.score = nn.Linear(backbone.config.dim, 1, device=p.device, dtype=torch.float32)
        nn.init.normal_(self.score.weight, std=1 / (backbone.config.dim + 1) ** 0.5)
        nn.init.zeros_(self.score.bias)

    @property
    def gradient_checkpointing(self) -> bool:
        return self.backbone.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        self.backbone.gradient_checkpointing = on

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Right-padded ids (B, T) and each row's real length (B,) -> rewards (B,). Causal attention never
        lets a real token see the padding after it, so padding needs no mask."""
        h = self.backbone.forward_hidden(input_ids)  # (B, T, C)
        last = h[torch.arange(h.shape[0], device=h.device), lengths - 1]  # (B, C)
        return self.score(last.float()).squeeze(-1)  # (B,)


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """-log sigmoid(r_chosen - r_rejected), batch mean; accuracy is the share of pairs ranked right."""
    margin = chosen - rejected  # (B,)
    loss = -F.logsigmoid(margin).mean()
    margin = margin.detach()
    metrics = {
        "accuracy": float((margin > 0).float().mean()),
        "margin": float(margin.mean()),
        "reward_chosen": float(chosen.detach().mean()),
        "reward_rejected": float(rejected.detach().mean()),
    }
    return loss, metrics


def reward_loss(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    """The pairwise loss over a `collate_preference` batch, both sides in one forward (2B, T)."""
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])  # (2B, T)
    mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    rewards = model(ids, mask.sum(-1))  # (2B,)
    b = batch["chosen_input_ids"].shape[0]
    return pairwise_loss(rewards[:b], rewards[b:])


# --- on disk ------------------------------------------------------------------------------------------------
def save_reward_model(model: RewardModel, path: str | Path, base_model: str, chat_template: str) -> Path:
    out = Path(path)
    save_adapter(model.backbone, out, base_model_name=base_model)
    head = {k: v.detach().contiguous() for k, v in model.score.state_dict().items()}
    save_file(head, str(out / HEAD_NAME))
    (out / TEMPLATE_NAME).write_text(chat_template)
    meta = {"format": FORMAT, "base_model": base_model, "dim": model.config.dim}
    (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def read_reward_config(path: str | Path) -> dict[str, Any]:
    """reward.json, or a ValueError saying what the folder is missing and how to make one."""
    folder = Path(path)
    if not (folder / CONFIG_NAME).is_file():
        raise ValueError(
            f"{folder} is not a reward model folder (it has no {CONFIG_NAME}); "
            "train one with `lmstack finetune --method reward`, which writes OUT/reward"
        )
    meta = json.loads((folder / CONFIG_NAME).read_text())
    if meta.get("format") != FORMAT or not meta.get("base_model"):
        raise ValueError(f"{folder / CONFIG_NAME} is not an lmstack reward model config: {meta}")
    return meta


def check_base(path: str | Path, base_model: str) -> dict[str, Any]:
    """reward.json, if the folder was trained on `base_model` (a path to its folder or GGUF file and the
    bare name count as the same model, as in lmstack.adapters); else a ValueError saying what to do."""
    meta = read_reward_config(path)

    def key(name: str) -> str:
        return Path(str(name).rstrip("/")).name.lower().removesuffix(".gguf")

    if key(meta["base_model"]) != key(base_model):
        raise ValueError(
            f"the reward model in {path} was trained on {meta['base_model']!r}, not on {base_model!r}; "
            f"train one on it with `lmstack finetune -m {base_model} --method reward`"
        )
    return meta


def load_reward_model(path: str | Path, backbone: Transformer, base_model: str) -> RewardModel:
    """The reward model in `path` on `backbone` (loaded from `base_model`, modified in place), frozen, in
    eval mode. A folder trained on another base model is refused before anything changes."""
    meta = check_base(path, base_model)
    if meta["dim"] != backbone.config.dim:
        raise ValueError(
            f"the reward model in {path} has a head of width {meta['dim']}, {base_model!r} has width "
            f"{backbone.config.dim}; is {base_model!r} the model it was trained on?"
        )
    load_adapter(backbone, path, base_model_name=base_model)  # checks every shape
    model = RewardModel(backbone)
    model.score.load_state_dict(load_file(str(Path(path) / HEAD_NAME)))
    return model.requires_grad_(False).eval()


class RewardScorer:
    """Scores (prompt messages, response) pairs the way the reward model was trained: the prompt plus the
    response as an assistant turn, rendered by the saved chat template."""

    def __init__(self, model: RewardModel, tokenizer: Tokenizer, chat_template: str, batch_size: int = 8):
        self.model, self.tokenizer, self.template, self.batch_size = (
            model,
            tokenizer,
            chat_template,
            batch_size,
        )

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Messages], responses: Sequence[str]) -> list[float]:
        ids = [
            tokenize_messages(
                [*p, {"role": "assistant", "content": r}], self.tokenizer, chat_template=self.template
            ).input_ids
            for p, r in zip(prompts, responses, strict=True)
        ]
        device = self.model.score.weight.device
        scores: list[float] = []
        for i in range(0, len(ids), self.batch_size):
            rows = ids[i : i + self.batch_size]
            batch = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long, device=device)  # (B, T)
            for j, row in enumerate(rows):
                batch[j, : len(row)] = torch.tensor(row)
            lengths = torch.tensor([len(r) for r in rows], device=device)
            scores += self.model(batch, lengths).tolist()
        return scores
