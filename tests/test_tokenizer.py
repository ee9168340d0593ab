"""Tokenizer tests: ids equal to transformers' tokenizer built from the same GGUF, lossless round trips,
chat prompts equal to transformers' `apply_chat_template`, and streaming deltas that add up to `decode`.

The fast tier pins a few known ids; everything that needs a transformers tokenizer (10-35 s to build
from a GGUF) or the 262k-token Gemma vocabulary is marked `slow`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from tokenizers import pre_tokenizers, processors

from lmstack.tokenizer import IncrementalDetokenizer, Tokenizer, read_gguf_metadata

INSTRUCT_MODELS = ("qwen", "smollm")
ALL_MODELS = (*INSTRUCT_MODELS, pytest.param("gemma", marks=pytest.mark.slow))


def gguf_path(model: str) -> Path:
    """The packaged GGUF for `model` (assembled by lmstack.hub into the tests' model cache), or skip the test
    when its weights package is not installed."""
    from lmstack.hub import ModelNotFoundError, resolve

    name = {"qwen": "qwen2.5-coder-0.5b-instruct", "smollm": "smollm2-135m-instruct", "gemma": "gemma-3-270m"}
    # the same folder as the model_cache_dir fixture in conftest.py
    cache = Path(__file__).resolve().parent.parent / ".pytest_cache" / "d" / "lmstack-models"
    try:
        return resolve(name[model], cache, allow_download=False).path
    except ModelNotFoundError as e:
        pytest.skip(f"no GGUF for {model} on this machine: {e}")


@pytest.fixture(scope="module")
def metadata():
    cache: dict[str, dict[str, Any]] = {}

    def load(model: str) -> dict[str, Any]:
        if model not in cache:
            cache[model] = read_gguf_metadata(gguf_path(model))
        return cache[model]

    return load


@pytest.fixture(scope="module")
def ours(metadata):
    cache: dict[str, Tokenizer] = {}

    def load(model: str) -> Tokenizer:
        if model not in cache:
            cache[model] = Tokenizer.from_gguf_metadata(metadata(model))
        return cache[model]

    return load


@pytest.fixture(scope="module")
def reference():
    """transformers' tokenizer from the same GGUF, built once per model.

    For SmolLM2 we put back the pre-tokenizer its own tokenizer.json declares (digits split one by one,
    then GPT-2's pattern; llama.cpp's "smollm" does the same). transformers' GGUF loader does not know
    "smollm" and falls back to GPT-2's pattern alone, which differs where whitespace meets a digit:
    "7 \\n6" is [7, " \\n", 6] for the model but [7, " ", "\\n", 6] for that fallback.
    """
    transformers = pytest.importorskip("transformers")
    cache: dict[str, Any] = {}

    def load(model: str) -> Any:
        if model not in cache:
            path = gguf_path(model)
            hf = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            if model == "smollm":
                hf.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
                    [
                        pre_tokenizers.Digits(individual_digits=True),
                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
                    ]
                )
            cache[model] = hf
        return cache[model]

    return load


TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. I'm sure they'll say it's FINE, WE'RE done.",
    "def f(x):\n    if x:\n\treturn x  # tab-indented\n\n\n    return None\n",
    "Numbers: 3.14159, 1,000,000, 2024-11-23, 0xDEADBEEF, 12345678901234567890, 7 \n6, x\r\n1999",
    "emoji 😀👍🏽 family 👨\u200d👩\u200d👧\u200d👦 rainbow flag 🏳️\u200d🌈 flag 🇫🇷 heart ❤️",
    "中文测试：你好，世界！日本語のテキスト、한국어 텍스트",
    "Ça va? Crème brûlée, naïve café, Ångström, Dvořák, e\u0301 (combining accent)",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<start_of_turn>user\nhello<end_of_turn>\n<bos> <eos> <tool_call>{}</tool_call>",
    "   leading and trailing spaces   ",
    "a  b   c    d\n  e\t\tf",
    " ",
    "\n\n",
    "",
    "rare scripts: 𝔹𝕠𝕝𝕕 𐍈 𓀀 ꙮ 𠮷",
]

# ids transformers gives (add_special_tokens=False), pinned so the fast tier catches regressions
KNOWN_IDS = {
    "qwen": {
        "Hello world": [9707, 1879],
        "def f(x):\n\treturn 42": [750, 282, 2075, 982, 853, 220, 19, 17],
        "你好 👋": [108386, 61804, 233],
    },
    "smollm": {
        "Hello world": [19556, 905],
        "def f(x):\n\treturn 42": [1604, 275, 24, 104, 727, 198, 197, 5406, 216, 36, 34],
        "你好 👋": [18645, 250, 48392, 138, 15107, 235, 229],
    },
    "gemma": {
        "Hello world": [9259, 1902],
        "def f(x):\n\treturn 42": [
            2063,
            517,
            236769,
            236781,
            1473,
            107,
            255968,
            2060,
            236743,
            236812,
            236778,
        ],
        "你好 👋": [144626, 155818],
    },
}

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3 😀? 中文"},
    ],
    [{"role": "user", "content": "  spaced  \n"}, {"role": "assistant", "content": ""}],
    [{"role": "user", "content": "weather?"}, {"role": "tool", "content": '{"temp": 21}'}],
]


# --- fast tier: our tokenizer alone ------------------------------------------------------------------


@pytest.mark.parametrize("model", ALL_MODELS)
def test_known_ids(ours, model):
    tokenizer = ours(model)
    for text, ids in KNOWN_IDS[model].items():
        assert tokenizer.encode(text, add_special_tokens=False) == ids, text


@pytest.mark.parametrize(
    ("model", "vocab_size", "bos_id", "eos_id", "stops"),
    [
        ("qwen", 151936, 151643, 151645, {151643, 151645}),
        ("smollm", 49152, 1, 2, {0, 2}),
        pytest.param("gemma", 262144, 2, 1, {1, 106}, marks=pytest.mark.slow),
    ],
)
def test_special_ids_from_metadata(ours, model, vocab_size, bos_id, eos_id, stops):
    tokenizer = ours(model)
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id) == (vocab_size, bos_id, eos_id)
    assert tokenizer.stop_ids == stops
    assert tokenizer.decode([eos_id]) == tokenizer.id_to_token(eos_id)
    assert tokenizer.token_to_id(tokenizer.id_to_token(eos_id)) == eos_id


@pytest.mark.parametrize("model", INSTRUCT_MODELS)
def test_control_tokens_are_one_id_and_no_bos(ours, model):
    tokenizer = ours(model)
    im_start, im_end = tokenizer.token_to_id("<|im_start|>"), tokenizer.token_to_id("<|im_end|>")
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>")  # both GGUFs say add_bos_token = false
    assert ids[0] == im_start and ids[-1] == im_end
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"


@pytest.mark.parametrize("model", ALL_MODELS)
@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(ours, model, text):
    tokenizer = ours(model)
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_smollm_splits_every_digit(ours):
    tokenizer = ours("smollm")
    ids = tokenizer.encode("year 2024", add_special_tokens=False)
    assert [tokenizer.id_to_token(i) for i in ids] == ["year", "Ġ", "2", "0", "2", "4"]


def test_unknown_pre_tokenizer_warns_and_falls_back(metadata):
    meta = {**metadata("smollm"), "tokenizer.ggml.pre": "not-a-real-pre"}
    with pytest.warns(UserWarning, match="not-a-real-pre"):
        tokenizer = Tokenizer.from_gguf_metadata(meta)
    assert tokenizer.encode("Hello world") == [19556, 905]


# --- streaming -----------------------------------------------------------------------------------------


def _stream(tokenizer: Tokenizer, ids: list[int], **kwargs: Any) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer, **kwargs)
    return [detokenizer.push(i) for i in ids] + [detokenizer.flush()]


@pytest.mark.parametrize("model", ALL_MODELS)
@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_stream_deltas_add_up_to_decode(ours, model, skip_special_tokens):
    tokenizer = ours(model)
    for text in TEXTS:
        ids = tokenizer.encode(text)
        deltas = _stream(tokenizer, ids, skip_special_tokens=skip_special_tokens)
        assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens), text
        assert not any("\ufffd" in delta for delta in deltas), (text, deltas)


@pytest.mark.parametrize("model", ALL_MODELS)
def test_stream_of_arbitrary_ids_adds_up_to_decode(ours, model):
    """Models can emit ids that are not valid UTF-8 together; the stream must still equal `decode`."""
    tokenizer = ours(model)
    rng = random.Random(0)
    byte_ids = sorted(tokenizer.byte_fallback_ids)
    for _ in range(100):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 20))]
        ids += rng.sample(byte_ids, min(4, len(byte_ids)))
        rng.shuffle(ids)
        assert "".join(_stream(tokenizer, ids)) == tokenizer.decode(ids), ids


def test_stream_holds_back_split_characters(ours):
    tokenizer = ours("qwen")
    ids = tokenizer.encode("👨\u200d👩\u200d👧 中")
    deltas = _stream(tokenizer, ids)
    assert "" in deltas[:-1]  # some ids held only part of a character, so they emitted nothing
    assert "".join(deltas) == "👨\u200d👩\u200d👧 中"


def test_stream_decodes_a_short_window(ours, monkeypatch):
    """O(1) per token: each step decodes a few recent ids, never the whole sequence."""
    tokenizer = ours("smollm")
    ids = tokenizer.encode("Streaming text, one token at a time. 你好 😀 " * 100)
    detokenizer = IncrementalDetokenizer(tokenizer)
    lengths = []
    decode = tokenizer.decode
    monkeypatch.setattr(tokenizer, "decode", lambda ids, **kw: lengths.append(len(ids)) or decode(ids, **kw))
    text = "".join(detokenizer.push(i) for i in ids) + detokenizer.flush()
    monkeypatch.undo()
    assert text == tokenizer.decode(ids)
    assert len(ids) > 1000 and max(lengths) <= 12


@pytest.mark.parametrize("model", INSTRUCT_MODELS)
def test_stream_with_prompt_context_keeps_the_leading_space(ours, model):
    tokenizer = ours(model)
    prompt = tokenizer.encode("The answer is", add_special_tokens=False)
    generated = tokenizer.encode(" forty two", add_special_tokens=False)
    assert "".join(_stream(tokenizer, generated, prompt_ids=prompt)) == " forty two"


# --- chat templates --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        ([{"role": "user", "content": "hi"}, "oops"], r"messages\[1\] must be a dict"),
        ([{"content": "hi"}], r"messages\[0\]\.role"),
        ([{"role": "wizard", "content": "hi"}], r"messages\[0\]\.role .*'wizard'"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant"}], r"messages\[1\]\.content"),
        ([{"role": "user", "content": ["hi"]}], r"messages\[0\]\.content must be a string, got list"),
    ],
)
def test_bad_messages_raise(ours, messages, match):
    with pytest.raises(ValueError, match=match):
        ours("smollm").apply_chat_template(messages)


def test_base_model_without_template_raises_with_advice(metadata):
    meta = {key: value for key, value in metadata("smollm").items() if key != "tokenizer.chat_template"}
    tokenizer = Tokenizer.from_gguf_metadata(meta)
    with pytest.raises(ValueError, match="base model.*completion"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    assert (
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], chat_template=template)
        == "user: hi\n"
    )


def test_template_errors_become_value_errors(ours):
    template = "{{ raise_exception('only one user turn, please') }}"
    with pytest.raises(ValueError, match="only one user turn"):
        ours("smollm").apply_chat_template([{"role": "user", "content": "hi"}], chat_template=template)


def test_template_sees_extra_variables_and_json(ours):
    template = "{{ bos_token }}|{{ eos_token }}|{{ tools | tojson }}|{{ flag }}"
    rendered = ours("smollm").apply_chat_template(
        [{"role": "user", "content": "hi"}], chat_template=template, tools=[{"name": "<é>"}], flag=True
    )
    assert rendered == '<|im_start|>|<|im_end|>|[{"name": "<é>"}]|True'


# --- Hugging Face model directories ----------------------------------------------------------------------


def test_from_pretrained_dir_matches_gguf(ours, tmp_path):
    gguf = ours("smollm")
    (tmp_path / "tokenizer.json").write_text(gguf.backend.to_str(), encoding="utf-8")
    config = {
        "bos_token": {"content": "<|im_start|>", "special": True},
        "eos_token": "<|im_end|>",
        "add_bos_token": False,
        "chat_template": gguf.chat_template,
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}), encoding="utf-8")

    loaded = Tokenizer.from_pretrained_dir(tmp_path)
    assert (loaded.bos_id, loaded.eos_id, loaded.add_bos) == (1, 2, False)
    assert loaded.stop_ids == {0, 2, 5}
    for text in TEXTS:
        assert loaded.encode(text) == gguf.encode(text)
    assert loaded.apply_chat_template(CONVERSATIONS[1]) == gguf.apply_chat_template(CONVERSATIONS[1])


def test_from_pretrained_dir_reads_bos_from_post_processor_and_jinja_file(ours, tmp_path):
    backend = ours("smollm").backend
    with_bos = type(backend).from_str(backend.to_str())
    with_bos.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)]
    )
    (tmp_path / "tokenizer.json").write_text(with_bos.to_str(), encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<|im_start|>"}), encoding="utf-8"
    )
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0].content }}", encoding="utf-8")

    loaded = Tokenizer.from_pretrained_dir(tmp_path)
    assert loaded.add_bos and loaded.encode("Hello world") == [1, 19556, 905]
    assert loaded.encode("Hello world", add_special_tokens=False) == [19556, 905]
    assert loaded.apply_chat_template([{"role": "user", "content": "hey"}]) == "hey"


# --- slow tier: parity with transformers and the 262k-token Gemma vocabulary ----------------------------


@pytest.mark.slow
@pytest.mark.parametrize("model", ["qwen", "smollm", "gemma"])
def test_encode_and_decode_match_transformers(ours, reference, model):
    tokenizer, hf = ours(model), reference(model)
    for text in TEXTS:
        for add_special_tokens in (True, False):
            expected = hf.encode(text, add_special_tokens=add_special_tokens)
            assert tokenizer.encode(text, add_special_tokens=add_special_tokens) == expected, text
        ids = tokenizer.encode(text)
        for skip in (True, False):
            assert tokenizer.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["qwen", "smollm", "gemma"])
def test_fuzzed_text_matches_transformers(ours, reference, model):
    tokenizer, hf = ours(model), reference(model)
    pieces = list("abcXYZ019 \n\t.,'!?<>|_") + [
        "é",
        "中",
        "😀",
        "🏽",
        "\u200d",
        "\u00a0",
        "\r\n",
        " the",
        "'LL",
    ]
    pieces += ["<|im_start|>", "<|im_end|>", "<start_of_turn>", "<eos>", "\u2581", "Ġ", "\x00", "𠮷"]
    rng = random.Random(1)
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 40)))
        assert tokenizer.encode(text) == hf.encode(text), text


@pytest.mark.slow
@pytest.mark.parametrize("model", INSTRUCT_MODELS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(ours, reference, model, add_generation_prompt):
    tokenizer, hf = ours(model), reference(model)
    for messages in CONVERSATIONS:
        expected = hf.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False
        )
        assert (
            tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
        )


@pytest.mark.slow
def test_chat_template_with_tools_matches_transformers(ours, reference):
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    messages = CONVERSATIONS[0]
    expected = reference("qwen").apply_chat_template(
        messages, tools=tools, add_generation_prompt=True, tokenize=False
    )
    assert ours("qwen").apply_chat_template(messages, tools=tools) == expected


@pytest.mark.slow
def test_gemma_adds_bos_and_has_no_chat_template(ours):
    tokenizer = ours("gemma")
    assert tokenizer.encode("Hello world") == [2, 9259, 1902]
    with pytest.raises(ValueError, match="base model"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.slow
def test_gemma_byte_fallback_streams_whole_characters(ours):
    tokenizer = ours("gemma")
    text = "hieroglyph 𓀀𓀁 and 𠮷"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert any(i in tokenizer.byte_fallback_ids for i in ids)  # the test needs `<0xNN>` pieces
    deltas = _stream(tokenizer, ids)
    assert "".join(deltas) == text
    assert not any("\ufffd" in delta for delta in deltas)


@pytest.mark.slow
def test_sentencepiece_space_prefix_round_trips(metadata):
    """Llama-2 style vocabularies prepend "▁" to the text; decoding must strip it again."""
    tokenizer = Tokenizer.from_gguf_metadata({**metadata("gemma"), "tokenizer.ggml.add_space_prefix": True})
    ids = tokenizer.encode("Hello world", add_special_tokens=False)
    assert tokenizer.id_to_token(ids[0]) == "▁Hello"
    for text in ("Hello world", " two leading", "x"):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
        assert "".join(_stream(tokenizer, ids)) == text
