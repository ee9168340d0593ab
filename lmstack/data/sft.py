"""Supervised fine-tuning data: JSONL conversations -> token ids, with labels on the assistant's tokens only.

Three record shapes are accepted, detected line by line, and all become chat messages:

    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
    {"prompt": "...", "response": "..."}
    {"instruction": "...", "input": "..." (optional), "output": "..."}          (Alpaca)

A conversation is rendered with the model's chat template and encoded the way inference encodes a chat
prompt (`encode(text, add_special_tokens=False)`, as `LLM.chat` and the server do), so the model trains on
the exact token sequence it is served with.

Labels follow the Hugging Face convention the losses expect: `labels[t]` is the target *at* position t
(the loss shifts), and -100 where no loss is taken. Only assistant turns are labelled, each one up to and
including the end-of-turn token that closes it, so the model learns to stop; the newline some templates
write after that token is left out, since generation stops before it.

Letters: B batch rows, T tokens per row.
"""

from __future__ import annotations

import bisect
import json
import os
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from torch.utils.data import Dataset

from lmstack.tokenizer import Tokenizer

IGNORE = -100  # label of a token that takes no loss (PyTorch's cross_entropy ignore_index default)
ROLES = ("system", "user", "assistant")
Messages = list[dict[str, str]]
T = TypeVar("T")

SHAPES = (
    '{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}',
    '{"prompt": "...", "response": "..."}',
    '{"instruction": "...", "input": "..." (optional), "output": "..."}',
)


