"""Text <-> token ids for lmstack models, plus chat templates and streaming detokenization.

A GGUF file carries no `tokenizer.json`: it stores the vocabulary, merges, scores and token types as
metadata under llama.cpp's key names. We rebuild the equivalent `tokenizers` pipeline from those keys, so
encoding runs in Rust and matches what transformers builds from the same file. Hugging Face model
directories load their `tokenizer.json` directly. Either way the rest of lmstack sees one `Tokenizer`.

GGUF token types (llama.cpp's `llama_token_type`): 1 normal, 2 unknown, 3 control, 4 user-defined,
5 unused, 6 byte.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from functools import cached_property, lru_cache, partial
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Tokens that end an assistant turn in the chat formats we meet; a model stops on any that it has.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<|eot_id|>")

CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})

SPIECE_SPACE = "\u2581"  # "▁": how SentencePiece spells a space inside a piece
REPLACEMENT_CHAR = "\ufffd"  # what a decoder emits for bytes that are not (yet) a whole UTF-8 character


# --- reading GGUF metadata ------------------------------------------------------------------------

# GGUF value type -> struct code: u8 i8 u16 i16 u32 i32 f32 bool, then u64 i64 f64 (8 is string, 9 array)
_GGUF_SCALAR_FORMATS = dict(zip([0, 1, 2, 3, 4, 5, 6, 7, 10, 11, 12], "BbHhIif?Qqd", strict=True))
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")


def read_gguf_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """All key/value metadata of a GGUF file, as Python values, without touching the tensors.

    `gguf.GGUFReader` builds numpy views for every element of every array, which takes 10-20 s for a
    262k-token vocabulary; reading the key/value section with `struct` takes a fraction of a second.
    """
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        magic, version, _n_tensors, n_kv = struct.unpack_from("<4sIQQ", buf, 0)
        if magic != b"GGUF" or version not in (2, 3):
            raise ValueError(f"{path}: not a little-endian GGUF v2/v3 (magic {magic!r}, version {version})")
        offset, meta = 24, {}
        for _ in range(n_kv):
            key, offset = _read_gguf_string(buf, offset)
            (value_type,) = _U32.unpack_from(buf, offset)
            meta[key], offset = _read_gguf_value(buf, offset + 4, value_type)
    return meta


def _read_gguf_string(buf: mmap.mmap, offset: int) -> tuple[str, int]:
    (length,) = _U64.unpack_from(buf, offset)
    start = offset + 8
    return buf[start : start + length].decode("utf-8"), start + length


def _read_gguf_value(buf: mmap.mmap, offset: int, value_type: int) -> tuple[Any, int]:
    if value_type == _GGUF_STRING:
        return _read_gguf_string(buf, offset)
    if value_type != _GGUF_ARRAY:
        fmt = "<" + _GGUF_SCALAR_FORMATS[value_type]
        return struct.unpack_from(fmt, buf, offset)[0], offset + struct.calcsize(fmt)
    item_type, count = struct.unpack_from("<IQ", buf, offset)
    offset += 12
    if item_type in _GGUF_SCALAR_FORMATS:  # one unpack for the whole array: token types, scores
        fmt = f"<{count}{_GGUF_SCALAR_FORMATS[item_type]}"
        return list(struct.unpack_from(fmt, buf, offset)), offset + struct.calcsize(fmt)
    items = []
    for _ in range(count):
        item, offset = _read_gguf_value(buf, offset, item_type)
        items.append(item)
    return items, offset


# --- building a `tokenizers.Tokenizer` from GGUF metadata --------------------------------------------

# Split patterns as the models' own tokenizer.json files (and llama.cpp's llama-vocab.cpp) define them.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_split() -> pre_tokenizers.PreTokenizer:
    """GPT-2's own pattern, which `ByteLevel(use_regex=True)` has built in."""
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _regex_split(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _digits_then_gpt2_split() -> pre_tokenizers.PreTokenizer:
    """StarCoder-family vocabularies (SmolLM too) cut every digit apart before GPT-2's pattern runs."""
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_split()])


