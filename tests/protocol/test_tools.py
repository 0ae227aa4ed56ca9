import copy
import re

import orjson
import pytest

from protocol.errors import ProtocolError
from protocol.tools import (FALLBACK_PROMPT, MAX_TOOLS, TOOL_CALL_CLOSE, TOOL_CALL_OPEN, ContentDelta,
                            ToolCallArgs, ToolCallParser, ToolCallStart, fallback_messages, parse_tool_calls,
                            parse_tools, render_tool_call, template_messages, tool_prompt_tools)
from protocol.types import ToolFunction, ToolSpec

NAMES = ("get_weather", "run", "noargs")
CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": CITY}}
RUN = {"type": "function", "function": {"name": "run", "strict": True}}
ID_RE = re.compile(r"call_[0-9a-f]{24}")


# --- parse_tools -----------------------------------------------------------------------------

def test_parse_tools_defaults_and_shapes():
    spec = parse_tools({"tools": [WEATHER, RUN]}, 1)
    assert spec == ToolSpec((ToolFunction("get_weather", "Weather of a city", WEATHER["function"]["parameters"]),
                             ToolFunction("run", "", {"type": "object"}, strict=True)), "auto", None, True)
    assert parse_tools({"tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False}, 1) == \
        ToolSpec(spec.tools[:1], "required", None, False)
    named = parse_tools({"tools": [WEATHER, RUN], "tool_choice": {"type": "function", "function": {"name": "run"}}}, 1)
    assert (named.choice, named.name) == ("named", "run")
    assert parse_tools({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, 1) \
        .tools[0].parameters == {"type": "object"}


@pytest.mark.parametrize("body", [
    {}, {"tools": None}, {"tools": []}, {"tool_choice": "none"}, {"tool_choice": "auto"},
    {"tools": [], "tool_choice": "auto"},
    {"tools": [WEATHER], "tool_choice": "none"}, {"tools": [WEATHER], "tool_choice": "none", "n": 3},
    {"functions": [], "function_call": None},
])
def test_no_tools_gives_none(body):
    assert parse_tools(body, body.get("n", 1)) is None


@pytest.mark.parametrize("body,n,param,words", [
    ({"tools": "x"}, 1, "tools", "list"),
    ({"tools": [{"type": "custom", "custom": {"name": "f"}}]}, 1, "tools", "function"),
    ({"tools": [{"type": "function"}]}, 1, "tools", "function"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, 1, "tools", "name"),
    ({"tools": [{"type": "function", "function": {"name": "f" * 65}}]}, 1, "tools", "name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "description": 1}}]}, 1, "tools", "description"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}, 1, "tools", "parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, 1, "tools",
     "parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "strict": "yes"}}]}, 1, "tools", "strict"),
    ({"tools": [WEATHER, WEATHER]}, 1, "tools", "unique"),
    ({"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(MAX_TOOLS + 1)]}, 1, "tools",
     str(MAX_TOOLS)),
    ({"tool_choice": "required"}, 1, "tool_choice", "tools"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, 1, "tool_choice", "tools"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, 1, "tool_choice", "required"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, 1, "tool_choice",
     "not in tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function"}}, 1, "tool_choice", "name"),
    ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, 1, "parallel_tool_calls", "boolean"),
    ({"tools": [WEATHER]}, 2, "n", "several choices"),
    ({"functions": [{"name": "f"}]}, 1, "functions", "use tools"),
    ({"function_call": "auto"}, 1, "function_call", "use tools"),
])
def test_parse_tools_errors(body, n, param, words):
    with pytest.raises(ProtocolError) as info:
        parse_tools(body, n)
    assert info.value.status == 400 and info.value.param == param and words in info.value.message


# --- the parser --------------------------------------------------------------------------------

def call(name: str, args: str) -> tuple[str, str]:
    return name, args


WELL_FORMED = [
    # (text, expected content, expected [(name, arguments)])
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     None, [call("get_weather", '{"city": "Paris"}')]),
    ('Sure.\n<tool_call>\n{"name": "run", "arguments": {"code": "print(\\"}</tool_call>{\\")", '
     '"n": [1, {"a": "<tool_call>"}]}}\n</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {}}\n'
     '</tool_call>\nDone.',
     "Sure.\nDone.", [call("run", '{"code": "print(\\"}</tool_call>{\\")", "n": [1, {"a": "<tool_call>"}]}'),
                      call("get_weather", "{}")]),
    ('<tool_call>{"arguments": {"city": "Oslo"}, "name": "get_weather"}</tool_call>',
     None, [call("get_weather", '{"city": "Oslo"}')]),
    ('<tool_call>\n{"name": "get_weather", "parameters": {"city": "Rome"}}\n</tool_call>',
     None, [call("get_weather", '{"city": "Rome"}')]),
    ('<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Lima\\"}"}\n</tool_call>',
     None, [call("get_weather", '{"city": "Lima"}')]),
    ('<tool_call>{"name":"noargs"}</tool_call>', None, [call("noargs", "{}")]),
    ('Let me look.  <tool_call>\n  {"name": "get_weather",\n "arguments": {"city": "N\\u00eemes"}}\n',
     "Let me look.", [call("get_weather", '{"city": "N\\u00eemes"}')]),     # unclosed at the end
    ('<tool_call>\n{"name": "run", "arguments": {"a": 1}}\n<tool_call>\n{"name": "noargs", "arguments": {}}\n'
     '</tool_call>', None, [call("run", '{"a": 1}'), call("noargs", "{}")]),  # a close tag left out
    ('<tool_call>{"name": "run", "arguments": {"a": "x"}</tool_call> ok',
     "ok", [call("run", '{"a": "x"}')]),                                    # the final brace left out
    ('<tool_call>{"name": "run", "arguments": {"a": 2}}</tool_c', None, [call("run", '{"a": 2}')]),
]

AS_TEXT = [                 # no call: the content is exactly the text
    "Plain answer, with a < b and <tool_cal and <tool_call is not a tag.\n",
    "",
    "  \n",
    'Unknown tool: <tool_call>{"name": "nope", "arguments": {}}</tool_call>',
    "Not an object: <tool_call> is how I call tools. </tool_call>",
    '<tool_call>["run", {}]</tool_call>',
    '<tool_call>{"name": "run", "arguments": [1]}</tool_call>',
    '<tool_call>{"name": "run", "arguments": "not json"}</tool_call>',
    '<tool_call>{"name": "run", "argu',                                    # cut off: never dropped
    'x <tool_call>{"name": "run"',
    '<tool_call>{"name": "run", "arguments": {"a": "</tool_call>',
    'Bad JSON: <tool_call>\n{"name": "run", "arguments": {"a": 1,}}\n</tool_call> after',
]


def splits(text: str):
    """Every split of text into 1, 2 and 3 pieces."""
    yield [text]
    for i in range(1, len(text)):
        yield [text[:i], text[i:]]
        for j in range(i + 1, len(text)):
            yield [text[:i], text[i:j], text[j:]]


def stream(pieces, names=NAMES):
    parser = ToolCallParser(names)
    events = []
    for piece in pieces:
        events += parser.feed(piece)
    events += parser.finish()
    return events, parser


def summarize(events):
    content, calls, ids = "", [], []
    for ev in events:
        if isinstance(ev, ContentDelta):
            assert ev.text
            content += ev.text
        elif isinstance(ev, ToolCallStart):
            assert ev.index == len(calls)
            calls.append([ev.name, ""])
            ids.append(ev.id)
        else:
            assert isinstance(ev, ToolCallArgs) and ev.index == len(calls) - 1 and ev.fragment
            calls[-1][1] += ev.fragment
    return content, [tuple(c) for c in calls], ids


@pytest.mark.parametrize("text,content,calls", WELL_FORMED)
def test_non_stream(text, content, calls):
    got_content, got_calls = parse_tool_calls(text, NAMES)
    assert got_content == content
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in got_calls] == calls
    for c in got_calls:
        assert ID_RE.fullmatch(c["id"]) and c["type"] == "function"
        assert isinstance(orjson.loads(c["function"]["arguments"]), dict)
    assert len({c["id"] for c in got_calls}) == len(got_calls)


