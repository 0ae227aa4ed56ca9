"""`python -m bench.structured`: what structured outputs cost on a running berth server.

Chat SSE, closed loop; at each concurrency the variants run alternately, --runs times over: (a) `free`: no constraint; (b) `constrained`: every request
carries --schema as response_format json_schema; (c) `mixed`: --mix-fraction of the conversations
(interleaved by index) carry it, the rest are free; (d) `tools` (with --tools): every request
offers the tools with tool_choice "required". ignore_eos is sent, and the default schema
(bench/schemas/long_array.json) cannot complete within 512 tokens, so free and constrained answers
both run to --output-len tokens. Tool-call answers end when the call is complete (or at
--output-len), and their TTFT is the first argument fragment (after the forced call header).
Every point draws fresh seeded prompts of the same length: a prompt sent before would hit the
prefix cache and favour whichever variant came later.

Reported (medians over runs): constrained ÷ free output tok/s (target >= 0.9); the free requests'
median TPOT in the mix ÷ the median TPOT of the all-free run (target <= 1.10). Also the grammar
compile time as a client sees it, at concurrency 1: TTFT of a request whose schema the server has
never seen (a random "description" makes it a cache miss) vs the same schema again (cached) vs no
schema. Writes PREFIX.json and PREFIX.md (--out).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import statistics
import sys
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import aiohttp

from bench import clients
from bench.clients import StructuredSpec, Target
from bench.metrics import Slo
from bench.serving import PointResult, bench_point, git_commit, load_structured, resolve_model, warm_up
from bench.workloads import Conversation, LoadPoint, TokenCounter, synthetic_conversations, with_constraint

DEFAULT_SCHEMA = Path(__file__).resolve().parent / "schemas" / "long_array.json"
VARIANTS = ("free", "constrained", "mixed", "tools")
# name -> (comparison, bound): the acceptance targets
TARGETS = {"constrained_over_free_tok_s": (">=", 0.9), "mixed_free_tpot_over_free_tpot": ("<=", 1.10)}
WARM_UP_TOKENS = 8
COMPILE_PROBE_TOKENS = 8


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def meets(name: str, value: float | None) -> bool | None:
    if value is None:
        return None
    op, bound = TARGETS[name]
    return value >= bound if op == ">=" else value <= bound


def build_variants(schema: StructuredSpec, tools: StructuredSpec | None,
                   mix_fraction: float = 0.5) -> dict[str, tuple[StructuredSpec | None, float]]:
    """variant -> (constraint, fraction of the conversations that carry it), in run order."""
    out = {"free": (None, 0.0), "constrained": (schema, 1.0), "mixed": (schema, mix_fraction)}
    if tools is not None:
        out["tools"] = (tools, 1.0)
    return out


class PromptStream:
    """Fresh seeded single-round conversations, a new seed per draw (no prompt is sent twice)."""

    def __init__(self, input_len: int, output_len: int, seed: int = 0, counter: TokenCounter | None = None):
        self.input_len, self.output_len, self.seed, self.counter = input_len, output_len, seed, counter
        self.draws = 0

    def take(self, num: int, output_len: int | None = None) -> list[Conversation]:
        self.draws += 1
        return synthetic_conversations(num, self.input_len, output_len or self.output_len, 1,
                                       self.seed * 1_000_003 + self.draws, self.counter)


def _metric_medians(metrics: list[dict]) -> dict:
    """Medians over runs of one variant's (or one tag's) metrics dicts (BenchmarkMetrics as dicts)."""
    return {"runs": len(metrics),
            "out_tok_s": median(m["output_throughput"] for m in metrics),
            "req_s": median(m["request_throughput"] for m in metrics),
            "ttft_p50_ms": median(m["ttft"]["median"] for m in metrics),
            "tpot_p50_ms": median(m["tpot"]["median"] for m in metrics),
            "itl_p50_ms": median(m["itl"]["median"] for m in metrics),
            "e2el_p50_ms": median(m["e2el"]["median"] for m in metrics),
            "out_tokens_per_request": median(m["total_output"] / m["completed"] for m in metrics if m["completed"]),
            "failed": sum(m["failed"] for m in metrics)}


def summarize(points: list[dict]) -> dict[str, dict]:
    """Per concurrency ("c=N"): each variant's medians over runs (the mix also per tag), the two
    target ratios and whether they are met (None when a side is missing)."""
    out = {}
    for c in sorted({p["concurrency"] for p in points}):
        row: dict = {}
        for variant in VARIANTS:
            runs = [p for p in points if p["concurrency"] == c and p["variant"] == variant]
            if not runs:
                continue
            row[variant] = _metric_medians([p["metrics"] for p in runs])
            tags = sorted({tag for p in runs for tag in p.get("by_tag", {})})
            if tags:
                row[variant]["by_tag"] = {tag: _metric_medians([p["by_tag"][tag] for p in runs if tag in p.get(
                    "by_tag", {})]) for tag in tags}
        free, cons, mixed = row.get("free", {}), row.get("constrained", {}), row.get("mixed", {})
        mixed_free = mixed.get("by_tag", {}).get("free", {})
        row["constrained_over_free_tok_s"] = ratio(cons.get("out_tok_s"), free.get("out_tok_s"))
        row["mixed_free_tpot_over_free_tpot"] = ratio(mixed_free.get("tpot_p50_ms"), free.get("tpot_p50_ms"))
        row["constrained_over_free_tpot"] = ratio(cons.get("tpot_p50_ms"), free.get("tpot_p50_ms"))
        if "tools" in row:
            row["tools_over_free_tok_s"] = ratio(row["tools"].get("out_tok_s"), free.get("out_tok_s"))
        row["meets"] = {name: meets(name, row[name]) for name in TARGETS}
        out[f"c={c}"] = row
    return out


def compile_summary(cold: list[float | None], cached: list[float | None], free: list[float | None]) -> dict:
    """TTFTs in ms of the compile probe; compile_ms_estimate = median cold - median cached."""
    cold_m, cached_m = median(cold), median(cached)
    return {"tries": len(cold), "cold_ttft_ms": cold, "cached_ttft_ms": cached, "free_ttft_ms": free,
            "cold_ttft_median_ms": cold_m, "cached_ttft_median_ms": cached_m, "free_ttft_median_ms": median(free),
            "compile_ms_estimate": None if cold_m is None or cached_m is None else cold_m - cached_m}


def fresh_schema(schema: dict) -> dict:
    """The schema with a random description: the same language, a key the grammar cache never saw."""
    return dict(schema, description=f"bench cold probe {uuid.uuid4().hex}")


async def measure_compile(http: aiohttp.ClientSession, target: Target, schema: dict, prompts: list[str],
                          tries: int) -> dict:
    """tries x (never-seen schema, the same schema again, no schema), one request at a time, each
    on its own prompt (so the prefix cache treats them alike); TTFT of each in ms."""
    cold, cached, free = [], [], []

    def ms(result) -> float | None:
        if not result.success or result.ttft is None:
            print(f"[compile probe] request failed: {result.error}", file=sys.stderr)
            return None
        return result.ttft * 1000.0

    for i in range(tries):
        spec = StructuredSpec(schema=fresh_schema(schema))
        a, b, c = prompts[3 * i: 3 * i + 3]
        cold.append(ms(await clients.openai_chat(http, target, a, COMPILE_PROBE_TOKENS, (), spec)))
        cached.append(ms(await clients.openai_chat(http, target, b, COMPILE_PROBE_TOKENS, (), spec)))
        free.append(ms(await clients.openai_chat(http, target, c, COMPILE_PROBE_TOKENS)))
    return compile_summary(cold, cached, free)


async def run_all(target: Target, concurrencies: list[int], runs: int, prompts: PromptStream, num_prompts: int,
                  schema: StructuredSpec, tools: StructuredSpec | None, mix_fraction: float, compile_tries: int,
                  seed: int = 0, show_progress: bool = True,
                  on_point: Callable[[dict, PointResult], None] | None = None
                  ) -> tuple[list[dict], dict | None, list[str]]:
    """(points, compile record, errors). points: PointResult dicts plus concurrency, variant, run."""
    points, errors = [], []
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as http:
        if target.model is None:
            target.model = await resolve_model(http, target)
        variants = build_variants(schema, tools, mix_fraction)
        for name in ("free", "constrained", "tools"):      # untimed; compiles the grammars once
            if name in variants:
                [one] = prompts.take(1, WARM_UP_TOKENS)
                error = await warm_up(http, "chat", target, replace(one, constraint=variants[name][0]))
                if error is not None:
                    errors.append(f"{name}: warm-up failed: {error}")
                    print(f"[{name}] warm-up request failed, skipping: {error}", file=sys.stderr)
                    variants.pop(name)
                    if name == "constrained":
                        variants.pop("mixed")
        if "free" not in variants:
            return points, None, errors
        compile_record = None
        if compile_tries > 0 and "constrained" in variants:
            probes = [c.turns[0].prompt for c in prompts.take(3 * compile_tries, COMPILE_PROBE_TOKENS)]
            compile_record = await measure_compile(http, target, schema.schema, probes, compile_tries)
        for c in concurrencies:
            n = max(num_prompts, c, 2)
            for run in range(runs):
                for name, (spec, fraction) in variants.items():
                    conversations = with_constraint(prompts.take(n), spec, fraction)
                    result = await bench_point(http, "chat", target, conversations, LoadPoint(concurrency=c),
                                               Slo(), seed, show_progress)
                    point = {"concurrency": c, "variant": name, "run": run, **result.to_dict()}
                    points.append(point)
                    if on_point is not None:
                        on_point(point, result)
    return points, compile_record, errors


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _verdict(value: float | None, ok: bool | None) -> str:
    return "-" if value is None else f"**{value:.3f}** {'ok' if ok else 'MISSED'}"


def format_markdown(record: dict) -> str:
    cfg, summary = record["config"], record["summary"]
    lines = ["# Structured outputs: speed", "",
             f"{record['date']}, commit {record['git_commit'] or '?'}; {cfg['base_url']}, model {cfg['model']}; "
             f"schema `{cfg['schema']}`; chat SSE, {cfg['input_len']}-token prompts, {cfg['output_len']} output "
             f"tokens (ignore_eos), closed loop, medians of {cfg['runs']} alternating runs; mix = "
             f"{cfg['mix_fraction']:g} constrained.", "",
             "| C | free tok/s | constrained tok/s | constrained / free (>= 0.9) | free TPOT p50 (ms) "
             "| mix: free TPOT p50 (ms) | mix free / all-free TPOT (<= 1.10) | constrained TPOT p50 (ms) "
             "| tools tok/s |", "|" + "---|" * 9]
    for label, row in summary.items():
        free, cons, mixed = row.get("free", {}), row.get("constrained", {}), row.get("mixed", {})
        mixed_free = mixed.get("by_tag", {}).get("free", {})
        tok_s, tpot = ("constrained_over_free_tok_s", "mixed_free_tpot_over_free_tpot")
        lines.append(f"| {label[2:]} | {_f(free.get('out_tok_s'))} | {_f(cons.get('out_tok_s'))} "
                     f"| {_verdict(row[tok_s], row['meets'][tok_s])} "
                     f"| {_f(free.get('tpot_p50_ms'))} | {_f(mixed_free.get('tpot_p50_ms'))} "
                     f"| {_verdict(row[tpot], row['meets'][tpot])} "
                     f"| {_f(cons.get('tpot_p50_ms'))} | {_f(row.get('tools', {}).get('out_tok_s'))} |")
    lines += ["", "| C | variant | out tok/s | TTFT p50 (ms) | TPOT p50 (ms) | ITL p50 (ms) | E2E p50 (ms) "
              "| out tokens / request | failed |", "|" + "---|" * 9]
    for label, row in summary.items():
        for variant in VARIANTS:
            if variant not in row:
                continue
            subsets = [(variant, row[variant])] + [(f"{variant}: {tag}", m) for tag, m in
                                                    row[variant].get("by_tag", {}).items()]
            for name, m in subsets:
                lines.append(f"| {label[2:]} | {name} | {_f(m['out_tok_s'])} | {_f(m['ttft_p50_ms'])} "
                             f"| {_f(m['tpot_p50_ms'])} | {_f(m['itl_p50_ms'])} | {_f(m['e2el_p50_ms'])} "
                             f"| {_f(m['out_tokens_per_request'])} | {m['failed']} |")
    comp = record.get("compile")
    if comp:
        lines += ["", f"Grammar compile as a client sees it (C=1, {comp['tries']} tries, {COMPILE_PROBE_TOKENS}-token "
                  f"answers, median TTFT): never-seen schema {_f(comp['cold_ttft_median_ms'])} ms, same schema "
                  f"again (cached) {_f(comp['cached_ttft_median_ms'])} ms, no schema "
                  f"{_f(comp['free_ttft_median_ms'])} ms; compile ≈ {_f(comp['compile_ms_estimate'])} ms."]
    if record.get("errors"):
        lines += ["", "Errors: " + "; ".join(record["errors"])]
    return "\n".join(lines) + "\n"


def write_outputs(prefix: str, record: dict) -> tuple[Path, Path]:
    json_path, md_path = Path(prefix + ".json"), Path(prefix + ".md")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(record, indent=2))
    md_path.write_text(format_markdown(record))
    return json_path, md_path


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.structured", description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--schema", default=str(DEFAULT_SCHEMA), help="JSON schema file (response_format json_schema)")
    p.add_argument("--tools", default=None, metavar="TOOLS.json",
                   help='also run every request with these tools and tool_choice "required"')
    p.add_argument("--concurrency", type=_int_list, default=[1, 16], help="e.g. 1,16")
    p.add_argument("--runs", type=int, default=3, help="alternating repetitions of every variant")
    p.add_argument("--num-prompts", type=int, default=16, help="requests per point (at least C)")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--mix-fraction", type=float, default=0.5, help="constrained share of the mixed variant")
    p.add_argument("--compile-tries", type=int, default=5, help="cold/cached schema probes (0: skip)")
    p.add_argument("--token", default=None)
    p.add_argument("--model", default=None, help="served model name (default: first of /v1/models)")
    p.add_argument("--tokenizer", default=None, help="folder with tokenizer.json (default: the default model's)")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout (s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/structured", help="writes OUT.json and OUT.md")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        schema = load_structured(args.schema, None)
        tools = load_structured(None, args.tools) if args.tools else None
        if not 0.0 < args.mix_fraction < 1.0:
            raise ValueError("--mix-fraction must be strictly between 0 and 1")
        if args.runs < 1 or not args.concurrency or min(args.concurrency) < 1:
            raise ValueError("--runs and every --concurrency must be at least 1")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    counter = TokenCounter.load(args.tokenizer)
    target = Target(args.base_url, model=args.model, token=args.token, timeout_s=args.timeout,
                    ignore_eos=True, count_tokens=counter.count if counter else None)
    prompts = PromptStream(args.input_len, args.output_len, args.seed, counter)

    def show(point: dict, result: PointResult) -> None:
        m = result.metrics
        tags = "".join(f"; {tag}: {t.output_throughput:.1f} tok/s, TPOT p50 {_f(t.tpot.median)} ms"
                       for tag, t in result.by_tag.items())
        print(f"c={point['concurrency']} run {point['run']} {point['variant']:<11} {m.output_throughput:7.1f} tok/s, "
              f"TTFT p50 {_f(m.ttft.median)} ms, TPOT p50 {_f(m.tpot.median)} ms, failed {m.failed}{tags}",
              flush=True)

    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    points, compile_record, errors = asyncio.run(run_all(
        target, args.concurrency, args.runs, prompts, args.num_prompts, schema, tools, args.mix_fraction,
        args.compile_tries, args.seed, show_progress=not args.no_progress, on_point=show))
    config = {k: v for k, v in vars(args).items() if k != "token"} | {
        "model": target.model, "tokenizer_found": counter is not None, "ignore_eos": True,
        "requests_per_point": {f"c={c}": max(args.num_prompts, c, 2) for c in args.concurrency}}
    record = {"date": started, "git_commit": git_commit(), "config": config, "targets": {
        name: {"op": op, "bound": bound} for name, (op, bound) in TARGETS.items()},
        "summary": summarize(points), "compile": compile_record, "errors": errors, "points": points}
    json_path, md_path = write_outputs(args.out, record)
    print(format_markdown(record))
    print(f"wrote {json_path} and {md_path}")
    failed = errors or not points or any(p["metrics"]["failed"] or not p["metrics"]["completed"] for p in points)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
