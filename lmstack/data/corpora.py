"""Real conversation data that ships as PyPI packages, as chat messages ready for `tokenize_sft`.

- chatterbot-corpus (BSD): YAML files of short scripted exchanges per topic; English has 2,026
  conversations, nearly all a single question and answer.
- chitchat-dataset (MIT): 7,168 crowd-sourced two-person chats (BYU PCC lab); 3,150 of them have only one
  side speaking, which leaves 4,017 with an answer to learn from.

Speakers alternate user / assistant from the first one, and a conversation ends on an assistant turn (a
trailing user turn has nothing to learn and is dropped). Order is the packages' own, so results are
reproducible.
"""

from __future__ import annotations

import importlib
import importlib.resources
import json
import random
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from lmstack.data.preference import PreferencePair
from lmstack.data.sft import Messages

CHATTERBOT = "chatterbot-corpus==1.3.3"
CHITCHAT = "chitchat-dataset==0.9.0"


def _require(module: str, requirement: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"this corpus ships in the {requirement.split('==')[0]!r} package: pip install {requirement}"
        ) from None


def alternate(turns: Sequence[str]) -> Messages:
    """Texts said in turn by two speakers -> user/assistant messages ending with the assistant (may be [])."""
    messages = [{"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(turns)]
    return messages[: len(messages) // 2 * 2]


def chatterbot_pairs(lang: str = "english") -> list[Messages]:
    """Every conversation of one language of chatterbot-corpus (2,026 for English; most are one Q/A pair)."""
    corpus = _require("chatterbot_corpus.corpus", CHATTERBOT)
    import yaml

    folder = Path(corpus.DATA_DIRECTORY) / lang
    if not folder.is_dir():
        langs = sorted(p.name for p in Path(corpus.DATA_DIRECTORY).iterdir() if p.is_dir())
        raise ValueError(f"chatterbot-corpus has no language {lang!r}; it has {', '.join(langs)}")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when built in: ~10x faster
    conversations = []
    for path in sorted(folder.glob("*.yml")):
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=loader) or {}
        for conversation in data.get("conversations") or []:
            turns = [str(text).strip() for text in conversation if text is not None and str(text).strip()]
            if messages := alternate(turns):
                conversations.append(messages)
    return conversations


def chitchat_conversations(
    limit: int | None = None, *, max_turns: int | None = None, separator: str = "\n"
) -> list[Messages]:
    """chitchat-dataset's conversations that have an answer (4,017), first speaker as the user.

    A turn is one speaker's run of chat lines, joined with `separator`. `max_turns` keeps each
    conversation's opening turns only (most run 10-30 turns, a few pass 10k tokens), for short sequences
    on small models; tokenizing also costs less (every prefix of a conversation is rendered).
    """
    package = _require("chitchat_dataset", CHITCHAT)
    data = json.loads((importlib.resources.files(package) / "dataset.json").read_text(encoding="utf-8"))
    conversations = []
    for chat in data.values():
        turns: list[str] = []
        senders: list[str] = []
        for group in chat["messages"]:
            text = separator.join(line["text"].strip() for line in group if line["text"].strip())
            if not text:
                continue
            if senders and group[0]["sender"] == senders[-1]:  # the same speaker again: one turn
                turns[-1] += separator + text
            else:
                turns.append(text)
                senders.append(group[0]["sender"])
        if messages := alternate(turns[:max_turns]):
            conversations.append(messages)
            if limit is not None and len(conversations) >= limit:
                break
    return conversations


def preference_pairs_from(conversations: Sequence[Messages], seed: int = 0) -> list[PreferencePair]:
    """Preference pairs from plain conversations, for a DPO demo: the prompt is everything before the last
    assistant turn, chosen is that turn, rejected is the last reply of another conversation drawn at random.

    The signal is relevance (an answer to this prompt over one to something else), not quality; rejected
    replies that some conversation gives to the same prompt text (chatterbot has several answers to "How
    are you?") are never drawn. A conversation with no such reply to draw is left out.
    """
    usable = [
        c for c in conversations if len(c) >= 2 and c[-1]["role"] == "assistant" and c[-2]["role"] == "user"
    ]
    if len(usable) < 2:
        raise ValueError("preference pairs need at least two conversations ending user -> assistant")
    replies: dict[str, set[str]] = {}
    for c in usable:
        replies.setdefault(c[-2]["content"], set()).add(c[-1]["content"])
    rng = random.Random(seed)
    pairs = []
    for index, c in enumerate(usable):
        good = replies[c[-2]["content"]]
        for _ in range(10):
            rejected = usable[rng.randrange(len(usable))][-1]["content"]
            if rejected not in good:
                pairs.append(
                    PreferencePair(list(c[:-1]), c[-1]["content"], rejected, f"conversation {index}")
                )
                break
    return pairs
