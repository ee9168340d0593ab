"""The runner: mechanism only. It executes a `SchedulerOutput` and samples; it decides nothing.

One step is ONE flattened batch of every scheduled token (N of them, from R requests): the embeddings, the
q/k/v/o projections and the MLPs run once over (1, N, C), which is what makes batching pay off (and what a
quantized GEMM kernel wants). Only attention is per request: new K/V are written through the slot mapping,
then each request reads its keys back through its block table -- decodes (one query each) in one padded
call, prefill chunks one call each, each with its causal / sliding-window mask. The LM head runs only on
the last token of the requests that sample this step.

It reuses the model's own modules and helpers (`embed`, `layers`, `norm`, `head`, `_ropes`) and never calls
`Transformer.forward`, whose KV cache is contiguous per batch row. Shape letters: lmstack/models/layers.py,
plus R requests in the step and nb blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lmstack.engine.kv_cache import PagedKVCache, cdiv
from lmstack.engine.request import TokenLogprob
from lmstack.engine.scheduler import SchedulerOutput
from lmstack.generate.sampling import (
    SamplingParams,
    apply_penalties,
    apply_temperature,
    draw,
    logprobs_of,
    make_generator,
    min_p_filter,
    prompt_mask,
    top_k_filter,
    top_p_filter,
    update_counts_,
)
from lmstack.models.attention import Attention, attend, attention_mask
from lmstack.models.layers import apply_rope
from lmstack.models.transformer import Block, Transformer


@dataclass(frozen=True, slots=True)
class RunnerOutput:
    sampled_token_ids: dict[str, int]
    logprobs: dict[str, TokenLogprob] = field(default_factory=dict)


@dataclass(slots=True)
class _Span:
    """One request's share of the step: batch rows [start, end) hold positions [start_pos, seq_len)."""

    start: int
    end: int
    start_pos: int
    block_ids: list[int]

    @property
    def seq_len(self) -> int:
        return self.start_pos + self.end - self.start


@dataclass
class _ReadPlan:
    """How the layers with one attention window read the cache this step (built once, used per layer)."""

    prefills: list[tuple[slice, torch.Tensor, torch.Tensor]]  # rows, block ids (nb,), mask (T, S)
    decode_rows: torch.Tensor | None = None  # (R,) batch rows of one-token requests
    decode_table: torch.Tensor | None = None  # (R, nb) block ids, padded with block 0
    decode_mask: torch.Tensor | None = None  # (R, 1, 1, nb * block_size)


def _first_block(pos: int, window: int | None, bs: int) -> int:
    """The first block a query at `pos` can see: sliding-window layers skip the blocks behind the window."""
    return max(0, pos - window + 1) // bs if window else 0


def plan_reads(spans: list[_Span], window: int | None, bs: int, device) -> _ReadPlan:
    plan = _ReadPlan([])
    decodes = [s for s in spans if s.end - s.start == 1]
    for s in spans:
        if s.end - s.start == 1:
            continue
        b0 = _first_block(s.start_pos, window, bs)
        k_pos = torch.arange(b0 * bs, s.seq_len, device=device)  # (S,)
        q_pos = torch.arange(s.start_pos, s.seq_len, device=device)  # (T,)
        blocks = torch.tensor(s.block_ids[b0 : cdiv(s.seq_len, bs)], device=device)
        plan.prefills.append((slice(s.start, s.end), blocks, attention_mask(q_pos, k_pos, window)))
    if decodes:
        firsts = [_first_block(s.seq_len - 1, window, bs) for s in decodes]
        tables = [s.block_ids[b0 : cdiv(s.seq_len, bs)] for s, b0 in zip(decodes, firsts, strict=True)]
        nb = max(len(t) for t in tables)
        plan.decode_rows = torch.tensor([s.start for s in decodes], device=device)
        plan.decode_table = torch.tensor([t + [0] * (nb - len(t)) for t in tables], device=device)
        k_pos = torch.tensor(firsts, device=device)[:, None] * bs + torch.arange(nb * bs, device=device)
        q_pos = torch.tensor([s.seq_len - 1 for s in decodes], device=device)[:, None]
        visible = k_pos <= q_pos  # (R, S); also hides the padding past each request's end
        if window is not None:
            visible &= (q_pos - k_pos) < window
        plan.decode_mask = visible[:, None, None, :]
    return plan


