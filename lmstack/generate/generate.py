"""The simple single-stream generate path: one request, one KV cache, no scheduler.

It runs the same model and the same sampling functions as the engine, so every engine result can be
diffed against it. Two layers:
  tokens: `generate_tokens` yields one TokenEvent per generated token (prefill once, then one forward per
          token; one host sync per token to read the id, which the caller needs to stream it anyway);
  text:   `stream_text` / `generate_text` detokenize incrementally and apply stop strings.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch

from lmstack.generate.beam import beam_search
from lmstack.generate.sampling import (
    SamplingParams,
    apply_penalties,
    logprobs_of,
    make_generator,
    prompt_mask,
    sample,
    update_counts_,
)
from lmstack.models.transformer import Transformer

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True, slots=True)
class TokenEvent:
    token_id: int
    logprob: float | None = None  # of token_id under the raw model distribution, when params.logprobs is set
    top_logprobs: tuple[tuple[int, float], ...] = ()  # (token id, logprob), best first
    finish_reason: FinishReason | None = None  # set on the last event only


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: list[int]  # every generated token, including a terminating stop token (excluded from text)
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenEvent] | None  # the events, when params.logprobs was set


def check_fits(model: Transformer, n_prompt: int, max_new_tokens: int) -> None:
    """Refuse, never truncate: the caller decides what to drop from a prompt that does not fit."""
    if n_prompt == 0:
        raise ValueError("empty prompt: generation needs at least one prompt token (e.g. BOS)")
    ctx = model.config.max_seq_len
    if n_prompt + max_new_tokens > ctx:
        over = n_prompt + max_new_tokens - ctx
        fix = (
            f"shorten the prompt by {over} tokens or lower max_new_tokens to {ctx - n_prompt}"
            if n_prompt < ctx
            else f"shorten the prompt by at least {n_prompt - ctx + 1} tokens"
        )
        raise ValueError(
            f"prompt of {n_prompt} tokens + max_new_tokens={max_new_tokens} = {n_prompt + max_new_tokens} "
            f"positions exceeds the context window of {ctx} ({model.config.name}) by {over}; {fix}"
        )


def generate_tokens(
    model: Transformer,
    prompt_ids: list[int],
    params: SamplingParams,
    *,
    stop_ids: frozenset[int],
    device: torch.device | str | None = None,
) -> Generator[TokenEvent, None, None]:
    """Stream the generated tokens. Arguments are checked now; the model runs as the iterator is consumed,
    and its cache is cleared when generation ends or the consumer stops early (close / garbage collection).

    `stop_ids` are the tokenizer's EOS/stop tokens (ignored with params.ignore_eos); params.stop_token_ids
    always stop. With num_beams > 1 the whole beam search runs on the first `next`, then the best
    hypothesis is replayed as events.
    """
    prompt = list(prompt_ids)
    check_fits(model, len(prompt), params.max_new_tokens)
    if params.json_schema is not None:
        raise ValueError("json_schema (constrained decoding) runs in the engine: use lmstack.engine or serve")
    device = device or next(model.parameters()).device
    terminators = frozenset(params.stop_token_ids) | (
        frozenset() if params.ignore_eos else frozenset(stop_ids)
    )
    if params.num_beams > 1:
        return _beam_events(model, prompt, params, terminators, device)
    return _sample_events(model, prompt, params, terminators, device)


def _sample_events(
    model: Transformer, prompt: list[int], params: SamplingParams, terminators: frozenset[int], device
) -> Generator[TokenEvent, None, None]:
    decoder = _Decoder(model, prompt, params, device)
    try:
        ids = decoder.prefill()
        for i in range(params.max_new_tokens):
            event = decoder.read(ids)
            tok = event.token_id
            if tok in terminators or i + 1 == params.max_new_tokens:
                yield _finished(event, "stop" if tok in terminators else "length")
                return
            yield event
            ids = decoder.decode(ids)
    finally:
        model.clear_caches()


def _finished(event: TokenEvent, reason: FinishReason) -> TokenEvent:
    return TokenEvent(event.token_id, event.logprob, event.top_logprobs, reason)


def _beam_events(
    model: Transformer, prompt: list[int], params: SamplingParams, terminators: frozenset[int], device
) -> Generator[TokenEvent, None, None]:
    best = beam_search(
        model,
        prompt,
        num_beams=params.num_beams,
        max_new_tokens=params.max_new_tokens,
        stop_ids=terminators,
        length_penalty=params.length_penalty,
        device=device,
    )[0]
    *body, last = best.token_ids
    yield from (TokenEvent(t) for t in body)
    yield TokenEvent(last, finish_reason="stop" if best.stopped else "length")


class _Decoder:
    """Decode state of one request on the simple path: position, penalty counts, RNG, last logits.

    Every tensor it owns is created and updated under inference mode, inside its methods only, so no
    inference-mode context is held open across the generator's yields (it would leak into the consumer).
    """

    @torch.inference_mode()
    def __init__(self, model: Transformer, prompt: list[int], params: SamplingParams, device) -> None:
        self.model, self.params = model, params
        self.generator = make_generator(params.seed, device)
        self.prompt = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, T)
        self.pos = torch.tensor([len(prompt)], dtype=torch.long, device=device)  # where the next token goes
        V, penalized = model.config.vocab_size, params.penalized
        self.counts = torch.zeros(1, V, dtype=torch.int32, device=device) if penalized else None  # (1, V)
        self.seen = prompt_mask(self.prompt, V) if penalized else None  # (1, V) tokens in the prompt
        self.raw = torch.empty(0)  # (1, V) unprocessed logits of the last step, for logprobs

    @torch.inference_mode()
    def prefill(self) -> torch.Tensor:
        T = self.prompt.shape[1]
        self.model.setup_caches(1, T + self.params.max_new_tokens)
        logits = self.model(self.prompt, torch.arange(T, device=self.prompt.device))  # (1, T, V)
        return self._next(logits[:, -1].float())

    @torch.inference_mode()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.model(ids.view(1, 1), self.pos)  # (1, 1, V)
        self.pos += 1
        return self._next(logits[:, -1].float())

    def _next(self, logits: torch.Tensor) -> torch.Tensor:  # (1, V) -> (1,)
        p = self.params
        self.raw = logits
        if self.counts is not None:
            logits = apply_penalties(
                logits, self.counts, self.seen, p.repetition_penalty, p.presence_penalty, p.frequency_penalty
            )
        ids = sample(logits, p, self.generator)
        if self.counts is not None:
            update_counts_(self.counts, ids)
        return ids

    @torch.inference_mode()
    def read(self, ids: torch.Tensor) -> TokenEvent:
        """The one host sync per token: the id, plus its logprobs in the same copy when asked."""
        n = self.params.logprobs
        if n is None:
            return TokenEvent(int(ids.item()))
        chosen, top_values, top_ids = logprobs_of(self.raw, ids, n)
        # float32 (MPS has no float64) holds token ids exactly below 2**24, far above any vocabulary
        row = torch.cat([ids.float(), chosen, top_values[0], top_ids[0].float()]).tolist()
        top = tuple(zip((int(t) for t in row[2 + n :]), row[2 : 2 + n], strict=True))
        return TokenEvent(int(row[0]), row[1], top)


# --- text layer ----------------------------------------------------------------------------------------
class StopStringMatcher:
    """Cuts streamed text at the first stop string without ever emitting any part of it.

    Text that could still be the start of a stop string is held back until the next piece decides it, so
    a stop string split across tokens is caught and nothing of it reaches a stream delta.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """-> (text safe to emit, whether a stop string was found; everything from it on is dropped)."""
        buf = self.pending + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return buf[: min(hits)], True
        hold = max((k for s in self.stops for k in range(1, len(s)) if buf.endswith(s[:k])), default=0)
        self.pending = buf[len(buf) - hold :]
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class TextStream:
    """Iterate for text deltas; afterwards `finish_reason`, `token_ids` and `result()` tell the rest."""

    def __init__(
        self,
        events: Generator[TokenEvent, None, None],
        detokenizer: Any,
        params: SamplingParams,
        n_prompt: int,
    ):
        self.events, self.params, self.n_prompt = events, params, n_prompt
        self._push: Callable[[int], str] = detokenizer.push
        self._flush: Callable[[], str] = detokenizer.flush
        self.token_ids: list[int] = []
        self.logprobs: list[TokenEvent] | None = [] if params.logprobs is not None else None
        self.finish_reason: FinishReason | None = None
        self._text: list[str] = []
        self._deltas = self._run()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._deltas)

    def close(self) -> None:
        """Stop early; the token generator is closed too, which clears the KV cache."""
        self._deltas.close()

    def _run(self) -> Generator[str, None, None]:
        matcher = StopStringMatcher(self.params.stop)
        try:
            for event in self.events:
                self.token_ids.append(event.token_id)
                if self.logprobs is not None:
                    self.logprobs.append(event)
                last = event.finish_reason is not None
                piece = (
                    "" if event.finish_reason == "stop" else self._push(event.token_id)
                )  # stop tokens: no text
                if last:
                    piece += self._flush()
                safe, stopped = matcher.push(piece)
                if last and not stopped:
                    safe += matcher.flush()
                if safe:
                    self._text.append(safe)
                    yield safe
                if stopped or last:
                    self.finish_reason = "stop" if stopped else event.finish_reason
                    return
        finally:
            self.events.close()  # clears the KV cache on early exit

    def result(self) -> GenerationResult:
        if self.finish_reason is None:
            raise RuntimeError("the stream has not finished; iterate it to the end first")
        return GenerationResult(
            text="".join(self._text),
            token_ids=self.token_ids,
            finish_reason=self.finish_reason,
            prompt_tokens=self.n_prompt,
            completion_tokens=len(self.token_ids),
            logprobs=self.logprobs,
        )


