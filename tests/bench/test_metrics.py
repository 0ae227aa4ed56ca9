"""Metric arithmetic against hand-computed values; workload generation; report formatting."""
from __future__ import annotations

import random

import numpy as np
import pytest

from bench.clients import ErrorKind, RequestResult, ws_url
from bench.metrics import Slo, compute_metrics, meets_slo, parse_slo, percentile, request_tpot, summarize
from bench.peers import PeerRow, ratio_table
from bench.workloads import LoadPoint, poisson_gaps, sweep_points, synthetic_conversations


def _ok(ttft, latency, output_tokens, itl=(), prompt_tokens=10, round_index=None):
    return RequestResult(success=True, ttft=ttft, latency=latency, output_tokens=output_tokens,
                         prompt_tokens=prompt_tokens, itl=list(itl), round_index=round_index)


def _failed(kind):
    return RequestResult(error_kind=kind, error="x")


def test_percentile_hand_values():
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 90) == pytest.approx(3.7)      # pos 2.7 -> 3 + 0.7 * 1
    assert percentile(values, 99) == pytest.approx(3.97)
    assert percentile([7.0], 99) == 7.0


def test_percentile_matches_numpy_linear():
    rng = random.Random(1)
    for n in (1, 2, 5, 17, 100):
        values = [rng.uniform(0, 10) for _ in range(n)]
        for q in (0, 25, 50, 90, 99, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_summarize_in_ms_and_empty():
    d = summarize([0.001, 0.002, 0.003])
    assert (d.mean, d.median, d.num_samples) == (pytest.approx(2.0), pytest.approx(2.0), 3)
    assert d.p90 == pytest.approx(2.8)
    assert summarize([]).median is None


def test_tpot_definition():
    assert request_tpot(_ok(0.2, 1.0, 5)) == pytest.approx(0.2)   # (1.0 - 0.2) / 4
    assert request_tpot(_ok(0.2, 1.0, 1)) is None                  # one output token: no TPOT
    assert request_tpot(_ok(0.2, 1.0, 0)) is None


def test_compute_metrics_hand_values():
    results = [
        _ok(0.1, 1.1, 11, itl=[0.1] * 10),                  # tpot 0.1
        _ok(0.3, 2.3, 5, itl=[0.5, 0.5, 0.5, 0.5]),        # tpot 0.5
        _ok(0.2, 0.2, 1),                                  # no tpot, counts 0 for goodput
        _failed(ErrorKind.HTTP), _failed(ErrorKind.HTTP), _failed(ErrorKind.TIMEOUT),
    ]
    m = compute_metrics(results, duration_s=2.0, slo=Slo(ttft_ms=250, tpot_ms=200))
    assert (m.num_requests, m.completed, m.failed) == (6, 3, 3)
    assert (m.total_input, m.total_output) == (30, 17)
    assert m.request_throughput == pytest.approx(1.5)
    assert m.output_throughput == pytest.approx(8.5)
    assert m.total_token_throughput == pytest.approx(23.5)
    assert m.ttft.median == pytest.approx(200.0) and m.ttft.mean == pytest.approx(200.0)
    assert m.tpot.mean == pytest.approx(300.0) and m.tpot.num_samples == 2
    assert m.itl.num_samples == 14 and m.itl.median == pytest.approx(100.0)
    assert m.e2el.median == pytest.approx(1100.0)
    assert m.request_goodput == pytest.approx(1.0)      # first and third meet both SLOs: 2 / 2 s
    assert m.errors == {"http": 2, "timeout": 1}


def test_goodput_absent_without_slo_and_checks_each_limit():
    assert compute_metrics([_ok(0.1, 1.0, 2)], 1.0).request_goodput is None
    r = _ok(0.1, 1.0, 2)                  # tpot 0.9 s
    assert meets_slo(r, Slo(ttft_ms=100))
    assert not meets_slo(r, Slo(ttft_ms=99))
    assert not meets_slo(r, Slo(tpot_ms=800))
    assert meets_slo(r, Slo(e2el_ms=1000)) and not meets_slo(r, Slo(e2el_ms=999))


def test_round_ttft_medians():
    results = [_ok(0.3, 1, 2, round_index=0), _ok(0.5, 1, 2, round_index=0), _ok(0.1, 1, 2, round_index=1),
               _ok(0.05, 1, 2, round_index=1), _ok(0.4, 1, 2, round_index=1), _failed(ErrorKind.PROTOCOL)]
    m = compute_metrics(results, 1.0)
    assert m.round_ttft_median_ms == {0: pytest.approx(400.0), 1: pytest.approx(100.0)}


def test_all_failed_has_empty_distributions():
    m = compute_metrics([_failed(ErrorKind.CONNECTION)], 1.0, Slo(ttft_ms=1))
    assert m.completed == 0 and m.ttft.median is None and m.request_goodput == 0.0


def test_parse_slo():
    assert parse_slo("ttft:500,tpot:50") == Slo(ttft_ms=500, tpot_ms=50)
    assert parse_slo(None) == Slo() and not Slo().is_set
    for bad in ("ttft", "foo:1", "ttft:-1", "tpot:abc"):
        with pytest.raises(ValueError):
            parse_slo(bad)


def test_synthetic_conversations_seeded():
    a = synthetic_conversations(3, 32, 16, rounds=3, seed=7)
    b = synthetic_conversations(3, 32, 16, rounds=3, seed=7)
    c = synthetic_conversations(3, 32, 16, rounds=3, seed=8)
    assert a == b and a != c
    assert len(a) == 3 and all(len(conv.turns) == 3 for conv in a)
    first = a[0].turns[0]
    assert (first.prompt_len, first.output_len, len(first.prompt.split())) == (32, 16, 32)
    assert a[0].turns[1].prompt_len == 8 and len(a[0].turns[1].prompt.split()) == 8


def test_poisson_gaps_and_points():
    gaps = poisson_gaps(4.0, 2000, seed=3)
    assert gaps == poisson_gaps(4.0, 2000, seed=3) and all(g > 0 for g in gaps)
    assert sum(gaps) / len(gaps) == pytest.approx(0.25, rel=0.1)
    assert sweep_points([1, 4], None) == [LoadPoint(concurrency=1), LoadPoint(concurrency=4)]
    assert sweep_points([1], [2.0]) == [LoadPoint(request_rate=2.0)]
    assert LoadPoint(request_rate=2.0).label == "rate=2/s"


def test_ws_url():
    assert ws_url("http://h:1/") == "ws://h:1/ws"
    assert ws_url("https://h") == "wss://h/ws"


def test_peer_ratio_table():
    rows = [PeerRow("berth", 4, {"out tok/s": 200.0, "TTFT p50 ms": 50.0}),
            PeerRow("llama.cpp", 4, {"out tok/s": 100.0, "TTFT p50 ms": 100.0}),
            PeerRow("llama.cpp", 16, {"out tok/s": 100.0, "TTFT p50 ms": None})]
    markdown, records = ratio_table(rows)
    assert records == [{"peer": "llama.cpp", "concurrency": 4,
                        "ratios": {"out tok/s": 2.0, "TTFT p50 ms": 0.5, "TPOT p50 ms": None,
                                   "ITL p50 ms": None, "E2E p50 ms": None}}]
    assert "| llama.cpp | 4 | 2.00 | 0.50 |" in markdown
    rows.append(PeerRow("berth int4", 4, {"out tok/s": 300.0, "TTFT p50 ms": 40.0}))
    markdown, records = ratio_table(rows)
    assert records[-1]["berth"] == "berth int4" and records[-1]["ratios"]["out tok/s"] == 3.0
    assert "| llama.cpp (vs berth int4) | 4 | 3.00 | 0.40 |" in markdown
    assert len(records) == 2                                  # berth variants are never each other's peers


def test_token_counter_random_text(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    from bench.workloads import TokenCounter
    vocab = {"[UNK]": 0} | {f"w{i}": i + 1 for i in range(50)}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.add_special_tokens(["[UNK]", "<s>"])
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    counter = TokenCounter.load(tmp_path)
    assert counter is not None and TokenCounter.load(tmp_path / "missing") is None
    text = counter.random_text(random.Random(0), 20)
    assert counter.count(text) == 20 and "<s>" not in text
    conversations = synthetic_conversations(2, 20, 4, rounds=2, seed=0, counter=counter)
    assert counter.count(conversations[1].turns[0].prompt) == 20
