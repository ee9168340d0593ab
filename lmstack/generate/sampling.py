"""Sampling: the parameters of one request and the pure tensor functions that turn logits into tokens.

The simple generate path and the batched engine call the same functions, so a request gets the same tokens
whichever path serves it. Every function takes batched logits (B, V) and, for each knob, either a Python
scalar (same for every row) or a per-row tensor (B,); none of them syncs with the host, so they can run
inside a compiled step. Order of processing (the Hugging Face order): penalties -> temperature -> top-k ->
top-p -> min-p -> draw.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

Knob = float | torch.Tensor  # a scalar for the whole batch, or one value per row (B,)
NEG_INF = float("-inf")


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks of the decoder; validated once, here, so hot paths never re-check."""

    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # CTRL / HF style, over prompt + output tokens
    presence_penalty: float = 0.0  # OpenAI style, over output tokens
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings: the text is cut before them
    stop_token_ids: tuple[int, ...] = ()  # honoured even with ignore_eos
    ignore_eos: bool = False  # ignore the tokenizer's EOS / stop ids (not stop_token_ids)
    num_beams: int = 1  # > 1: deterministic beam search; needs temperature=0
    length_penalty: float = 1.0  # beam score = sum logprob / len ** length_penalty
    logprobs: int | None = None  # None: none; n >= 0: the chosen token's logprob and the top n
    json_schema: str | None = None  # JSON Schema text the output must match (generate/structured.py), or None

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        problems = self._field_problems() + self._beam_problems()
        if problems:
            raise ValueError("invalid SamplingParams: " + "; ".join(problems))

    def _field_problems(self) -> list[str]:
        s = self
        checks = [
            ("max_new_tokens", _int(s.max_new_tokens, 1), "an int >= 1"),
            ("temperature", _num(s.temperature, 0), ">= 0 (0 = greedy)"),
            ("top_k", _int(s.top_k, 0), "an int >= 0 (0 = off)"),
            ("top_p", _num(s.top_p, 0, 1) and s.top_p > 0, "in (0, 1]"),
            ("min_p", _num(s.min_p, 0, 1), "in [0, 1]"),
            ("repetition_penalty", _num(s.repetition_penalty) and s.repetition_penalty > 0, "> 0"),
            ("presence_penalty", _num(s.presence_penalty, -2, 2), "in [-2, 2]"),
            ("frequency_penalty", _num(s.frequency_penalty, -2, 2), "in [-2, 2]"),
            ("seed", s.seed is None or _int(s.seed, 0, 2**63 - 1), "None or an int in [0, 2**63)"),
            ("stop", all(isinstance(x, str) and x for x in s.stop), "non-empty strings"),
            ("stop_token_ids", all(_int(t, 0) for t in s.stop_token_ids), "ints >= 0"),
            ("ignore_eos", isinstance(s.ignore_eos, bool), "a bool"),
            ("num_beams", _int(s.num_beams, 1), "an int >= 1"),
            ("length_penalty", _num(s.length_penalty), "a finite number"),
            ("logprobs", s.logprobs is None or _int(s.logprobs, 0), "None or an int >= 0"),
            ("json_schema", s.json_schema is None or _json_object(s.json_schema), "None or JSON object text"),
            ("ignore_eos", not (s.ignore_eos and s.json_schema), "False with json_schema: EOS ends the JSON"),
        ]
        return [f"{name}={getattr(self, name)!r} must be {valid}" for name, ok, valid in checks if not ok]

    def _beam_problems(self) -> list[str]:
        """Beam search here is HF's deterministic beam search; refuse what it would silently ignore."""
        s = self
        if not _int(s.num_beams, 2):
            return []
        unsupported = [
            ("temperature", s.temperature != 0, "beam search is deterministic, set temperature=0"),
            ("repetition_penalty", s.repetition_penalty != 1, "penalties are not supported with beams"),
            ("presence_penalty", s.presence_penalty != 0, "penalties are not supported with beams"),
            ("frequency_penalty", s.frequency_penalty != 0, "penalties are not supported with beams"),
            ("stop", bool(s.stop), "stop strings are not supported with beams, use stop_token_ids"),
            ("logprobs", s.logprobs is not None, "logprobs are not supported with beams"),
            ("json_schema", s.json_schema is not None, "constrained decoding is not supported with beams"),
        ]
        return [
            f"{name}={getattr(s, name)!r} with num_beams={s.num_beams}: {why}"
            for name, bad, why in unsupported
            if bad
        ]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


def _num(x: object, lo: float = -math.inf, hi: float = math.inf) -> bool:
    """A finite real number (not a bool) in [lo, hi]."""
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and lo <= x <= hi


def _int(x: object, lo: float, hi: float = math.inf) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi


def _json_object(x: object) -> bool:
    try:
        return isinstance(x, str) and isinstance(json.loads(x), dict)
    except ValueError:
        return False


def _rows(x: Knob) -> Knob:
    """A per-row knob (B,) as a column (B, 1) so it broadcasts against logits (B, V)."""
    return x.view(-1, 1) if isinstance(x, torch.Tensor) else x


# --- penalties -----------------------------------------------------------------------------------------
def prompt_mask(prompt_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, V) bool: which tokens occur in each prompt (B, T); the repetition penalty also covers these."""
    mask = torch.zeros(prompt_ids.shape[0], vocab_size, dtype=torch.bool, device=prompt_ids.device)
    return mask.scatter_(1, prompt_ids, True)


def update_counts_(counts: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Add one occurrence of each row's new token (B,) to the output counts (B, V), in place."""
    return counts.scatter_add_(
        1, token_ids.view(-1, 1), torch.ones_like(token_ids.view(-1, 1), dtype=counts.dtype)
    )


