"""Continuous batching over a paged KV cache: requests in, a scheduler (policy) deciding how many tokens of
which requests to compute each step, a runner (mechanism) executing them in one flattened batch."""

from lmstack.engine.async_engine import AsyncEngine
from lmstack.engine.engine import LLMEngine
from lmstack.engine.request import EngineStats, RequestOutput, TokenLogprob

__all__ = ["AsyncEngine", "EngineStats", "LLMEngine", "RequestOutput", "TokenLogprob"]
