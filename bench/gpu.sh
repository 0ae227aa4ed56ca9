#!/usr/bin/env bash
# The GPU check of issue 18 as one script, for a machine with a CUDA device and no package index:
#   1. env        versions, the device, the attention backend the engine picks there      -> OUTDIR/env.json
#   2. gpu_tests  tests/gpu: Triton kernels vs the reference; the paged engine (CUDA graphs on and off)
#                 vs transformers' greedy output on tiny random Llama/Qwen2 models        -> OUTDIR/gpu_tests.xml
#   3. bench      bench/engine.py, random weights in SmolLM2-135M's shape, 1/16/64/256 sequences
#                                                                                         -> OUTDIR/engine_cuda.json
#   4. eager      the same without CUDA graphs                                            -> OUTDIR/engine_cuda_eager.json
# OUTDIR/summary.json says how each stage ended (ok / failed / timeout / skipped) and is rewritten after every
# stage, so a failure or a kill still leaves it. Each stage has a time limit (seconds, overridable:
# ENV_LIMIT, TESTS_LIMIT, BENCH_LIMIT, EAGER_LIMIT); the defaults add up to under 8 minutes.
#
#   bash bench/gpu.sh OUTDIR        on the GPU machine, from anywhere (runs in the repository root)
#   bash bench/gpu.sh --prepare     here, first: copies pytest (pure Python) into bench/gpu_vendor (git-ignored;
#                                   carry it) for a machine without pytest; only the missing modules are used
# Missing orjson (protocol/ imports it) is replaced by bench/gpu_shims/orjson.py, and the summary says so.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || PY=python
VENDORED=(pytest _pytest pluggy iniconfig packaging pygments py exceptiongroup tomli)

if [[ ${1:-} == --prepare ]]; then
    "$PY" - "${VENDORED[@]}" <<'PREPARE'
import importlib, pathlib, shutil, sys
dst = pathlib.Path("bench/gpu_vendor")
shutil.rmtree(dst, ignore_errors=True)
dst.mkdir(parents=True)
for name in sys.argv[1:]:
    try:
        path = pathlib.Path(importlib.import_module(name).__file__)
    except ImportError:
        print(f"{name}: not installed here, not vendored")
        continue
    src = path.parent if path.name == "__init__.py" else path
    if src.is_dir():
        shutil.copytree(src, dst / src.name, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        shutil.copy(src, dst / src.name)
print(f"vendored into {dst}:", sorted(p.name for p in dst.iterdir()))
PREPARE
    exit 0
fi

OUT=${1:?usage: bash bench/gpu.sh OUTDIR | --prepare}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
STAGES=()
NOTES=()

write_summary() {
    local IFS=,
    printf '{"script": "bench/gpu.sh", "started": "%s", "updated": "%s", "notes": [%s], "stages": [%s]}\n' \
        "$STARTED" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "${NOTES[*]:-}" "${STAGES[*]:-}" >"$OUT/summary.json"
}
trap write_summary EXIT

note() { NOTES+=("\"$1\""); echo "note: $1"; }

record() {  # name status rc seconds
    STAGES+=("{\"stage\": \"$1\", \"status\": \"$2\", \"rc\": $3, \"seconds\": $4, \"log\": \"$1.log\"}")
    write_summary
}

run_stage() {  # name limit_s command...: never stops the script; the summary records how it ended
    local name=$1 limit=$2 rc=0 start status
    shift 2
    start=$(date +%s)
    echo "== $name (limit ${limit}s)"
    if command -v timeout >/dev/null; then
        timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
    else
        "$@" >"$OUT/$name.log" 2>&1 || rc=$?
    fi
    status=ok
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then status=timeout; elif [[ $rc -ne 0 ]]; then status=failed; fi
    record "$name" "$status" "$rc" "$(($(date +%s) - start))"
    tail -n 8 "$OUT/$name.log" || true
    [[ $status == ok ]]
}

if ! "$PY" -c "import orjson" 2>/dev/null; then
    export PYTHONPATH="$PWD/bench/gpu_shims${PYTHONPATH:+:$PYTHONPATH}"
    note "orjson missing: bench/gpu_shims/orjson.py (stdlib json) stands in"
fi
if ! "$PY" -c "import pytest" 2>/dev/null; then
    if [[ -d bench/gpu_vendor ]]; then
        VENDOR=$(mktemp -d)
        for mod in "${VENDORED[@]}"; do
            src=bench/gpu_vendor/$mod
            [[ -e $src ]] || src=$src.py
            if [[ -e $src ]] && ! "$PY" -c "import $mod" 2>/dev/null; then ln -s "$PWD/$src" "$VENDOR/"; fi
        done
        export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$VENDOR"
        note "pytest missing: the copy in bench/gpu_vendor runs the tests"
    else
        note "pytest missing and no bench/gpu_vendor (bash bench/gpu.sh --prepare, then carry it): no GPU tests"
    fi
fi

read -r -d '' ENV_PY <<'ENVPY' || true
import importlib, json, platform, sys
info = {"python": sys.version.split()[0], "platform": platform.platform()}
for name in ("torch", "triton", "transformers", "flash_attn", "tokenizers", "safetensors", "numpy", "orjson",
             "llguidance", "gguf", "aiohttp", "uvloop", "pytest"):
    try:
        info[name] = getattr(importlib.import_module(name), "__version__", "present")
    except Exception as exc:  # noqa: BLE001 - any import failure is reported, not raised
        info[name] = f"missing ({type(exc).__name__}: {exc})"[:200]
import torch
info["cuda"] = torch.cuda.is_available()
if info["cuda"]:
    info.update(device=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                torch_cuda=torch.version.cuda, memory_gib=round(torch.cuda.mem_get_info()[1] / 2**30, 1))
import kernels
info.update(backend=kernels.BACKEND, block_size=kernels.block_size_for("cuda" if info["cuda"] else "cpu"))
json.dump(info, open(sys.argv[1], "w"), indent=2)
print(json.dumps(info, indent=2))
sys.exit(0 if info["cuda"] else 3)
ENVPY

if ! run_stage env "${ENV_LIMIT:-45}" "$PY" -c "$ENV_PY" "$OUT/env.json"; then
    for stage in gpu_tests bench eager; do record "$stage" skipped 0 0; done
    note "no usable CUDA device or environment: see env.log"
    exit 1
fi
FAILED=0
run_stage gpu_tests "${TESTS_LIMIT:-170}" "$PY" -m pytest -q -rfEs -p no:cacheprovider tests/gpu \
    --junitxml "$OUT/gpu_tests.xml" || FAILED=1
BENCH=("$PY" -m bench.engine --device cuda --random-weights --engines paged --concurrency 1,16,64,256
       --input-len 128 --output-len 128 --kv-cache-gib 4 --max-num-batched-tokens 8192)
run_stage bench "${BENCH_LIMIT:-150}" "${BENCH[@]}" --runs 2 --json "$OUT/engine_cuda.json" || FAILED=1
run_stage eager "${EAGER_LIMIT:-90}" "${BENCH[@]}" --runs 1 --no-cuda-graphs --json "$OUT/engine_cuda_eager.json" \
    || FAILED=1
exit $FAILED
