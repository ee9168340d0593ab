"""Constrained decoding: every sampled token keeps the output a prefix of JSON matching a JSON Schema, and
EOS is allowed only once that JSON value is complete, so an output that ends on EOS is valid JSON.

The grammar work is llguidance's (Rust; the library behind vLLM's "guidance" backend): an Earley parser
walked over a trie of the vocabulary writes one bit per token. Three parts, by lifetime:

- `GrammarCompiler`, per model: the vocabulary as llguidance sees it (each token's bytes, read from the
  `tokenizers` JSON), built on first use -- about a second for 150k tokens -- and shared by every request.
- `GrammarMatcher`, per request: where its output stands in the grammar, advanced with each kept token.
- `fill_bitmask` / `apply_bitmask`, per step: the masks of a batch of matchers in one call into the
  library's thread pool, then every disallowed logit set to -inf by one tensor op.

A bitmask row holds ceil(V / 32) int32 words; bit j of word w allows token 32 w + j.

The JSON differs from RFC 8259 only in whitespace: between tokens at most one space, or a newline and up to
20 spaces or tabs (llama.cpp's json.gbnf rule), so a model cannot stall in the endless whitespace OpenAI's
json_object mode warns about. A schema's own "x-guidance" options can change that.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

JSON_OBJECT = '{"type": "object"}'  # OpenAI's response_format {"type": "json_object"}: any JSON object
_JSON_OPTIONS = {"whitespace_pattern": r"(?: |\n[ \t]{0,20})?", "json_allow_general_unicode_escapes": True}
_MISSING = "constrained decoding (json_schema) needs llguidance: pip install llguidance==1.9.1"


def _llguidance() -> Any:
    """Imported on first use, so the engine runs without it until a request asks for JSON."""
    try:
        import llguidance
    except ImportError as error:
        raise ImportError(_MISSING) from error
    return llguidance


def compile_json_schema(schema: str) -> str:
    """JSON Schema text -> llguidance grammar; ValueError naming the problem if it cannot be compiled."""
    llg = _llguidance()
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
    except ValueError as error:  # not a JSON object
        raise ValueError(f"json_schema is not a JSON Schema object: {error}") from None
    is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ValueError(f"json_schema cannot be used for constrained decoding: {messages[0]}")
    return grammar


class GrammarMatcher:
    """One request's place in its grammar. A token the grammar rejects (never one sampled under its mask)
    puts it in an error state in which only EOS is allowed."""

    def __init__(self, matcher: Any, executor: Any) -> None:
        self._matcher, self.executor = matcher, executor

    def advance(self, token_ids: Sequence[int]) -> None:
        for token in token_ids:
            if self._matcher.is_stopped():  # complete: the EOS that follows ends the request
                return
            self._matcher.consume_token(token)

    @property
    def complete(self) -> bool:
        """The JSON value is complete: only EOS may follow."""
        return self._matcher.is_stopped() and not self._matcher.is_error()

    @property
    def error(self) -> str:
        return self._matcher.get_error()


class GrammarCompiler:
    """The per-model half: `tokenizer` is lmstack's `Tokenizer`, `vocab_size` the model's (logits width),
    which may pad past the tokenizer's. Its stop ids are the EOS a complete output ends with."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self._vocab: Any = None  # llguidance.LLTokenizer, built by the first matcher
        self._executor: Any = None

    def check(self, schema: str) -> None:
        """ValueError unless `schema` can constrain this model's output; reads nothing that changes."""
        if not self.tokenizer.stop_ids:
            raise ValueError(
                "constrained decoding needs an EOS token to end the output; the tokenizer has none"
            )
        compile_json_schema(schema)

    def matcher(self, schema: str) -> GrammarMatcher:
        llg = _llguidance()
        if self._vocab is None:
            backend = copy.copy(self.tokenizer.backend)  # the JSON must describe plain encoding
            backend.no_padding()
            backend.no_truncation()
            stops = sorted(self.tokenizer.stop_ids)
            self._vocab = llg.LLTokenizer(backend.to_str(), n_vocab=self.vocab_size, eos_token=stops)
            self._executor = llg.LLExecutor()
        return GrammarMatcher(
            llg.LLMatcher(self._vocab, compile_json_schema(schema), log_level=0), self._executor
        )


def fill_bitmask(rows: Sequence[tuple[GrammarMatcher, list[int]]], vocab_size: int) -> torch.Tensor:
    """Allowed-token bits (M, ceil(V / 32)) int32 for matchers laid out one after another, each with
    1 + len(drafts) rows: its next token, then the token after each prefix of its speculative drafts. Rows
    past a draft the grammar rejects stay all-allowed: verification never keeps a token past a rejection."""
    bitmask = torch.full((sum(1 + len(d) for _, d in rows), (vocab_size + 31) // 32), -1, dtype=torch.int32)
    plain, drafted, start = [], [], 0
    for matcher, drafts in rows:
        if drafts:
            drafted.append((matcher._matcher, start, list(drafts)))
        else:
            plain.append((matcher._matcher, start))
        start += 1 + len(drafts)
    args = (bitmask.data_ptr(), bitmask.shape[1] * 4, bitmask.shape[0])
    if plain:
        rows[0][0].executor.unsafe_compute_mask_ptr(plain, *args)
    if drafted:
        rows[0][0].executor.unsafe_compute_mask_ptr_with_draft_token(drafted, *args)
    return bitmask


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Logits (M, V) with every token its row of `bitmask` (M, ceil(V / 32)) does not allow at -inf: tensor
    ops on the logits' device (the bits are copied there), nothing read back."""
    dev = logits.device
    bitmask = bitmask.to(dev, non_blocking=True)
    bits = torch.ones(32, dtype=torch.int32, device=dev) << torch.arange(32, dtype=torch.int32, device=dev)
    allowed = ((bitmask[:, :, None] & bits) != 0).flatten(1)[:, : logits.shape[1]]  # (M, W * 32) -> (M, V)
    return torch.where(allowed, logits, float("-inf"))
