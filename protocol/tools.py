"""OpenAI tool calling: the request's tools, tool prompts, and tool calls parsed out of the text.

The tool-call text format (the engine's grammar produces exactly this for tool_choice required /
named; several calls are separated by "\\n"):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Requests (parse_tools): `tools` (function tools only, at most MAX_TOOLS, unique names), `tool_choice`
("auto", the default with tools; "required"; {"type": "function", "function": {"name"}} -> "named";
"none" -> None: the tools are then NOT put in the prompt and the text is not parsed for calls, as
if no tools were sent), `parallel_tool_calls` (default true). Tools with n > 1 are a 400 (calls are
parsed per choice but not supported with several choices). The deprecated `functions` /
`function_call` are a 400 pointing at tools / tool_choice.

Prompts. A chat template that supports tools gets tool_prompt_tools() as its `tools=` argument and
template_messages() (assistant tool_calls' arguments parsed to dicts, as vLLM does). A template
without tool support gets fallback_messages(): tool results become user messages wrapped in
<tool_response>, earlier calls become assistant text in the format above, and this system prompt
(Qwen2.5 / Hermes style; one tool JSON per line) is appended to the first system message after a
blank line, or inserted as the first message:

    # Tools

    You may call one or more functions to assist with the user query.

    You are provided with function signatures within <tools></tools> XML tags:
    <tools>
    {"type": "function", "function": {"name": "get_weather", "description": "...", "parameters": {...}}}
    </tools>

    For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
    <tool_call>
    {"name": <function-name>, "arguments": <args-json-object>}
    </tool_call>

Parsing (ToolCallParser, see its docstring) accepts what real models write beyond the exact format.
"""
from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

import orjson

from protocol.constraints import MAX_SPEC_BYTES, NAME_RE, schema_size
from protocol.errors import bad_field
from protocol.sampling import as_bool
from protocol.types import ToolFunction, ToolSpec

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
TOOL_RESPONSE_OPEN = "<tool_response>"
TOOL_RESPONSE_CLOSE = "</tool_response>"
MAX_TOOLS = 128

FALLBACK_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
@TOOLS@
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call>"""


# ---------------------------------------------------------------------------------------------
# Request fields

def parse_tools(body: dict, n: int) -> ToolSpec | None:
    """tools / tool_choice / parallel_tool_calls -> ToolSpec, or None (no tools, or tool_choice none)."""
    for field in ("functions", "function_call"):
        if body.get(field):
            raise bad_field(field, "is deprecated and not supported; use tools and tool_choice")
    tools = _tools(body.get("tools"))
    parallel = body.get("parallel_tool_calls")
    parallel = True if parallel is None else as_bool("parallel_tool_calls", parallel)
    choice = body.get("tool_choice")
    if not tools:
        if choice not in (None, "none", "auto"):
            raise bad_field("tool_choice", "needs a non-empty tools list")
        return None
    mode, name = _choice(choice, tools)
    if mode == "none":
        return None
    if n > 1:
        raise bad_field("n", "tool calls with several choices are not supported; use n=1 with tools")
    return ToolSpec(tools, mode, name, parallel)


def _tools(value: object) -> tuple[ToolFunction, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise bad_field("tools", "must be a list of function tools")
    if len(value) > MAX_TOOLS:
        raise bad_field("tools", f"at most {MAX_TOOLS} tools are allowed")
    tools = tuple(_tool(i, item) for i, item in enumerate(value))
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise bad_field("tools", "function names must be unique")
    return tools


def _tool(i: int, item: object) -> ToolFunction:
    where = f"tools[{i}]"
    if not isinstance(item, dict) or item.get("type") != "function" or not isinstance(item.get("function"), dict):
        raise bad_field("tools", f'{where} must be {{"type": "function", "function": {{...}}}}')
    fn = item["function"]
    name = fn.get("name")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise bad_field("tools", f"{where}.function.name must be 1 to 64 letters, digits, '_' or '-'")
    description = fn.get("description")
    if description is not None and not isinstance(description, str):
        raise bad_field("tools", f"{where}.function.description must be a string")
    parameters = fn.get("parameters")
    if parameters is None or parameters == {}:
        parameters = {"type": "object"}
    if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
        raise bad_field("tools", f'{where}.function.parameters must be a JSON schema of "type": "object"')
    if schema_size(parameters) > MAX_SPEC_BYTES:
        raise bad_field("tools", f"{where}.function.parameters exceeds {MAX_SPEC_BYTES} bytes of JSON")
    strict = fn.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise bad_field("tools", f"{where}.function.strict must be a boolean")
    return ToolFunction(name, description or "", parameters, bool(strict))


def _choice(value: object, tools: tuple[ToolFunction, ...]) -> tuple[str, str | None]:
    if value is None:
        return "auto", None
    if value in ("none", "auto", "required"):
        return value, None
    fn = value.get("function") if isinstance(value, dict) and value.get("type") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise bad_field("tool_choice", 'must be "none", "auto", "required" or '
                                       '{"type": "function", "function": {"name": <string>}}')
    if fn["name"] not in {t.name for t in tools}:
        raise bad_field("tool_choice", "names a function that is not in tools")
    return "named", fn["name"]


# ---------------------------------------------------------------------------------------------
# Prompts

def tool_prompt_tools(tools: ToolSpec | tuple[ToolFunction, ...]) -> list[dict]:
    """OpenAI-shaped tool dicts for a chat template's `tools=` argument (a ToolSpec or its tools)."""
    functions = tools.tools if isinstance(tools, ToolSpec) else tools
    return [{"type": "function", "function": {"name": t.name, "description": t.description,
                                              "parameters": t.parameters}} for t in functions]


