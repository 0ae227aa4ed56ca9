"""The dependency rule (DESIGN.md): import each layer in a fresh interpreter and assert that
the modules it must not depend on were not loaded."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL_GPU_MODULES = ("flash_attn", "triton")   # kernels import these lazily; absent on CPU

# package -> (import its submodules too?, forbidden top-level modules)
LAYERS = {
    "protocol": (True, ["torch", "aiohttp", "asyncio", "numpy", "transformers"]),
    "kernels": (False, ["aiohttp"]),            # torch itself loads asyncio
    "server.engine": (True, ["aiohttp"]),
    "server.grammar": (True, ["aiohttp"]),
    "server.knowledge": (True, ["aiohttp", "torch", "transformers"]),
}

PROBE = r"""
import importlib, json, pkgutil, sys
package, walk, optional = sys.argv[1], sys.argv[2] == "1", tuple(sys.argv[3].split(","))
try:
    pkg = importlib.import_module(package)
except ModuleNotFoundError as e:
    if e.name and (package == e.name or package.startswith(e.name + ".")):
        print(json.dumps({"missing": True})); sys.exit(0)
    raise
skipped = []
if walk and hasattr(pkg, "__path__"):
    for info in pkgutil.walk_packages(pkg.__path__, package + "."):
        try:
            importlib.import_module(info.name)
        except ModuleNotFoundError as e:
            if not (e.name or "").startswith(optional):
                raise
            skipped.append(info.name)
print(json.dumps({"missing": False, "modules": sorted(sys.modules), "skipped": skipped}))
"""


@pytest.mark.parametrize("package", list(LAYERS))
def test_layer_does_not_import_forbidden_modules(package):
    walk, forbidden = LAYERS[package]
    proc = subprocess.run([sys.executable, "-c", PROBE, package, "1" if walk else "0", ",".join(OPTIONAL_GPU_MODULES)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["missing"]:
        pytest.skip(f"{package} does not exist yet")
    loaded = {name.split(".")[0] for name in result["modules"]}
    assert not loaded & set(forbidden), f"{package} pulled in {sorted(loaded & set(forbidden))}"
