"""Engine outputs -> OpenAI response bodies and server-sent-event chunks, as plain dicts (no pydantic here).

`Choices` runs the n engine requests of one HTTP request and merges their outputs; the two formats turn
them into `chat.completion(.chunk)` and legacy `text_completion` bodies. Streams follow OpenAI's order:
per choice a first chunk with the assistant role (chat only), content deltas, a chunk carrying
`finish_reason`, then an optional usage chunk (`choices: []`), then `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from lmstack.engine import AsyncEngine, RequestOutput, TokenLogprob
from lmstack.generate.sampling import SamplingParams

DONE = b"data: [DONE]\n\n"
MIN_LOGPROB = -9999.0  # what OpenAI reports for an impossible token; JSON has no -Infinity


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def finish_reason(out: RequestOutput) -> str:
    return out.finish_reason or "stop"


# --- the n requests of one HTTP request ---------------------------------------------------------------------
class Choices:
    """The n engine requests behind one HTTP request, merged into one stream of (choice index, output).

    Each choice is pumped by its own task, so one choice never waits on another. `cancel()` (also called
    when iteration stops early: client gone, timeout) cancels the pumps; a cancelled pump's engine stream
    aborts its request, which frees its KV blocks at once.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        request_id: str,
        prompts: Sequence[list[int]],
        params: Sequence[SamplingParams],
    ) -> None:
        self._queue: asyncio.Queue[tuple[int, RequestOutput | Exception]] = asyncio.Queue()
        self._buffered: list[tuple[int, RequestOutput]] = []
        self._tasks = [
            asyncio.create_task(self._pump(engine, f"{request_id}-{i}", i, prompt, sp))
            for i, (prompt, sp) in enumerate(zip(prompts, params, strict=True))
        ]

    async def _pump(
        self, engine: AsyncEngine, rid: str, index: int, prompt: list[int], params: SamplingParams
    ) -> None:
        try:
            async for out in engine.generate(rid, prompt, params):
                self._queue.put_nowait((index, out))
        except Exception as error:  # a refusal (ValueError, QueueFull, shutting down) or a failed step
            self._queue.put_nowait((index, error))

    async def started(self) -> None:
        """Wait for every choice's first output, so that refusals (400, 503) come before any header."""
        waiting = set(range(len(self._tasks)))
        try:
            while waiting:
                index, item = await self._queue.get()
                if isinstance(item, Exception):
                    raise item
                self._buffered.append((index, item))
                waiting.discard(index)
        except BaseException:
            self.cancel()
            raise

    async def outputs(self, deadline: float | None = None) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Every output of every choice, each choice's in order; TimeoutError past `deadline` (loop time)."""
        unfinished = len(self._tasks)
        try:
            for index, out in self._buffered:
                unfinished -= out.finished
                yield index, out
            self._buffered = []
            while unfinished:
                async with asyncio.timeout_at(deadline):  # never around a yield
                    index, item = await self._queue.get()
                if isinstance(item, Exception):
                    raise item
                unfinished -= item.finished
                yield index, item
        finally:
            self.cancel()

    def cancel(self) -> None:
        """Idempotent and synchronous (safe inside a cancelled scope): finished pumps ignore it."""
        for task in self._tasks:
            task.cancel()


# --- per-choice accumulation --------------------------------------------------------------------------------
def visible_logprobs(out: RequestOutput, stop_ids: frozenset[int]) -> list[TokenLogprob] | None:
    """The logprobs a client sees: not the one of a terminating EOS/stop token, which has no text."""
    lps = out.logprobs
    if lps and out.finish_reason == "stop" and out.new_token_ids and out.new_token_ids[-1] in stop_ids:
        return lps[:-1]
    return lps


@dataclass
class ChoiceState:
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    text_offset: int = 0  # legacy logprobs: characters before the next token

    def add(self, out: RequestOutput, logprobs: list[TokenLogprob] | None) -> None:
        self.text.append(out.text_delta)
        self.logprobs.extend(logprobs or ())
        self.prompt_tokens, self.completion_tokens = out.prompt_tokens, out.completion_tokens
        if out.finished:
            self.finish_reason = finish_reason(out)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


# --- token text for logprobs --------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable stand-in character -> the byte it spells."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class TokenText:
    """token id -> (text, UTF-8 bytes) as logprobs report a token. The bytes are the token's own, so a token
    holding half a character still says which bytes it holds (its text then shows U+FFFD)."""

    def __init__(self, tokenizer: Any) -> None:
        from tokenizers import decoders

        self._tokenizer = tokenizer
        backend = getattr(tokenizer, "backend", None)
        self._byte_level = backend is not None and isinstance(backend.decoder, decoders.ByteLevel)
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        got = self._cache.get(token_id)
        if got is None:
            got = self._cache[token_id] = self._lookup(token_id)
        return got

    def _lookup(self, token_id: int) -> tuple[str, list[int]]:
        piece = self._tokenizer.id_to_token(token_id) or ""
        raw: bytes | None = None
        if self._byte_level and piece and all(c in _byte_decoder() for c in piece):
            raw = bytes(_byte_decoder()[c] for c in piece)
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            raw = bytes([int(piece[3:5], 16)])
        if raw is not None:
            return raw.decode("utf-8", errors="replace"), list(raw)
        text = self._tokenizer.decode([token_id])
        return text, list(text.encode())