@pytest.mark.parametrize("text", AS_TEXT)
def test_invalid_blocks_stay_text(text):
    assert parse_tool_calls(text, NAMES) == (text, [])


@pytest.mark.parametrize("text,content,calls", WELL_FORMED)
def test_every_split_streams_the_same_calls(text, content, calls):
    for pieces in splits(text):
        events, parser = stream(pieces)
        got_content, got_calls, ids = summarize(events)
        assert (got_content or None, got_calls) == (content, calls), pieces
        assert parser.num_calls == len(calls) and len(set(ids)) == len(ids)
        assert all(ID_RE.fullmatch(i) for i in ids)


@pytest.mark.parametrize("text", AS_TEXT[:-2])
def test_every_split_keeps_invalid_text(text):
    """Blocks that never look like a call's start; the last two begin as a call, which streams
    before it breaks (committed, see ToolCallParser)."""
    for pieces in splits(text):
        events, parser = stream(pieces)
        assert summarize(events) == (text, [], []), pieces


def test_arguments_stream_before_the_block_ends():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>'
    parser = ToolCallParser(NAMES)
    seen = []
    for i, ch in enumerate(text):
        seen += [(i, ev) for ev in parser.feed(ch)]
    assert not parser.finish()
    start = next(i for i, ev in seen if isinstance(ev, ToolCallStart))
    assert text[start] == "{" and text[:start].endswith('"arguments": ')
    fragments = [ev.fragment for i, ev in seen if isinstance(ev, ToolCallArgs)]
    assert len(fragments) > 10 and "".join(fragments) == '{"city": "Paris", "days": 3}'
    assert max(i for i, ev in seen) < text.index(TOOL_CALL_CLOSE)


