"""What LLM-aware routers read: vLLM's metric names on /metrics (parsed back with prometheus_client's own
parser), and /health (live) vs /ready (ready), both open without the token."""
from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import CANADA, wait_idle

NAME = "SmolLM2-135M-Instruct"


def samples(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


async def test_vllm_names_are_exported_and_move_with_traffic(make_client, served_engine):
    client = await make_client(served_engine, token="tok")
    auth = {"Authorization": "tok"}
    before = samples(await (await client.get("/metrics", headers=auth)).text())
    for _ in range(2):        # the second request hits the prefix cache
        resp = await client.post("/v1/chat/completions", json={"messages": CANADA, "max_tokens": 8,
                                                              "temperature": 0}, headers=auth)
        assert resp.status == 200
    await wait_idle(served_engine)
    after = samples(await (await client.get("/metrics", headers=auth)).text())
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:gpu_cache_usage_perc"):
        (sample,) = after[name]
        assert sample.labels == {"model_name": NAME} and sample.value >= 0
    assert 0 <= after["vllm:kv_cache_usage_perc"][0].value <= 1
    (info,) = after["vllm:cache_config_info"]
    assert info.labels["block_size"] == str(served_engine.runner.block_size)
    assert int(info.labels["num_gpu_blocks"]) == served_engine.runner.num_blocks

    def value(snapshot, name):
        return sum(s.value for s in snapshot.get(name, []))

    assert value(after, "vllm:prefix_cache_queries_total") > value(before, "vllm:prefix_cache_queries_total")
    assert value(after, "vllm:prefix_cache_hits_total") > value(before, "vllm:prefix_cache_hits_total")
    assert value(after, "vllm:generation_tokens_total") - value(before, "vllm:generation_tokens_total") == 16
    assert value(after, "vllm:time_to_first_token_seconds_count") == \
        value(before, "vllm:time_to_first_token_seconds_count") + 2
    assert value(after, "vllm:inter_token_latency_seconds_count") > 0
    assert after["vllm:e2e_request_latency_seconds_count"][0].labels == {"model_name": NAME}
    assert "berth_num_requests_running" in after         # berth's own names stay


async def test_health_is_liveness_and_ready_is_readiness(make_client, served_engine):
    from server.http import keys

    client = await make_client(served_engine, token="tok")
    assert (await client.get("/health")).status == 200 and (await client.get("/ready")).status == 200
    state = client.server.app[keys.STATE]
    state.draining = True                                 # what SIGTERM's drain sets
    try:
        resp = await client.get("/ready")
        assert resp.status == 503 and resp.headers["Retry-After"]
        health = await client.get("/health")
        assert health.status == 200 and (await health.json())["status"] == "draining"
    finally:
        state.draining = False
