"""Preference data for DPO: one prompt, a chosen and a rejected response.

    {"prompt": "..." or [messages ending with a user turn], "chosen": "...", "rejected": "..."}

`chosen` and `rejected` may also be a list holding one assistant message (TRL's conversational form).
Each side is tokenized as the prompt followed by that response, through the same chat template path as
SFT (`sft.tokenize_messages`), with labels on the response tokens only: earlier assistant turns of a
messages prompt are context, not labelled. The two sides share the prompt's tokens exactly.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lmstack.data.prompts import prompt_messages
from lmstack.data.sft import (
    IGNORE,
    Example,
    Messages,
    check_lengths,
    cut,
    json_type,
    read_jsonl,
    tokenize_messages,
    training_chat_template,
    warn_dropped,
)
from lmstack.tokenizer import Tokenizer

SHAPE = '{"prompt": "..." or [messages], "chosen": "...", "rejected": "..."}'


@dataclass(frozen=True)
class PreferencePair:
    prompt: Messages  # ends with a user turn
    chosen: str
    rejected: str
    source: str = ""


def to_preference_pair(record: dict[str, Any], where: str) -> PreferencePair:
    missing = [key for key in ("prompt", "chosen", "rejected") if key not in record]
    if missing:
        raise ValueError(
            f"{where}: missing {', '.join(repr(k) for k in missing)} "
            f"(keys: {', '.join(sorted(record)) or 'none'}); a preference record is {SHAPE}"
        )
    messages = prompt_messages(record["prompt"], where, "the responses")
    chosen, rejected = _response(record, "chosen", where), _response(record, "rejected", where)
    if chosen == rejected:
        raise ValueError(f"{where}: chosen and rejected are the same text, which teaches nothing")
    return PreferencePair(messages, chosen, rejected, where)


def _response(record: dict[str, Any], key: str, where: str) -> str:
    value = record[key]
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        if value[0].get("role") == "assistant" and isinstance(value[0].get("content"), str):
            return value[0]["content"]
    if not isinstance(value, str):
        raise ValueError(
            f"{where}: {key!r} must be a string (or a list of one assistant message), got {json_type(value)}"
        )
    return value


def load_preference_jsonl(path: str | os.PathLike[str]) -> list[PreferencePair]:
    return [to_preference_pair(r, f"{path} line {n}") for n, r in read_jsonl(path)]


@dataclass(frozen=True)
class PreferenceExample:
    chosen: Example
    rejected: Example
    source: str = ""


def tokenize_preference(
    pairs: Sequence[PreferencePair],
    tokenizer: Tokenizer,
    max_len: int,
    *,
    truncate: bool = False,
    chat_template: str | None = None,
) -> list[PreferenceExample]:
    """prompt + chosen and prompt + rejected, labels on the response; over-long sides as in SFT
    (an error naming them, or truncate=True to cut their end off; a pair either of whose sides keeps no
    response token is dropped, with a warning)."""
    template = chat_template or training_chat_template(tokenizer)[0]

    def side(pair: PreferencePair, response: str, name: str) -> Example:
        messages = [*pair.prompt, {"role": "assistant", "content": response}]
        source = f"{pair.source or 'pair'} ({name})"
        return tokenize_messages(messages, tokenizer, chat_template=template, label="last", source=source)

    chosen = [side(p, p.chosen, "chosen") for p in pairs]
    rejected = [side(p, p.rejected, "rejected") for p in pairs]
    check_lengths(chosen + rejected, max_len, truncate=truncate)
    kept, dropped = [], []
    for c, r, pair in zip(chosen, rejected, pairs, strict=True):
        c_cut, r_cut = cut(c, max_len), cut(r, max_len)
        if c_cut is not None and r_cut is not None:
            kept.append(PreferenceExample(c_cut, r_cut, pair.source))
        else:
            dropped.append(pair.source)
    warn_dropped(dropped, max_len)
    return kept


def collate_preference(items: Sequence[PreferenceExample], pad_id: int = 0) -> dict[str, Any]:
    """Right-padded (B, T) tensors, chosen and rejected padded to one T so a DPO step can run both sides
    in one forward: `torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])` is (2B, T).

    Keys: chosen_input_ids, chosen_labels, chosen_attention_mask, the same three for rejected, n_tokens.
    """
    if not items:
        raise ValueError("collate_preference needs at least one pair")
    sides = {"chosen": [item.chosen for item in items], "rejected": [item.rejected for item in items]}
    T = max(len(e.input_ids) for examples in sides.values() for e in examples)
    batch: dict[str, Any] = {}
    for name, examples in sides.items():
        input_ids = torch.full((len(items), T), pad_id, dtype=torch.long)  # (B, T)
        labels = torch.full((len(items), T), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(items), T), dtype=torch.bool)
        for row, example in enumerate(examples):
            n = len(example.input_ids)
            input_ids[row, :n] = torch.tensor(example.input_ids)
            labels[row, :n] = torch.tensor(example.labels)
            mask[row, :n] = True
        batch.update(
            {f"{name}_input_ids": input_ids, f"{name}_labels": labels, f"{name}_attention_mask": mask}
        )
    batch["n_tokens"] = int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())
    return batch
