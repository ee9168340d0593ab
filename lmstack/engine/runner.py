"""The runner: mechanism only. It executes a `SchedulerOutput` and samples; it decides nothing.

One step is ONE flattened batch of every scheduled token (N of them, from R requests): the embeddings, the
q/k/v/o projections and the MLPs run once over (1, N, C), which is what makes batching pay off (and what a
quantized GEMM kernel wants). Only attention is per request: new K/V are written through the slot mapping,
then each request reads its keys back through its block table -- decodes (one query each) in one padded
call, prefill chunks one call each, each with its causal / sliding-window mask. The LM head runs only on
the last token of the requests that sample this step, and on their draft tokens.

Speculative verification (the drafts come with the `SchedulerOutput`; the scheduler chose them): a request
with k drafts is a chunk of k+1 tokens whose k+1 logits rows are sampled by `sample_batch` like k+1
requests, row i with the penalty counts of the output plus drafts[:i]. It keeps its tokens up to and
including the first that differs from its draft (`accepted_length`): greedy, that is the target's argmax;
sampled, it is speculative sampling with a deterministic proposer (accept with min(1, p/q), replace from
max(p - q, 0) for a one-hot q). A seeded request's generator is then rewound to the draws of the tokens it
kept, so every token is the one non-speculative decoding draws: the output does not depend on speculation.

It reuses the model's own modules and helpers (`embed`, `layers`, `norm`, `head`, `_ropes`) and never calls
`Transformer.forward`, whose KV cache is contiguous per batch row. Shape letters: lmstack/models/layers.py,
plus R requests in the step and nb blocks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import ModuleType

import torch
from torch import nn

from lmstack.engine.kv_cache import PagedKVCache, cdiv
from lmstack.engine.request import TokenLogprob
from lmstack.engine.scheduler import ScheduledRequest, SchedulerOutput
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
from lmstack.generate.speculative import accepted_length, verification_counts
from lmstack.generate.structured import GrammarCompiler, GrammarMatcher, apply_bitmask, fill_bitmask
from lmstack.models.attention import Attention, attend, attention_mask
from lmstack.models.layers import apply_rope, fused_ops
from lmstack.models.transformer import Block, Transformer


@dataclass(frozen=True, slots=True)
class RunnerOutput:
    sampled_token_ids: dict[str, list[int]]  # per sampling request: its accepted drafts, then one more token
    logprobs: dict[str, list[TokenLogprob]] = field(default_factory=dict)  # one per sampled token


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


@dataclass(frozen=True)
class NativeTables:
    """What the native paged-attention op reads: every request's block table, and its rows and length."""

    ops: ModuleType
    block_table: torch.Tensor  # (R, nb) int64, padded with block 0
    query_start: torch.Tensor  # (R + 1,) request r owns batch rows [query_start[r], query_start[r + 1])
    seq_lens: torch.Tensor  # (R,) tokens with K/V after this step


_Reads = NativeTables | dict[int | None, _ReadPlan]  # per attention window, for the PyTorch path


def native_tables(spans: list[_Span], ops: ModuleType, device) -> NativeTables:
    tables = [s.block_ids for s in spans]
    nb = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (nb - len(t)) for t in tables], dtype=torch.long, device=device)
    starts = torch.tensor([s.start for s in spans] + [spans[-1].end], dtype=torch.long, device=device)
    lens = torch.tensor([s.seq_len for s in spans], dtype=torch.long, device=device)
    return NativeTables(ops, table, starts, lens)


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
    grammar: GrammarMatcher | None = None  # for params.json_schema: which tokens may come next


