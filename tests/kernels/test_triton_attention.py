"""The Triton kernels against the reference on the CPU: tests/kernels/triton_interpreted.py in a child pytest
with TRITON_INTERPRET=1 (it must be set before triton is imported, and no other test should run interpreted
Triton). Skipped only when triton is not installed."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CASES = "tests/kernels/triton_interpreted.py"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                    reason="triton is not installed (pip install -e .[test]): no Triton kernel to test")
def test_triton_kernels_match_reference_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", CASES],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, f"{CASES}: {summary}\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"
    assert " passed" in summary and "skipped" not in summary, summary
    print(f"{CASES}: {summary}")