def test_text_streams_at_once_but_a_possible_tag_is_held():
    parser = ToolCallParser(NAMES)
    assert parser.feed("Hello") == [ContentDelta("Hello")]
    assert parser.feed(" <tool") == []
    assert parser.feed("bar> x") == [ContentDelta(" <toolbar> x")]
    assert parser.feed("\n\n") == []
    assert parser.feed("<tool_ca") == []
    assert parser.finish() == [ContentDelta("\n\n<tool_ca")]


def test_whitespace_around_calls():
    text = "A\n\n<tool_call>{\"name\": \"noargs\"}</tool_call>\n<tool_call>{\"name\": \"noargs\"}</tool_call>\n\nB\n"
    assert parse_tool_calls(text, NAMES)[0] == "A\n\nB\n"
    assert parse_tool_calls("\n<tool_call>{\"name\": \"noargs\"}</tool_call>\n", NAMES)[0] is None


def test_a_streamed_call_cut_short_keeps_what_was_sent():
    events, _ = stream(['<tool_call>{"name": "run", "arguments": {"code": "x', "y"])
    assert summarize(events)[1] == [("run", '{"code": "xy')]
    events, _ = stream(['<tool_call>{"name": "run", "arguments": {"a": 1,', "}}</tool_call>"])
    assert summarize(events)[1] == [("run", '{"a": 1,}')]


def test_no_tool_names_means_all_text():
    text = '<tool_call>{"name": "run", "arguments": {}}</tool_call>'
    assert parse_tool_calls(text, ()) == (text, [])


