"""Fine-tuning data: SFT conversations and DPO preference pairs -> token ids, labels and padded batches."""

from lmstack.data.preference import (
    PreferenceExample,
    PreferencePair,
    collate_preference,
    load_preference_jsonl,
    tokenize_preference,
)
from lmstack.data.sft import (
    IGNORE,
    Conversation,
    Example,
    PackedExample,
    SFTDataset,
    collate,
    load_sft_jsonl,
    pack,
    read_jsonl,
    tokenize_messages,
    tokenize_sft,
    train_val_split,
    training_chat_template,
)

__all__ = [
    "IGNORE",
    "Conversation",
    "Example",
    "PackedExample",
    "PreferenceExample",
    "PreferencePair",
    "SFTDataset",
    "collate",
    "collate_preference",
    "load_preference_jsonl",
    "load_sft_jsonl",
    "pack",
    "read_jsonl",
    "tokenize_messages",
    "tokenize_preference",
    "tokenize_sft",
    "train_val_split",
    "training_chat_template",
]