def paged_attention(
    q: torch.Tensor,  # (N, nh, hs) queries of the step's tokens
    k_cache: torch.Tensor,  # (num_blocks, block_size, nkv, hs), this step's keys already written
    v_cache: torch.Tensor,
    plan: _ReadPlan,
    scale: float,
    softcap: float | None,
) -> torch.Tensor:
    y = torch.empty_like(q)  # (N, nh, hs)
    for rows, blocks, mask in plan.prefills:
        S = mask.shape[1]
        k = k_cache[blocks].flatten(0, 1)[:S].transpose(0, 1)[None]  # (1, nkv, S, hs)
        v = v_cache[blocks].flatten(0, 1)[:S].transpose(0, 1)[None]
        out = attend(q[rows].transpose(0, 1)[None], k, v, mask, scale, softcap)  # (1, nh, T, hs)
        y[rows] = out[0].transpose(0, 1)
    if plan.decode_rows is not None and plan.decode_table is not None and plan.decode_mask is not None:
        k = k_cache[plan.decode_table].flatten(1, 2).transpose(1, 2)  # (R, nkv, S, hs)
        v = v_cache[plan.decode_table].flatten(1, 2).transpose(1, 2)
        qd = q[plan.decode_rows][:, :, None]  # (R, nh, 1, hs)
        y[plan.decode_rows] = attend(qd, k, v, plan.decode_mask, scale, softcap)[:, :, 0]
    return y


@dataclass
class _SamplingState:
    """Per-request sampling state, kept across preemption (a seeded request continues its stream)."""

    params: SamplingParams
    generator: torch.Generator | None
    counts: torch.Tensor | None  # (1, V) output token counts, for penalties
    seen: torch.Tensor | None  # (1, V) tokens of the prompt, for the repetition penalty