# `tokenizer.ggml.pre` -> pre-tokenizer; names as llama.cpp's convert_hf_to_gguf.py writes them.
BYTE_LEVEL_PRE_TOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    "default": _gpt2_split,
    "gpt2": _gpt2_split,
    "gpt-2": _gpt2_split,
    "mpt": _gpt2_split,
    "olmo": _gpt2_split,
    "qwen2": partial(_regex_split, _QWEN2_SPLIT),
    "deepseek-r1-qwen": partial(_regex_split, _QWEN2_SPLIT),
    "llama3": partial(_regex_split, _LLAMA3_SPLIT),
    "llama-v3": partial(_regex_split, _LLAMA3_SPLIT),
    "llama-bpe": partial(_regex_split, _LLAMA3_SPLIT),
    "falcon3": partial(_regex_split, _LLAMA3_SPLIT),
    "pixtral": partial(_regex_split, _LLAMA3_SPLIT),
    "smaug-bpe": partial(_regex_split, _LLAMA3_SPLIT),
    "dbrx": partial(_regex_split, _LLAMA3_SPLIT),
    "smollm": _digits_then_gpt2_split,
    "starcoder": _digits_then_gpt2_split,
    "refact": _digits_then_gpt2_split,
    "codeshell": _digits_then_gpt2_split,
}
# Llama 3's tokenizer takes a whole word from the vocabulary before merging, and prepends BOS by default.
_LLAMA3_FAMILY = frozenset({"llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"})


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre not in BYTE_LEVEL_PRE_TOKENIZERS:
        warnings.warn(
            f"GGUF pre-tokenizer {pre!r} is not known to lmstack; splitting text with GPT-2's pattern, "
            "so some token ids may differ from the model's own tokenizer.",
            stacklevel=3,
        )
        return _gpt2_split()
    return BYTE_LEVEL_PRE_TOKENIZERS[pre]()


def _build_byte_level_bpe(meta: Mapping[str, Any]) -> tokenizers.Tokenizer:
    """GPT-2 style BPE over bytes: the file's vocabulary and merges are already in the byte alphabet."""
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    pre = meta.get("tokenizer.ggml.pre", "default")
    model = tokenizers.models.BPE(
        vocab={token: index for index, token in enumerate(tokens)},
        merges=[tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]],
        fuse_unk=False,
        byte_fallback=False,
        ignore_merges=pre in _LLAMA3_FAMILY,
    )
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = _byte_level_pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    return backend


def _build_sentencepiece_bpe(meta: Mapping[str, Any]) -> tokenizers.Tokenizer:
    """SentencePiece BPE: pieces spell spaces as "▁", unknown characters fall back to `<0xNN>` bytes."""
    types: list[int] = meta["tokenizer.ggml.token_type"]
    # Gemma files store the multi-space pieces with real spaces; the text side only ever has "▁".
    tokens = [
        token.replace(" ", SPIECE_SPACE) if kind in (NORMAL, USER_DEFINED) else token
        for token, kind in zip(meta["tokenizer.ggml.tokens"], types, strict=True)
    ]
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    if "tokenizer.ggml.merges" in meta:  # newer converters keep the tokenizer.json merges
        merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
    else:
        merges = _sentencepiece_merges(tokens, meta["tokenizer.ggml.scores"], types)
    model = tokenizers.models.BPE(
        vocab={token: index for index, token in enumerate(tokens)},
        merges=merges,
        unk_token=tokens[unk_id] if unk_id is not None else None,
        fuse_unk=True,
        byte_fallback=True,
    )
    space_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    backend = tokenizers.Tokenizer(model)
    prepend = [normalizers.Prepend(SPIECE_SPACE)] if space_prefix else []
    backend.normalizer = normalizers.Sequence([*prepend, normalizers.Replace(" ", SPIECE_SPACE)])
    strip = [decoders.Strip(" ", 1, 0)] if space_prefix else []  # undo the prepended space, once per text
    backend.decoder = decoders.Sequence(
        [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), *strip]
    )
    return backend