def apply_penalties(
    logits: torch.Tensor,  # (B, V)
    output_counts: torch.Tensor,  # (B, V) occurrences of each token in the output so far
    prompt_mask: torch.Tensor | None = None,  # (B, V) bool
    repetition_penalty: Knob = 1.0,
    presence_penalty: Knob = 0.0,
    frequency_penalty: Knob = 0.0,
) -> torch.Tensor:
    """Repetition (divide positive / multiply negative logits of seen tokens, as CTRL and HF do), then
    OpenAI presence and frequency penalties, which only look at generated tokens."""
    seen = output_counts > 0
    rp = _rows(repetition_penalty)
    if isinstance(rp, torch.Tensor) or rp != 1.0:
        seen_any = seen | prompt_mask if prompt_mask is not None else seen
        penalized = torch.where(logits > 0, logits / rp, logits * rp)
        logits = torch.where(seen_any, penalized, logits)
    pp, fp = _rows(presence_penalty), _rows(frequency_penalty)
    if isinstance(pp, torch.Tensor) or pp != 0.0:
        logits = logits - seen.to(logits.dtype) * pp
    if isinstance(fp, torch.Tensor) or fp != 0.0:
        logits = logits - output_counts.to(logits.dtype) * fp
    return logits


# --- warpers -------------------------------------------------------------------------------------------
def apply_temperature(logits: torch.Tensor, temperature: Knob) -> torch.Tensor:
    """Divide by the temperature; rows with temperature 0 are left alone (the caller takes their argmax)."""
    t = _rows(temperature)
    if isinstance(t, torch.Tensor):
        return logits / torch.where(t > 0, t, torch.ones_like(t))
    return logits / t if t > 0 else logits


def top_k_filter(logits: torch.Tensor, top_k: int | torch.Tensor) -> torch.Tensor:
    """Keep the k largest logits per row (ties with the k-th are kept, as in HF); 0 = off."""
    V = logits.shape[-1]
    if isinstance(top_k, torch.Tensor):
        k = torch.where(top_k > 0, top_k, V).clamp(max=V).view(-1, 1)  # (B, 1)
        kth = logits.sort(dim=-1, descending=True).values.gather(-1, k - 1)  # (B, 1)
    elif 0 < top_k < V:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
    else:
        return logits
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p_filter(logits: torch.Tensor, top_p: Knob) -> torch.Tensor:
    """Nucleus: keep the smallest set of top tokens whose mass reaches top_p; the top token always stays.

    A token is kept when the mass of the tokens ranked strictly above it is still below top_p.
    """
    p = _rows(top_p)
    if not isinstance(p, torch.Tensor) and p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.softmax(dim=-1)
    mass_above = probs.cumsum(dim=-1) - probs
    drop_sorted = (mass_above >= p) & (p < 1.0)  # p = 1 is "off" even where rounding pushes mass past 1
    drop_sorted[:, 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, NEG_INF)


def min_p_filter(logits: torch.Tensor, min_p: Knob) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the top token's probability."""
    m = _rows(min_p)
    if not isinstance(m, torch.Tensor) and m <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    return logits.masked_fill(probs < m * probs.amax(dim=-1, keepdim=True), NEG_INF)


# --- drawing -------------------------------------------------------------------------------------------
Generators = torch.Generator | Sequence[torch.Generator | None] | None


def draw(probs: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """One token per row from probs (B, V) -> (B,), without a host sync.

    Exponential race: argmax(p / E) with E ~ Exp(1) picks i with probability p_i (gpt-fast's trick; unlike
    torch.multinomial it never syncs). A list gives each row its own generator, so a seeded request draws
    the same noise alone (simple path) or in any batch (engine).
    """
    noise = torch.empty_like(probs, dtype=torch.float32)
    if isinstance(generator, torch.Generator) or generator is None:
        noise.exponential_(generator=generator)
    else:
        for row, g in enumerate(generator):
            noise[row].exponential_(generator=g)
    return (probs / noise.clamp_min_(1e-20)).argmax(dim=-1)


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator on the logits' device, so one seed gives the same tokens wherever the noise is drawn."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature and the truncation filters of one request, in HF order."""
    logits = apply_temperature(logits, params.temperature)
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    return min_p_filter(logits, params.min_p)


def sample(logits: torch.Tensor, params: SamplingParams, generator: Generators = None) -> torch.Tensor:
    """Penalized logits (B, V) -> token ids (B,): argmax when greedy, else a draw from the warped softmax."""
    if params.greedy:
        return logits.argmax(dim=-1)
    return draw(warp(logits.float(), params).softmax(dim=-1), generator)


def logprobs_of(
    logits: torch.Tensor, token_ids: torch.Tensor, top_n: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities under the model's own distribution (raw logits, before penalties and warping,
    like vLLM's default): the chosen tokens' (B,), and the top_n values and ids (B, top_n), best first."""
    lp = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
    chosen = lp.gather(-1, token_ids.view(-1, 1)).squeeze(-1)  # (B,)
    top_values, top_ids = lp.topk(min(top_n, lp.shape[-1]), dim=-1)  # (B, n)
    return chosen, top_values, top_ids
