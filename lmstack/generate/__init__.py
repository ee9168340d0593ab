"""Sampling functions shared with the engine, the simple single-stream generate path, and beam search."""

from lmstack.generate.beam import Hypothesis, beam_search
from lmstack.generate.generate import (
    GenerationResult,
    StopStringMatcher,
    TextStream,
    TokenEvent,
    check_fits,
    generate_text,
    generate_tokens,
    stream_text,
)
from lmstack.generate.sampling import (
    SamplingParams,
    apply_penalties,
    apply_temperature,
    draw,
    logprobs_of,
    make_generator,
    min_p_filter,
    prompt_mask,
    sample,
    top_k_filter,
    top_p_filter,
    update_counts_,
    warp,
)

__all__ = [
    "GenerationResult",
    "Hypothesis",
    "SamplingParams",
    "StopStringMatcher",
    "TextStream",
    "TokenEvent",
    "apply_penalties",
    "apply_temperature",
    "beam_search",
    "check_fits",
    "draw",
    "generate_text",
    "generate_tokens",
    "logprobs_of",
    "make_generator",
    "min_p_filter",
    "prompt_mask",
    "sample",
    "stream_text",
    "top_k_filter",
    "top_p_filter",
    "update_counts_",
    "warp",
]

from lmstack.generate.speculative import (  # noqa: E402  (appended: speculative decoding)
    Draft,
    DraftModelProposer,
    PromptLookupProposer,
    Proposer,
    SpecStats,
    speculative_generate_tokens,
)

__all__ += [
    "Draft",
    "DraftModelProposer",
    "PromptLookupProposer",
    "Proposer",
    "SpecStats",
    "speculative_generate_tokens",
]