# --- reading records ------------------------------------------------------------------------------------
def read_jsonl(path: str | os.PathLike[str]) -> list[tuple[int, dict[str, Any]]]:
    """(line number from 1, object) for each non-blank line of a JSON Lines file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a leading BOM is not JSON
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    records = []
    # split on "\n" only: str.splitlines would also cut at U+2028, which JSON strings may hold unescaped
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path} line {number}: invalid JSON ({error.msg} at column {error.colno})"
            ) from None
        if not isinstance(value, dict):
            raise ValueError(f"{path} line {number}: expected a JSON object, got {json_type(value)}")
        records.append((number, value))
    if not records:
        raise ValueError(f"{path}: no examples (the file is empty)")
    return records


def json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, int | float) else type(value).__name__)


def text_field(record: dict[str, Any], key: str, where: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise ValueError(f"{where}: {key!r} must be a string, got {json_type(value)}")
    return value


def check_messages(value: Any, where: str, key: str = "messages") -> Messages:
    """A list of {"role", "content"} dicts with known roles, not opening with the assistant."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: {key!r} must be a non-empty list of {{'role', 'content'}} objects")
    messages = []
    for index, message in enumerate(value):
        at = f"{where}: {key}[{index}]"
        if not isinstance(message, dict):
            raise ValueError(f"{at} must be an object, got {json_type(message)}")
        if message.get("role") not in ROLES:
            raise ValueError(f"{at}.role must be one of {', '.join(ROLES)}, got {message.get('role')!r}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"{at}.content must be a string, got {json_type(message.get('content'))}")
        messages.append({"role": message["role"], "content": message["content"]})
    if messages[0]["role"] == "assistant":
        raise ValueError(f"{where}: {key}[0] is an assistant turn; a conversation opens with system or user")
    return messages


def to_messages(record: dict[str, Any], where: str) -> Messages:
    """Normalize one record of any accepted shape to chat messages with at least one assistant turn."""
    if "messages" in record:
        messages = check_messages(record["messages"], where)
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError(
                f"{where}: no assistant message; SFT learns the assistant's turns, so each conversation "
                "needs at least one"
            )
        return messages
    if "prompt" in record and "response" in record:
        prompt, response = text_field(record, "prompt", where), text_field(record, "response", where)
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    if "instruction" in record and "output" in record:
        instruction = text_field(record, "instruction", where)
        extra = text_field(record, "input", where) if record.get("input") is not None else ""
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction  # Alpaca puts input after
        return [
            {"role": "user", "content": user},
            {"role": "assistant", "content": text_field(record, "output", where)},
        ]
    raise ValueError(
        f"{where}: unknown record shape (keys: {', '.join(sorted(record)) or 'none'}); expected one of "
        + ", ".join(SHAPES)
    )


@dataclass(frozen=True)
class Conversation:
    messages: Messages
    source: str  # where it came from ("train.jsonl line 3"), named by every later error about it


def load_sft_jsonl(path: str | os.PathLike[str]) -> list[Conversation]:
    return [Conversation(to_messages(r, f"{path} line {n}"), f"{path} line {n}") for n, r in read_jsonl(path)]


# --- chat template ---------------------------------------------------------------------------------------
CHATML_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PLAIN_TEMPLATE = (  # for vocabularies without ChatML tokens: text headers, assistant turns end with EOS
    "{% for m in messages %}{{ '### ' + (m['role'] | capitalize) + '\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant\n' }}{% endif %}"
)


def training_chat_template(tokenizer: Tokenizer) -> tuple[str, str]:
    """(template, a sentence saying which one and which tokens it uses), for the recipe to print.

    A base model has no chat template, so SFT gives it one: ChatML when the vocabulary has <|im_start|> and
    <|im_end|> as tokens, else plain "### User" / "### Assistant" headers with assistant turns closed by
    EOS. The fine-tuned model must be served with the same template, so save it with the checkpoint.
    """
    if tokenizer.chat_template:
        return tokenizer.chat_template, "the model's own chat template"
    bos = "{{ bos_token }}" if tokenizer.add_bos and tokenizer.bos_id is not None else ""
    start, end = tokenizer.token_to_id("<|im_start|>"), tokenizer.token_to_id("<|im_end|>")
    if start is not None and end is not None:
        note = f"no chat template (base model): ChatML with <|im_start|> (id {start}), <|im_end|> (id {end})"
        return bos + CHATML_TEMPLATE, note
    if tokenizer.eos_id is None:
        raise ValueError(
            "this tokenizer has no chat template, no ChatML tokens and no EOS token, so there is no token to "
            "end an assistant turn with; pass chat_template=... with one that closes assistant turns"
        )
    eos = tokenizer.id_to_token(tokenizer.eos_id)
    note = (
        "no chat template and no ChatML tokens (base model): plain '### User' / '### Assistant' headers, "
        f"assistant turns end with EOS {eos!r} (id {tokenizer.eos_id})"
    )
    return bos + PLAIN_TEMPLATE, note


# --- tokenizing ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # aligned with input_ids; IGNORE off the assistant turns
    source: str = ""
    truncated: bool = False


def tokenize_messages(
    messages: Messages,
    tokenizer: Tokenizer,
    *,
    chat_template: str | None = None,
    label: Literal["all", "last"] = "all",
    source: str = "conversation",
) -> Example:
    """Ids of the rendered conversation, labels on every assistant turn (or only the last one).

    Each assistant turn is located by rendering the conversation prefix by prefix: messages[:i] with the
    generation prompt, then messages[:i+1]; the turn is the text the second adds. Both must be prefixes of
    the whole rendering (a template that rewrites earlier turns breaks this, and is refused). The text span
    maps to the tokens that overlap it, through the tokenizer's offsets (as transformers'
    `return_assistant_tokens_mask` does): a token that a merge carries across the boundary (GPT-2's split
    pattern joins the header's newline with an answer's leading indent) is labelled, so no character of
    the answer goes unlearned. A conversation of n turns takes O(n) renders of O(n) messages each.
    """
    template = chat_template or training_chat_template(tokenizer)[0]

    def render(msgs: Messages, generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(msgs, generation_prompt, chat_template=template)

    text = render(messages, False)
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)  # == tokenizer.encode(text, False)
    ids = list(encoding.ids)
    starts, ends = [start for start, _ in encoding.offsets], [end for _, end in encoding.offsets]
    labels = [IGNORE] * len(ids)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for i in turns[-1:] if label == "last" else turns:
        before, after = render(messages[:i], True), render(messages[: i + 1], False)
        if not (after.startswith(before) and text.startswith(after)):
            raise ValueError(
                f"{source}: the chat template is not prefix-stable at message {i}: rendering messages[:{i}] "
                f"with the generation prompt, then messages[:{i + 1}], then the whole conversation must each "
                "extend the previous text, or the assistant's tokens cannot be found (templates that rewrite "
                "earlier turns do this); pass chat_template=... with one that does not"
            )
        lo, hi = bisect.bisect_right(ends, len(before)), bisect.bisect_left(starts, len(after))
        end = next((j + 1 for j in range(hi - 1, lo - 1, -1) if ids[j] in tokenizer.stop_ids), None)
        if end is None:
            stops = ", ".join(repr(tokenizer.id_to_token(s)) for s in sorted(tokenizer.stop_ids)) or "none"
            raise ValueError(
                f"{source}: assistant message {i} renders without an end-of-turn token (stop tokens: "
                f"{stops}), so the model could never learn to stop; use a template that ends assistant turns"
            )
        labels[lo:end] = ids[lo:end]
    return Example(ids, labels, source)


def fit_to_length(examples: Sequence[Example], max_len: int, *, truncate: bool = False) -> list[Example]:
    """Refuse examples over `max_len` tokens, naming them, or (truncate=True) cut their end off.

    `Example.truncated` marks the cut ones. A cut that would leave no labelled token (a prompt longer than
    max_len) drops the example, with a warning naming it.
    """
    check_lengths(examples, max_len, truncate=truncate)
    kept, dropped = [], []
    for example in examples:
        fitted = cut(example, max_len)
        if fitted is None:
            dropped.append(example.source)
        else:
            kept.append(fitted)
    warn_dropped(dropped, max_len)
    return kept


def check_lengths(examples: Sequence[Example], max_len: int, *, truncate: bool) -> None:
    if max_len <= 0:
        raise ValueError(f"max_len must be > 0, got {max_len}")
    too_long = [e for e in examples if len(e.input_ids) > max_len]
    if too_long and not truncate:
        named = ", ".join(f"{e.source} ({len(e.input_ids)} tokens)" for e in too_long[:5])
        more = f" and {len(too_long) - 5} more" if len(too_long) > 5 else ""
        raise ValueError(
            f"{len(too_long)} example(s) longer than max_len={max_len} tokens: {named}{more}; raise max_len, "
            "shorten them, or pass truncate=True to cut them to max_len (their end is dropped)"
        )


def cut(example: Example, max_len: int) -> Example | None:
    """The example cut to its first `max_len` tokens; None when that leaves no labelled token."""
    if len(example.input_ids) <= max_len:
        return example
    labels = example.labels[:max_len]
    if all(label == IGNORE for label in labels):
        return None
    return Example(example.input_ids[:max_len], labels, example.source, truncated=True)


def warn_dropped(sources: Sequence[str], max_len: int) -> None:
    if sources:
        named = ", ".join(sources[:5]) + (f" and {len(sources) - 5} more" if len(sources) > 5 else "")
        warnings.warn(
            f"dropped {len(sources)} example(s) whose prompt alone fills max_len={max_len} tokens, leaving "
            f"no assistant token to learn: {named}",
            stacklevel=3,
        )


def tokenize_sft(
    conversations: Sequence[Conversation | Messages],
    tokenizer: Tokenizer,
    max_len: int,
    *,
    truncate: bool = False,
    chat_template: str | None = None,
) -> list[Example]:
    """Tokenize conversations (from `load_sft_jsonl`, or plain message lists such as the corpora give)."""
    template = chat_template or training_chat_template(tokenizer)[0]
    examples = []
    for index, item in enumerate(conversations):
        if isinstance(item, Conversation):
            messages, source = item.messages, item.source
        else:
            source = f"conversation {index}"
            messages = to_messages({"messages": item}, source)
        examples.append(tokenize_messages(messages, tokenizer, chat_template=template, source=source))
    return fit_to_length(examples, max_len, truncate=truncate)


# --- packing, batches, splits ----------------------------------------------------------------------------
@dataclass(frozen=True)
class PackedExample:
    """Several examples in one row. `position_ids` restart at 0 and `document_ids` count up per example, so
    a model can rotate each example from position 0 and mask attention to within an example."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    document_ids: list[int]
    sources: tuple[str, ...]


def pack(examples: Sequence[Example], max_len: int) -> list[PackedExample]:
    """Concatenate short examples into rows of at most `max_len` tokens (best-fit decreasing).

    Attention should not cross examples: an answer would otherwise condition on an unrelated conversation,
    and at positions it never has when served. So each row carries restarting `position_ids` and
    `document_ids` for a block-diagonal causal mask. Labels stay as each example had them, and the first
    token of every example is never labelled, so no loss predicts one example from the one before it.
    Split into train/validation before packing.
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i].input_ids), i))
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (tokens still free, row index), sorted: best fit by bisection
    for i in order:
        n = len(examples[i].input_ids)
        if n > max_len:
            raise ValueError(f"{examples[i].source}: {n} tokens, over the packing length max_len={max_len}")
        k = bisect.bisect_left(room, (n, -1))
        if k == len(room):
            rows.append([i])
            bisect.insort(room, (max_len - n, len(rows) - 1))
        else:
            free, row = room.pop(k)
            rows[row].append(i)
            bisect.insort(room, (free - n, row))
    return [_concat([examples[i] for i in sorted(row)]) for row in rows]


