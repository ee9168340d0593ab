"""Prompts for on-policy training (PPO): the policy writes the answers, so only the conversation up to the
user's last turn is kept.

    {"prompt": "..." or [messages ending with a user turn]}     (a preference file's records qualify)
    {"messages": [...]}                                          (a chat: a final assistant turn is dropped)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lmstack.data.sft import Messages, check_messages, read_jsonl, training_chat_template
from lmstack.tokenizer import Tokenizer

SHAPE = '{"prompt": "..." or [messages]} or {"messages": [...]}'


def prompt_messages(value: Any, where: str, answered_by: str) -> Messages:
    """A record's "prompt": a string (one user turn) or a message list that ends with a user turn."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    messages = check_messages(value, where, key="prompt")
    if messages[-1]["role"] != "user":
        raise ValueError(f"{where}: the prompt must end with a user message ({answered_by} answers it)")
    return messages


def to_prompt(record: dict[str, Any], where: str) -> Messages:
    if "prompt" in record:
        return prompt_messages(record["prompt"], where, "the policy")
    if "messages" not in record:
        raise ValueError(
            f"{where}: no 'prompt' or 'messages' (keys: {', '.join(sorted(record))}); use {SHAPE}"
        )
    messages = check_messages(record["messages"], where)
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]  # the policy writes its own answer
    if not messages or messages[-1]["role"] != "user":
        raise ValueError(f"{where}: the prompt must end with a user message (the policy answers it)")
    return messages


def load_prompt_jsonl(path: str | os.PathLike[str]) -> list[Messages]:
    return [to_prompt(r, f"{path} line {n}") for n, r in read_jsonl(path)]


@dataclass(frozen=True)
class PromptExample:
    messages: Messages
    input_ids: list[int]  # the rendered prompt with the generation prompt (the assistant header)
    source: str = ""


def tokenize_prompts(
    prompts: Sequence[Messages],
    tokenizer: Tokenizer,
    chat_template: str | None,
    max_prompt_len: int,
    *,
    sources: Sequence[str] | None = None,
) -> list[PromptExample]:
    """Each prompt rendered up to the assistant header; one longer than `max_prompt_len` tokens is an error
    naming it (the completion needs the rest of the context)."""
    template = chat_template or training_chat_template(tokenizer)[0]
    out = []
    for i, messages in enumerate(prompts):
        text = tokenizer.apply_chat_template(messages, True, chat_template=template)
        ids = tokenizer.encode(text, add_special_tokens=False)
        source = sources[i] if sources is not None else f"prompt {i}"
        if len(ids) > max_prompt_len:
            raise ValueError(
                f"{source}: the prompt has {len(ids)} tokens, more than the {max_prompt_len} left for it "
                "(max_len minus max_new_tokens); raise --max-len or shorten the prompt"
            )
        out.append(PromptExample(messages, ids, source))
    return out