def _sentencepiece_merges(
    tokens: Sequence[str], scores: Sequence[float], types: Sequence[int]
) -> list[tuple[str, str]]:
    """Recover BPE merges from a vocabulary that only lists pieces and scores.

    SentencePiece merges the pair whose result has the best score, so every way of cutting a piece into
    two known pieces becomes a merge ranked by that piece's score. User-defined pieces come first:
    SentencePiece matches them whole before any merging. For one piece, the longer left part wins ties,
    as in transformers' converter, so both build the same table.
    """
    mergeable = [index for index, kind in enumerate(types) if kind in (NORMAL, USER_DEFINED)]
    known = frozenset(tokens[index] for index in mergeable)
    mergeable.sort(key=lambda index: (types[index] != USER_DEFINED, -scores[index], index))
    pieces = [tokens[index] for index in mergeable if len(tokens[index]) > 1]
    # ~1.4M cuts for Gemma's 262k pieces: about 1 s of CPU, the bulk of building that tokenizer.
    return [
        (piece[:cut], piece[cut:])
        for piece in pieces
        for cut in range(len(piece) - 1, 0, -1)
        if piece[:cut] in known and piece[cut:] in known
    ]


def _register_added_tokens(
    backend: tokenizers.Tokenizer, tokens: Sequence[str], types: Sequence[int]
) -> None:
    """Match control and user-defined tokens whole in the text, so "<|im_start|>" is one id, not six.

    Control and unknown tokens are special (`skip_special_tokens` drops them); user-defined ones, like
    "<tool_call>", are ordinary text that must not be split. A user-defined token containing a space is
    left to BPE: SentencePiece spells it with "▁", and the normalizer turns the text's spaces into "▁".
    """
    kinds = list(zip(tokens, types, strict=True))
    special = [t for t, k in kinds if k in (CONTROL, UNKNOWN)]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    user = [t for t, k in kinds if k == USER_DEFINED and " " not in t]
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])


def _backend_from_gguf_metadata(meta: Mapping[str, Any]) -> tokenizers.Tokenizer:
    kind = meta.get("tokenizer.ggml.model")
    if kind == "gpt2":
        backend = _build_byte_level_bpe(meta)
    elif kind == "llama":
        backend = _build_sentencepiece_bpe(meta)
    else:
        raise ValueError(f"GGUF tokenizer.ggml.model {kind!r} is not supported (only 'gpt2' and 'llama')")
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    _register_added_tokens(backend, tokens, types)
    return backend


def _default_add_bos(meta: Mapping[str, Any]) -> bool:
    """llama.cpp's default when the file does not say: SentencePiece and Llama 3 vocabularies add BOS."""
    return meta.get("tokenizer.ggml.model") == "llama" or meta.get("tokenizer.ggml.pre") in _LLAMA3_FAMILY


