"""The scheduler: pure policy over plain Python records, no tensors.

Each step it decides how many tokens of which requests to compute, in one budget of
`max_num_batched_tokens` and at most `max_num_seqs` running requests:

1. RUNNING requests first, in arrival order: each catches up as far as the budget allows (a decode is one
   token, an unfinished prefill the next chunk). When the KV pool is short it preempts the running request
   that arrived last -- frees its blocks and puts it back at the front of the waiting queue to be recomputed
   later (prefix caching turns most of that recompute into hits). A resumed request keeps its arrival rank,
   so the oldest request is never the victim while a younger one runs, and it always makes progress.
   A request that catches up also verifies its draft tokens (speculative decoding), as many as fit the
   budget and its remaining length; short of blocks, it drops its drafts rather than preempt anyone.
2. WAITING requests, strictly first come first served (a request that does not fit blocks the ones behind
   it, so big requests are never starved), unless this step already had to preempt. Prefix-cache hits
   count as computed tokens, so only the rest of the prompt costs budget; a prompt bigger than the budget
   is prefilled in chunks over several steps.

The output is a `SchedulerOutput` dataclass; the runner executes it, and `update` takes back the rejected
drafts, appends the new tokens and finishes requests on stop ids / length, never appending past them. Stop
strings are text: the engine's output processor finds them and calls `finish_requests`.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import count
from typing import TYPE_CHECKING

from lmstack.engine.kv_cache import KVCacheManager
from lmstack.engine.request import Request, RequestStatus

if TYPE_CHECKING:
    from lmstack.generate.sampling import SamplingParams


@dataclass(frozen=True, slots=True)
class NewRequest:
    """A request scheduled for the first time: what the runner needs to set up its sampling state."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams | None


@dataclass(frozen=True, slots=True)
class ScheduledRequest:
    request_id: str
    token_ids: list[int]  # the tokens whose K/V this step computes, drafts last
    num_computed_tokens: int  # position of token_ids[0]
    block_ids: list[int]  # the request's block table, covering every position up to the last new token
    sample: bool  # this step catches the request up: its last token's logits give the next token
    num_spec_tokens: int = 0  # the last ones of token_ids are drafts: their logits verify them (sample only)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]  # batch order
    new_requests: list[NewRequest] = field(default_factory=list)
    resumed_ids: list[str] = field(default_factory=list)  # readmitted after preemption (recomputed)
    preempted_ids: list[str] = field(default_factory=list)  # preempted this step: blocks freed
    finished_ids: list[str] = field(default_factory=list)  # finished since the last step: drop state

    @property
    def num_scheduled_tokens(self) -> dict[str, int]:
        return {s.request_id: len(s.token_ids) for s in self.scheduled}

    @property
    def block_tables(self) -> dict[str, list[int]]:
        return {s.request_id: s.block_ids for s in self.scheduled}

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.scheduled)


