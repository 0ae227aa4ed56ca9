"""The `vllm bench serve` metric set computed from RequestResults: pure functions, no I/O.

Definitions (vLLM benchmarks/serve, calculate_metrics):
- TTFT: send -> first text chunk, per successful request.
- TPOT: (latency - ttft) / (output_tokens - 1), only for requests with more than one output token.
- ITL: every gap between consecutive text chunks, pooled over all requests.
- E2E: send -> end of stream.
- Goodput: successful requests per second that meet every SLO given; a request with at most one
  output token counts TPOT 0 for that test (as vLLM does).
Percentiles use numpy's default ("linear") interpolation. Latencies are reported in ms.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from bench.clients import RequestResult


def percentile(values: list[float], q: float) -> float:
    """numpy.percentile(values, q) with the default linear method; values must be non-empty."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(slots=True)
class Distribution:
    """Summary of one latency in ms; all None when there were no samples."""
    mean: float | None = None
    median: float | None = None
    p90: float | None = None
    p99: float | None = None
    num_samples: int = 0


def summarize(values_s: list[float]) -> Distribution:
    if not values_s:
        return Distribution()
    ms = [v * 1000.0 for v in values_s]
    return Distribution(mean=sum(ms) / len(ms), median=percentile(ms, 50), p90=percentile(ms, 90),
                        p99=percentile(ms, 99), num_samples=len(ms))


@dataclass(slots=True)
class Slo:
    """Service-level objectives in ms; None means not checked."""
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None

    @property
    def is_set(self) -> bool:
        return any(v is not None for v in (self.ttft_ms, self.tpot_ms, self.e2el_ms))


def parse_slo(text: str | None) -> Slo:
    """'ttft:500,tpot:50' (ms; names ttft, tpot, e2el) -> Slo. Raises ValueError on bad input."""
    slo = Slo()
    for part in filter(None, (text or "").split(",")):
        name, sep, value = part.partition(":")
        name = name.strip().lower()
        if not sep or name not in ("ttft", "tpot", "e2el"):
            raise ValueError(f"bad SLO {part!r}: expected ttft:MS, tpot:MS or e2el:MS")
        ms = float(value)
        if not ms > 0:
            raise ValueError(f"SLO {name} must be a positive number of ms")
        setattr(slo, f"{name}_ms", ms)
    return slo


def request_tpot(result: RequestResult) -> float | None:
    """Seconds per output token after the first; None with fewer than two output tokens."""
    if result.output_tokens <= 1 or result.ttft is None:
        return None
    return (result.latency - result.ttft) / (result.output_tokens - 1)


def meets_slo(result: RequestResult, slo: Slo) -> bool:
    checks = ((slo.ttft_ms, result.ttft), (slo.tpot_ms, request_tpot(result) or 0.0),
              (slo.e2el_ms, result.latency))
    return all(limit is None or (value is not None and value * 1000.0 <= limit) for limit, value in checks)


@dataclass(slots=True)
class BenchmarkMetrics:
    num_requests: int
    completed: int
    failed: int
    duration_s: float
    total_input: int
    total_output: int
    request_throughput: float
    request_goodput: float | None
    output_throughput: float
    total_token_throughput: float
    ttft: Distribution
    tpot: Distribution
    itl: Distribution
    e2el: Distribution
    errors: dict[str, int] = field(default_factory=dict)
    round_ttft_median_ms: dict[int, float] = field(default_factory=dict)


def errors_by_kind(results: list[RequestResult]) -> dict[str, int]:
    counts = Counter(r.error_kind.value for r in results if not r.success and r.error_kind is not None)
    return dict(sorted(counts.items()))


def round_ttft_medians(results: list[RequestResult]) -> dict[int, float]:
    """Median TTFT in ms per round index (multi-round sessions), successful rounds only."""
    by_round: dict[int, list[float]] = {}
    for r in results:
        if r.success and r.round_index is not None and r.ttft is not None:
            by_round.setdefault(r.round_index, []).append(r.ttft * 1000.0)
    return {index: percentile(ttfts, 50) for index, ttfts in sorted(by_round.items())}


def compute_metrics(results: list[RequestResult], duration_s: float, slo: Slo | None = None) -> BenchmarkMetrics:
    """All metrics of one load point. duration_s is the wall time of the whole run (> 0)."""
    done = [r for r in results if r.success]
    total_input = sum(r.prompt_tokens for r in done)
    total_output = sum(r.output_tokens for r in done)
    tpots = [t for t in map(request_tpot, done) if t is not None]
    goodput = None
    if slo is not None and slo.is_set:
        goodput = sum(meets_slo(r, slo) for r in done) / duration_s
    return BenchmarkMetrics(
        num_requests=len(results), completed=len(done), failed=len(results) - len(done),
        duration_s=duration_s, total_input=total_input, total_output=total_output,
        request_throughput=len(done) / duration_s, request_goodput=goodput,
        output_throughput=total_output / duration_s,
        total_token_throughput=(total_input + total_output) / duration_s,
        ttft=summarize([r.ttft for r in done if r.ttft is not None]),
        tpot=summarize(tpots),
        itl=summarize([gap for r in done for gap in r.itl]),
        e2el=summarize([r.latency for r in done]),
        errors=errors_by_kind(results),
        round_ttft_median_ms=round_ttft_medians(results),
    )