# --- chat templates --------------------------------------------------------------------------------


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, **kwargs: Any) -> str:
    """Jinja's own `tojson` HTML-escapes; chat templates expect plain JSON, as transformers renders it."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, **kwargs)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile_chat_template(source: str) -> jinja2.Template:
    """The environment transformers renders chat templates in, so the prompt text is identical.

    Templates come from model files, i.e. from strangers: the immutable sandbox stops them from reaching
    Python internals or mutating the messages we pass.
    """
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check chat messages once, with errors that say which message and field is wrong.

    Keys whose value is None are dropped (as transformers does): OpenAI clients send `"name": null`,
    and templates handle a missing key but often print "None" for a present one.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    cleaned = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{index}] must be a dict, got {type(message).__name__}")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise ValueError(f"messages[{index}].role must be one of {sorted(CHAT_ROLES)}, got {role!r}")
        if not isinstance(message.get("content"), str):
            content = message.get("content")
            raise ValueError(f"messages[{index}].content must be a string, got {type(content).__name__}")
        cleaned.append({key: value for key, value in message.items() if value is not None})
    return cleaned


# --- the tokenizer ---------------------------------------------------------------------------------


class Tokenizer:
    """Encode, decode and chat-format for one model; wraps a `tokenizers.Tokenizer`.

    BOS/EOS are added here, not by the backend's post-processor, so `add_bos` is one visible flag whatever
    file the tokenizer came from.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_id: int | None = None,
        eos_id: int | None = None,
        add_bos: bool = False,
        add_eos: bool = False,
        chat_template: str | None = None,
        extra_stop_ids: Iterable[int] = (),
        template_tokens: Mapping[str, str] | None = None,
    ) -> None:
        self.backend = backend
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.chat_template = chat_template
        turn_ends = (backend.token_to_id(token) for token in END_OF_TURN_TOKENS)
        stops = {eos_id, *extra_stop_ids, *turn_ends}
        self.stop_ids: frozenset[int] = frozenset(i for i in stops if i is not None)
        named = {"bos_token": bos_id, "eos_token": eos_id}
        self._template_tokens = {k: self.id_to_token(v) for k, v in named.items() if v is not None}
        self._template_tokens.update(template_tokens or {})

    # -- construction --

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """Build from GGUF metadata keys (`tokenizer.ggml.*`, `tokenizer.chat_template`) mapped to values."""
        tokens = meta["tokenizer.ggml.tokens"]

        def token_name(key: str) -> dict[str, str]:
            index = meta.get(f"tokenizer.ggml.{key}_token_id")
            return {f"{key}_token": tokens[index]} if index is not None and index < len(tokens) else {}

        return cls(
            _backend_from_gguf_metadata(meta),
            bos_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_id=meta.get("tokenizer.ggml.eos_token_id"),
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", _default_add_bos(meta))),
            add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
            chat_template=meta.get("tokenizer.chat_template"),
            template_tokens={**token_name("unknown"), **token_name("padding")},
        )

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str]) -> Tokenizer:
        return cls.from_gguf_metadata(read_gguf_metadata(path))

    @classmethod
    def from_pretrained_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """A Hugging Face model directory: tokenizer.json, tokenizer_config.json, generation_config.json."""
        root = Path(path)
        backend = tokenizers.Tokenizer.from_file(str(root / "tokenizer.json"))
        config = _read_json(root / "tokenizer_config.json")
        generation = _read_json(root / "generation_config.json")
        bos_id, eos_id = (_config_token_id(backend, config.get(key)) for key in ("bos_token", "eos_token"))
        generation_eos = _id_list(generation.get("eos_token_id"))  # some models stop on several ids
        if bos_id is None:
            bos_id = next(iter(_id_list(generation.get("bos_token_id"))), None)
        if eos_id is None:
            eos_id = next(iter(generation_eos), None)
        return cls(
            backend,
            bos_id=bos_id,
            eos_id=eos_id,
            add_bos=bool(config.get("add_bos_token", _post_processor_adds(backend, bos_id))),
            add_eos=bool(config.get("add_eos_token", False)),
            chat_template=_chat_template_from_dir(root, config),
            extra_stop_ids=generation_eos,
        )

    # -- ids <-> text --

    @property
    def vocab_size(self) -> int:
        """Tokens the tokenizer knows; a model's embedding table may be padded past this."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if add_special_tokens and self.add_eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @cached_property
    def byte_fallback_ids(self) -> frozenset[int]:
        """The `<0xNN>` tokens: a run of them decodes as one group, so a stream must not cut inside it."""
        ids = (self.backend.token_to_id(f"<0x{byte:02X}>") for byte in range(256))
        return frozenset(i for i in ids if i is not None)

    # -- chat --

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        *,
        chat_template: str | None = None,
        **extra: Any,
    ) -> str:
        """The prompt text for `messages`, rendered like transformers' `apply_chat_template(tokenize=False)`.

        `extra` reaches the template as variables (`tools`, `documents`, `enable_thinking`, ...).
        """
        source = chat_template or self.chat_template
        if source is None:
            raise ValueError(
                "This model has no chat template: it is a base model. Use completion (generate) on plain "
                "text instead, or pass chat_template=... to apply_chat_template."
            )
        variables = {"tools": None, "documents": None, **self._template_tokens, **extra}
        try:
            template = _compile_chat_template(source)
            return template.render(
                messages=validate_messages(messages), add_generation_prompt=add_generation_prompt, **variables
            )
        except jinja2.TemplateError as error:
            raise ValueError(f"chat template failed: {error}") from error


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _id_list(value: int | list[int] | None) -> list[int]:
    return list(value) if isinstance(value, list) else [] if value is None else [value]


def _config_token_id(backend: tokenizers.Tokenizer, token: str | dict[str, Any] | None) -> int | None:
    """`tokenizer_config.json` writes a special token as a string or as a serialized AddedToken dict."""
    content = token.get("content") if isinstance(token, dict) else token
    return backend.token_to_id(content) if content else None


def _post_processor_adds(backend: tokenizers.Tokenizer, bos_id: int | None) -> bool:
    """Whether the tokenizer.json's own post-processor prepends BOS (Llama 3 does, with no config flag)."""
    return bos_id is not None and backend.encode("", add_special_tokens=True).ids[:1] == [bos_id]