class ModelRunner:
    def __init__(self, model: Transformer, kv_cache: PagedKVCache, device: torch.device) -> None:
        self.model, self.kv, self.device = model, kv_cache, device
        self.block_size = kv_cache.block_size
        self.windows = {attn.window for attn in model.attentions()}
        self.states: dict[str, _SamplingState] = {}

    @torch.inference_mode()
    def execute(self, so: SchedulerOutput) -> RunnerOutput:
        self._update_states(so)
        if not so.scheduled:
            return RunnerOutput({})
        ids, pos, slots, spans = self._prepare(so)
        plans = {w: plan_reads(spans, w, self.block_size, self.device) for w in self.windows}
        samplers = [s for s in so.scheduled if s.sample]
        hidden = self._forward(ids, pos, slots, plans)  # (1, N, C)
        if not samplers:
            return RunnerOutput({})
        last = [sp.end - 1 for s, sp in zip(so.scheduled, spans, strict=True) if s.sample]
        rows = torch.tensor(last, device=self.device)
        logits = self.model.head(self.model.norm(hidden[:, rows]))[0].float()  # (R, V)
        return self._sample(logits, [s.request_id for s in samplers])

    def _update_states(self, so: SchedulerOutput) -> None:
        for rid in so.finished_ids:
            self.states.pop(rid, None)
        V = self.model.config.vocab_size
        for new in so.new_requests:
            p = new.params or SamplingParams()
            prompt = torch.tensor([new.prompt_ids], device=self.device)  # (1, T)
            self.states[new.request_id] = _SamplingState(
                p,
                make_generator(p.seed, self.device),
                torch.zeros(1, V, dtype=torch.int32, device=self.device) if p.penalized else None,
                prompt_mask(prompt, V) if p.penalized else None,
            )

    def _prepare(self, so: SchedulerOutput):
        """Flatten the step: token ids, positions and cache slots (N,), plus each request's span."""
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        spans = []
        for s in so.scheduled:
            p0, n = s.num_computed_tokens, len(s.token_ids)
            spans.append(_Span(len(ids), len(ids) + n, p0, s.block_ids))
            ids.extend(s.token_ids)
            pos.extend(range(p0, p0 + n))
            slots.extend(s.block_ids[p // bs] * bs + p % bs for p in range(p0, p0 + n))

        def tensor(xs: list[int]) -> torch.Tensor:
            return torch.tensor(xs, dtype=torch.long, device=self.device)

        return tensor(ids), tensor(pos), tensor(slots), spans

    def _forward(self, ids, pos, slots, plans: dict[int | None, _ReadPlan]) -> torch.Tensor:
        m = self.model
        x = m.embed(ids[None], pos)  # (1, N, C)
        ropes = {key: (cos[:, None], sin[:, None]) for key, (cos, sin) in m._ropes(pos).items()}  # (N, 1, rd)
        for i, layer in enumerate(m.layers):
            assert isinstance(layer, Block)
            h = self._attention(i, layer.attn, layer.attn_norm(x), ropes.get(m._rope_key(i)), slots, plans)
            if layer.post_attn_norm is not None:
                h = layer.post_attn_norm(h)
            x = x + h
            h = layer.mlp(layer.mlp_norm(x))
            if layer.post_mlp_norm is not None:
                h = layer.post_mlp_norm(h)
            x = x + h
        return x

    def _attention(self, i: int, attn: Attention, x, rope, slots, plans) -> torch.Tensor:
        N = x.shape[1]
        q, k, v = attn.project(x)  # (1, N, nh*hs), (1, N, nkv*hs) x2
        q, k, v = q.view(N, attn.nh, attn.hs), k.view(N, attn.nkv, attn.hs), v.view(N, attn.nkv, attn.hs)
        if attn.q_norm is not None and attn.k_norm is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        if attn.use_rope and rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        self.kv.write(i, slots, k, v)
        y = paged_attention(q, self.kv.k[i], self.kv.v[i], plans[attn.window], attn.scale, attn.softcap)
        return attn.wo(y.reshape(1, N, attn.nh * attn.hs))  # (1, N, C)

    def _sample(self, logits: torch.Tensor, request_ids: list[str]) -> RunnerOutput:
        states = [self.states[rid] for rid in request_ids]
        ids = sample_batch(logits, states)  # (R,)
        for i, st in enumerate(states):
            if st.counts is not None:
                update_counts_(st.counts, ids[i : i + 1])
        token_ids = ids.tolist()  # the one host sync of the step
        out = RunnerOutput(dict(zip(request_ids, token_ids, strict=True)))
        wants = [i for i, st in enumerate(states) if st.params.logprobs is not None]
        if wants:
            n = max(states[i].params.logprobs or 0 for i in wants)
            rows = torch.tensor(wants, device=logits.device)
            chosen, top_v, top_i = logprobs_of(logits[rows], ids[rows], n)
            packed = torch.cat([chosen[:, None], top_v, top_i.float()], dim=1).tolist()
            for i, row in zip(wants, packed, strict=True):
                k = states[i].params.logprobs or 0
                top = [(int(t), lp) for t, lp in zip(row[1 + n : 1 + n + k], row[1 : 1 + k], strict=True)]
                out.logprobs[request_ids[i]] = TokenLogprob(token_ids[i], row[0], top)
        return out


def _knob(values: list, device) -> float | torch.Tensor:
    """A scalar when every row agrees (the exact arithmetic of the single-request path), else (B,)."""
    return values[0] if all(v == values[0] for v in values) else torch.tensor(values, device=device)


def sample_batch(logits: torch.Tensor, states: list[_SamplingState]) -> torch.Tensor:
    """Raw logits (R, V) -> token ids (R,), each row with its own request's params, penalty counts and
    generator: the same functions, in the same order, as `lmstack.generate.sampling.sample`."""
    dev = logits.device
    pen = [i for i, st in enumerate(states) if st.counts is not None]
    if pen:
        rows = torch.tensor(pen, device=dev)
        ps = [states[i].params for i in pen]
        logits = logits.clone()
        logits[rows] = apply_penalties(
            logits[rows],
            torch.cat([states[i].counts for i in pen]),  # type: ignore[misc]
            torch.cat([states[i].seen for i in pen]),  # type: ignore[misc]
            _knob([p.repetition_penalty for p in ps], dev),
            _knob([p.presence_penalty for p in ps], dev),
            _knob([p.frequency_penalty for p in ps], dev),
        )
    ids = logits.argmax(dim=-1)
    rand = [i for i, st in enumerate(states) if not st.params.greedy]
    if rand:
        rows = torch.tensor(rand, device=dev)
        ps = [states[i].params for i in rand]
        x = apply_temperature(logits[rows], _knob([p.temperature for p in ps], dev))
        top_k = _knob([p.top_k for p in ps], dev)
        x = top_k_filter(x, top_k if isinstance(top_k, torch.Tensor) else int(top_k))
        x = top_p_filter(x, _knob([p.top_p for p in ps], dev))
        x = min_p_filter(x, _knob([p.min_p for p in ps], dev))
        ids[rows] = draw(x.softmax(dim=-1), [states[i].generator for i in rand])
    return ids


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")
