"""berth command line: `berth serve` deploys a model on every EAS calling method; `berth bench` measures it."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time

from server.config import DTYPES, EngineConfig

log = logging.getLogger("berth")

GIL_SWITCH_INTERVAL = 0.0005   # seconds (Python's default is 0.005)


def serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over OpenAI, BladeLLM, EAS HTTP, WebSocket and the WebUI")
    p.add_argument("--model", default="default",
                   help="'default' (SmolLM2-135M-Instruct), a local HF folder or a .gguf file")
    p.add_argument("--engine", choices=("auto", "paged", "transformers"), default="auto")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token", default=os.environ.get("BERTH_TOKEN") or None,
                   help="require this token (Authorization: <token> or Bearer); default $BERTH_TOKEN, which keeps "
                        "it out of the process list")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--dtype", choices=DTYPES, default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--kv-cache-gib", type=float, default=None,
                   help="KV pool size (default: planned from available memory, at most 4 GiB on the CPU)")
    p.add_argument("--memory-utilization", type=float, default=0.9,
                   help="share of available memory the weights, KV pool and activations may take")
    p.add_argument("--block-size", type=int, default=None,
                   help="tokens per KV block (default: the attention backend's: 16; 256 with flash-attn on CUDA)")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="run every decode step eagerly on CUDA (default: replay graphs captured at start)")
    p.add_argument("--max-pending", type=int, default=256,
                   help="admitted, unfinished requests before new ones get 429")
    p.add_argument("--quantization", choices=("auto", "none", "int8", "int4"), default="auto",
                   help="auto: a GGUF keeps its own quant types (native kernels), a folder its stored dtype; "
                        "int8/int4: weight-only int8 or int4 (groups of 32) linear layers of a folder, paged "
                        "engine: faster decode on CPU, outputs no longer equal the float model's")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="operator cap on generated tokens per request (longer requests end with 'length')")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get after SIGTERM before they are aborted")
    p.add_argument("--metrics-public", action="store_true", help="serve /metrics without the token")
    p.add_argument("--log-prompts", action="store_true", help="access log lines include prompt text")
    p.add_argument("--stall-timeout", type=float, default=60.0,
                   help="seconds a stream may wait on a client that does not read before it is aborted")
    p.add_argument("--body-timeout", type=float, default=60.0, help="seconds to receive a request body")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds from connect to a complete request head")
    p.add_argument("--max-connections", type=int, default=1024, help="open connections; more get 503")
    p.add_argument("--allowed-hosts", default=None,
                   help="comma-separated Host names to serve ('*': any). Default: loopback names when bound "
                        "to a loopback address (refuses DNS rebinding), any Host otherwise")
    p.add_argument("--ws-idle-timeout", type=float, default=600.0,
                   help="seconds a WebSocket session may sit idle (no frame, no round) before it is closed")
    p.add_argument("--knowledge", default=None, metavar="DIR",
                   help="index every document in DIR at start (txt, md, html, pdf, json, jsonl) into the knowledge "
                        "base that langchain: true requests answer from")
    p.add_argument("--knowledge-db", default=None, metavar="URL",
                   help="the knowledge base's store: a SQLite file (default $BERTH_CACHE/knowledge.sqlite3) or "
                        "postgresql://... shared by several replicas; enables the knowledge base on its own")
    p.add_argument("--reasoning-parser", choices=("auto", "none", "deepseek_r1", "qwen3"), default="auto",
                   help="split <think>...</think> into reasoning_content on the OpenAI chat routes. auto: when the "
                        "chat template has </think> (deepseek_r1 when its generation prompt opens <think>, else qwen3)")
    p.add_argument("--log-level", default="info")


def serve(args) -> int:
    from server.model_store import ModelError, model_name, resolve_model

    started = time.monotonic()
    try:
        folder = resolve_model(args.model, log=lambda m: print(m, file=sys.stderr, flush=True))
    except ModelError as err:
        print(f"berth: error: {err}", file=sys.stderr)
        return 2
    config = EngineConfig(model=args.model, engine=args.engine, dtype=args.dtype, device=args.device,
                          max_model_len=args.max_model_len, block_size=args.block_size,
                          max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                          kv_cache_gib=args.kv_cache_gib, enable_prefix_caching=not args.no_prefix_caching,
                          max_pending=args.max_pending, max_new_tokens=args.max_new_tokens,
                          quantization=args.quantization, memory_utilization=args.memory_utilization,
                          cuda_graphs=not args.no_cuda_graphs)
    from server.engine.memory import MemoryPlanError

    try:
        engine = _load_engine(config, str(folder))
    except MemoryPlanError as exc:
        print(f"berth: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - one clear line, no traceback
        print(f"berth: error: cannot load model {args.model!r}: {type(exc).__name__}: "
              f"{str(exc).splitlines()[0][:300] if str(exc) else ''}", file=sys.stderr)
        return 2
    name = args.served_model_name or model_name(args.model, folder)
    try:
        knowledge = _open_knowledge(args, engine)
    except Exception as exc:  # noqa: BLE001 - one clear line, no traceback
        print(f"berth: error: knowledge base: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
              file=sys.stderr)
        return 2
    _announce(args, name, engine, time.monotonic() - started)
    return _run(args, engine, name, knowledge)


def _open_knowledge(args, engine):
    """The knowledge base when --knowledge or --knowledge-db asks for one; DIR is indexed now."""
    if args.knowledge is None and args.knowledge_db is None:
        return None
    from pathlib import Path

    from server.knowledge import KnowledgeBase
    from server.model_store import cache_dir

    if args.knowledge is not None and not Path(args.knowledge).is_dir():
        raise NotADirectoryError(f"--knowledge {args.knowledge}: not a directory")
    hf = getattr(getattr(engine.engine, "tokenizer", None), "hf", None)
    count = (lambda text: len(hf.encode(text, add_special_tokens=False))) if hf is not None else None
    kb = KnowledgeBase.open(args.knowledge_db, cache_dir(), count_tokens=count)
    if args.knowledge is not None:
        started = time.monotonic()
        added, errors = kb.index_dir(Path(args.knowledge))
        for file, error in errors:
            print(f"berth: knowledge: skipped {file}: {error}", file=sys.stderr, flush=True)
        print(f"berth: knowledge: indexed {len(added)} documents from {args.knowledge} in "
              f"{time.monotonic() - started:.1f} s ({kb.num_chunks} chunks in the knowledge base)", flush=True)
    return kb


def _load_engine(config: EngineConfig, folder: str):
    from server.async_engine import AsyncEngine
    from server.engine.factory import build_engine

    return AsyncEngine(build_engine(config, folder), max_pending=config.max_pending)


def _announce(args, name: str, engine, seconds: float) -> None:
    url = f"http://{args.host}:{args.port}"
    auth = f' -H "Authorization: {args.token}"' if args.token else ""
    kind = type(engine.engine).__name__
    print(f"berth: serving {name!r} ({kind}, max_model_len {engine.max_model_len}) "
          f"loaded in {seconds:.1f} s", flush=True)
    print(f"  endpoint:   {url}\n  model name: {name}\n  token:      {args.token or '(none: open)'}")
    plan = getattr(engine.engine, "memory_plan", None)
    if plan is not None:
        print(f"  {plan.summary()}", flush=True)
    print(f"  try:  curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} "
          f"-d '{{\"messages\":[{{\"role\":\"user\",\"content\":\"What is the capital of Canada?\"}}]}}'",
          flush=True)
    print(f"  WebUI: {url}/", flush=True)


def _reasoning(choice: str, engine):
    """The reasoning split the chat routes apply (protocol/reasoning.py), or None."""
    from protocol.reasoning import ReasoningConfig, detect

    if choice == "none":
        return None
    if choice != "auto":
        return ReasoningConfig(starts_inside=choice == "deepseek_r1")
    tokenizer = getattr(engine.engine, "tokenizer", None)
    if tokenizer is None:
        return None
    config = detect(tokenizer.hf.chat_template, tokenizer.generation_prompt())
    if config is not None:
        log.info("reasoning parser: %s (from the chat template)", "deepseek_r1" if config.starts_inside else "qwen3")
    return config


def _run(args, engine, name: str, knowledge=None) -> int:
    from server.http.app import make_app
    from server.http.keys import ServerOptions
    from server.http.limits import parse_allowed_hosts
    from server.http.serve import serve as serve_app

    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    # The engine thread and the event loop share the GIL. With the default 5 ms switch interval a thread
    # that wants it waits up to 5 ms per hand-over, which a 10 ms decode step feels on every token.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    options = ServerOptions(metrics_public=args.metrics_public, log_prompts=args.log_prompts,
                            body_timeout=args.body_timeout, header_timeout=args.header_timeout,
                            stall_timeout=args.stall_timeout, drain_timeout=args.drain_timeout,
                            max_connections=args.max_connections, ws_idle_timeout=args.ws_idle_timeout,
                            allowed_hosts=parse_allowed_hosts(args.allowed_hosts, args.host))
    app = make_app(engine, [name], token=args.token, options=options, knowledge=knowledge,
                   reasoning=_reasoning(args.reasoning_parser, engine))
    return asyncio.run(serve_app(app, args.host, args.port))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="berth", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve_parser(sub)
    sub.add_parser("bench", help="latency benchmark of a running server (see bench/README.md)",
                   add_help=False)
    from server import kb_cli

    kb_cli.add_parser(sub)
    from server.deploy import local as deploy_cli

    deploy_cli.add_parsers(sub)
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        from bench.serving import main as bench_main

        return bench_main(rest) or 0
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "kb":
        from server import kb_cli

        return kb_cli.main(args)
    if args.command in deploy_cli.COMMANDS:
        return deploy_cli.main(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
