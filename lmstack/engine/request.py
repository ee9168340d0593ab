"""What the engine knows about one request, and what it hands back each step.

`Request` is the scheduler's record: token ids (prompt + output) and how many of them already have K/V in
the cache (`num_computed_tokens`). Prefill, chunked prefill, prefix-cache hits and recompute after
preemption are all that one counter catching up with `num_tokens`; a token is sampled only on the step
that catches it up completely. Speculative verification is the same counter running ahead: a step also
computes the request's draft tokens (`spec_token_ids`), and `update` takes back the rejected ones. No torch
here: the scheduler is plain Python.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from lmstack.generate.sampling import SamplingParams

FinishReason = Literal["stop", "length", "abort"]


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # back in the waiting queue, its blocks freed; recomputed when readmitted
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self.name.startswith("FINISHED")

    @property
    def finish_reason(self) -> FinishReason | None:
        return self.value if self.finished else None  # type: ignore[return-value]


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    stop_token_ids: frozenset[int] = frozenset()  # EOS/stop ids that end it (already honouring ignore_eos)
    params: SamplingParams | None = None  # opaque to the scheduler; the runner samples with it
    arrival_time: float = 0.0
    token_ids: list[int] = field(default_factory=list)  # prompt + output, filled in __post_init__
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache (or scheduled into it this step)
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    block_hashes: list[bytes] = field(default_factory=list)  # of its full blocks, filled by the KV manager
    spec_token_ids: list[int] = field(default_factory=list)  # drafts to follow token_ids, verified next step
    first_token_time: float | None = None

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids) :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    logprob: float  # under the raw model distribution (before penalties and warping), as the simple path
    top: list[tuple[int, float]]  # (token id, logprob), best first


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    text_delta: str  # detokenized, stop strings applied: never any part of a stop string
    logprobs: list[TokenLogprob] | None  # one per new token, when params.logprobs is set
    finished: bool
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    first_token_time: float | None  # time.monotonic() of the first generated token (TTFT)
    arrival_time: float


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_usage: float  # fraction of KV blocks held by requests (cached-but-free blocks count as free)
    num_preemptions: int  # total since start
    prefix_cache_hit_rate: float  # prompt tokens found in the prefix cache / prompt tokens looked up
    prompt_tokens_total: int
    generation_tokens_total: int
    spec_draft_tokens_total: int = 0  # draft tokens verified (speculative decoding)
    spec_accepted_tokens_total: int = 0  # ... and accepted, counting any cut off by a stop or the length

    @property
    def spec_acceptance_rate(self) -> float:
        """Accepted / verified draft tokens; NaN while nothing was proposed (or speculation is off)."""
        if not self.spec_draft_tokens_total:
            return math.nan
        return self.spec_accepted_tokens_total / self.spec_draft_tokens_total
