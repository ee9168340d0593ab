"""Beam search with Hugging Face semantics, so its output can be diffed against `transformers.generate`.

The K beams are the K rows of the KV cache; after each step `model.reorder_caches(beam_idx)` keeps the
cache rows of the surviving parents. Candidate selection runs on the device; the bookkeeping of finished
hypotheses (a handful of Python floats) runs on the host after one sync per step, which beam search needs
anyway to decide whether to stop.

HF details kept on purpose: each step looks at the top max(2, 1 + #stop ids) * K continuations; only the
top K of them may finish; a hypothesis is scored sum(logprob) / generated_len ** length_penalty, counting
its stop token; `early_stopping` means what it means in HF (True: stop once K hypotheses are finished;
False: also stop when the best running beam, scored at its current length, cannot beat the worst finished
one; "never": the same test with the best length it could still reach, exact for length_penalty > 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from lmstack.models.transformer import Transformer

EarlyStopping = bool | Literal["never"]
_FINISHED = -1.0e9  # HF's "this beam may not continue" offset


@dataclass(frozen=True)
class Hypothesis:
    token_ids: tuple[int, ...]  # generated tokens, including the stop token when `stopped`
    logprob: float  # sum of the token logprobs
    score: float  # logprob / len(token_ids) ** length_penalty
    stopped: bool  # ended with a stop token (else ran into max_new_tokens)


def beam_search(
    model: Transformer,
    prompt_ids: list[int],
    *,
    num_beams: int,
    max_new_tokens: int,
    stop_ids: frozenset[int],
    length_penalty: float = 1.0,
    early_stopping: EarlyStopping = False,
    device: torch.device | str | None = None,
) -> list[Hypothesis]:
    """The n-best finished hypotheses (at most num_beams), best first."""
    if not prompt_ids:
        raise ValueError("empty prompt: beam search needs at least one prompt token")
    device = device or next(model.parameters()).device
    K, P = num_beams, len(prompt_ids)
    try:
        logits, running = _prefill(model, prompt_ids, K, max_new_tokens, device)
        stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
        width = max(2, 1 + len(stop_ids)) * K
        seqs: list[list[int]] = [[] for _ in range(K)]  # the running beams' tokens, on the host
        finished: list[Hypothesis] = []
        can_improve = True
        for step in range(max_new_tokens):
            top, beam_idx, next_ids, running = _select(logits, running, stop, width, K)
            c = _to_host(top)
            hits = [s or step + 1 == max_new_tokens for s in c.stops]  # max length finishes everyone
            if can_improve and not (early_stopping is True and len(finished) == K):
                finished = _finish(finished, c, hits, seqs, K, length_penalty)
            seqs = [[*seqs[c.parents[j]], c.tokens[j]] for j in c.keep]
            if len(finished) == K:
                reach = max_new_tokens if early_stopping == "never" and length_penalty > 0 else step + 1
                can_improve = can_improve and c.best_running / reach**length_penalty > finished[-1].score
            if not can_improve or (early_stopping is True and len(finished) == K) or all(hits):
                break
            logits = _advance(model, beam_idx, next_ids, P + step)
        return finished
    finally:
        model.clear_caches()


@dataclass
class _Candidates:
    """Host copy of one step's top continuations, best first."""

    scores: list[float]  # accumulated logprob
    parents: list[int]  # beam each one extends
    tokens: list[int]
    stops: list[bool]  # token is a stop id
    keep: list[int]  # indices of the K that continue as beams
    best_running: float  # accumulated logprob of the best continuing beam


def _finish(
    finished: list[Hypothesis],
    c: _Candidates,
    hits: list[bool],
    seqs: list[list[int]],
    K: int,
    length_penalty: float,
) -> list[Hypothesis]:
    """Add the finishing candidates among the top K (HF only lets those finish); keep the best K."""
    for j in range(K):
        if hits[j]:
            ids = (*seqs[c.parents[j]], c.tokens[j])
            finished.append(
                Hypothesis(ids, c.scores[j], c.scores[j] / len(ids) ** length_penalty, c.stops[j])
            )
    return sorted(finished, key=lambda h: h.score, reverse=True)[:K]


@torch.inference_mode()
def _prefill(
    model: Transformer, prompt_ids: list[int], K: int, max_new_tokens: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every beam starts as the prompt; only beam 0 may expand at the first step (the others start at -1e9
    so the K beams don't pick the same K tokens)."""
    model.setup_caches(K, len(prompt_ids) + max_new_tokens)
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device).expand(K, -1)  # (K, P)
    logits = model(idx, torch.arange(len(prompt_ids), device=device))[:, -1].float()  # (K, V)
    running = torch.full((K,), _FINISHED, device=device)
    running[0] = 0.0
    return logits, running


@torch.inference_mode()
def _select(
    logits: torch.Tensor, running: torch.Tensor, stop: torch.Tensor, width: int, K: int
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top `width` continuations over all beams, and the best K that did not stop (the next beams)."""
    V = logits.shape[-1]
    total = torch.log_softmax(logits, dim=-1) + running[:, None]  # (K, V)
    scores, flat = total.view(-1).topk(min(width, total.numel()))  # (W,), best first
    parents, tokens = flat // V, flat % V
    is_stop = torch.isin(tokens, stop)
    alive = scores + is_stop.float() * _FINISHED
    keep = alive.topk(K).indices  # (K,), best first
    running = alive[keep]
    return (scores, parents, tokens, is_stop, keep, running), parents[keep], tokens[keep], running


def _to_host(top: tuple[torch.Tensor, ...]) -> _Candidates:
    """One device->host copy per step (float32, as MPS lacks float64: exact for ids below 2**24)."""
    scores, parents, tokens, stops, keep, running = top
    W, K = scores.shape[0], keep.shape[0]
    packed = torch.cat([t.float() for t in (scores, parents, tokens, stops, keep, running[:1])]).tolist()
    cols = [packed[i * W : (i + 1) * W] for i in range(4)]
    return _Candidates(
        scores=cols[0],
        parents=[int(p) for p in cols[1]],
        tokens=[int(t) for t in cols[2]],
        stops=[bool(s) for s in cols[3]],
        keep=[int(k) for k in packed[4 * W : 4 * W + K]],
        best_running=packed[-1],
    )


@torch.inference_mode()
def _advance(model: Transformer, beam_idx: torch.Tensor, next_ids: torch.Tensor, pos: int) -> torch.Tensor:
    """Keep the surviving parents' cache rows, then feed each beam its new token at position `pos`."""
    model.reorder_caches(beam_idx)
    input_pos = torch.full((1,), pos, dtype=torch.long, device=next_ids.device)
    return model(next_ids.view(-1, 1), input_pos)[:, -1].float()  # (K, V)
