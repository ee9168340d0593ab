"""Fine-tuning data: exact label masks on a hand-checked ChatML example, the template prefix property, the
record shapes and their errors (with line numbers), length limits, packing that keeps every label once,
deterministic splits, preference pairs, and the packaged corpora."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmstack.data import (
    IGNORE,
    Example,
    PreferencePair,
    SFTDataset,
    collate,
    collate_preference,
    load_preference_jsonl,
    load_sft_jsonl,
    pack,
    read_jsonl,
    tokenize_messages,
    tokenize_preference,
    tokenize_sft,
    train_val_split,
    training_chat_template,
)
from lmstack.data.sft import CHATML_TEMPLATE
from lmstack.tokenizer import Tokenizer

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "The capital of France?"},
    {"role": "assistant", "content": "Paris."},
]


@pytest.fixture(scope="module")
def tok(tiny_checkpoint: Path) -> Tokenizer:
    return Tokenizer.from_pretrained_dir(tiny_checkpoint)


def write_jsonl(path: Path, lines: list[object]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def labelled_runs(example: Example) -> list[list[int]]:
    """The labelled token ids, as contiguous runs."""
    runs: list[list[int]] = []
    for t, label in enumerate(example.labels):
        if label == IGNORE:
            continue
        assert label == example.input_ids[t]
        if t == 0 or example.labels[t - 1] == IGNORE:
            runs.append([])
        runs[-1].append(label)
    return runs


# --- label masks ------------------------------------------------------------------------------------------
def test_chatml_labels_are_exactly_the_assistant_text_and_its_end_of_turn(tok: Tokenizer) -> None:
    example = tokenize_messages(CONVERSATION, tok)
    text = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nThe capital of France?<|im_end|>\n"
        "<|im_start|>assistant\nParis.<|im_end|>\n"
    )
    assert example.input_ids == tok.encode(text, add_special_tokens=False)
    im_end = tok.token_to_id("<|im_end|>")
    (run,) = labelled_runs(example)
    assert run == tok.encode("Paris.", add_special_tokens=False) + [im_end]
    assert tok.decode(run) == "Paris.<|im_end|>"
    prompt = tok.encode(tok.apply_chat_template(CONVERSATION[:2], True), add_special_tokens=False)
    assert example.labels[: len(prompt)] == [IGNORE] * len(prompt)
    assert example.labels[-1] == IGNORE  # the newline after <|im_end|> is never generated


def test_every_assistant_turn_is_labelled_and_only_the_last_on_request(tok: Tokenizer) -> None:
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "def f(x):"},
        {"role": "assistant", "content": "    return x + 1"},
    ]
    runs = labelled_runs(tokenize_messages(messages, tok))
    # GPT-2's split pattern merges the header's newline with the indent ("\n   "): that token overlaps
    # the answer, so it is labelled rather than the answer losing its first spaces
    assert [tok.decode(r) for r in runs] == ["Hello!<|im_end|>", "\n    return x + 1<|im_end|>"]
    (last,) = labelled_runs(tokenize_messages(messages, tok, label="last"))
    assert last == runs[1]


def test_rendering_is_prefix_stable_and_a_template_that_is_not_is_refused(tok: Tokenizer) -> None:
    full = tok.encode(tok.apply_chat_template(CONVERSATION, False), add_special_tokens=False)
    for i in range(1, len(CONVERSATION) + 1):
        generation = CONVERSATION[i - 1]["role"] != "assistant" and CONVERSATION[i]["role"] == "assistant"
        prefix = tok.encode(tok.apply_chat_template(CONVERSATION[:i], generation), add_special_tokens=False)
        assert full[: len(prefix)] == prefix
    counting = "{{ messages | length }} turns\n" + CHATML_TEMPLATE  # the first line changes with every turn
    with pytest.raises(ValueError, match="prefix-stable at message 2"):
        tokenize_messages(CONVERSATION, tok, chat_template=counting, source="x.jsonl line 4")


def test_a_template_without_end_of_turn_is_refused(tok: Tokenizer) -> None:
    no_end = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    with pytest.raises(ValueError, match="never learn to stop"):
        tokenize_messages(CONVERSATION, tok, chat_template=no_end)


def test_base_model_gets_chatml_with_its_own_tokens(tiny_checkpoint: Path) -> None:
    base = Tokenizer.from_pretrained_dir(tiny_checkpoint)
    base.chat_template = None
    template, note = training_chat_template(base)
    assert template == CHATML_TEMPLATE and "<|im_start|> (id 1)" in note
    (run,) = labelled_runs(tokenize_messages(CONVERSATION, base))
    assert base.decode(run) == "Paris.<|im_end|>"


def test_base_model_without_chatml_tokens_gets_text_headers_and_eos() -> None:
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=200, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(["Paris is the capital. " * 10], trainer)
    base = Tokenizer(backend, eos_id=backend.token_to_id("</s>"))
    template, note = training_chat_template(base)
    assert "'</s>'" in note and "### Assistant" in note
    example = tokenize_messages(CONVERSATION, base)
    text = "### System\nBe brief.\n\n### User\nThe capital of France?\n\n### Assistant\nParis.</s>\n\n"
    assert base.decode(example.input_ids) == text
    (run,) = labelled_runs(example)
    assert base.decode(run) == "Paris.</s>"
    with pytest.raises(ValueError, match="no EOS token"):
        training_chat_template(Tokenizer(backend))


# --- records ----------------------------------------------------------------------------------------------
def test_three_shapes_become_messages(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"messages": CONVERSATION},
            "",  # blank lines are skipped, line numbers still count them
            {"prompt": "Hi", "response": "Hello"},
            {"instruction": "Add one.", "input": "41", "output": "42"},
            {"instruction": "Say hi.", "output": "hi"},
        ],
    )
    conversations = load_sft_jsonl(path)
    assert [c.messages for c in conversations] == [
        CONVERSATION,
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        [{"role": "user", "content": "Add one.\n\n41"}, {"role": "assistant", "content": "42"}],
        [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}],
    ]
    assert [c.source for c in conversations] == [f"{path} line {n}" for n in (1, 3, 4, 5)]


@pytest.mark.parametrize(
    ("line3", "message"),
    [
        ('{"prompt": "a", "response": ', "line 3: invalid JSON"),
        ("[1, 2]", "line 3: expected a JSON object, got an array"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "line 3: no assistant message"),
        ({"messages": [{"role": "bot", "content": "hi"}]}, r"line 3: messages\[0\].role must be one of"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "line 3: messages.0. is an assistant turn"),
        ({"prompt": "a", "response": 7}, "line 3: 'response' must be a string, got a number"),
        (
            {"question": "a", "answer": "b"},
            'line 3: unknown record shape .keys: answer, question.*"instruction"',
        ),
    ],
)
def test_bad_records_name_their_line(tmp_path: Path, line3: object, message: str) -> None:
    good = {"prompt": "a", "response": "b"}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, good, line3, good])
    with pytest.raises(ValueError, match=message):
        load_sft_jsonl(path)


def test_empty_file_has_no_examples(tmp_path: Path) -> None:
    for text in ("", "\n\n"):
        (tmp_path / "empty.jsonl").write_text(text)
        with pytest.raises(ValueError, match="no examples"):
            read_jsonl(tmp_path / "empty.jsonl")


def test_too_long_is_an_error_unless_truncation_is_asked_for(tmp_path: Path, tok: Tokenizer) -> None:
    long = {"prompt": "Hi", "response": "The capital of France is Paris. " * 8}
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "Hi", "response": "Hey"}, long])
    conversations = load_sft_jsonl(path)
    n = len(tokenize_sft(conversations, tok, max_len=1000)[1].input_ids)
    with pytest.raises(
        ValueError, match=rf"1 example\(s\) longer than max_len=30 tokens: .*line 2 \({n} tokens\)"
    ):
        tokenize_sft(conversations, tok, max_len=30)
    short, cut = tokenize_sft(conversations, tok, max_len=30, truncate=True)
    assert not short.truncated and cut.truncated and len(cut.input_ids) == 30
    assert sum(e.truncated for e in (short, cut)) == 1
    assert any(label != IGNORE for label in cut.labels)
    with pytest.warns(UserWarning, match="dropped 1 example.*prompt alone fills max_len=8.*line 2"):
        assert tokenize_sft(conversations[1:], tok, max_len=8, truncate=True) == []


# --- packing, batches, splits -----------------------------------------------------------------------------
def random_examples(tok: Tokenizer, n: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    words = "The capital of France is Paris . def f ( x ) : return x + 1".split()
    conversations = [
        [
            {"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(1, 12)))},
            {"role": "assistant", "content": " ".join(rng.choices(words, k=rng.randint(1, 20)))},
        ]
        for _ in range(n)
    ]
    return tokenize_sft(conversations, tok, max_len=64)


def test_packing_fits_and_keeps_every_label_once(tok: Tokenizer) -> None:
    examples = random_examples(tok, 40)
    packed = pack(examples, max_len=64)
    assert len(packed) < len(examples) and all(len(p.input_ids) <= 64 for p in packed)
    documents = []
    for p in packed:
        assert len(p.input_ids) == len(p.labels) == len(p.position_ids) == len(p.document_ids)
        for d in range(max(p.document_ids) + 1):
            span = [t for t, doc in enumerate(p.document_ids) if doc == d]
            assert [p.position_ids[t] for t in span] == list(range(len(span)))
            assert p.labels[span[0]] == IGNORE  # nothing is predicted across a document boundary
            documents.append((tuple(p.input_ids[t] for t in span), tuple(p.labels[t] for t in span)))
    assert sorted(documents) == sorted((tuple(e.input_ids), tuple(e.labels)) for e in examples)
    with pytest.raises(ValueError, match="over the packing length"):
        pack(examples, max_len=8)


def test_collate_pads_labels_with_ignore(tok: Tokenizer) -> None:
    examples = random_examples(tok, 3)
    batch = collate(examples)
    T = max(len(e.input_ids) for e in examples)
    assert batch["input_ids"].shape == batch["labels"].shape == (3, T)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        assert batch["input_ids"][row, :n].tolist() == e.input_ids
        assert batch["labels"][row].tolist() == e.labels + [IGNORE] * (T - n)
        assert batch["attention_mask"][row].tolist() == [True] * n + [False] * (T - n)
        assert batch["position_ids"][row, :n].tolist() == list(range(n))
    assert batch["n_tokens"] == sum(len(e.input_ids) for e in examples)
    packed = collate(pack(examples, max_len=sum(len(e.input_ids) for e in examples)))
    assert packed["input_ids"].shape[0] == 1 and packed["document_ids"].max() == 2
    dataset = SFTDataset(examples)
    assert len(dataset) == 3 and dataset[1] is examples[1]
    assert dataset.num_label_tokens == int((batch["labels"] != IGNORE).sum())


def test_split_is_deterministic_and_disjoint() -> None:
    items = list(range(100))
    train, val = train_val_split(items, 0.1, seed=3)
    assert (train, val) == train_val_split(items, 0.1, seed=3)
    assert val != train_val_split(items, 0.1, seed=4)[1]
    assert len(val) == 10 and sorted(train + val) == items and train == sorted(train)
    assert train_val_split(items[:3], 0.01)[1] != [] and train_val_split(items, 0.0) == (items, [])
    with pytest.raises(ValueError, match="none left to train"):
        train_val_split(items[:1], 0.5)


# --- preference pairs -------------------------------------------------------------------------------------
def test_preference_pairs_label_only_the_response(tmp_path: Path, tok: Tokenizer) -> None:
    history = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "The capital of France?"},
    ]
    path = write_jsonl(
        tmp_path / "pref.jsonl",
        [
            {"prompt": "The capital of France?", "chosen": "Paris.", "rejected": "Rome."},
            {"prompt": history, "chosen": [{"role": "assistant", "content": "Paris."}], "rejected": "No."},
        ],
    )
    pairs = load_preference_jsonl(path)
    assert pairs[1].prompt == history and pairs[1].chosen == "Paris."
    examples = tokenize_preference(pairs, tok, max_len=64)
    for example, rejected in zip(examples, ("Rome.", "No."), strict=True):
        (chosen_run,) = labelled_runs(example.chosen)  # "Hello!" of the history is context, not labelled
        (rejected_run,) = labelled_runs(example.rejected)
        assert tok.decode(chosen_run) == "Paris.<|im_end|>"
        assert tok.decode(rejected_run) == f"{rejected}<|im_end|>"
        start = example.chosen.labels.index(chosen_run[0])
        assert example.chosen.input_ids[:start] == example.rejected.input_ids[:start]  # one shared prompt
    batch = collate_preference(examples)
    assert batch["chosen_input_ids"].shape == batch["rejected_labels"].shape
    assert batch["chosen_labels"][0].tolist()[: len(examples[0].chosen.labels)] == examples[0].chosen.labels


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": "a", "chosen": "b"}, "line 2: missing 'rejected'"),
        ({"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "chosen": "c",
          "rejected": "d"}, "line 2: the prompt must end with a user message"),
        ({"prompt": "a", "chosen": "b", "rejected": "b"}, "line 2: chosen and rejected are the same"),
        ({"prompt": "a", "chosen": 1, "rejected": "b"}, "line 2: 'chosen' must be a string"),
        ({"prompt": 5, "chosen": "b", "rejected": "c"}, "line 2: 'prompt' must be a non-empty list"),
    ],
)  # fmt: skip
def test_bad_preference_records_name_their_line(tmp_path: Path, record: dict, message: str) -> None:
    path = write_jsonl(tmp_path / "pref.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}, record])
    with pytest.raises(ValueError, match=message):
        load_preference_jsonl(path)


def test_preference_length_limit(tok: Tokenizer) -> None:
    pair = PreferencePair([{"role": "user", "content": "Hi"}], "Paris. " * 20, "No.", "p.jsonl line 1")
    with pytest.raises(ValueError, match=r"p.jsonl line 1 \(chosen\)"):
        tokenize_preference([pair], tok, max_len=30)
    (example,) = tokenize_preference([pair], tok, max_len=30, truncate=True)
    assert example.chosen.truncated and not example.rejected.truncated
    with pytest.warns(UserWarning, match=r"dropped 1 example.*p.jsonl line 1"):
        assert tokenize_preference([pair], tok, max_len=8, truncate=True) == []


# --- packaged corpora -------------------------------------------------------------------------------------
def check_conversations(conversations: list[list[dict[str, str]]]) -> None:
    for messages in conversations:
        assert len(messages) % 2 == 0 and all(m["content"] for m in messages)
        assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)


def test_chatterbot_pairs() -> None:
    pytest.importorskip("chatterbot_corpus")
    from lmstack.data.corpora import chatterbot_pairs

    conversations = chatterbot_pairs()
    assert 1900 <= len(conversations) <= 2100
    check_conversations(conversations)
    assert sum(len(m) == 2 for m in conversations) > 1900
    with pytest.raises(ValueError, match="no language 'klingon'.*english"):
        chatterbot_pairs("klingon")


def test_chitchat_conversations_and_preference_pairs(tok: Tokenizer) -> None:
    pytest.importorskip("chitchat_dataset")
    from lmstack.data.corpora import chitchat_conversations, preference_pairs_from

    conversations = chitchat_conversations()
    assert 3900 <= len(conversations) <= 4100  # of 7,168: 3,150 have one speaker only
    check_conversations(conversations)
    short = chitchat_conversations(limit=20, max_turns=4)
    assert len(short) == 20 and all(len(m) <= 4 for m in short)
    assert [m[:2] for m in short] == [m[:2] for m in conversations[:20]]
    pairs = preference_pairs_from(short, seed=0)
    assert pairs == preference_pairs_from(short, seed=0) and len(pairs) == 20
    for pair, messages in zip(pairs, short, strict=True):
        assert pair.prompt == messages[:-1] and pair.chosen == messages[-1]["content"] != pair.rejected
    assert len(tokenize_preference(pairs, tok, max_len=4096)) == 20


# --- the packaged instruct models' own templates ----------------------------------------------------------
@pytest.mark.parametrize(
    "name", [pytest.param("qwen2.5-coder-0.5b-instruct", marks=pytest.mark.slow), "smollm2-135m-instruct"]
)
def test_real_chat_templates_label_only_the_answers(name: str, model_cache_dir: Path) -> None:
    """Both insert a default system prompt: it, the user turns and the headers stay unlabelled."""
    from lmstack.hub import ModelNotFoundError, resolve

    try:
        path = resolve(name, model_cache_dir, allow_download=False).path
    except ModelNotFoundError as e:
        pytest.skip(f"{name} is not installed: {e}")
    real = Tokenizer.from_gguf(path)
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "The capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
    example = tokenize_messages(messages, real)
    assert example.input_ids == real.encode(
        real.apply_chat_template(messages, False), add_special_tokens=False
    )
    runs = [real.decode(run) for run in labelled_runs(example)]
    assert runs == ["Hello! How can I help?<|im_end|>", "Paris.<|im_end|>"]
