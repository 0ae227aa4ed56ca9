"""One decode step of the paged engine, timed and profiled (not a test).

    python -m bench.step_profile --batch 16 --quantization int4 --temperature 1

Admits --batch requests of --prompt-len tokens, runs until every one decodes, then prints the median of
--steps step() times and torch.profiler's table of the ops that took the most time over 5 steps.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from protocol.types import GenerateRequest, SamplingParams
from server.config import EngineConfig
from server.engine.engine import Engine
from server.engine.models import llama
from server.model_store import resolve_model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="bench.step_profile", description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--quantization", default="none", choices=("none", "int8", "int4"))
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rows", type=int, default=15, help="rows of the profiler table")
    ap.add_argument("--quantized-max-rows", type=int, default=None,
                    help="override models.llama.QUANTIZED_MAX_ROWS (largest input a quantized weight multiplies)")
    args = ap.parse_args(argv)
    if args.quantized_max_rows is not None:
        llama.QUANTIZED_MAX_ROWS = args.quantized_max_rows
    engine = Engine.from_folder(str(resolve_model("default")),
                                EngineConfig(kv_cache_gib=0.5, quantization=args.quantization),
                                torch.device("cpu"), torch.float32)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.steps + 64, ignore_eos=True)
    for i in range(args.batch):
        engine.add(GenerateRequest(f"r{i}", params, prompt_token_ids=list(range(100 + i, 100 + i + args.prompt_len))))
    while engine.scheduler.num_waiting or any(s.num_computed_tokens < s.num_tokens - 1
                                              for s in engine.scheduler.running):
        engine.step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    print(f"batch {args.batch}, {args.quantization}, temperature {args.temperature}: "
          f"decode step median {statistics.median(times) * 1e3:.1f} ms over {args.steps}")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            engine.step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
