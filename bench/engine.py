"""Offline throughput: berth's paged engine against transformers `generate`, same model, same prompts.

    python -m bench.engine [--concurrency 1,8,32,64] [--input-len 128] [--output-len 128] [--runs 3]
                           [--dtype auto] [--engines paged,hf] [--json bench/results/engine.json] [--profile]
                           [--device cpu|cuda] [--random-weights] [--no-cuda-graphs]

Prompts are seeded random token ids (input-len each), generation ignores EOS, greedy. Prints output
tokens/s and mean step time per point (median of --runs), a one-step phase profile of the paged engine,
and writes JSON. --random-weights: SmolLM2-135M's shape with random weights and a stand-in tokenizer, built
in a temporary folder (bench/random_model.py): no model file needed, as on a lent GPU (bench/gpu.sh).
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import server  # noqa: F401  (OMP_WAIT_POLICY before torch)
import torch

from protocol.types import GenerateRequest, SamplingParams
from server.config import EngineConfig, pick_device, pick_dtype
from server.model_store import resolve_model


def make_prompts(num: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(num)]


def run_paged(engine, prompts: list[list[int]], output_len: int) -> tuple[float, int, int]:
    """(seconds, output tokens, steps) for all prompts admitted at once."""
    for i, ids in enumerate(prompts):
        engine.add(GenerateRequest(f"b{i}", SamplingParams(temperature=0, max_tokens=output_len,
                                                           ignore_eos=True), prompt_token_ids=ids))
    start, tokens, steps = time.perf_counter(), 0, 0
    while engine.has_unfinished():
        tokens += sum(len(ev.token_ids) for _, ev in engine.step() if hasattr(ev, "token_ids"))
        steps += 1
    return time.perf_counter() - start, tokens, steps


@torch.inference_mode()
def run_hf(model, prompts: list[list[int]], output_len: int) -> tuple[float, int, int]:
    ids = torch.tensor(prompts, device=model.device)                       # (B, P), equal lengths
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len,
                         min_new_tokens=output_len, do_sample=False, pad_token_id=0)
    return time.perf_counter() - start, (out.shape[1] - ids.shape[1]) * ids.shape[0], output_len


def profile_step(engine, prompts: list[list[int]]) -> dict[str, float]:
    """Milliseconds per phase of one decode step with len(prompts) running sequences."""
    for i, ids in enumerate(prompts):
        engine.add(GenerateRequest(f"p{i}", SamplingParams(temperature=0, max_tokens=64, ignore_eos=True),
                                   prompt_token_ids=ids))
    while engine.scheduler.num_waiting or any(s.num_computed_tokens < s.num_tokens - 1
                                              for s in engine.scheduler.running):
        engine.step()
    phases: dict[str, float] = {}
    timed = {"schedule": (engine.scheduler, "schedule"), "forward": (engine.runner.model, "forward"),
             "runner_total": (engine.runner, "run"), "sample": (engine, "_sample")}
    originals = {}
    for name, (obj, attr) in timed.items():
        fn = getattr(obj, attr)
        originals[name] = (obj, attr, fn)

        def wrapper(*a, _fn=fn, _name=name, **kw):
            t = time.perf_counter()
            result = _fn(*a, **kw)
            phases[_name] = phases.get(_name, 0.0) + (time.perf_counter() - t) * 1e3
            return result
        setattr(obj, attr, wrapper)
    t = time.perf_counter()
    engine.step()
    phases["step_total"] = (time.perf_counter() - t) * 1e3
    for obj, attr, _ in originals.values():
        delattr(obj, attr) if attr in vars(obj) else None
    for i in range(len(prompts)):
        engine.abort(f"p{i}")
    phases["prepare_inputs"] = phases["runner_total"] - phases["forward"]
    phases["other(update,detok,events)"] = phases["step_total"] - phases["runner_total"] - \
        phases["sample"] - phases["schedule"]
    return {k: round(v, 2) for k, v in phases.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.engine", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--engines", default="paged,hf")
    ap.add_argument("--model", default="default")
    ap.add_argument("--quantization", default="auto", choices=("auto", "none", "int8", "int4"))
    ap.add_argument("--json", default="bench/results/engine.json")
    ap.add_argument("--profile", action="store_true", help="print a one-step phase profile per point")
    ap.add_argument("--quantized-max-rows", type=int, default=None,
                    help="override models.llama.QUANTIZED_MAX_ROWS (largest input a quantized weight multiplies)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (auto: cuda when there is one)")
    ap.add_argument("--random-weights", action="store_true",
                    help="SmolLM2-135M's shape with random weights instead of --model (nothing to download)")
    ap.add_argument("--no-cuda-graphs", action="store_true", help="run every CUDA decode step eagerly")
    ap.add_argument("--kv-cache-gib", type=float, default=1.0)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    args = ap.parse_args(argv)
    if args.quantized_max_rows is not None:
        from server.engine.models import llama
        llama.QUANTIZED_MAX_ROWS = args.quantized_max_rows
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    folder = hf_folder = random_folder(dtype) if args.random_weights else str(resolve_model(args.model))
    levels = [int(c) for c in args.concurrency.split(",")]
    engines = args.engines.split(",")
    results = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "dtype": str(dtype), "quantization": args.quantization,
               "device": _device_name(device), "isa": _isa() if device.type == "cpu" else None,
               "threads": torch.get_num_threads(), "model": "random SmolLM2-135M shape" if args.random_weights
               else args.model, "input_len": args.input_len, "output_len": args.output_len, "runs": args.runs,
               "points": []}
    paged = hf = None
    if "paged" in engines:
        import kernels
        from server.engine.engine import Engine

        config = EngineConfig(max_num_seqs=max(levels), kv_cache_gib=args.kv_cache_gib,
                              max_num_batched_tokens=args.max_num_batched_tokens, quantization=args.quantization,
                              cuda_graphs=not args.no_cuda_graphs)
        paged = Engine.from_folder(folder, config, device, dtype)
        results.update(attention=kernels.BACKEND if device.type == "cuda" else "reference",
                       block_size=paged.runner.block_size, cuda_graphs=paged.runner.graphs is not None)
    if "hf" in engines:
        import transformers

        if not args.random_weights:
            hf_folder = str(resolve_model(args.model, dequantize=True))
        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_folder, dtype=dtype).to(device).eval()
    vocab = 49152 if paged is None else paged.tokenizer.vocab_size
    run_paged(paged, make_prompts(1, 16, vocab, 99), 4) if paged else None          # warm-up
    print(f"dtype {dtype}, threads {torch.get_num_threads()}, prompts {args.input_len} -> {args.output_len} tokens")
    print(f"{'engine':<8}{'conc':>6}{'tok/s':>10}{'step ms':>10}  runs")
    for level in levels:
        prompts = make_prompts(level, args.input_len, vocab, seed=level)
        for name, runner in (("paged", paged), ("hf", hf)):
            if runner is None:
                continue
            fn = run_paged if name == "paged" else run_hf
            runs = [fn(runner, prompts, args.output_len) for _ in range(args.runs)]
            rates = [tok / sec for sec, tok, _ in runs]
            step_ms = [sec / steps * 1e3 for sec, _, steps in runs]
            point = {"engine": name, "concurrency": level, "output_tok_s_median": statistics.median(rates),
                     "step_ms_median": statistics.median(step_ms), "output_tok_s_runs": rates}
            if name == "paged" and args.profile:
                point["profile_ms"] = profile_step(paged, prompts)
            results["points"].append(point)
            print(f"{name:<8}{level:>6}{point['output_tok_s_median']:>10.1f}{point['step_ms_median']:>10.1f}  "
                  f"{', '.join(f'{r:.1f}' for r in rates)}" +
                  (f"\n        profile (ms): {point['profile_ms']}" if "profile_ms" in point else ""), flush=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.json}")
    return 0


def random_folder(dtype: torch.dtype) -> str:
    from bench.random_model import SMOLLM2_135M, write_random_model

    folder = tempfile.mkdtemp(prefix="berth-random-")
    return str(write_random_model(folder, SMOLLM2_135M, str(dtype).removeprefix("torch.")))


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _isa() -> str:
    from kernels import native

    ext = native.load()
    return ext.isa() if ext is not None else "none (PyTorch path)"


if __name__ == "__main__":
    raise SystemExit(main())
