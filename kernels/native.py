"""berth's C++ CPU model step (kernels/csrc/cpu_model.cpp: decode, prefill and mixed batches) and GGUF
repacking (kernels/csrc/gguf_repack.cpp), compiled once per machine and cached.

    from kernels import native
    ext = native.load()          # the extension module, or None (with one log line saying why)

The source is compiled by torch.utils.cpp_extension with -march=native on the machine that runs it
(about 50 s on 2 cores, once; later loads take well under a second) into
$BERTH_CACHE/torch_extensions/cpu_model-<CPU fingerprint>. `python -m kernels.native` builds it ahead of
time (make does so before serving or testing). BERTH_NATIVE=0 disables it: every step then runs the PyTorch path,
which is also the oracle the tests compare the extension against.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import time
from pathlib import Path

log = logging.getLogger("berth.kernels")

# one file per quant family and instruction set, a dispatch table filled from cpuid (csrc/quant.h)
SOURCES = [Path(__file__).parent / "csrc" / name for name in (
    "cpu_model.cpp", "gguf_repack.cpp", "quant_rows.cpp", "dispatch.cpp", "q4_scalar.cpp", "q4_avx2.cpp",
    "q4_avx512vnni.cpp", "q8_scalar.cpp", "q8_avx2.cpp", "q8_avx512vnni.cpp", "dequant_bf16.cpp",
    "token_mask.cpp", "moe.cpp", "mla.cpp")]
_UNTRIED = object()
_module = _UNTRIED


def enabled() -> bool:
    return os.environ.get("BERTH_NATIVE", "1") not in ("0", "false", "no", "")


def build_dir() -> Path:
    """One build per CPU feature set: a -march=native binary from another CPU could die with SIGILL
    (a cache directory shared between machines)."""
    # NOTE: same default as server.model_store.cache_dir(); kernels/ does not import server/.
    cache = Path(os.environ.get("BERTH_CACHE") or Path.home() / ".cache" / "berth")
    return cache / "torch_extensions" / f"cpu_model-{cpu_fingerprint()}"


def cpu_fingerprint() -> str:
    """Short hash of the CPU model and instruction-set flags (Linux /proc/cpuinfo; the machine type elsewhere)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        text = "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))
    except OSError:
        import platform
        text = platform.machine() + platform.processor()
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def load():
    """The compiled extension, or None when disabled or when it cannot be built here (no compiler,
    no ninja): the caller then keeps the PyTorch path. Tried once per process."""
    global _module
    if _module is not _UNTRIED:
        return _module
    _module = None
    if not enabled():
        return None
    try:
        from torch.utils.cpp_extension import load as load_extension
        if shutil.which("ninja") is None:  # pip's ninja sits next to the venv's python, maybe not on PATH
            os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        directory = build_dir()
        directory.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        _module = load_extension(
            name="berth_cpu_model", sources=[str(p) for p in SOURCES], build_directory=str(directory),
            extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
        if time.monotonic() - start > 5:
            log.info("compiled the native CPU model step in %.0f s (%s)", time.monotonic() - start, directory)
    except Exception as exc:  # noqa: BLE001 - any build failure means "use the PyTorch path"
        log.warning("native CPU model step unavailable, using the PyTorch path: %s",
                    str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__)
    return _module


def loaded():
    """The extension if an earlier load() built or loaded it, else None: never starts a build."""
    return None if _module is _UNTRIED else _module


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    module = load()
    print(f"native CPU model step: {'ready' if module else 'unavailable'} ({build_dir()})")
    return 0 if module or not enabled() else 1


if __name__ == "__main__":
    sys.exit(main())
