"""Constraint -> llguidance grammar text. Pure translation; the service validates and compiles it.

JSON is generated in one fixed style, json.dumps' own (", " and ": ", no other whitespace): a small
model given free whitespace can loop on newlines until max_tokens; a fixed style cannot.
Tool calls use the text format of protocol/tools.py: <tool_call> blocks around
{"name": ..., "arguments": {...}}, separated by a newline. vLLM's construction: required / named
choice is an anyOf over the tools' call schemas; auto with a strict tool lets the answer be free text
(not starting with "<") or calls whose arguments follow the strict tools' schemas.
"""
from __future__ import annotations

import json

from protocol.tools import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from protocol.types import Constraint, ToolSpec

JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT = {"type": "object"}


class GrammarSpecError(ValueError):
    """The constraint cannot be turned into a grammar (message says why)."""


def grammar_text(constraint: Constraint) -> str:
    import llguidance   # here, not at import: an engine that never compiles a grammar never needs it

    kind, spec = constraint.kind, constraint.spec
    try:
        if kind == "json":
            return llguidance.LLMatcher.grammar_from_json_schema(_schema(spec), overrides=JSON_STYLE)
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(spec)
        if kind == "choice":
            return llguidance.LLMatcher.grammar_from_lark(
                "start: " + " | ".join(json.dumps(choice, ensure_ascii=False) for choice in spec))
        if kind == "grammar":
            return llguidance.grammar_from("gbnf" if "::=" in spec else "lark", spec)
        if kind == "tools":
            return llguidance.LLMatcher.grammar_from_lark(tool_lark(spec))
    except ValueError as exc:
        raise GrammarSpecError(str(exc)) from exc
    raise GrammarSpecError(f"unknown constraint kind {kind!r}")


def _schema(spec: object) -> dict:
    if spec is True:
        return {}
    if not isinstance(spec, dict):
        raise GrammarSpecError("a JSON schema must be an object")
    return spec


def tool_lark(spec: ToolSpec) -> str:
    """The Lark grammar of an answer made of tool calls (see the module docstring)."""
    tools = [t for t in spec.tools if spec.choice != "named" or t.name == spec.name]
    if not tools:
        raise GrammarSpecError(f"tool {spec.name!r} is not in tools")
    constrain_args = spec.choice != "auto"
    calls = [{"type": "object",
              "properties": {"name": {"const": t.name},
                             "arguments": _schema(t.parameters) if constrain_args or t.strict else ANY_OBJECT},
              "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    body = json.dumps({"anyOf": calls, "x-guidance": JSON_STYLE}, ensure_ascii=False)
    lines = [f"call: {json.dumps(TOOL_CALL_OPEN + chr(10))} body {json.dumps(chr(10) + TOOL_CALL_CLOSE)}",
             f"body: %json {body}",
             'calls: call ("\\n" call)*' if spec.parallel else "calls: call"]
    if spec.choice == "auto":
        # free text must not start with "<" (else it could be a malformed call); empty is allowed
        lines = ["start: calls | TEXT | \"\"", "TEXT: /[^<](.|\\n)*/"] + lines
    else:
        lines = ["start: calls"] + lines
    return "\n".join(lines) + "\n"
