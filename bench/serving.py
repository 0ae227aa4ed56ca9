"""`python -m bench.serving` (`berth bench`): latency of every calling method under load.

Runs a seeded workload against one server for each method and each load point of a sweep,
prints vLLM-style tables, and writes a JSON record and a latency-vs-throughput PNG.
--structured SCHEMA.json / --tools TOOLS.json constrain a fraction of the conversations
(--structured-fraction); a point that mixes constrained and free requests also reports each subset.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import aiohttp
from tqdm import tqdm

from bench import clients
from bench.clients import RequestResult, StructuredSpec, Target
from bench.metrics import BenchmarkMetrics, Slo, compute_metrics, parse_slo
from bench.workloads import (Conversation, LoadPoint, TokenCounter, run_load, sweep_points, synthetic_conversations,
                             with_constraint)

HTTP_METHODS = {"chat": clients.openai_chat, "completions": clients.openai_completions, "eas": clients.eas_http}
ALL_METHODS = ("chat", "completions", "eas", "ws")


@dataclass(slots=True)
class PointResult:
    method: str
    point: LoadPoint
    metrics: BenchmarkMetrics
    # per request tag ("constrained", "free"), only when the point mixed both
    by_tag: dict[str, BenchmarkMetrics] = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = {"method": self.method, "label": self.point.label, **asdict(self.point),
               "metrics": asdict(self.metrics)}
        if self.by_tag:
            out["by_tag"] = {tag: asdict(m) for tag, m in self.by_tag.items()}
        return out


def metrics_by_tag(results: list[RequestResult], duration_s: float, slo: Slo | None = None
                   ) -> dict[str, BenchmarkMetrics]:
    """Metrics of each tag's subset over the point's whole duration (throughputs are the subset's
    share of the run); empty when every request has the same tag."""
    tags = sorted({r.tag for r in results})
    if len(tags) < 2:
        return {}
    return {tag: compute_metrics([r for r in results if r.tag == tag], duration_s, slo) for tag in tags}


async def run_conversation(method: str, http: aiohttp.ClientSession, target: Target,
                           conversation: Conversation) -> list[RequestResult]:
    """All rounds of one conversation; HTTP methods carry the history client-side, ws on the server."""
    turns, constraint = conversation.turns, conversation.constraint
    if method == "ws":
        results = await clients.websocket_session(http, target, [t.prompt for t in turns], turns[0].output_len,
                                                  constraint)
    else:
        call, history, results = HTTP_METHODS[method], [], []
        for index, turn in enumerate(turns):
            result = await call(http, target, turn.prompt, turn.output_len, history, constraint)
            result.round_index = index if len(turns) > 1 else None
            results.append(result)
            if not result.success:
                break
            history.append((turn.prompt, result.text))
    for result in results:
        result.tag = conversation.tag
    return results


async def resolve_model(http: aiohttp.ClientSession, target: Target) -> str | None:
    """The first id of GET /v1/models, or None when the server does not list models."""
    try:
        async with http.get(target.url("/v1/models"), headers=target.headers(),
                            timeout=aiohttp.ClientTimeout(total=10)) as resp:
            data = await resp.json(content_type=None) if resp.status == 200 else {}
        return (data.get("data") or [{}])[0].get("id")
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, AttributeError):
        return None


async def bench_point(http: aiohttp.ClientSession, method: str, target: Target, conversations: list[Conversation],
                      point: LoadPoint, slo: Slo, seed: int, show_progress: bool = True) -> PointResult:
    bar = tqdm(total=len(conversations), desc=f"{method} {point.label}", disable=not show_progress, leave=False)
    start = time.perf_counter()
    results = await run_load(conversations, lambda c: run_conversation(method, http, target, c),
                             point, seed, on_done=bar.update)
    duration = time.perf_counter() - start
    bar.close()
    return PointResult(method, point, compute_metrics(results, duration, slo), metrics_by_tag(results, duration, slo))


async def warm_up(http: aiohttp.ClientSession, method: str, target: Target, conversation: Conversation) -> str | None:
    """One untimed request; the error text when it fails (bad URL, token, model...)."""
    one = replace(conversation, turns=conversation.turns[:1])
    result = (await run_conversation(method, http, target, one))[0]
    return None if result.success else f"{result.error_kind.value}: {result.error}"


async def run_sweep(target: Target, methods: list[str], points: list[LoadPoint], conversations: list[Conversation],
                    slo: Slo, seed: int = 0, show_progress: bool = True,
                    on_point: Callable[[PointResult], None] | None = None) -> list[PointResult]:
    """Every method at every load point, one after another, on one connection pool."""
    out = []
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as http:
        if target.model is None:
            target.model = await resolve_model(http, target)
        for method in methods:
            error = await warm_up(http, method, target, conversations[0])
            if error is not None:
                print(f"[{method}] warm-up request failed, skipping: {error}", file=sys.stderr)
                continue
            for point in points:
                result = await bench_point(http, method, target, conversations, point, slo, seed, show_progress)
                out.append(result)
                if on_point is not None:
                    on_point(result)
    return out


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_report(result: PointResult) -> str:
    """The vLLM `bench serve` result block for one point."""
    m = result.metrics
    rows = [("Method / load:", f"{result.method} {result.point.label}"),
            ("Successful requests:", m.completed), ("Failed requests:", m.failed),
            ("Benchmark duration (s):", f"{m.duration_s:.2f}"), ("Total input tokens:", m.total_input),
            ("Total generated tokens:", m.total_output),
            ("Request throughput (req/s):", f"{m.request_throughput:.2f}"),
            ("Request goodput (req/s):", _ms(m.request_goodput)),
            ("Output token throughput (tok/s):", f"{m.output_throughput:.2f}"),
            ("Total Token throughput (tok/s):", f"{m.total_token_throughput:.2f}")]
    lines = ["{:=^50}".format(" Serving Benchmark Result ")]
    lines += [f"{name:<40} {value:<10}" for name, value in rows]
    for key, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                       ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        dist, short = getattr(m, key), key.upper()
        lines.append("{:-^50}".format(title))
        for stat in ("mean", "median", "p90", "p99"):
            lines.append(f"{f'{stat.capitalize()} {short} (ms):':<40} {_ms(getattr(dist, stat)):<10}")
    if m.errors:
        lines.append("Errors: " + ", ".join(f"{kind}={n}" for kind, n in m.errors.items()))
    if m.round_ttft_median_ms:
        lines.append("Median TTFT by round (ms): " + ", ".join(
            f"{i}: {v:.1f}" for i, v in m.round_ttft_median_ms.items()))
    for tag, t in result.by_tag.items():
        lines.append("{:-^50}".format(f" {tag} requests "))
        for name, value in (("Successful requests:", t.completed), ("Failed requests:", t.failed),
                            ("Output token throughput (tok/s):", f"{t.output_throughput:.2f}"),
                            ("Median TTFT (ms):", _ms(t.ttft.median)), ("Median TPOT (ms):", _ms(t.tpot.median)),
                            ("Median ITL (ms):", _ms(t.itl.median)), ("Median E2EL (ms):", _ms(t.e2el.median))):
            lines.append(f"{name:<40} {value:<10}")
    lines.append("=" * 50)
    return "\n".join(lines)


def format_summary(results: list[PointResult]) -> str:
    """One markdown row per (method, load point)."""
    head = ("| method | load | req/s | out tok/s | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 | ITL p50 "
            "| E2E p50 | goodput | errors |\n|" + "---|" * 12)
    rows = [head]
    for r in results:
        for label, m in [(r.point.label, r.metrics)] + [(f"{r.point.label} {tag}", t) for tag, t in r.by_tag.items()]:
            errors = ", ".join(f"{k}={n}" for k, n in m.errors.items()) or "0"
            rows.append(f"| {r.method} | {label} | {m.request_throughput:.2f} | {m.output_throughput:.1f} "
                        f"| {_ms(m.ttft.median)} | {_ms(m.ttft.p99)} | {_ms(m.tpot.median)} | {_ms(m.tpot.p99)} "
                        f"| {_ms(m.itl.median)} | {_ms(m.e2el.median)} | {_ms(m.request_goodput)} | {errors} |")
    return "\n".join(rows)


def git_commit(repo: Path = Path(__file__).resolve().parent.parent) -> str | None:
    """HEAD's commit read from .git files (no git process), or None."""
    head_file = repo / ".git" / "HEAD"
    try:
        head = head_file.read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        ref_file = repo / ".git" / ref
        if ref_file.is_file():
            return ref_file.read_text().strip()
        for line in (repo / ".git" / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        return None
    return None


def write_json(path: str, config: dict, results: list[PointResult]) -> None:
    record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "git_commit": git_commit(), "config": config, "points": [r.to_dict() for r in results]}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record, indent=2))


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _float_list(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="berth bench", description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--method", default="chat", choices=(*ALL_METHODS, "all"))
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-prompts", type=int, default=32, help="conversations per load point")
    p.add_argument("--concurrency", type=_int_list, default=[1], help="closed-loop sweep, e.g. 1,4,16")
    p.add_argument("--request-rate", type=_float_list, default=None, help="open-loop Poisson sweep (req/s)")
    p.add_argument("--rounds", type=int, default=1, help="rounds per conversation (multi-turn chat)")
    p.add_argument("--slo", default=None, help="goodput SLOs in ms, e.g. ttft:500,tpot:50")
    p.add_argument("--token", default=None)
    p.add_argument("--model", default=None, help="served model name (default: first of /v1/models)")
    p.add_argument("--tokenizer", default=None, help="folder with tokenizer.json (default: the default model's)")
    p.add_argument("--no-ignore-eos", action="store_true", help="do not send ignore_eos")
    p.add_argument("--structured", default=None, metavar="SCHEMA.json",
                   help="constrain answers to this JSON schema (response_format json_schema; "
                        "structured_outputs.json on completions)")
    p.add_argument("--tools", default=None, metavar="TOOLS.json",
                   help='an OpenAI tools list, sent with tool_choice "required" (chat only)')
    p.add_argument("--structured-fraction", type=float, default=1.0, metavar="F",
                   help="fraction of conversations that carry --structured/--tools, interleaved by index")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout (s)")
    p.add_argument("--result-json", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p


def load_json(path: str, what: str) -> object:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {what} {path}: {exc}") from None


def load_structured(schema_path: str | None, tools_path: str | None) -> StructuredSpec | None:
    """The StructuredSpec of --structured / --tools (None when neither); ValueError for a bad file.
    A tools file holds a list of OpenAI tools or {"tools": [...]}."""
    if schema_path and tools_path:
        raise ValueError("--structured and --tools cannot be combined (berth answers 400 to both at once)")
    if schema_path:
        schema = load_json(schema_path, "schema")
        if not isinstance(schema, dict):
            raise ValueError(f"{schema_path}: a JSON schema must be an object")
        return StructuredSpec(schema=schema)
    if tools_path:
        tools = load_json(tools_path, "tools")
        tools = tools.get("tools") if isinstance(tools, dict) else tools
        if not isinstance(tools, list) or not tools or not all(isinstance(t, dict) for t in tools):
            raise ValueError(f"{tools_path}: expected a non-empty list of OpenAI tools")
        return StructuredSpec(tools=tools)
    return None


def check_structured(spec: StructuredSpec | None, methods: list[str], fraction: float) -> None:
    """ValueError when the flags do not fit together (tools off chat, a fraction out of range)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError("--structured-fraction must be in [0, 1]")
    if spec is None:
        if fraction != 1.0:
            raise ValueError("--structured-fraction needs --structured or --tools")
        return
    for method in methods:
        try:
            spec.fields(method)
        except ValueError as exc:
            raise ValueError(f"--tools: {exc}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    methods = list(ALL_METHODS) if args.method == "all" else [args.method]
    try:
        slo = parse_slo(args.slo)
        spec = load_structured(args.structured, args.tools)
        check_structured(spec, methods, args.structured_fraction)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    counter = TokenCounter.load(args.tokenizer)
    target = Target(args.base_url, model=args.model, token=args.token, timeout_s=args.timeout,
                    ignore_eos=not args.no_ignore_eos, count_tokens=counter.count if counter else None)
    conversations = synthetic_conversations(args.num_prompts, args.input_len, args.output_len,
                                            args.rounds, args.seed, counter)
    conversations = with_constraint(conversations, spec, args.structured_fraction)
    points = sweep_points(args.concurrency, args.request_rate)
    results = asyncio.run(run_sweep(target, methods, points, conversations, slo, args.seed,
                                    show_progress=not args.no_progress,
                                    on_point=lambda r: print(format_report(r), flush=True)))
    print(format_summary(results))
    hidden = {"token"} | ({"structured", "tools", "structured_fraction"} if spec is None else set())
    config = {k: v for k, v in vars(args).items() if k not in hidden} | {"model": target.model,
                                                                          "tokenizer_found": counter is not None}
    if args.result_json:
        write_json(args.result_json, config, results)
    if args.plot and results:
        from bench.plot import plot_sweep
        plot_sweep(results, args.plot)
    return 0 if results and all(r.metrics.completed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
