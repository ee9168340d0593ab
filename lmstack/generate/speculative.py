"""Speculative decoding on the simple path: a cheap proposer guesses k tokens, the target checks all of them
in ONE forward, and every guess it agrees with is a token that needed no target forward of its own.

Verification is computed tokens catching up. The target's KV cache holds every position before the last
emitted token; one forward over [last token, d1..dk] at their explicit positions computes the missing keys
and values and scores every draft at once. Rejected positions need no undo: the next forward writes over
them. The proposer rolls its own state back to the accepted length (`Proposer.rollback`).

Acceptance is a pair of pure functions:
  greedy   keep the longest draft prefix equal to the target's argmax, then the target's own token at the
           first mismatch (or the bonus token after all k): the output is target-only greedy, token for token.
  sampled  speculative sampling (Leviathan et al. 2023; Chen et al. 2023): keep draft x with probability
           min(1, p(x) / q(x)); on rejection draw from max(p - q, 0); after k acceptances draw a bonus token
           from p. p and q are the warped (temperature, top-k, top-p, min-p) distributions, so every emitted
           token has the target's distribution exactly. A deterministic proposer has a one-hot q.
Penalties are supported: verification row i is penalized with the output counts plus drafts 1..i, which are
the counts target-only decoding has at that position. With a seed the tokens are reproducible, but they are
not the tokens `generate_tokens` draws for that seed (the same distribution, different random numbers).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from lmstack.generate.generate import FinishReason, TokenEvent, check_fits
from lmstack.generate.sampling import (
    Generators,
    SamplingParams,
    apply_penalties,
    draw,
    logprobs_of,
    make_generator,
    prompt_mask,
    warp,
)
from lmstack.models.attention import KVCache
from lmstack.models.transformer import Transformer


# --- proposers -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Draft:
    """The proposed tokens and, for a sampling proposer, the distributions they were drawn from."""

    tokens: torch.Tensor  # (k,) long; k may be below the proposer's k, or 0
    probs: torch.Tensor | None = None  # (k, V) warped draft probabilities q; None: deterministic (one-hot q)

    def __len__(self) -> int:
        return self.tokens.shape[0]


NO_DRAFT = Draft(torch.empty(0, dtype=torch.long))


class Proposer(Protocol):
    """Guesses the next tokens of one sequence. Lifecycle: start, then propose / rollback in turns, then stop
    (always called, also when the consumer leaves early)."""

    k: int  # the most tokens one proposal holds

    def start(self, prompt_ids: Sequence[int], max_len: int, vocab_size: int) -> None:
        """Get ready for a sequence of up to max_len tokens; a model proposer prefills the prompt here, so
        its prefill counts towards the time to first token, not the decode speed."""
        ...

    def propose(
        self, tokens: Sequence[int], k: int, params: SamplingParams, generator: torch.Generator | None
    ) -> Draft:
        """Up to k tokens that may follow `tokens` (prompt + output so far)."""
        ...

    def rollback(self, num_tokens: int) -> None:
        """The sequence's first num_tokens tokens are final; forget any state computed beyond them."""
        ...

    def stop(self) -> None: ...