class Scheduler:
    def __init__(
        self,
        kv_cache: KVCacheManager,
        *,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 512,
        max_model_len: int | None = None,
    ) -> None:
        if max_num_seqs <= 0 or max_num_batched_tokens <= 0:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        self.kv = kv_cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # sorted by arrival rank
        self.num_preemptions = 0
        self._rank: dict[str, int] = {}
        self._counter = count()
        self._finished_ids: list[str] = []

    # --- requests in and out ---------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self._rank[request.request_id] = next(self._counter)
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def finish_requests(self, request_ids: str | Iterable[str], status: RequestStatus) -> list[Request]:
        """Finish (abort, stop string) requests now: their blocks go back to the pool at once."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        done = []
        for rid in ids:
            request = self.requests.get(rid)
            if request is None:
                continue
            if request.status is RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            self._finish(request, status)
            done.append(request)
        return done

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # --- one step --------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput([], finished_ids=self._finished_ids)
        self._finished_ids = []
        budget = self.max_num_batched_tokens
        chosen: list[tuple[Request, int, list[int]]] = []  # (request, tokens to catch up, drafts)
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            drafts = self._drafts(request, n, budget)
            if not (drafts and self.kv.allocate_slots(request, n + len(drafts))):
                drafts = []  # short of blocks: verify no guesses rather than preempt anyone for them
                if not self._allocate_or_preempt(request, n, out.preempted_ids):
                    break  # it was the youngest running request: preempted itself
            chosen.append((request, n, drafts))
            budget -= n + len(drafts)
            i += 1
        if not out.preempted_ids:  # admitting while short of blocks would only thrash
            self._admit(budget, chosen, out)
        for request, n, drafts in chosen:
            start = request.num_computed_tokens
            request.num_computed_tokens += n + len(drafts)  # update() takes the rejected drafts back
            request.spec_token_ids = []
            out.scheduled.append(
                ScheduledRequest(
                    request.request_id,
                    request.token_ids[start : start + n] + drafts,
                    start,
                    self.kv.block_ids(request.request_id),
                    sample=start + n == request.num_tokens,
                    num_spec_tokens=len(drafts),
                )
            )
        return out

    def update(
        self, output: SchedulerOutput, sampled: Mapping[str, list[int]]
    ) -> list[tuple[Request, list[int]]]:
        """Take each request's new tokens (its accepted drafts, then the target's own token): count only
        the accepted drafts as computed, and append the tokens up to the first stop id or the length limit,
        which finishes the request. Returns (request, tokens appended) for the requests that got tokens, in
        batch order (finished ones carry their final status)."""
        updated = []
        for s in output.scheduled:
            request = self.requests.get(s.request_id)
            if not s.sample or request is None or request.status is not RequestStatus.RUNNING:
                continue  # a chunk of a prefill, or finished (aborted) since it was scheduled
            tokens = sampled[s.request_id]
            # the K/V written at rejected draft positions are stale: later steps write over them
            request.num_computed_tokens -= s.num_spec_tokens - (len(tokens) - 1)
            appended = []
            for token in tokens:
                request.token_ids.append(token)
                appended.append(token)
                status = self._finish_status(request, token)
                if status is not None:
                    self._finish_running(request, status)
                    break
            else:
                self.kv.free_tail(request)  # blocks that only rejected drafts reached
            updated.append((request, appended))
        return updated

    # --- internals -------------------------------------------------------------------------------------
    def _drafts(self, request: Request, n: int, budget: int) -> list[int]:
        """The drafts this step verifies: only on a step that catches the request up, within the budget,
        and never past max_new_tokens / max_model_len (a verification of d drafts emits up to d + 1)."""
        if not request.spec_token_ids or request.num_computed_tokens + n < request.num_tokens:
            return []
        room = request.max_new_tokens - request.num_output_tokens - 1
        if self.max_model_len is not None:
            room = min(room, self.max_model_len - request.num_tokens - 1)
        return request.spec_token_ids[: max(0, min(room, budget - n))]

    def _finish_status(self, request: Request, token: int) -> RequestStatus | None:
        if token in request.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= request.max_new_tokens or (
            self.max_model_len is not None and request.num_tokens >= self.max_model_len
        ):
            return RequestStatus.FINISHED_LENGTH
        return None

    def _allocate_or_preempt(self, request: Request, n: int, preempted: list[str]) -> bool:
        """Allocate n more tokens for a running request, preempting the youngest running requests until
        it fits. False if the request itself had to go."""
        while not self.kv.allocate_slots(request, n):
            victim = self.running.pop()
            self.kv.free(victim)
            victim.status = RequestStatus.PREEMPTED
            victim.num_computed_tokens = 0
            victim.num_preemptions += 1
            self.num_preemptions += 1
            self.waiting.appendleft(victim)  # victims leave youngest first: the queue keeps arrival order
            preempted.append(victim.request_id)
            if victim is request:
                return False
        return True

    def _admit(self, budget: int, chosen: list[tuple[Request, int, list[int]]], out: SchedulerOutput) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            hits, num_hit = self.kv.get_computed_blocks(request)
            n = min(request.num_tokens - num_hit, budget)
            if not self.kv.allocate_slots(request, n, hits):
                break  # first come first served: nobody overtakes the head of the queue
            self.waiting.popleft()
            if request.status is RequestStatus.PREEMPTED:
                out.resumed_ids.append(request.request_id)
            else:
                out.new_requests.append(NewRequest(request.request_id, request.prompt_ids, request.params))
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_hit
            bisect.insort(self.running, request, key=lambda r: self._rank[r.request_id])
            chosen.append((request, n, []))
            budget -= n

    def _finish_running(self, request: Request, status: RequestStatus) -> None:
        self.running.remove(request)
        self._finish(request, status)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        self.kv.free(request)
        request.status = status
        del self.requests[request.request_id]
        del self._rank[request.request_id]
        self._finished_ids.append(request.request_id)