class ModelRunner:
    def __init__(
        self,
        model: Transformer,
        kv_cache: PagedKVCache,
        device: torch.device,
        grammars: GrammarCompiler | None = None,  # the model's vocabulary for constrained decoding
    ) -> None:
        self.model, self.kv, self.device, self.grammars = model, kv_cache, device, grammars
        self.block_size = kv_cache.block_size
        self.windows = {attn.window for attn in model.attentions()}
        self.states: dict[str, _SamplingState] = {}

    @torch.inference_mode()
    def execute(self, so: SchedulerOutput) -> RunnerOutput:
        self._update_states(so)
        if not so.scheduled:
            return RunnerOutput({})
        ids, pos, slots, spans = self._prepare(so)
        ops = fused_ops(self.kv.k[0], rows=len(ids))  # CPU float32 cache, a step of few tokens
        reads: _Reads = (
            native_tables(spans, ops, self.device)
            if ops is not None
            else {w: plan_reads(spans, w, self.block_size, self.device) for w in self.windows}
        )
        samplers = [s for s in so.scheduled if s.sample]
        hidden = self._forward(ids, pos, slots, reads)  # (1, N, C)
        if not samplers:
            return RunnerOutput({})
        # each sampler's last caught-up token, then its drafts: M = R + drafts rows
        last = [r for s, sp in zip(so.scheduled, spans, strict=True) if s.sample for r in _sample_rows(s, sp)]
        rows = torch.tensor(last, device=self.device)
        logits = self.model.head(self.model.norm(hidden[:, rows]))[0].float()  # (M, V)
        return self._sample(logits, samplers)

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
                self._grammar(p),
            )

    def _grammar(self, p: SamplingParams) -> GrammarMatcher | None:
        if p.json_schema is None:
            return None
        if self.grammars is None:  # LLMEngine.validate refuses such requests before they get here
            raise ValueError("json_schema needs a runner built with a GrammarCompiler")
        return self.grammars.matcher(p.json_schema)

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

    def _forward(self, ids, pos, slots, reads: _Reads) -> torch.Tensor:
        m = self.model
        x = m.embed(ids[None], pos)  # (1, N, C)
        ropes = {key: (cos[:, None], sin[:, None]) for key, (cos, sin) in m._ropes(pos).items()}  # (N, 1, rd)
        for i, layer in enumerate(m.layers):
            assert isinstance(layer, Block)
            h = self._attention(i, layer.attn, layer.attn_norm(x), ropes.get(m._rope_key(i)), slots, reads)
            if layer.post_attn_norm is not None:
                h = layer.post_attn_norm(h)
            x = x + h
            h = layer.mlp(layer.mlp_norm(x))
            if layer.post_mlp_norm is not None:
                h = layer.post_mlp_norm(h)
            x = x + h
        return x

    def _attention(self, i: int, attn: Attention, x, rope, slots, reads: _Reads) -> torch.Tensor:
        N = x.shape[1]
        q, k, v = attn.project(x)  # (1, N, nh*hs), (1, N, nkv*hs) x2
        q, k, v = q.view(N, attn.nh, attn.hs), k.view(N, attn.nkv, attn.hs), v.view(N, attn.nkv, attn.hs)
        if attn.q_norm is not None and attn.k_norm is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        if attn.use_rope and rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        self.kv.write(i, slots, k, v)
        if isinstance(reads, NativeTables):  # keys read in place through the block tables
            t = reads
            y = t.ops.paged_attention(
                q.contiguous(), self.kv.k[i], self.kv.v[i], t.block_table, t.query_start, t.seq_lens,
                attn.scale, attn.softcap or 0.0, attn.window or 0,
            )  # fmt: skip
        else:
            y = paged_attention(q, self.kv.k[i], self.kv.v[i], reads[attn.window], attn.scale, attn.softcap)
        return attn.wo(y.reshape(1, N, attn.nh * attn.hs))  # (1, N, C)

    def _sample(self, logits: torch.Tensor, samplers: list[ScheduledRequest]) -> RunnerOutput:
        """Logits (M, V): one row per sampler, k+1 for one with k drafts (see the module docstring)."""
        states = [self.states[s.request_id] for s in samplers]
        drafts = [_drafts(s) for s in samplers]
        rewind = {  # seeded samplers that may draw more rows than they keep
            i: st.generator.get_state()
            for i, st in enumerate(states)
            if drafts[i] and st.generator is not None and not st.params.greedy
        }
        row_states = [row for st, d in zip(states, drafts, strict=True) for row in verification_states(st, d)]
        constrained = [(st.grammar, d) for st, d in zip(states, drafts, strict=True) if st.grammar]
        allowed = fill_bitmask(constrained, logits.shape[1]) if constrained else None
        ids = sample_batch(logits, row_states, allowed)  # (M,)
        token_ids = ids.tolist()  # the one host sync of the step
        out = RunnerOutput({})
        kept: list[range] = []  # per sampler, its rows up to the first rejected draft
        start = 0
        for i, (s, st, d) in enumerate(zip(samplers, states, drafts, strict=True)):
            n = accepted_length(token_ids[start : start + len(d) + 1], d)
            kept.append(range(start, start + n + 1))
            out.sampled_token_ids[s.request_id] = token_ids[start : start + n + 1]
            if st.grammar is not None:
                st.grammar.advance(token_ids[start : start + n + 1])
            if st.counts is not None:
                for r in kept[-1]:
                    update_counts_(st.counts, ids[r : r + 1])
            if i in rewind and n < len(d):
                _rewind(st.generator, rewind[i], n + 1, logits)  # type: ignore[arg-type]
            start += len(d) + 1
        self._logprobs(logits, ids, token_ids, samplers, states, kept, out)
        return out

    def _logprobs(self, logits, ids, token_ids, samplers, states, kept, out: RunnerOutput) -> None:
        """Raw-model logprobs (and the top ones) of the kept tokens of the samplers that ask for them."""
        wants = [i for i, st in enumerate(states) if st.params.logprobs is not None]
        if not wants:
            return
        n = max(states[i].params.logprobs or 0 for i in wants)
        flat = [r for i in wants for r in kept[i]]
        rows = torch.tensor(flat, device=logits.device)
        chosen, top_v, top_i = logprobs_of(logits[rows], ids[rows], n)
        table = torch.cat([chosen[:, None], top_v, top_i.float()], dim=1).tolist()  # (rows, 1 + 2n)
        packed = dict(zip(flat, table, strict=True))
        for i in wants:
            k = states[i].params.logprobs or 0
            lps = out.logprobs.setdefault(samplers[i].request_id, [])
            for r in kept[i]:
                row = packed[r]
                top = [(int(t), lp) for t, lp in zip(row[1 + n : 1 + n + k], row[1 : 1 + k], strict=True)]
                lps.append(TokenLogprob(token_ids[r], row[0], top))