def template_messages(messages: list[dict]) -> list[dict]:
    """Copies for a template with tool support: assistant tool_calls' arguments become dicts when
    they parse to one ("" -> {}), else stay strings."""
    out = []
    for message in messages:
        message = dict(message)
        if message.get("tool_calls"):
            calls = []
            for call in message["tool_calls"]:
                function = dict(call["function"])
                function["arguments"] = _arguments_value(function.get("arguments"))
                calls.append({**call, "function": function})
            message["tool_calls"] = calls
        out.append(message)
    return out


def fallback_messages(messages: list[dict], tools: tuple[ToolFunction, ...]) -> list[dict]:
    """Messages for a template without tool support (roles system/user/assistant only): the
    module docstring's system prompt when there are tools, calls as <tool_call> text, tool
    results as user <tool_response> text (consecutive ones in one message)."""
    out: list[dict] = []
    previous_tool = False
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "tool":
            text = f"{TOOL_RESPONSE_OPEN}\n{content}\n{TOOL_RESPONSE_CLOSE}"
            if previous_tool:
                out[-1]["content"] += "\n" + text
            else:
                out.append({"role": "user", "content": text})
        elif role == "assistant" and message.get("tool_calls"):
            parts = [content] if content else []
            parts += [render_tool_call(c["function"]["name"], c["function"].get("arguments"))
                      for c in message["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(parts)})
        else:
            out.append({"role": role, "content": content})
        previous_tool = role == "tool"
    if tools:
        prompt = tool_system_prompt(tools)
        at = next((i for i, m in enumerate(out) if m["role"] == "system"), None)
        if at is None:
            out.insert(0, {"role": "system", "content": prompt})
        else:
            system = out[at]["content"]
            out[at] = {"role": "system", "content": f"{system}\n\n{prompt}" if system else prompt}
    return out


def tool_system_prompt(tools: tuple[ToolFunction, ...]) -> str:
    lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tool_prompt_tools(tools))
    return FALLBACK_PROMPT.replace("@TOOLS@", lines)


def render_tool_call(name: str, arguments: str | dict | None) -> str:
    """One call in the tool-call text format. String arguments that parse are kept verbatim
    (the model's own text, so a later round's prompt repeats it exactly)."""
    if isinstance(arguments, str) and _parses(arguments):
        args = arguments.strip()
    elif isinstance(arguments, str) and arguments.strip():
        args = json.dumps(arguments, ensure_ascii=False)
    else:
        args = json.dumps(arguments or {}, ensure_ascii=False)
    body = f'{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": {args}}}'
    return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


def _arguments_value(arguments: object) -> object:
    if not isinstance(arguments, str):
        return arguments if arguments is not None else {}
    if not arguments.strip():
        return {}
    try:
        value = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return arguments
    return value if isinstance(value, dict) else arguments


def _parses(text: str) -> bool:
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Parsing generated text

@dataclass(frozen=True, slots=True)
class ContentDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class ToolCallArgs:
    index: int
    fragment: str


ToolEvent = ContentDelta | ToolCallStart | ToolCallArgs

_WS = " \t\r\n"
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_HEADER = ('"name"', ":", None, ",", '"arguments"', ":", "{")     # None: the name string
MAX_HEADER = 1024       # chars after "{" within which the streamed header must be recognised


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


class ToolCallParser:
    """Incremental: feed(text) -> events, finish() -> the last events. Pure and per choice.

    Text outside blocks streams out as ContentDelta at once, except a tail that may begin
    "<tool_call>" and trailing whitespace (held until resolved). Whitespace around valid blocks
    is dropped, except that text on both sides of calls stays apart by the whitespace that came
    before the first of those calls; all else is kept byte for byte (with no calls, the content
    is exactly the text).

    A block is "<tool_call>", one JSON object, then "</tool_call>" or the end of the text; a
    missing close tag is also accepted when other text follows the object. Strings are tracked,
    so "</tool_call>" or braces inside them do not end anything.
    - Streamed (fast path): once the block begins {"name": "<known tool>", "arguments": { the
      call starts (ToolCallStart) and the arguments' raw JSON streams as ToolCallArgs until its
      closing brace. Such a call is committed: if the text then breaks off (max_tokens) or the
      arguments turn out malformed, it keeps the arguments streamed so far, as OpenAI and vLLM do.
    - Buffered: any other shape (arguments before name, arguments as a JSON string holding an
      object, "parameters" instead of "arguments", no arguments -> "{}") is resolved when the
      block ends: ToolCallStart + one ToolCallArgs with the whole arguments JSON. A block that is
      not a JSON object naming a known tool is ContentDelta again, verbatim.
    A block that ends within the text already fed is always resolved whole, so parse_tool_calls
    (one finish(text)) is strict; for well-formed blocks the streamed fragments concatenate to
    exactly its arguments. A block whose outer object is broken (a missing final brace) but whose
    name and complete arguments object came first is accepted both ways.
    """

    def __init__(self, tool_names: Iterable[str]) -> None:
        self._names = frozenset(tool_names)
        self._pending = ""
        self._block: _Block | None = None
        self._after_block = False
        self._emitted = False           # some content was sent
        self._sep: str | None = None    # whitespace before the calls after that content
        self.num_calls = 0

    def feed(self, text: str) -> list[ToolEvent]:
        self._add(text)
        return self._run(final=False)

    def finish(self, text: str = "") -> list[ToolEvent]:
        """The last events, after the last text (finish(whole_text) parses a whole answer)."""
        self._add(text)
        return self._run(final=True)

    def _add(self, text: str) -> None:
        if self._block is not None:
            self._block.buf += text
        else:
            self._pending += text

    def _run(self, final: bool) -> list[ToolEvent]:
        out: list[ToolEvent] = []
        while self._text(out, final) if self._block is None else self._in_block(out, final):
            pass
        merged: list[ToolEvent] = []
        for ev in out:
            if isinstance(ev, ContentDelta) and merged and isinstance(merged[-1], ContentDelta):
                merged[-1] = ContentDelta(merged[-1].text + ev.text)
            else:
                merged.append(ev)
        return merged

    def _text(self, out: list[ToolEvent], final: bool) -> bool:
        """Text mode; True when a block opened (keep going)."""
        text = self._pending
        if self._after_block:
            text = text.lstrip()
            if not text:
                self._pending = ""
                return False
            self._after_block = False
        at = text.find(TOOL_CALL_OPEN)
        if at >= 0:
            head = text[:at].rstrip()
            self._content(out, head)
            self._block = _Block(text[len(head):at], text[at + len(TOOL_CALL_OPEN):])
            self._pending = ""
            return True
        if final:
            self._content(out, text)
            self._pending = ""
            return False
        head = text[:len(text) - _partial_tag(text, TOOL_CALL_OPEN)].rstrip()
        self._content(out, head)
        self._pending = text[len(head):]
        return False

    def _in_block(self, out: list[ToolEvent], final: bool) -> bool:
        """Block mode; True when the block ended (keep going with the text after it)."""
        block = self._block
        block.scan(final)
        if block.end is None and final:
            block.end = len(block.buf)
        if block.end is None:
            if block.call is None and block.header is None and block.obj_start is not None:
                block.header = _header(block.buf, block.obj_start, self._names)
                if block.header is None and len(block.buf) - block.obj_start > MAX_HEADER:
                    block.header = False
                if block.header:
                    self._start(out, block, block.header[0], block.header[1])
            if block.call is not None:
                block.send_args(out)
            return False
        if block.call is not None:
            block.send_args(out)
            self._after_block = True
        else:
            call = self._resolve(block)
            if call is None:
                self._content(out, block.gap + TOOL_CALL_OPEN + block.buf[:block.end])
            else:
                self._start(out, block, call[0], 0)
                out.append(ToolCallArgs(block.call, call[1]))
                self._after_block = True
        self._pending = block.buf[block.end:]
        self._block = None
        return True

    def _content(self, out: list[ToolEvent], text: str) -> None:
        if text:
            if self._sep is not None:
                text, self._sep = self._sep + text, None
            self._emitted = True
            out.append(ContentDelta(text))

    def _start(self, out: list[ToolEvent], block: _Block, name: str, args_start: int) -> None:
        if self._emitted and self._sep is None:
            self._sep = block.gap
        block.call, block.sent = self.num_calls, args_start
        self.num_calls += 1
        out.append(ToolCallStart(block.call, new_call_id(), name))

    def _resolve(self, block: _Block) -> tuple[str, str] | None:
        """(name, arguments JSON) of an ended block that did not stream, or None (it is text)."""
        if block.obj_start is None:
            return None
        header = block.header or _header(block.buf, block.obj_start, self._names)
        if header and block.inner_end is not None:
            args = block.buf[header[1]:block.inner_end]
            if _is_object(args):
                return header[0], args
        if block.obj_end is None:
            return None
        return _call_of(block.buf[block.obj_start:block.obj_end], self._names)


class _Block:
    """Scan state of one block: buf is the text after "<tool_call>"; gap the whitespace before it."""
    __slots__ = ("gap", "buf", "pos", "depth", "in_str", "esc", "obj_start", "obj_end", "inner_end",
                 "end", "header", "call", "sent")

    def __init__(self, gap: str, buf: str) -> None:
        self.gap, self.buf = gap, buf
        self.pos = self.depth = 0
        self.in_str = self.esc = False
        self.obj_start: int | None = None    # the outer "{"
        self.obj_end: int | None = None      # just after the outer "}"
        self.inner_end: int | None = None    # just after the first nested object/array
        self.end: int | None = None          # the block's text ends here (close tag included)
        self.header: tuple[str, int] | bool | None = None
        self.call: int | None = None         # index of the call once streaming
        self.sent = 0                        # buf index up to which arguments were sent

    def scan(self, final: bool) -> None:
        buf, pos = self.buf, self.pos
        while pos < len(buf) and self.end is None:
            c = buf[pos]
            if self.obj_start is None:
                if c not in _WS and c != "{":
                    self.end = pos                       # not a JSON object: the block is text
                    break
                if c == "{":
                    self.obj_start, self.depth = pos, 1
            elif self.obj_end is None:
                if self.in_str:
                    if self.esc:
                        self.esc = False
                    elif c == "\\":
                        self.esc = True
                    elif c == '"':
                        self.in_str = False
                elif c == '"':
                    self.in_str = True
                elif c in "{[":
                    self.depth += 1
                elif c in "}]":
                    self.depth -= 1
                    if self.depth == 1 and self.inner_end is None:
                        self.inner_end = pos + 1
                    elif self.depth == 0:
                        self.obj_end = pos + 1
                elif c == "<":
                    tag = buf[pos:pos + len(TOOL_CALL_CLOSE)]
                    if tag == TOOL_CALL_CLOSE:
                        self.end = pos + len(tag)         # a close tag inside the object: broken
                        break
                    if not final and len(tag) < len(TOOL_CALL_CLOSE) and TOOL_CALL_CLOSE.startswith(tag):
                        break                             # may be the close tag: wait
            elif c not in _WS:
                tag = buf[pos:pos + len(TOOL_CALL_CLOSE)]
                if tag == TOOL_CALL_CLOSE:
                    self.end = pos + len(tag)
                elif len(tag) < len(TOOL_CALL_CLOSE) and TOOL_CALL_CLOSE.startswith(tag):
                    if final:
                        self.end = len(buf)               # a close tag cut short by the end
                    break
                else:
                    self.end = pos                        # no close tag: the text resumes here
                break
            pos += 1
        self.pos = pos

    def send_args(self, out: list[ToolEvent]) -> None:
        upto = self.inner_end if self.inner_end is not None else self.pos
        if upto > self.sent:
            out.append(ToolCallArgs(self.call, self.buf[self.sent:upto]))
            self.sent = upto


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest tail of text that is a proper beginning of tag."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def _header(buf: str, start: int, names: frozenset[str]) -> tuple[str, int] | bool | None:
    """Match {"name": "<known tool>", "arguments": { from buf[start] (the outer "{"):
    (name, index of the arguments' "{"), False when it cannot match, None when it is too early."""
    i, name = start + 1, None
    for step in _HEADER:
        while i < len(buf) and buf[i] in _WS:
            i += 1
        if i == len(buf):
            return None
        if step is None:
            match = _STRING.match(buf, i)
            if match is None:
                return None if buf[i] == '"' else False
            try:
                name = orjson.loads(match.group())
            except orjson.JSONDecodeError:
                return False
            if name not in names:
                return False
            i = match.end()
            continue
        piece = buf[i:i + len(step)]
        if piece != step:
            return None if len(piece) < len(step) and step.startswith(piece) else False
        i += len(step)
    return name, i - 1


def _call_of(obj: str, names: frozenset[str]) -> tuple[str, str] | None:
    """(name, arguments JSON) of one block's object text, any accepted shape, or None."""
    try:
        value = orjson.loads(obj)
    except orjson.JSONDecodeError:
        return None
    name = value.get("name") if isinstance(value, dict) else None
    if not isinstance(name, str) or name not in names:
        return None
    key = "arguments" if "arguments" in value else "parameters"
    args = value.get(key)
    if args is None:
        return name, "{}"
    if isinstance(args, dict):
        return name, _member_text(obj, key)
    if isinstance(args, str):
        inner = args.strip()
        if not inner:
            return name, "{}"
        return (name, inner) if _is_object(inner) else None
    return None


def _is_object(text: str) -> bool:
    try:
        return isinstance(orjson.loads(text), dict)
    except orjson.JSONDecodeError:
        return False


def _member_text(obj: str, key: str) -> str:
    """Raw text of member `key` of the valid JSON object text obj (the last one, as loads keeps)."""
    found, i = "", _skip_ws(obj, 1)
    while obj[i] != "}":
        key_end = _value_end(obj, i)
        name = orjson.loads(obj[i:key_end])
        start = _skip_ws(obj, _skip_ws(obj, key_end) + 1)
        end = _value_end(obj, start)
        if name == key:
            found = obj[start:end]
        i = _skip_ws(obj, end)
        if obj[i] == ",":
            i = _skip_ws(obj, i + 1)
    return found


def _skip_ws(text: str, i: int) -> int:
    while text[i] in _WS:
        i += 1
    return i


def _value_end(text: str, i: int) -> int:
    """Index just after the JSON value starting at text[i] (text is valid JSON)."""
    if text[i] == '"':
        return _STRING.match(text, i).end()
    if text[i] not in "{[":
        while text[i] not in ",}] \t\r\n":
            i += 1
        return i
    depth, in_str, esc = 0, False, False
    while True:
        c = text[i]
        if in_str:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1


def parse_tool_calls(text: str, tool_names: Iterable[str]) -> tuple[str | None, list[dict]]:
    """The non-stream path: (content, calls), calls as OpenAI tool_calls items; content is None
    when it is empty and there are calls (with no calls it is exactly text)."""
    parser = ToolCallParser(tool_names)
    content: list[str] = []
    calls: list[dict] = []
    for ev in parser.finish(text):
        if isinstance(ev, ContentDelta):
            content.append(ev.text)
        elif isinstance(ev, ToolCallStart):
            calls.append({"id": ev.id, "type": "function", "function": {"name": ev.name, "arguments": ""}})
        else:
            calls[ev.index]["function"]["arguments"] += ev.fragment
    joined = "".join(content)
    return (joined or None) if calls else joined, calls
