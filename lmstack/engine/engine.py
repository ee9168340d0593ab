"""The engine step loop: schedule -> execute -> update -> detokenize, one round per `step()`.

`LLMEngine` is synchronous and single-threaded (`AsyncEngine` drives it from one background thread). It
owns the three parts and the text side: each request's `IncrementalDetokenizer` and `StopStringMatcher`,
applied exactly as the simple path's `TextStream` does, so `generate_text` and the engine give the same
tokens and the same text. A stop string found in the text finishes the request here, and the scheduler
frees its blocks at once.

Speculative decoding (`speculative="prompt_lookup"`): after each step the proposer guesses up to
`num_speculative_tokens` drafts for every running request from its own tokens (n-gram lookup in prompt +
output, `lmstack.generate.speculative`); the scheduler fits them into the next step, the runner verifies
them, and a request may then get several tokens in one step. Greedy and seeded outputs are the same tokens
as without speculation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lmstack.engine.kv_cache import KVCacheManager, PagedKVCache
from lmstack.engine.request import EngineStats, Request, RequestOutput, RequestStatus, TokenLogprob
from lmstack.engine.runner import ModelRunner, RunnerOutput, model_device
from lmstack.engine.scheduler import Scheduler, SchedulerOutput
from lmstack.generate.generate import StopStringMatcher, check_fits
from lmstack.generate.sampling import SamplingParams
from lmstack.generate.speculative import DraftModelPool, PromptLookupProposer, SpecStats
from lmstack.generate.structured import GrammarCompiler
from lmstack.models.transformer import Transformer

DEFAULT_KV_CACHE_MEMORY_BYTES = 512 * 2**20
Speculative = Literal["prompt_lookup", "draft_model"]


@dataclass
class _TextState:
    """The text side of one request: incremental detokenizer + stop-string matcher."""

    detokenizer: Any  # push(id) -> str, flush() -> str; None without a tokenizer
    matcher: StopStringMatcher

    def push(self, token_id: int, finish_reason: str | None) -> tuple[str, bool]:
        """-> (text delta, whether a stop string ended it); mirrors lmstack.generate.TextStream."""
        if self.detokenizer is None:
            return "", False
        piece = "" if finish_reason == "stop" else self.detokenizer.push(token_id)  # stop ids: no text
        if finish_reason is not None:
            piece += self.detokenizer.flush()
        safe, stopped = self.matcher.push(piece)
        if finish_reason is not None and not stopped:
            safe += self.matcher.flush()
        return safe, stopped


class LLMEngine:
    def __init__(
        self,
        model: Transformer,
        tokenizer: Any,
        *,
        block_size: int = 16,
        num_blocks: int | None = None,
        kv_cache_memory_bytes: int = DEFAULT_KV_CACHE_MEMORY_BYTES,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 512,
        enable_prefix_caching: bool = True,
        kv_cache_dtype: torch.dtype | None = None,
        speculative: Speculative | None = None,
        num_speculative_tokens: int = 4,
        draft_model: Transformer | None = None,
        speculative_max_running: int | None = None,
    ) -> None:
        """`num_blocks` of `block_size` token slots each; by default as many as fit in
        `kv_cache_memory_bytes` (K and V of every layer). Without a tokenizer: no text, no stop strings.
        `speculative`: None, "prompt_lookup", or "draft_model" (with `draft_model`, a small model with the
        same vocabulary), each with up to `num_speculative_tokens` drafts per request; with more than
        `speculative_max_running` requests running nobody drafts (a batch that already fills the matmuls
        gains nothing from verifying guesses; vLLM's speculative_disable_by_batch_size)."""
        if speculative not in (None, "prompt_lookup", "draft_model"):
            raise ValueError(f"speculative must be None, prompt_lookup or draft_model; got {speculative!r}")
        if speculative and num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1; got {num_speculative_tokens}")
        if speculative_max_running is not None and speculative_max_running < 1:
            raise ValueError(f"speculative_max_running must be >= 1 or None; got {speculative_max_running}")
        self.speculative_max_running = speculative_max_running
        if (speculative == "draft_model") != (draft_model is not None):
            raise ValueError("speculative='draft_model' and a draft_model go together; pass both or neither")
        c = model.config
        self.model, self.tokenizer = model, tokenizer
        self.device = model_device(model)
        dtype = kv_cache_dtype or _model_dtype(model)
        if num_blocks is None:
            per_block = PagedKVCache.bytes_per_block(c.n_layers, block_size, c.kv_heads, c.hd, dtype)
            num_blocks = kv_cache_memory_bytes // per_block
            if num_blocks < 1:
                raise ValueError(f"kv_cache_memory_bytes={kv_cache_memory_bytes} is below one block")
        self.kv_manager = KVCacheManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(
            self.kv_manager,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=c.max_seq_len,
        )
        kv_cache = PagedKVCache(c.n_layers, num_blocks, block_size, c.kv_heads, c.hd, dtype, self.device)
        # constrained decoding: the vocabulary is compiled once per engine, on the first JSON request
        self.grammars = GrammarCompiler(tokenizer, c.vocab_size) if tokenizer is not None else None
        self.runner = ModelRunner(model, kv_cache, self.device, self.grammars)
        self.stop_ids = frozenset(tokenizer.stop_ids) if tokenizer is not None else frozenset()
        self._text: dict[str, _TextState] = {}
        self._pending: list[RequestOutput] = []  # abort notices, returned by the next step
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.proposer: PromptLookupProposer | DraftModelPool | None = None
        if speculative == "prompt_lookup":
            self.proposer = PromptLookupProposer(num_speculative_tokens)
        elif draft_model is not None:
            self.proposer = DraftModelPool(draft_model, num_speculative_tokens, c.vocab_size)
        # target_forwards counts request-steps that sampled, so tokens_per_forward is 1.0 without drafts
        self.spec_stats = SpecStats()

    @property
    def capacity_tokens(self) -> int:
        return self.kv_manager.num_blocks * self.kv_manager.block_size

    # --- requests ----------------------------------------------------------------------------------------
    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Refuse what could never run (ValueError); no state is read that changes, so any thread may call."""
        check_fits(self.model, len(prompt_ids), params.max_new_tokens)
        V = self.model.config.vocab_size
        bad = [t for t in prompt_ids if not (isinstance(t, int) and 0 <= t < V)]
        if bad:
            raise ValueError(f"prompt token ids must be ints in [0, {V}); got {bad[:5]}")
        if params.max_new_tokens + len(prompt_ids) > self.capacity_tokens:
            raise ValueError(
                f"prompt of {len(prompt_ids)} tokens + max_new_tokens={params.max_new_tokens} exceeds the KV "
                f"cache capacity of {self.capacity_tokens} tokens; lower max_new_tokens or give the cache "
                "more memory"
            )
        if params.num_beams > 1:
            raise ValueError("beam search (num_beams > 1) is not supported by the engine; use generate/")
        if params.json_schema is not None:
            if self.grammars is None:
                raise ValueError("json_schema (constrained decoding) needs an engine with a tokenizer")
            self.grammars.check(params.json_schema)

    def add_request(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> None:
        if request_id in self.scheduler.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        prompt_ids = list(prompt_ids)
        self.validate(prompt_ids, params)
        stops = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.stop_ids)
        request = Request(
            request_id,
            prompt_ids,
            params.max_new_tokens,
            stops,
            params,
            time.monotonic() if arrival_time is None else arrival_time,
        )
        self.scheduler.add_request(request)
        self._text[request_id] = _TextState(self._detokenizer(prompt_ids), StopStringMatcher(params.stop))

    def abort(self, request_id: str) -> None:
        """Finish now and free the blocks; the next `step()` returns its final output (reason "abort")."""
        for request in self.scheduler.finish_requests(request_id, RequestStatus.FINISHED_ABORTED):
            self._text.pop(request.request_id, None)
            self._forget_drafts(request.request_id)
            self._pending.append(self._output(request, [], "", None))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending)

    # --- the step ----------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs, self._pending = self._pending, []
        so = self.scheduler.schedule()
        self.prompt_tokens_total += sum(len(r.prompt_ids) for r in so.new_requests)
        try:
            result = self.runner.execute(so)
        except BaseException:
            # The batch's K/V are half written: abort its requests (their final outputs come with the next
            # step) and forget every prefix-cache name, some of which point at blocks never filled.
            self.kv_manager.reset_prefix_cache()
            for s in so.scheduled:
                self.abort(s.request_id)
            self._pending = outputs + self._pending
            raise
        self._count_speculation(so, result)
        updated = self.scheduler.update(so, result.sampled_token_ids)
        outputs += self._process(updated, result)
        self._propose(updated)
        return outputs

    def _process(self, updated: list[tuple[Request, list[int]]], result: RunnerOutput) -> list[RequestOutput]:
        now = time.monotonic()
        outputs = []
        for request, new in updated:
            rid = request.request_id
            if request.first_token_time is None:
                request.first_token_time = now
            text, kept = self._push_text(request, new)
            self.generation_tokens_total += len(kept)
            self.spec_stats.tokens += len(kept)
            lps = result.logprobs.get(rid)
            outputs.append(self._output(request, kept, text, lps[: len(kept)] if lps is not None else None))
            if request.status.finished:
                del self._text[rid]
                self._forget_drafts(rid)
        return outputs

    def _forget_drafts(self, request_id: str) -> None:
        if isinstance(self.proposer, DraftModelPool):
            self.proposer.drop(request_id)  # its draft KV cache

    def _push_text(self, request: Request, new: list[int]) -> tuple[str, list[int]]:
        """Detokenize a step's new tokens; a stop string in the text ends the request at the token that
        completed it, dropping the tokens after it (several arrive at once with speculation)."""
        state, rid = self._text[request.request_id], request.request_id
        text = ""
        for j, token in enumerate(new):
            last = j == len(new) - 1
            piece, hit_stop = state.push(token, request.status.finish_reason if last else None)
            text += piece
            if not hit_stop:
                continue
            del request.token_ids[len(request.token_ids) - (len(new) - j - 1) :]
            if request.status.finished:  # a later token (or this one) also ended it: the stop string wins
                request.status = RequestStatus.FINISHED_STOPPED
            else:
                self.scheduler.finish_requests(rid, RequestStatus.FINISHED_STOPPED)
            return text, new[: j + 1]
        return text, new

    def _count_speculation(self, so: SchedulerOutput, result: RunnerOutput) -> None:
        for s in so.scheduled:
            tokens = result.sampled_token_ids.get(s.request_id)
            if s.sample and tokens is not None:
                self.spec_stats.proposed += s.num_spec_tokens
                self.spec_stats.accepted += len(tokens) - 1
                self.spec_stats.target_forwards += 1

    def _propose(self, updated: list[tuple[Request, list[int]]]) -> None:
        """Drafts for the next step of every request that just got tokens and goes on."""
        if self.proposer is None:
            return
        cap = self.speculative_max_running
        if cap is not None and len(self.scheduler.running) > cap:
            return  # drafts are cleared once scheduled, so none are pending now
        for request, _ in updated:
            if request.status is not RequestStatus.RUNNING:
                continue
            if isinstance(self.proposer, DraftModelPool):
                max_len = request.num_tokens - request.num_output_tokens + request.max_new_tokens
                request.spec_token_ids = self.proposer.propose_ids(
                    request.request_id, request.token_ids, self.proposer.k, max_len
                )
            else:
                request.spec_token_ids = self.proposer.propose_ids(request.token_ids, self.proposer.k)

    def _output(
        self, request: Request, new: list[int], text: str, logprobs: list[TokenLogprob] | None
    ) -> RequestOutput:
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=new,
            text_delta=text,
            logprobs=logprobs,
            finished=request.status.finished,
            finish_reason=request.status.finish_reason,
            prompt_tokens=request.num_prompt_tokens,
            completion_tokens=request.num_output_tokens,
            first_token_time=request.first_token_time,
            arrival_time=request.arrival_time,
        )

    # --- introspection -----------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_usage=self.kv_manager.usage(),
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_hit_rate=self.kv_manager.prefix_cache_hit_rate(),
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            spec_draft_tokens_total=self.spec_stats.proposed,
            spec_accepted_tokens_total=self.spec_stats.accepted,
        )

    def _detokenizer(self, prompt_ids: list[int]) -> Any:
        if self.tokenizer is None:
            return None
        from lmstack.tokenizer import IncrementalDetokenizer  # here, so the engine imports without tokenizers

        return IncrementalDetokenizer(self.tokenizer, skip_special_tokens=True, prompt_ids=prompt_ids)


def _model_dtype(model: nn.Module) -> torch.dtype:
    """The K/V dtype `Transformer.setup_caches` would pick: the embedding's, float32 if quantized."""
    emb = getattr(model, "tok_embeddings", None)
    w = emb.weight if isinstance(emb, nn.Embedding) else None
    return w.dtype if w is not None and w.is_floating_point() else torch.float32