def _sample_rows(s: ScheduledRequest, span: _Span) -> range:
    """Batch rows whose logits a sampling request needs: its last caught-up token and its drafts."""
    return range(span.end - 1 - s.num_spec_tokens, span.end)


def _drafts(s: ScheduledRequest) -> list[int]:
    return s.token_ids[len(s.token_ids) - s.num_spec_tokens :]


def verification_states(st: _SamplingState, drafts: list[int]) -> list[_SamplingState]:
    """One sampling state per verified row: row i draws the token after drafts[:i], so its penalty counts
    include them (what non-speculative decoding counts at that position). All rows share the generator,
    which `draw` uses in row order: row i gets the noise non-speculative decoding uses for that token."""
    if not drafts or st.counts is None:
        return [st] * (len(drafts) + 1)
    counts = verification_counts(st.counts, torch.tensor(drafts, device=st.counts.device))  # (k+1, V)
    return [dataclasses.replace(st, counts=counts[i : i + 1]) for i in range(len(drafts) + 1)]


def _rewind(generator: torch.Generator, state: torch.Tensor, num_rows: int, logits: torch.Tensor) -> None:
    """Reset a generator to `state` advanced by the noise of `num_rows` draws: the rows it kept."""
    generator.set_state(state)
    draw(torch.ones(num_rows, logits.shape[1], device=logits.device), [generator] * num_rows)


def _knob(values: list, device) -> float | torch.Tensor:
    """A scalar when every row agrees (the exact arithmetic of the single-request path), else (B,)."""
    return values[0] if all(v == values[0] for v in values) else torch.tensor(values, device=device)


def sample_batch(
    logits: torch.Tensor, states: list[_SamplingState], allowed: torch.Tensor | None = None
) -> torch.Tensor:
    """Raw logits (R, V) -> token ids (R,), each row with its own request's params, penalty counts and
    generator: the same functions, in the same order, as `lmstack.generate.sampling.sample`. Rows whose
    state has a grammar first lose every token it forbids: `allowed` (C, V / 32) holds their bitmasks in row
    order (`fill_bitmask`); by default each such row is its request's next token."""
    dev = logits.device
    grammars = [(i, st.grammar) for i, st in enumerate(states) if st.grammar is not None]
    if grammars:
        if allowed is None:
            allowed = fill_bitmask([(g, []) for _, g in grammars], logits.shape[1])
        rows = torch.tensor([i for i, _ in grammars], device=dev)
        logits = logits.clone()
        logits[rows] = apply_bitmask(logits[rows], allowed)
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