def test_render_tool_call_round_trips():
    block = render_tool_call("get_weather", '{"city": "Paris"}')
    assert block == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert block.startswith(TOOL_CALL_OPEN) and block.endswith(TOOL_CALL_CLOSE)
    assert parse_tool_calls(block, NAMES)[1][0]["function"]["arguments"] == '{"city": "Paris"}'
    assert render_tool_call("run", {"a": "é"}) == '<tool_call>\n{"name": "run", "arguments": {"a": "é"}}\n</tool_call>'
    assert render_tool_call("run", "") == '<tool_call>\n{"name": "run", "arguments": {}}\n</tool_call>'


# --- prompts -----------------------------------------------------------------------------------

HISTORY = [
    {"role": "user", "content": "Weather in Paris and Oslo?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]},
    {"role": "tool", "content": "18C", "tool_call_id": "call_1"},
    {"role": "tool", "content": "9C", "tool_call_id": "call_2", "name": "get_weather"},
    {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "call_3", "type": "function", "function": {"name": "get_weather", "arguments": "not json"}}]},
]
TOOLS = (ToolFunction("get_weather", "Weather of a city", {"type": "object"}),)


def test_tool_prompt_tools():
    assert tool_prompt_tools(ToolSpec(TOOLS)) == tool_prompt_tools(TOOLS) == [
        {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                          "parameters": {"type": "object"}}}]


def test_template_messages_parse_arguments_without_touching_the_input():
    before = copy.deepcopy(HISTORY)
    out = template_messages(HISTORY)
    assert HISTORY == before
    assert [c["function"]["arguments"] for c in out[1]["tool_calls"]] == [{"city": "Paris"}, {}]
    assert out[4]["tool_calls"][0]["function"]["arguments"] == "not json"
    assert out[1]["tool_calls"][0]["id"] == "call_1" and out[2:4] == HISTORY[2:4]


def test_fallback_messages():
    out = fallback_messages([{"role": "system", "content": "Be brief."}] + HISTORY, TOOLS)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user", "assistant"]
    assert all(set(m) == {"role", "content"} for m in out)
    system = out[0]["content"]
    assert system.startswith("Be brief.\n\n# Tools\n") and "<tools>\n{\"type\": \"function\"" in system
    assert '"name": "get_weather"' in system and system.endswith(
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
    assert out[2]["content"] == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
                                 '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>')
    assert out[3]["content"] == "<tool_response>\n18C\n</tool_response>\n<tool_response>\n9C\n</tool_response>"
    assert out[4]["content"] == ('Checking.\n<tool_call>\n{"name": "get_weather", "arguments": "not json"}\n'
                                 '</tool_call>')


def test_fallback_prompt_inserted_first_or_left_out():
    out = fallback_messages([{"role": "user", "content": "hi"}], TOOLS)
    assert out[0]["role"] == "system" and out[0]["content"].startswith("# Tools")
    assert FALLBACK_PROMPT.replace("@TOOLS@", "") != out[0]["content"]
    assert fallback_messages([{"role": "user", "content": "hi"}], ()) == [{"role": "user", "content": "hi"}]
    assert fallback_messages([{"role": "system", "content": ""}], TOOLS)[0]["content"].startswith("# Tools")


def test_random_text_never_crashes_and_never_loses_text():
    import random

    atoms = ["<tool_call>", "</tool_call>", "<tool_", "</tool", "{", "}", "[", "]", '"', "\\", '"name"', '"arguments"',
             '"parameters"', ":", ",", " ", "\n", '"run"', "x", "1", '"a\\"b"', "null", '"{}"', "<", ">"]
    rng = random.Random(15)
    for _ in range(2000):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 25)))
        content, calls = parse_tool_calls(text, NAMES)
        if not calls:
            assert content == text
        assert all(isinstance(orjson.loads(c["function"]["arguments"]), dict) for c in calls)
        cut = sorted(rng.randint(0, len(text)) for _ in range(3))
        stream([text[:cut[0]], text[cut[0]:cut[1]], text[cut[1]:cut[2]], text[cut[2]:]])