def ngram_continuation(tokens: Sequence[int], k: int, max_ngram: int, min_ngram: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the sequence's last n tokens, trying the
    longest n first. Latest, because text being quoted right now continues where it was last seen."""
    seq, L = list(tokens), len(tokens)
    for n in range(min(max_ngram, L - 1), min_ngram - 1, -1):
        suffix = seq[L - n :]
        for start in range(L - n - 1, -1, -1):  # start + n <= L - 1: a continuation always exists
            if seq[start] == suffix[0] and seq[start : start + n] == suffix:
                return seq[start + n : start + n + k]
    return []


class PromptLookupProposer:
    """Prompt lookup decoding: no model, no state, microseconds per proposal. It pays off when the answer
    quotes its context (code edits, RAG answers, extraction) and proposes nothing when there is no match."""

    def __init__(self, k: int, max_ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram or k < 1:
            raise ValueError(
                f"need k >= 1 and 1 <= min_ngram <= max_ngram; got {k=}, {min_ngram=}, {max_ngram=}"
            )
        self.k, self.max_ngram, self.min_ngram = k, max_ngram, min_ngram

    def start(self, prompt_ids: Sequence[int], max_len: int, vocab_size: int) -> None:
        pass

    def propose(
        self, tokens: Sequence[int], k: int, params: SamplingParams, generator: torch.Generator | None
    ) -> Draft:
        found = self.propose_ids(tokens, k)
        return Draft(torch.tensor(found, dtype=torch.long)) if found else NO_DRAFT

    def propose_ids(self, tokens: Sequence[int], k: int) -> list[int]:
        """The same proposal as plain ids (the engine's scheduler speaks lists, not tensors)."""
        return ngram_continuation(tokens, k, self.max_ngram, self.min_ngram)

    def rollback(self, num_tokens: int) -> None:
        pass

    def stop(self) -> None:
        pass


class DraftModelProposer:
    """A small model with the target's vocabulary drafts k tokens, one forward each, from its own KV cache.

    `computed` counts the leading positions of the sequence whose keys and values in the draft's cache are
    final. A proposal first catches up on the tokens emitted since (one, or two after a full acceptance),
    then drafts; rollback moves `computed` back to the accepted length and the rest gets overwritten.
    Drafts are argmax for greedy requests and drawn from the warped draft distribution otherwise.
    """

    def __init__(self, draft_model: Transformer, k: int) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1; got {k}")
        self.model, self.k, self.computed = draft_model, k, 0
        self.device = next(draft_model.parameters()).device

    @torch.inference_mode()
    def start(self, prompt_ids: Sequence[int], max_len: int, vocab_size: int) -> None:
        if self.model.config.vocab_size != vocab_size:
            raise ValueError(
                f"the draft model {self.model.config.name} has {self.model.config.vocab_size} tokens in its "
                f"vocabulary but the target has {vocab_size}; speculative decoding needs the same tokenizer"
            )
        self.model.setup_caches(1, max_len)
        prompt = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.device)  # (1, T)
        self.model(prompt, torch.arange(prompt.shape[1], device=self.device))
        self.computed = prompt.shape[1]

    @torch.inference_mode()
    def propose(
        self, tokens: Sequence[int], k: int, params: SamplingParams, generator: torch.Generator | None
    ) -> Draft:
        L = len(tokens)
        start = min(self.computed, L - 1)
        new = torch.tensor([list(tokens[start:])], dtype=torch.long, device=self.device)  # (1, L - start)
        logits = self.model(new, torch.arange(start, L, device=self.device))[0, -1:]  # (1, V)
        drafted, probs = [], []
        for j in range(k):
            token, q = draft_step(logits.float(), params, generator)  # (1,), (1, V) | None
            drafted.append(token)
            probs.append(q)
            if j + 1 < k:  # the last draft is never fed: the target computes its keys and values
                pos = torch.tensor([L + j], device=self.device)
                logits = self.model(token.view(1, 1), pos)[0]  # (1, V)
        self.computed = L + k - 1
        q_rows = None if params.greedy else torch.cat([q for q in probs if q is not None])  # (k, V)
        return Draft(torch.cat(drafted), q_rows)

    def rollback(self, num_tokens: int) -> None:
        self.computed = min(self.computed, num_tokens)

    def stop(self) -> None:
        self.model.clear_caches()
        self.computed = 0


class DraftModelPool:
    """Draft-model proposals for many sequences at once (the engine's running requests).

    Each sequence keeps its own contiguous KV cache of the draft model, installed into the shared model for
    its turn, plus the tokens whose keys and values that cache holds (`fed`). A proposal feeds the tokens
    after the longest common prefix of `fed` and the sequence (the accepted ones), then drafts k tokens one
    forward each. Drafts are the draft model's argmax: a deterministic proposer (one-hot q), so accepting
    while the target's token equals the draft is exact for greedy requests and distribution-preserving
    for sampled ones. Sequences are drafted one after another: the draft model runs at batch 1.
    """

    def __init__(self, draft_model: Transformer, k: int, vocab_size: int) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1; got {k}")
        if draft_model.config.vocab_size != vocab_size:
            raise ValueError(
                f"the draft model {draft_model.config.name} has {draft_model.config.vocab_size} tokens in "
                f"its vocabulary but the target has {vocab_size}: drafts need the target's tokenizer"
            )
        self.model, self.k = draft_model, k
        self.device = next(draft_model.parameters()).device
        self._caches: dict[str, list[KVCache]] = {}
        self._fed: dict[str, list[int]] = {}

    @torch.inference_mode()
    def propose_ids(self, seq_id: str, tokens: Sequence[int], k: int, max_len: int) -> list[int]:
        """Up to k tokens to follow `tokens` (prompt + output) of a sequence that may grow to max_len."""
        L = len(tokens)
        cap = min(max_len, self.model.config.max_seq_len)
        k = min(k, cap - L)
        if k < 1:
            return []
        caches = self._install(seq_id, cap)
        try:
            fed = self._fed[seq_id]
            start = min(_common_prefix(fed, tokens), L - 1)
            new = torch.tensor([list(tokens[start:])], dtype=torch.long, device=self.device)  # (1, L - start)
            logits = self.model(new, torch.arange(start, L, device=self.device))[0, -1]  # (V,)
            drafted: list[int] = []
            for j in range(k):
                drafted.append(int(logits.argmax()))
                if j + 1 < k:  # the last draft is never fed: the target computes its keys and values
                    token = torch.tensor([[drafted[-1]]], device=self.device)
                    logits = self.model(token, torch.tensor([L + j], device=self.device))[0, -1]
            self._fed[seq_id] = list(tokens) + drafted[:-1]
            return drafted
        finally:
            self.model.clear_caches()  # the caches stay with the sequence, not the model
            del caches

    def drop(self, seq_id: str) -> None:
        """Forget a finished (or aborted) sequence and free its cache."""
        self._caches.pop(seq_id, None)
        self._fed.pop(seq_id, None)

    def _install(self, seq_id: str, cap: int) -> list[KVCache]:
        caches = self._caches.get(seq_id)
        if caches is None or caches[0].max_seq_len < cap:  # new sequence (or more room needed): start over
            self.model.setup_caches(1, cap)
            self._caches[seq_id] = caches = [a.kv_cache for a in self.model.attentions()]  # type: ignore[misc]
            self._fed[seq_id] = []
            return caches
        for attn, cache in zip(self.model.attentions(), caches, strict=True):
            attn.kv_cache = cache
        self.model.cache_len = caches[0].max_seq_len
        return caches


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def draft_step(
    logits: torch.Tensor, params: SamplingParams, generator: Generators
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(1, V) draft logits -> the drafted token (1,) and q (1, V), or None when greedy (q one-hot)."""
    if params.greedy:
        return logits.argmax(dim=-1), None
    q = warp(logits, params).softmax(dim=-1)
    return draw(q, generator), q


# --- verification: pure functions ----------------------------------------------------------------------
def penalized_rows(
    logits: torch.Tensor,  # (k+1, V) raw target logits of one verification
    counts: torch.Tensor,  # (1, V) output counts before the verification
    seen: torch.Tensor | None,  # (1, V) bool, tokens of the prompt
    drafts: torch.Tensor,  # (k,)
    params: SamplingParams,
) -> torch.Tensor:
    """Row i is penalized with counts + drafts[:i]: what target-only decoding would count at that position."""
    T, V = logits.shape
    rows = verification_counts(counts, drafts)  # (k+1, V)
    seen_rows = seen.expand(T, V) if seen is not None else None
    return apply_penalties(
        logits, rows, seen_rows, params.repetition_penalty, params.presence_penalty, params.frequency_penalty
    )


def verification_counts(counts: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
    """(1, V) output counts, (k,) drafts -> (k+1, V): row i counts the output plus drafts[:i]."""
    step = torch.zeros(drafts.shape[0] + 1, counts.shape[1], dtype=counts.dtype, device=counts.device)
    step[1:].scatter_(1, drafts.view(-1, 1), 1)  # row i + 1 adds drafts[i]
    return (counts + step.cumsum(dim=0)).to(counts.dtype)  # (k+1, V)


def accepted_length(target: Sequence[int], drafts: Sequence[int]) -> int:
    """How many drafts the target's own tokens (k+1 of them) confirm: the first mismatch ends acceptance.

    This is `accept_greedy` on argmax tokens, and `accept_sampled` with a deterministic proposer (q one-hot)
    on tokens drawn from p: keeping draft x when the draw equals x happens with probability p(x) =
    min(1, p(x) / q(x)), and a draw that differs is distributed as max(p - q, 0), the replacement.
    """
    for i, (t, d) in enumerate(zip(target, drafts, strict=False)):
        if t != d:
            return i
    return len(drafts)


def accept_greedy(logits: torch.Tensor, drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(k+1, V) target logits, (k,) drafts -> (n accepted (), tokens (k+1,)); emit tokens[: n + 1].

    The emitted tokens are the target's argmax at every row, so they are target-only greedy by construction;
    the drafts only decide how many rows are valid."""
    target = logits.argmax(dim=-1)  # (k+1,)
    n = (target[:-1] == drafts).long().cumprod(dim=0).sum()
    return n, target


def accept_sampled(
    probs: torch.Tensor,  # (k+1, V) warped target distributions p
    drafts: torch.Tensor,  # (k,)
    draft_probs: torch.Tensor | None,  # (k, V) warped draft distributions q; None: one-hot at the drafts
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling -> (n accepted (), tokens (k+1,)); emit tokens[: n + 1]. No host sync.

    Draft i is kept with probability min(1, p_i(x) / q_i(x)); the first rejected row n draws from
    max(p_n - q_n, 0), or, with every draft kept, row k draws the bonus token from p_k. The replacement is
    drawn for every row and the one at n is taken, which keeps the whole step on the device.
    """
    k, V = drafts.shape[0], probs.shape[-1]
    rows = torch.arange(k, device=probs.device)
    q = draft_probs if draft_probs is not None else F.one_hot(drafts, V).to(probs.dtype)  # (k, V)
    p_x, q_x = probs[rows, drafts], q[rows, drafts]  # (k,)
    u = torch.rand(k, generator=generator, device=probs.device)
    n = (u * q_x < p_x).long().cumprod(dim=0).sum()  # u < p/q, without dividing by q
    residual = (probs[:k] - q).clamp_min(0)  # (k, V)
    # p == q leaves nothing to draw from; such a row rejects with probability 0, but rounding can still
    # reject it, and then p is the right distribution
    residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, probs[:k])
    replacement = draw(torch.cat([residual, probs[k:]]), generator)  # (k+1,); draw needs no normalizing
    kept = torch.cat([drafts, replacement[k:]])  # (k+1,)
    return n, torch.where(torch.arange(k + 1, device=probs.device) == n, replacement, kept)


# --- the generation loop -------------------------------------------------------------------------------
@dataclass
class SpecStats:
    """Counters of one speculative generation, filled in place as it runs."""

    proposed: int = 0  # draft tokens sent to verification
    accepted: int = 0  # of those, accepted (including any cut off by a stop token or max_new_tokens)
    target_forwards: int = 0  # prefill included, so plain decoding makes exactly 1.0 token per forward
    tokens: int = 0  # tokens emitted

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / self.target_forwards if self.target_forwards else 0.0


def speculative_generate_tokens(
    target: Transformer,
    prompt_ids: list[int],
    params: SamplingParams,
    proposer: Proposer,
    *,
    stop_ids: frozenset[int],
    device: torch.device | str | None = None,
    stats: SpecStats | None = None,
) -> Generator[TokenEvent, None, None]:
    """`generate_tokens` with speculation: the same events, finish reasons and cache lifecycle (the target's
    and the proposer's caches are released when generation ends or the consumer stops early). Pass a
    SpecStats to read acceptance and tokens per target forward afterwards."""
    prompt = list(prompt_ids)
    check_fits(target, len(prompt), params.max_new_tokens)
    if params.num_beams > 1:
        raise ValueError(
            f"num_beams={params.num_beams}: speculative decoding extends one sequence; use generate_tokens"
        )
    device = device or next(target.parameters()).device
    terminators = frozenset(params.stop_token_ids) | (
        frozenset() if params.ignore_eos else frozenset(stop_ids)
    )
    return _speculative_events(target, prompt, params, proposer, terminators, device, stats or SpecStats())


def _speculative_events(
    target: Transformer,
    prompt: list[int],
    params: SamplingParams,
    proposer: Proposer,
    terminators: frozenset[int],
    device,
    stats: SpecStats,
) -> Generator[TokenEvent, None, None]:
    verifier = _Verifier(target, prompt, params, device)
    seq = list(prompt)
    try:
        proposer.start(prompt, len(prompt) + params.max_new_tokens, target.config.vocab_size)
        raw, draft = verifier.prefill(), NO_DRAFT  # the prefill is a verification of zero drafts
        stats.target_forwards += 1
        while True:
            events, n_accepted = verifier.accept(raw, draft)
            stats.proposed += len(draft)
            stats.accepted += n_accepted
            for event in events:
                seq.append(event.token_id)
                stats.tokens += 1
                reason: FinishReason | None = "stop" if event.token_id in terminators else None
                if reason is None and len(seq) - len(prompt) == params.max_new_tokens:
                    reason = "length"
                if reason is not None:
                    yield dataclasses.replace(event, finish_reason=reason)
                    return
                yield event
            proposer.rollback(len(seq) - 1)  # all but the newest token, which no proposal has seen
            room = params.max_new_tokens - (len(seq) - len(prompt)) - 1  # one verification emits k + 1
            k = min(proposer.k, room)
            draft = proposer.propose(seq, k, params, verifier.generator) if k > 0 else NO_DRAFT
            raw = verifier.forward(seq[-1], draft.tokens, len(seq) - 1)
            stats.target_forwards += 1
    finally:
        proposer.stop()
        target.clear_caches()


class _Verifier:
    """Target-side state of one speculative request: penalty counts, RNG, and the raw rows for logprobs.

    Like generate's _Decoder, every tensor is made under inference mode inside its methods only, so no
    inference-mode context stays open across the generator's yields."""

    @torch.inference_mode()
    def __init__(self, model: Transformer, prompt: list[int], params: SamplingParams, device) -> None:
        self.model, self.params, self.device = model, params, device
        self.generator = make_generator(params.seed, device)
        self.prompt = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, T)
        V, penalized = model.config.vocab_size, params.penalized
        self.counts = torch.zeros(1, V, dtype=torch.int32, device=device) if penalized else None  # (1, V)
        self.seen = prompt_mask(self.prompt, V) if penalized else None  # (1, V)

    @torch.inference_mode()
    def prefill(self) -> torch.Tensor:
        T = self.prompt.shape[1]
        self.model.setup_caches(1, T + self.params.max_new_tokens)
        return self.model(self.prompt, torch.arange(T, device=self.device))[0, -1:].float()  # (1, V)

    @torch.inference_mode()
    def forward(self, last: int, drafts: torch.Tensor, pos: int) -> torch.Tensor:
        """Score [last, d1..dk] at positions pos..pos+k -> raw logits (k+1, V)."""
        last_id = torch.tensor([last], dtype=torch.long, device=self.device)
        ids = torch.cat([last_id, drafts.to(self.device)]).view(1, -1)  # (1, k+1)
        positions = torch.arange(pos, pos + ids.shape[1], device=self.device)
        return self.model(ids, positions)[0].float()  # (k+1, V)

    @torch.inference_mode()
    def accept(self, raw: torch.Tensor, draft: Draft) -> tuple[list[TokenEvent], int]:
        """The accepted drafts plus the target's token, as events; one host sync."""
        p, drafts = self.params, draft.tokens.to(self.device)
        logits = raw
        if self.counts is not None:
            logits = penalized_rows(raw, self.counts, self.seen, drafts, p)
        if p.greedy:
            n, tokens = accept_greedy(logits, drafts)
        else:
            q = draft.probs.to(self.device) if draft.probs is not None else None
            n, tokens = accept_sampled(warp(logits, p).softmax(dim=-1), drafts, q, self.generator)
        if self.counts is not None:
            emitted = (torch.arange(tokens.shape[0], device=self.device) <= n).to(self.counts.dtype)
            self.counts.scatter_add_(1, tokens.view(1, -1), emitted.view(1, -1))
        return self._read(raw, n, tokens)

    def _read(self, raw: torch.Tensor, n: torch.Tensor, tokens: torch.Tensor) -> tuple[list[TokenEvent], int]:
        top_n = self.params.logprobs
        if top_n is None:
            n_accepted, *ids = torch.cat([n.view(1), tokens]).tolist()
            return [TokenEvent(t) for t in ids[: n_accepted + 1]], n_accepted
        chosen, top_values, top_ids = logprobs_of(raw, tokens, top_n)  # (k+1,), (k+1, n), (k+1, n)
        # float32 holds token ids exactly below 2**24, far above any vocabulary (MPS has no float64)
        table = torch.cat(
            [tokens.float().view(-1, 1), chosen.view(-1, 1), top_values, top_ids.float()], dim=1
        )
        flat = torch.cat([n.float().view(1), table.flatten()]).tolist()  # the one host sync
        n_accepted, width = int(flat[0]), 2 + 2 * top_n
        rows = [flat[1 + i * width : 1 + (i + 1) * width] for i in range(n_accepted + 1)]
        events = [
            TokenEvent(
                int(r[0]), r[1], tuple(zip((int(t) for t in r[2 + top_n :]), r[2 : 2 + top_n], strict=True))
            )
            for r in rows
        ]
        return events, n_accepted
