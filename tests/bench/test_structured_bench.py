"""--structured / --tools in berth bench and python -m bench.structured, offline against the fake server."""
from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from bench import clients, serving, structured
from bench.clients import RequestResult, StructuredSpec, Target
from bench.workloads import Conversation, Turn, constrained_flags, with_constraint
from tests.bench import fake_server
from tests.bench.fake_server import BODIES, MODE, TOKEN

SCHEMAS = Path(structured.__file__).resolve().parent / "schemas"
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
ARG_FRAGMENTS = ['{"city": ', '"Paris"', ', "unit": "celsius"}']


async def _tool_chat(request: web.Request) -> web.StreamResponse:
    """The fake chat route, answering a request with tools by one streamed tool call (OpenAI shape)."""
    body = await request.json()
    if not body.get("tools"):
        return await fake_server.chat(request)        # aiohttp keeps the body: it reads it again
    request.app[BODIES].append(body)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    sse = fake_server._sse
    data = sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
    data += sse({"choices": [{"index": 0, "finish_reason": None, "delta": {"tool_calls": [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}}]})
    for fragment in ARG_FRAGMENTS:
        data += sse({"choices": [{"index": 0, "finish_reason": None, "delta": {"tool_calls": [
            {"index": 0, "function": {"arguments": fragment}}]}}]})
    data += sse({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
    data += sse({"choices": [], "usage": {"prompt_tokens": 20, "completion_tokens": 12, "total_tokens": 32}})
    await fake_server._write_split(resp, data + b"data: [DONE]\n\n")
    return resp


def make_app() -> web.Application:
    app = fake_server.make_app()
    tools_app = web.Application()
    tools_app[MODE], tools_app[BODIES] = app[MODE], app[BODIES]
    tools_app.router.add_post("/v1/chat/completions", _tool_chat)
    tools_app.router.add_post("/v1/completions", fake_server.completions)
    tools_app.router.add_post("/", fake_server.eas)
    tools_app.router.add_get("/ws", fake_server.ws)
    tools_app.router.add_get("/v1/models", fake_server.models)
    return tools_app


@pytest.fixture
def fake():
    """(base URL, app) of the fake server running on its own loop in a thread."""
    loop = asyncio.new_event_loop()
    app = make_app()
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}", app
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


# -- pure parts ------------------------------------------------------------------------------------

def test_spec_fields_per_method():
    spec = StructuredSpec(schema=SCHEMA)
    rf = {"response_format": {"type": "json_schema", "json_schema": {"name": "bench", "schema": SCHEMA}}}
    assert spec.fields("chat") == rf and spec.fields("eas") == rf and spec.fields("ws") == rf
    assert spec.fields("completions") == {"structured_outputs": {"json": SCHEMA}}
    tools = StructuredSpec(tools=TOOLS)
    assert tools.fields("chat") == {"tools": TOOLS, "tool_choice": "required"}
    for method in ("completions", "eas", "ws"):
        with pytest.raises(ValueError, match="chat"):
            tools.fields(method)
    assert StructuredSpec().fields("chat") == {}


def test_fraction_interleaves_by_index():
    assert constrained_flags(6, 0.5) == [True, False] * 3
    assert constrained_flags(4, 1.0) == [True] * 4 and constrained_flags(3, 0.0) == [False] * 3
    assert constrained_flags(9, 1 / 3) == [True, False, False] * 3
    assert sum(constrained_flags(1000, 0.25)) == 250
    with pytest.raises(ValueError):
        constrained_flags(3, 1.5)
    base = [Conversation([Turn(f"p{i}", 4, 4)]) for i in range(4)]
    spec = StructuredSpec(schema=SCHEMA)
    mixed = with_constraint(base, spec, 0.5)
    assert [c.constraint is spec for c in mixed] == [True, False, True, False]
    assert [c.tag for c in mixed] == ["constrained", "free", "constrained", "free"]
    assert all(m.turns is b.turns for m, b in zip(mixed, base))
    assert all(c.constraint is None for c in with_constraint(base, None, 0.5))


def test_chat_delta_text_counts_tool_call_arguments():
    text = clients.chat_delta_text
    assert text({"delta": {"content": "hi"}}) == "hi"
    assert text({"delta": {"content": None}}) == "" and text({}) == ""
    start = {"delta": {"tool_calls": [{"index": 0, "id": "c", "type": "function",
                                       "function": {"name": "f", "arguments": ""}}]}}
    assert text(start) == ""
    two = [{"index": 0, "function": {"arguments": '{"a"'}}, {"index": 1, "function": {"arguments": ": 1}"}}]
    assert text({"delta": {"content": "", "tool_calls": two}}) == '{"a": 1}'


def _result(tag: str, ttft: float, latency: float, tokens: int, success: bool = True) -> RequestResult:
    r = RequestResult(success=success, ttft=ttft, latency=latency, output_tokens=tokens, prompt_tokens=10, tag=tag)
    if not success:
        r.error_kind = clients.ErrorKind.HTTP
    return r


def test_metrics_by_tag_splits_only_mixed_points():
    free = [_result("free", 0.1, 1.1, 11), _result("free", 0.1, 2.1, 11)]
    cons = [_result("constrained", 0.2, 3.2, 11), _result("constrained", 0.1, 1.0, 5, success=False)]
    assert serving.metrics_by_tag(free, 2.0) == {}
    split = serving.metrics_by_tag(free + cons, 2.0)
    assert sorted(split) == ["constrained", "free"]
    assert (split["free"].completed, split["free"].total_output, split["free"].output_throughput) == (2, 22, 11.0)
    assert (split["constrained"].completed, split["constrained"].failed) == (1, 1)
    assert split["free"].tpot.median == pytest.approx(150.0)            # (2.1 - 0.1) / 10 and 100 ms
    assert split["constrained"].tpot.median == pytest.approx(300.0)


def _point(c: int, variant: str, run: int, tok_s: float, tpot: float, by_tag: dict | None = None) -> dict:
    def metrics(tok_s, tpot):
        return {"output_throughput": tok_s, "request_throughput": 1.0, "ttft": {"median": 5.0},
                "tpot": {"median": tpot}, "itl": {"median": tpot}, "e2el": {"median": 100.0},
                "total_output": 64, "completed": 2, "failed": 0}
    point = {"concurrency": c, "variant": variant, "run": run, "metrics": metrics(tok_s, tpot)}
    if by_tag:
        point["by_tag"] = {tag: metrics(*values) for tag, values in by_tag.items()}
    return point


def test_structured_summary_ratios():
    points = []
    for run, (free, cons, mix_free_tpot) in enumerate([(100.0, 95.0, 10.5), (90.0, 80.0, 12.0), (110.0, 99.0, 10.0)]):
        points += [_point(4, "free", run, free, 10.0 + run), _point(4, "constrained", run, cons, 11.0),
                   _point(4, "mixed", run, (free + cons) / 2, 10.5,
                          {"free": (free / 2, mix_free_tpot), "constrained": (cons / 2, 11.0)})]
    row = structured.summarize(points)["c=4"]
    assert row["free"]["out_tok_s"] == 100.0 and row["constrained"]["out_tok_s"] == 95.0     # medians
    assert row["free"]["tpot_p50_ms"] == 11.0 and row["free"]["runs"] == 3
    assert row["free"]["out_tokens_per_request"] == 32.0
    assert row["constrained_over_free_tok_s"] == pytest.approx(0.95)
    assert row["mixed"]["by_tag"]["free"]["tpot_p50_ms"] == 10.5
    assert row["mixed_free_tpot_over_free_tpot"] == pytest.approx(10.5 / 11.0)
    assert row["meets"] == {"constrained_over_free_tok_s": True, "mixed_free_tpot_over_free_tpot": True}
    assert "tools" not in row
    slow = [_point(1, "free", 0, 100.0, 10.0), _point(1, "constrained", 0, 85.0, 12.0)]
    row = structured.summarize(slow)["c=1"]
    assert row["constrained_over_free_tok_s"] == pytest.approx(0.85)
    assert row["meets"] == {"constrained_over_free_tok_s": False, "mixed_free_tpot_over_free_tpot": None}


def test_compile_summary_and_fresh_schema():
    out = structured.compile_summary([30.0, 50.0, None], [10.0, 12.0, 11.0], [9.0, 9.5, 10.0])
    assert out["cold_ttft_median_ms"] == 40.0 and out["cached_ttft_median_ms"] == 11.0
    assert out["compile_ms_estimate"] == 29.0 and out["tries"] == 3
    a, b = structured.fresh_schema(SCHEMA), structured.fresh_schema(SCHEMA)
    assert a["description"] != b["description"] and {**a, "description": None} == {**SCHEMA, "description": None}
    assert "description" not in SCHEMA


def test_prompt_stream_draws_fresh_prompts():
    stream = structured.PromptStream(16, 8, seed=3)
    a, b = stream.take(4), stream.take(2, output_len=2)
    assert len({c.turns[0].prompt for c in a + b}) == 6
    assert [c.turns[0].output_len for c in a + b] == [8] * 4 + [2] * 2
    again = structured.PromptStream(16, 8, seed=3).take(4)
    assert [c.turns[0].prompt for c in again] == [c.turns[0].prompt for c in a]     # seeded


def test_shipped_schemas_are_valid():
    schema = json.loads((SCHEMAS / "long_array.json").read_text())
    records = schema["properties"]["records"]
    assert records["maxItems"] == 1000 and records["minItems"] * 20 > 512      # never completes by 512 tokens
    tools = json.loads((SCHEMAS / "tools.json").read_text())
    assert len(tools) == 2 and all(t["type"] == "function" and t["function"]["parameters"]["type"] == "object"
                                   for t in tools)
    spec = serving.load_structured(None, str(SCHEMAS / "tools.json"))
    assert spec.tools == tools


# -- against the fake server -----------------------------------------------------------------------

@pytest.mark.asyncio
async def test_chat_tool_call_stream_times_argument_fragments(aiohttp_server):
    server = await aiohttp_server(make_app())
    target = Target(str(server.make_url("")), token=TOKEN, timeout_s=10)
    async with aiohttp.ClientSession() as http:
        r = await clients.openai_chat(http, target, "weather?", 16, constraint=StructuredSpec(tools=TOOLS))
        plain = await clients.openai_chat(http, target, "hi", 16)
    assert r.success and r.text == "".join(ARG_FRAGMENTS)
    assert r.ttft is not None and len(r.chunk_times) == 3 and len(r.itl) == 2
    assert r.output_tokens == 12
    assert plain.success and plain.text == "".join(fake_server.WORDS)
    tool_body, plain_body = server.app[BODIES]
    assert tool_body["tools"] == TOOLS and tool_body["tool_choice"] == "required"
    assert "tools" not in plain_body and "response_format" not in plain_body


def test_bench_structured_fraction_tags_and_bodies(fake, tmp_path, capsys):
    url, app = fake
    schema_file = tmp_path / "s.json"
    schema_file.write_text(json.dumps(SCHEMA))
    out = tmp_path / "out.json"
    code = serving.main(["--base-url", url, "--method", "all", "--num-prompts", "4", "--concurrency", "1",
                         "--output-len", "4", "--token", TOKEN, "--structured", str(schema_file),
                         "--structured-fraction", "0.5", "--result-json", str(out),
                         "--tokenizer", str(tmp_path), "--no-progress"])
    assert code == 0
    record = json.loads(out.read_text())
    assert record["config"]["structured_fraction"] == 0.5
    for point in record["points"]:
        assert point["metrics"]["completed"] == 4
        assert {t: m["completed"] for t, m in point["by_tag"].items()} == {"constrained": 2, "free": 2}
    bodies = app[BODIES]
    chat = [b for b in bodies if "messages" in b]
    comp = [b for b in bodies if "prompt" in b and "stream" in b and "max_tokens" in b]
    eas_ws = [b for b in bodies if "max_new_tokens" in b]
    # warm-up (conversation 0, constrained) then 4 conversations alternating
    assert ["response_format" in b for b in chat] == [True, True, False, True, False]
    assert chat[0]["response_format"]["json_schema"] == {"name": "bench", "schema": SCHEMA}
    assert ["structured_outputs" in b for b in comp] == [True, True, False, True, False]
    assert comp[0]["structured_outputs"] == {"json": SCHEMA} and "response_format" not in comp[0]
    assert ["response_format" in b for b in eas_ws] == [True, True, False, True, False] * 2
    printed = capsys.readouterr().out
    assert "constrained requests" in printed and "| chat | c=1 free |" in printed


def test_bench_without_flags_has_no_tags(fake, tmp_path):
    url, app = fake
    out = tmp_path / "out.json"
    assert serving.main(["--base-url", url, "--num-prompts", "2", "--output-len", "4", "--token", TOKEN,
                         "--result-json", str(out), "--tokenizer", str(tmp_path), "--no-progress"]) == 0
    record = json.loads(out.read_text())
    assert "by_tag" not in record["points"][0] and "structured" not in record["config"]
    assert all("response_format" not in b and "tools" not in b for b in app[BODIES])


def test_bench_tools_on_chat(fake, tmp_path):
    url, app = fake
    tools_file = tmp_path / "t.json"
    tools_file.write_text(json.dumps({"tools": TOOLS}))
    out = tmp_path / "out.json"
    assert serving.main(["--base-url", url, "--num-prompts", "2", "--output-len", "4", "--token", TOKEN,
                         "--tools", str(tools_file), "--result-json", str(out), "--tokenizer", str(tmp_path),
                         "--no-progress"]) == 0
    m = json.loads(out.read_text())["points"][0]["metrics"]
    assert m["completed"] == 2 and m["total_output"] == 24 and m["ttft"]["median"] is not None
    assert m["itl"]["num_samples"] == 4
    assert all(b["tool_choice"] == "required" for b in app[BODIES])


@pytest.mark.parametrize("extra", [
    ["--tools", "TOOLS", "--method", "completions"],
    ["--tools", "TOOLS", "--method", "all"],
    ["--tools", "TOOLS", "--structured", "SCHEMA"],
    ["--structured-fraction", "0.5"],
    ["--structured", "SCHEMA", "--structured-fraction", "2"],
    ["--structured", "MISSING"],
])
def test_bench_bad_combinations_exit_2(tmp_path, capsys, extra):
    files = {"TOOLS": tmp_path / "t.json", "SCHEMA": tmp_path / "s.json", "MISSING": tmp_path / "nope.json"}
    files["TOOLS"].write_text(json.dumps(TOOLS))
    files["SCHEMA"].write_text(json.dumps(SCHEMA))
    argv = ["--base-url", "http://127.0.0.1:9", "--no-progress"] + [str(files.get(a, a)) for a in extra]
    assert serving.main(argv) == 2
    assert "error:" in capsys.readouterr().err


def test_structured_module_end_to_end(fake, tmp_path, capsys):
    url, app = fake
    prefix = tmp_path / "st"
    code = structured.main(["--base-url", url, "--token", TOKEN, "--runs", "2", "--concurrency", "1,2",
                            "--num-prompts", "2", "--input-len", "8", "--output-len", "4",
                            "--tools", str(SCHEMAS / "tools.json"), "--compile-tries", "2",
                            "--tokenizer", str(tmp_path), "--out", str(prefix), "--no-progress"])
    assert code == 0
    record = json.loads((tmp_path / "st.json").read_text())
    order = [(p["concurrency"], p["run"], p["variant"]) for p in record["points"]]
    assert order == [(c, r, v) for c in (1, 2) for r in (0, 1) for v in ("free", "constrained", "mixed", "tools")]
    assert set(record["summary"]) == {"c=1", "c=2"}
    row = record["summary"]["c=2"]
    assert set(row["mixed"]["by_tag"]) == {"constrained", "free"}
    assert row["constrained_over_free_tok_s"] is not None and row["mixed_free_tpot_over_free_tpot"] is not None
    assert set(row["meets"]) == set(structured.TARGETS)
    assert record["compile"]["tries"] == 2 and len(record["compile"]["cold_ttft_ms"]) == 2
    assert record["config"]["model"] == "fake-model" and "token" not in record["config"]
    md = (tmp_path / "st.md").read_text()
    assert "constrained / free" in md and "Grammar compile" in md and "mixed: free" in md
    chat = [b for b in app[BODIES] if "messages" in b]
    cold = [b["response_format"]["json_schema"]["schema"]["description"] for b in chat
            if "response_format" in b and "cold probe" in b["response_format"]["json_schema"]["schema"].get(
                "description", "")]
    assert len(cold) == 4 and len(set(cold)) == 2          # each probe schema sent twice (cold, cached)
    prompts = [b["messages"][-1]["content"] for b in chat]
    assert len(prompts) == len(set(prompts))               # fresh prompts: no prefix-cache advantage
    assert "wrote" in capsys.readouterr().out