def _concat(examples: Sequence[Example]) -> PackedExample:
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    documents: list[int] = []
    for doc, example in enumerate(examples):
        n = len(example.input_ids)
        ids += example.input_ids
        labels += [IGNORE, *example.labels[1:]]
        positions += range(n)
        documents += [doc] * n
    return PackedExample(ids, labels, positions, documents, tuple(e.source for e in examples))


def collate(items: Sequence[Example | PackedExample], pad_id: int = 0) -> dict[str, Any]:
    """Right-pad to the longest row. Padding is never attended by real tokens (causal) and takes no loss,
    so its id does not matter.

    Keys: input_ids, labels (IGNORE on padding), attention_mask (True on real tokens), position_ids,
    document_ids (-1 on padding; one id per row unless packed), all (B, T) tensors; n_tokens (real tokens).
    """
    if not items:
        raise ValueError("collate needs at least one example")
    B, T = len(items), max(len(item.input_ids) for item in items)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    document_ids = torch.full((B, T), -1, dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        input_ids[row, :n] = torch.tensor(item.input_ids)
        labels[row, :n] = torch.tensor(item.labels)
        if isinstance(item, PackedExample):
            position_ids[row, :n] = torch.tensor(item.position_ids)
            document_ids[row, :n] = torch.tensor(item.document_ids)
        else:
            position_ids[row, :n] = torch.arange(n)
            document_ids[row, :n] = 0
    attention_mask = document_ids >= 0
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "document_ids": document_ids,
        "n_tokens": int(attention_mask.sum()),
    }


class SFTDataset(Dataset[Example | PackedExample]):
    """Tokenized (or packed) examples; the training loop indexes it and batches with `collate`."""

    def __init__(self, examples: Sequence[Example | PackedExample]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example | PackedExample:
        return self.examples[index]

    @property
    def num_tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)

    @property
    def num_label_tokens(self) -> int:
        return sum(sum(label != IGNORE for label in e.labels) for e in self.examples)


def train_val_split(items: Sequence[T], val_fraction: float, seed: int = 0) -> tuple[list[T], list[T]]:
    """A seeded random split, each side in the original order; validation gets at least one item when
    val_fraction > 0, training always keeps at least one."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(items)
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    if n - n_val < 1:
        raise ValueError(
            f"{n} example(s) cannot be split with val_fraction={val_fraction}: none left to train"
        )
    val_index = set(random.Random(seed).sample(range(n), n_val))
    train = [item for i, item in enumerate(items) if i not in val_index]
    val = [item for i, item in enumerate(items) if i in val_index]
    return train, val
