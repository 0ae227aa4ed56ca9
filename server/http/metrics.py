"""Prometheus metrics: one CollectorRegistry per app (tests build many apps in one process).

Latencies come from RequestTrace hooks (the streaming loop, the collectors and WebSocket rounds);
engine gauges are read at scrape time from AsyncEngine.stats, a copy the worker thread publishes.
"""
from __future__ import annotations

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, ProcessCollector,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from server.async_engine import AsyncEngine

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self, engine: AsyncEngine):
        self.registry = CollectorRegistry(auto_describe=False)
        reg = self.registry
        self.ttft = Histogram("berth_time_to_first_token_seconds", "Time to the first generated token",
                              buckets=_LATENCY_BUCKETS, registry=reg)
        self.itl = Histogram("berth_inter_token_latency_seconds", "Time between generated tokens",
                             buckets=_ITL_BUCKETS, registry=reg)
        self.e2e = Histogram("berth_e2e_request_latency_seconds", "Request arrival to its last event",
                             buckets=_LATENCY_BUCKETS, registry=reg)
        self.admission = Histogram("berth_request_admission_seconds",
                                   "Arrival to submission to the engine (body read, parse, validation)",
                                   buckets=_LATENCY_BUCKETS, registry=reg)
        self.queue = Histogram("berth_request_queue_time_seconds",
                               "Time in the engine's waiting queue before the first step",
                               buckets=_LATENCY_BUCKETS, registry=reg)
        self.prompt_tokens = Counter("berth_prompt_tokens", "Prompt tokens of finished choices", registry=reg)
        self.generation_tokens = Counter("berth_generation_tokens", "Generated tokens", registry=reg)
        self.requests = Counter("berth_requests", "Generation requests by protocol and outcome",
                                ["protocol", "outcome"], registry=reg)
        reg.register(_EngineCollector(engine))
        ProcessCollector(registry=reg)          # RSS, open fds, CPU (the soak reads them)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _EngineCollector:
    """Gauges and counters of the engine, from the last published EngineStats copy."""

    def __init__(self, engine: AsyncEngine):
        self.engine = engine

    def collect(self):
        s = self.engine.stats
        yield _gauge("berth_num_requests_running", "Sequences in the running batch", s.num_running)
        yield _gauge("berth_num_requests_waiting", "Sequences waiting for admission", s.num_waiting)
        yield _gauge("berth_num_requests_pending", "Requests admitted by the server and unfinished",
                     self.engine.num_pending)
        yield _gauge("berth_kv_blocks_total", "KV cache blocks in the pool", s.num_blocks_total)
        yield _gauge("berth_kv_blocks_used", "KV cache blocks held by sequences", s.num_blocks_used)
        yield _gauge("berth_kv_blocks_free", "KV cache blocks free (evictable included)",
                     s.num_blocks_total - s.num_blocks_used)
        yield _gauge("berth_kv_blocks_evictable", "Free blocks still holding a cached prefix",
                     s.num_blocks_evictable)
        rate = s.prefix_hit_tokens / s.prefix_queries if s.prefix_queries else 0.0
        yield _gauge("berth_prefix_cache_hit_rate", "Prefix-cache hit tokens / queried tokens", rate)
        yield _counter("berth_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                       s.prefix_queries)
        yield _counter("berth_prefix_cache_hits", "Prompt tokens found in the prefix cache", s.prefix_hit_tokens)
        yield _counter("berth_num_preemptions", "Sequences preempted for lack of KV blocks", s.num_preemptions)
        yield _gauge("berth_engine_dead", "1 once the engine has failed", int(self.engine.dead is not None))


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)