def _lp(x: float) -> float:
    return x if math.isfinite(x) else MIN_LOGPROB


def chat_logprobs(lps: Sequence[TokenLogprob], text: TokenText) -> dict[str, Any]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        token, raw = text(token_id)
        return {"token": token, "logprob": _lp(logprob), "bytes": raw}

    return {
        "content": [
            {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, x) for t, x in lp.top]} for lp in lps
        ],
        "refusal": None,
    }


def legacy_logprobs(lps: Sequence[TokenLogprob], text: TokenText, state: ChoiceState) -> dict[str, Any]:
    """The completions endpoint's format; text offsets continue across a stream's chunks via `state`."""
    tokens, offsets = [], []
    for lp in lps:
        token = text(lp.token_id)[0]
        tokens.append(token)
        offsets.append(state.text_offset)
        state.text_offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [_lp(lp.logprob) for lp in lps],
        "top_logprobs": [{text(t)[0]: _lp(x) for t, x in lp.top} for lp in lps],
        "text_offset": offsets,
    }


# --- the two endpoints' shapes ------------------------------------------------------------------------------
@dataclass
class BodyFormat:
    """What both formats share: the envelope of every body and chunk."""

    response_id: str
    model: str
    created: int
    token_text: TokenText
    logprobs: bool
    include_usage: bool

    def closing(self, states: Sequence[ChoiceState]) -> list[dict[str, Any]]:
        """Chunks after every choice has finished, before the usage chunk (extensions: RAG sources)."""
        return []

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        body = {"id": self.response_id, "object": obj, "created": self.created, "model": self.model}
        body["choices"] = choices
        if self.include_usage:
            body["usage"] = None
        return body


class ChatFormat(BodyFormat):
    def opening(self, index: int) -> list[dict[str, Any]]:
        delta = {"role": "assistant", "content": "", "refusal": None}
        return [self._chunk(index, delta, None, None)]

    def deltas(
        self, index: int, out: RequestOutput, lps: list[TokenLogprob] | None, state: ChoiceState
    ) -> list[dict[str, Any]]:
        chunks = []
        logprobs = chat_logprobs(lps, self.token_text) if self.logprobs and lps else None
        if out.text_delta or logprobs:
            chunks.append(self._chunk(index, {"content": out.text_delta}, logprobs, None))
        if out.finished:
            chunks.append(self._chunk(index, {}, None, finish_reason(out)))
        return chunks

    def _chunk(self, index: int, delta: dict, logprobs: dict | None, reason: str | None) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        return self._envelope("chat.completion.chunk", [choice])

    def usage_chunk(self, totals: dict[str, int]) -> dict[str, Any]:
        return {**self._envelope("chat.completion.chunk", []), "usage": totals}

    def response(self, states: Sequence[ChoiceState], totals: dict[str, int]) -> dict[str, Any]:
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": "".join(s.text), "refusal": None},
                "logprobs": chat_logprobs(s.logprobs, self.token_text) if self.logprobs else None,
                "finish_reason": s.finish_reason,
            }
            for i, s in enumerate(states)
        ]
        body = self._envelope("chat.completion", choices)
        return {**body, "usage": totals, "system_fingerprint": None}


@dataclass
class CompletionFormat(BodyFormat):
    echo: Sequence[str] = ()  # per choice: the prompt text, sent before the completion

    def opening(self, index: int) -> list[dict[str, Any]]:
        if not self.echo:
            return []
        return [self._chunk(index, self.echo[index], None, None)]

    def deltas(
        self, index: int, out: RequestOutput, lps: list[TokenLogprob] | None, state: ChoiceState
    ) -> list[dict[str, Any]]:
        logprobs = legacy_logprobs(lps or [], self.token_text, state) if self.logprobs else None
        if not (out.text_delta or (logprobs and lps) or out.finished):
            return []
        reason = finish_reason(out) if out.finished else None
        return [self._chunk(index, out.text_delta, logprobs, reason)]

    def _chunk(self, index: int, text: str, logprobs: dict | None, reason: str | None) -> dict[str, Any]:
        choice = {"text": text, "index": index, "logprobs": logprobs, "finish_reason": reason}
        return self._envelope("text_completion", [choice])

    def usage_chunk(self, totals: dict[str, int]) -> dict[str, Any]:
        return {**self._envelope("text_completion", []), "usage": totals}

    def response(self, states: Sequence[ChoiceState], totals: dict[str, int]) -> dict[str, Any]:
        choices = []
        for i, s in enumerate(states):
            s.text_offset = 0
            lps = legacy_logprobs(s.logprobs, self.token_text, s) if self.logprobs else None
            text = (self.echo[i] if self.echo else "") + "".join(s.text)
            choices.append({"text": text, "index": i, "logprobs": lps, "finish_reason": s.finish_reason})
        body = self._envelope("text_completion", choices)
        return {**body, "usage": totals, "system_fingerprint": None}
