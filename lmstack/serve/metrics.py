"""Prometheus metrics for /metrics, in a registry of the app's own (several apps can live in one process).

Latencies are observed per finished engine request; engine state (running, waiting, KV usage, token,
preemption and speculative-decoding totals) is read from `AsyncEngine.stats()` at scrape time, so nothing
on the engine's hot path ever touches Prometheus.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lmstack.engine import EngineStats, RequestOutput

_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 60)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2.5)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 600)


class Metrics:
    def __init__(self, engines: Mapping[str, Callable[[], EngineStats]]) -> None:
        """`engines`: model name -> its stats function."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(
            "lmstack_time_to_first_token_seconds", "Arrival to first generated token.", ["model"],
            buckets=_TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.tpot = Histogram(
            "lmstack_time_per_output_token_seconds", "Mean time per generated token after the first.",
            ["model"], buckets=_TPOT_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            "lmstack_e2e_request_latency_seconds", "Arrival to last token of one engine request.", ["model"],
            buckets=_E2E_BUCKETS, registry=r,
        )  # fmt: skip
        self.finished = Counter(
            "lmstack_requests",
            "Finished engine requests (one per choice).",
            ["model", "finish_reason"],
            registry=r,
        )
        self.errors = Counter(
            "lmstack_http_errors", "Error responses by HTTP status.", ["status"], registry=r
        )
        r.register(_EngineCollector(engines))

    def observe(self, model: str, out: RequestOutput, now: float | None = None) -> None:
        """One finished engine request; times are the engine's time.monotonic()."""
        now = time.monotonic() if now is None else now
        self.finished.labels(model, out.finish_reason or "stop").inc()
        if out.finish_reason == "abort":
            return
        self.e2e.labels(model).observe(max(now - out.arrival_time, 0.0))
        if out.first_token_time is not None:
            self.ttft.labels(model).observe(max(out.first_token_time - out.arrival_time, 0.0))
            if out.completion_tokens > 1:
                per_token = (now - out.first_token_time) / (out.completion_tokens - 1)
                self.tpot.labels(model).observe(max(per_token, 0.0))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _EngineCollector(Collector):
    def __init__(self, engines: Mapping[str, Callable[[], EngineStats]]) -> None:
        self._engines = engines

    def collect(self) -> Iterator[Metric]:
        gauges: dict[str, tuple[str, Callable[[EngineStats], float]]] = {
            "num_requests_running": ("Requests in the running batch.", lambda s: s.num_running),
            "num_requests_waiting": ("Requests waiting to be scheduled.", lambda s: s.num_waiting),
            "kv_cache_usage_ratio": ("Fraction of KV-cache blocks in use.", lambda s: s.kv_usage),
            "prefix_cache_hit_rate": (
                "Prompt tokens found in the prefix cache.",
                lambda s: s.prefix_cache_hit_rate,
            ),
            "spec_decode_draft_acceptance_rate": (
                "Accepted / verified draft tokens since start (NaN: none proposed, or speculation is off).",
                lambda s: s.spec_acceptance_rate,
            ),
        }
        counters: dict[str, tuple[str, Callable[[EngineStats], float]]] = {
            "num_preemptions": (
                "Requests preempted (blocks freed, recomputed).",
                lambda s: s.num_preemptions,
            ),
            "prompt_tokens": ("Prompt tokens admitted.", lambda s: s.prompt_tokens_total),
            "generation_tokens": ("Tokens generated.", lambda s: s.generation_tokens_total),
            "spec_decode_num_draft_tokens": (
                "Draft tokens verified by speculative decoding.",
                lambda s: s.spec_draft_tokens_total,
            ),
            "spec_decode_num_accepted_tokens": (
                "Draft tokens accepted by speculative decoding.",
                lambda s: s.spec_accepted_tokens_total,
            ),
        }
        stats = {name: get() for name, get in self._engines.items()}
        for name, (doc, read) in gauges.items():
            g = GaugeMetricFamily(f"lmstack_{name}", doc, labels=["model"])
            for model, s in stats.items():
                g.add_metric([model], float(read(s)))
            yield g
        for name, (doc, read) in counters.items():
            c = CounterMetricFamily(f"lmstack_{name}", doc, labels=["model"])
            for model, s in stats.items():
                c.add_metric([model], float(read(s)))
            yield c