def _chat_template_from_dir(root: Path, config: Mapping[str, Any]) -> str | None:
    """Newer transformers saves `chat_template.jinja`; older configs hold a string or a named list."""
    template_file = root / "chat_template.jinja"
    if template_file.is_file():
        return template_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {entry["name"]: entry["template"] for entry in template}
        return named.get("default")
    return template


# --- streaming detokenization ----------------------------------------------------------------------


class IncrementalDetokenizer:
    """Turns generated ids into text deltas one id at a time, never emitting half a character.

    Decoding one token alone is wrong: byte-level and `<0xNN>` tokens can each hold part of a UTF-8
    character, and SentencePiece decoders treat the first token of a text differently. Like vLLM and
    TGI, we decode a short window of recent ids twice -- with and without the ids not yet emitted -- and
    emit the difference once it no longer ends in U+FFFD. The window restarts after each emission, so a
    step costs O(1) however long the sequence. Concatenating every delta and `flush()` gives exactly
    `tokenizer.decode(all_ids)`.

    `prompt_ids` seeds the window so the first generated token is decoded in context (its leading space
    kept); their own text is not emitted.
    """

    def __init__(
        self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False, prompt_ids: Sequence[int] = ()
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._window: list[int] = list(prompt_ids[-4:])  # ids from the last cut point on
        self._emitted = len(self._window)  # window ids before this index are already emitted
        self._emitted_text = self._decode(self._window)

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it completes (often "", never a partial character)."""
        self._window.append(token_id)
        if token_id in self._tokenizer.byte_fallback_ids:
            return ""  # the next id may be another byte of the same run, which decodes as one group
        text = self._decode(self._window)
        if len(text) <= len(self._emitted_text) or text.endswith(REPLACEMENT_CHAR):
            return ""
        delta = text[len(self._emitted_text) :]
        # The ids just emitted become the context for the next ones.
        self._window = self._window[self._emitted :]
        self._emitted = len(self._window)
        self._emitted_text = self._decode(self._window)
        return delta

    def flush(self) -> str:
        """End of stream: return whatever is left, incomplete bytes included (as U+FFFD)."""
        delta = self._decode(self._window)[len(self._emitted_text) :]
        self._window, self._emitted, self._emitted_text = [], 0, ""
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens) if ids else ""
