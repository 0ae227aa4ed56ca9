"""`python -m bench.peers`: berth against llama.cpp's llama-server and `transformers serve`.

Each server runs alone (started, benchmarked, stopped), on the same workload: chat SSE, 128-token
prompts, 128 output tokens (ignore_eos where the server accepts it), closed loop at each concurrency,
several runs, medians. Peers are benchmark-only: they live under ~/.cache/berth/peers, never in
berth's environment (FACTS.md, "Peers for benchmarks").
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.metrics import Slo
from bench.peer_servers import PeerSpec, peer_specs, running
from bench.serving import PointResult, git_commit, run_sweep
from bench.clients import Target
from bench.workloads import LoadPoint, TokenCounter, synthetic_conversations

# (metric name, getter, higher is better)
_COLUMNS = (
    ("out tok/s", lambda m: m.output_throughput, True),
    ("TTFT p50 ms", lambda m: m.ttft.median, False),
    ("TPOT p50 ms", lambda m: m.tpot.median, False),
    ("ITL p50 ms", lambda m: m.itl.median, False),
    ("E2E p50 ms", lambda m: m.e2el.median, False),
)


@dataclass(slots=True)
class PeerRow:
    peer: str
    concurrency: int
    values: dict[str, float | None]   # column -> median over runs


def median_rows(peer: str, runs: list[list[PointResult]]) -> list[PeerRow]:
    """Median of each column over runs, per concurrency (failed points are left out)."""
    rows = []
    for index, first in enumerate(runs[0]):
        values = {}
        for name, get, _ in _COLUMNS:
            samples = [get(run[index].metrics) for run in runs if index < len(run)]
            samples = [s for s in samples if s is not None]
            values[name] = statistics.median(samples) if samples else None
        rows.append(PeerRow(peer, first.point.concurrency or 0, values))
    return rows


def ratio_table(rows: list[PeerRow], base: str = "berth") -> tuple[str, list[dict]]:
    """Markdown and JSON rows of berth / peer per concurrency and column. Every peer named "berth..."
    (e.g. "berth int4") is a berth variant: each variant gets its own ratios against the other peers."""
    variants = list(dict.fromkeys(r.peer for r in rows if r.peer.startswith(base)))
    lines = ["| peer | concurrency | " + " | ".join(f"{n} (berth/peer)" for n, _, _ in _COLUMNS) + " |",
             "|" + "---|" * (2 + len(_COLUMNS))]
    records = []
    for variant in variants:
        ours = {r.concurrency: r for r in rows if r.peer == variant}
        for row in rows:
            mine = ours.get(row.concurrency)
            if row.peer.startswith(base) or mine is None:
                continue
            ratios = {}
            for name, _, _ in _COLUMNS:
                a, b = mine.values.get(name), row.values.get(name)
                ratios[name] = a / b if a is not None and b else None
            record = {"peer": row.peer, "concurrency": row.concurrency, "ratios": ratios}
            if variant != base:
                record["berth"] = variant
            records.append(record)
            cells = " | ".join("-" if v is None else f"{v:.2f}" for v in ratios.values())
            label = row.peer if variant == base else f"{row.peer} (vs {variant})"
            lines.append(f"| {label} | {row.concurrency} | {cells} |")
    return "\n".join(lines), records


def absolute_table(rows: list[PeerRow]) -> str:
    lines = ["| peer | concurrency | " + " | ".join(n for n, _, _ in _COLUMNS) + " |",
             "|" + "---|" * (2 + len(_COLUMNS))]
    for row in rows:
        cells = " | ".join("-" if v is None else f"{v:.1f}" for v in row.values.values())
        lines.append(f"| {row.peer} | {row.concurrency} | {cells} |")
    return "\n".join(lines)


async def bench_peer(spec: PeerSpec, args, counter: TokenCounter | None) -> list[list[PointResult]]:
    """--runs runs of every concurrency point against one server started for them."""
    runs = []
    async with running(spec):
        for run in range(args.runs):
            target = Target(spec.base_url, model=spec.model, ignore_eos=spec.ignore_eos,
                            count_tokens=counter.count if counter else None)
            results = []
            for c in args.concurrency:
                conversations = synthetic_conversations(max(args.num_prompts, 2 * c), args.input_len,
                                                        args.output_len, 1, args.seed + run, counter)
                results += await run_sweep(target, ["chat"], [LoadPoint(concurrency=c)], conversations,
                                           Slo(), args.seed + run, show_progress=not args.no_progress)
            print(f"[{spec.name}] run {run + 1}/{args.runs}: " + ", ".join(
                f"c={r.point.concurrency} {r.metrics.output_throughput:.1f} tok/s" for r in results), flush=True)
            runs.append(results)
    return runs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.splitlines()[0])
    p.add_argument("--peers", default="llama,transformers,berth", help="comma list: llama (built for this CPU), llama-wheel, transformers, berth")
    p.add_argument("--concurrency", type=lambda t: [int(v) for v in t.split(",")], default=[1, 4, 16, 64])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat the whole comparison, peers in alternating order: on a noisy shared machine "
                        "each peer is then measured in several time windows (medians over rounds x runs)")
    p.add_argument("--num-prompts", type=int, default=16, help="requests per point (at least 2 x concurrency)")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/peers", help="writes OUT.md and OUT.json")
    p.add_argument("--check", action="store_true", help="start each peer, send one chat request, stop")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    specs = peer_specs([n.strip() for n in args.peers.split(",") if n.strip()], args.port)
    if args.check:
        from bench.peer_servers import check_peer
        ok = True
        for spec in specs:
            try:
                ok = asyncio.run(check_peer(spec)) and ok
            except RuntimeError as exc:
                print(f"[{spec.name}] failed: {exc}", file=sys.stderr)
                ok = False
        return 0 if ok else 1
    counter = TokenCounter.load()
    runs: dict[str, list[list[PointResult]]] = {}
    for round_index in range(args.rounds):
        for spec in specs if round_index % 2 == 0 else specs[::-1]:
            try:
                runs.setdefault(spec.name, []).extend(asyncio.run(bench_peer(spec, args, counter)))
            except RuntimeError as exc:
                print(f"[{spec.name}] skipped: {exc}", file=sys.stderr)
    rows: list[PeerRow] = []
    for spec in specs:
        if runs.get(spec.name) and runs[spec.name][0]:
            rows += median_rows(spec.name, runs[spec.name])
    markdown, records = ratio_table(rows)
    total = args.runs * args.rounds
    report = f"## Absolute (medians of {total} runs)\n\n{absolute_table(rows)}\n\n## berth / peer\n\n{markdown}\n"
    print(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(report)
    out.with_suffix(".json").write_text(json.dumps({
        "git_commit": git_commit(), "config": vars(args) | {"tokenizer_found": counter is not None},
        "rows": [{"peer": r.peer, "concurrency": r.concurrency, "values": r.values} for r in rows],
        "ratios": records}, indent=2))
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