def stream_text(
    model: Transformer,
    tokenizer: Any,
    prompt_ids: list[int],
    params: SamplingParams,
    *,
    detokenizer: Any = None,
    device: torch.device | str | None = None,
) -> TextStream:
    """Text deltas of one generation; iterate it, then read `.result()`.

    `detokenizer` (push(id) -> str, flush() -> str) defaults to lmstack.tokenizer.IncrementalDetokenizer,
    seeded with the prompt so the first token keeps its leading space, and skipping special tokens in the
    output text as OpenAI-style servers do (stop tokens never reach it anyway).
    """
    if detokenizer is None:
        from lmstack.tokenizer import (
            IncrementalDetokenizer,  # here, so generate/ imports without `tokenizers`
        )

        detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=True, prompt_ids=prompt_ids)
    events = generate_tokens(model, prompt_ids, params, stop_ids=frozenset(tokenizer.stop_ids), device=device)
    return TextStream(events, detokenizer, params, len(prompt_ids))


def generate_text(
    model: Transformer,
    tokenizer: Any,
    prompt_ids: list[int],
    params: SamplingParams,
    *,
    detokenizer: Any = None,
    device: torch.device | str | None = None,
) -> GenerationResult:
    stream = stream_text(model, tokenizer, prompt_ids, params, detokenizer=detokenizer, device=device)
    for _ in stream:
        pass
    return stream.result()
