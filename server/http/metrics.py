"""Prometheus metrics: one CollectorRegistry per app (tests build many apps in one process).

Latencies come from RequestTrace hooks (the streaming loop, the collectors and WebSocket rounds);
engine gauges are read at scrape time from AsyncEngine.stats, a copy the worker thread publishes.

Beside berth's own names, the series LLM-aware routers read are also exported under vLLM's names and
its `model_name` label (the Gateway API Inference Extension / llm-d endpoint picker, KServe, the EAS LLM
intelligent router): vllm:num_requests_running / _waiting, vllm:kv_cache_usage_perc (and the older
vllm:gpu_cache_usage_perc), vllm:cache_config_info{block_size,num_gpu_blocks}, the prefix-cache
queries / hits and preemption counters, and the TTFT, inter-token and e2e latency histograms.
"""
from __future__ import annotations

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, ProcessCollector,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from server.async_engine import AsyncEngine

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


class _Both:
    """One observation recorded under berth's name and vLLM's (labelled with the model name)."""
    __slots__ = ("ours", "vllm")

    def __init__(self, ours, vllm):
        self.ours, self.vllm = ours, vllm

    def observe(self, value: float) -> None:
        self.ours.observe(value)
        self.vllm.observe(value)

    def inc(self, value: float = 1.0) -> None:
        self.ours.inc(value)
        self.vllm.inc(value)


class Metrics:
    def __init__(self, engine: AsyncEngine, model_name: str = ""):
        self.registry = CollectorRegistry(auto_describe=False)
        reg = self.registry

        def histogram(ours: str, vllm: str, doc: str, buckets) -> _Both:
            return _Both(Histogram(ours, doc, buckets=buckets, registry=reg),
                         Histogram(vllm, doc, ["model_name"], buckets=buckets, registry=reg).labels(model_name))

        self.ttft = histogram("berth_time_to_first_token_seconds", "vllm:time_to_first_token_seconds",
                              "Time to the first generated token", _LATENCY_BUCKETS)
        self.itl = histogram("berth_inter_token_latency_seconds", "vllm:inter_token_latency_seconds",
                             "Time between generated tokens", _ITL_BUCKETS)
        self.e2e = histogram("berth_e2e_request_latency_seconds", "vllm:e2e_request_latency_seconds",
                             "Request arrival to its last event", _LATENCY_BUCKETS)
        self.admission = Histogram("berth_request_admission_seconds",
                                   "Arrival to submission to the engine (body read, parse, validation)",
                                   buckets=_LATENCY_BUCKETS, registry=reg)
        self.queue = Histogram("berth_request_queue_time_seconds",
                               "Time in the engine's waiting queue before the first step",
                               buckets=_LATENCY_BUCKETS, registry=reg)
        self.prompt_tokens = _Both(
            Counter("berth_prompt_tokens", "Prompt tokens of finished choices", registry=reg),
            Counter("vllm:prompt_tokens", "Prompt tokens of finished choices", ["model_name"],
                    registry=reg).labels(model_name))
        self.generation_tokens = _Both(
            Counter("berth_generation_tokens", "Generated tokens", registry=reg),
            Counter("vllm:generation_tokens", "Generated tokens", ["model_name"], registry=reg).labels(model_name))
        self.requests = Counter("berth_requests", "Generation requests by protocol and outcome",
                                ["protocol", "outcome"], registry=reg)
        reg.register(_EngineCollector(engine))
        reg.register(_VllmCollector(engine, model_name))
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


class _VllmCollector:
    """The engine's state under vLLM's names (see the module docstring)."""

    def __init__(self, engine: AsyncEngine, model_name: str):
        self.engine = engine
        self.model_name = model_name
        runner = getattr(getattr(engine, "engine", None), "runner", None)
        self.block_size = getattr(runner, "block_size", None)

    def collect(self):
        s, labels = self.engine.stats, {"model_name": self.model_name}
        yield _labelled(GaugeMetricFamily, "vllm:num_requests_running", "Requests in the running batch",
                        labels, s.num_running)
        yield _labelled(GaugeMetricFamily, "vllm:num_requests_waiting", "Requests waiting to be scheduled",
                        labels, s.num_waiting)
        usage = s.num_blocks_used / s.num_blocks_total if s.num_blocks_total else 0.0
        yield _labelled(GaugeMetricFamily, "vllm:kv_cache_usage_perc", "KV cache usage (1 = full)", labels, usage)
        yield _labelled(GaugeMetricFamily, "vllm:gpu_cache_usage_perc",
                        "KV cache usage (1 = full); vLLM's older name, read by the EAS router", labels, usage)
        info = {"block_size": str(self.block_size or ""), "num_gpu_blocks": str(s.num_blocks_total)}
        yield _labelled(GaugeMetricFamily, "vllm:cache_config_info", "KV cache configuration", info, 1)
        yield _labelled(CounterMetricFamily, "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                        labels, s.prefix_queries)
        yield _labelled(CounterMetricFamily, "vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache",
                        labels, s.prefix_hit_tokens)
        yield _labelled(CounterMetricFamily, "vllm:num_preemptions", "Sequences preempted for lack of KV blocks",
                        labels, s.num_preemptions)


def _labelled(kind, name: str, doc: str, labels: dict, value: float):
    family = kind(name, doc, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)
