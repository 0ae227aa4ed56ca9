import orjson
import pytest

from protocol.constraints import MAX_CHOICES, MAX_SPEC_BYTES, parse_constraint
from protocol.errors import ProtocolError
from protocol.types import Constraint

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def error_of(body: dict) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse_constraint(body)
    assert info.value.status == 400
    return info.value


@pytest.mark.parametrize("body,expected", [
    ({}, None),
    ({"response_format": None}, None),
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": {"type": "json_object"}}, Constraint("json", {"type": "object"})),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "city-Info_1", "schema": SCHEMA,
                                                                 "strict": True, "description": "d"}}},
     Constraint("json", SCHEMA)),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, Constraint("json", {"type": "object"})),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": True}}}, Constraint("json", {})),
    ({"structured_outputs": {"json": SCHEMA}}, Constraint("json", SCHEMA)),
    ({"structured_outputs": {"json": orjson.dumps(SCHEMA).decode()}}, Constraint("json", SCHEMA)),
    ({"structured_outputs": {"regex": r"\d+"}}, Constraint("regex", r"\d+")),
    ({"structured_outputs": {"choice": ["yes", "no"]}}, Constraint("choice", ("yes", "no"))),
    ({"structured_outputs": {"grammar": 'start: "a"'}}, Constraint("grammar", 'start: "a"')),
    ({"structured_outputs": {"json_object": True}}, Constraint("json", {"type": "object"})),
    ({"structured_outputs": {"choice": ["a"], "backend": "guidance", "regex": None, "disable_fallback": False}},
     Constraint("choice", ("a",))),
    ({"guided_json": SCHEMA, "guided_decoding_backend": "xgrammar"}, Constraint("json", SCHEMA)),
    ({"guided_json": orjson.dumps(SCHEMA).decode()}, Constraint("json", SCHEMA)),
    ({"guided_regex": "[a-z]+"}, Constraint("regex", "[a-z]+")),
    ({"guided_choice": ["x", "y"]}, Constraint("choice", ("x", "y"))),
    ({"guided_grammar": "root ::= \"a\""}, Constraint("grammar", "root ::= \"a\"")),
    ({"response_format": {"type": "text"}, "guided_regex": "a"}, Constraint("regex", "a")),
])
def test_accepted_forms(body, expected):
    assert parse_constraint(body) == expected


@pytest.mark.parametrize("body,param", [
    ({"response_format": "json"}, "response_format"),
    ({"response_format": {}}, "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": SCHEMA}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x" * 65}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": 3}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": False}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": [1]}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": "{}"}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"strict": "yes"}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"description": 1}}}, "response_format"),
    ({"structured_outputs": "json"}, "structured_outputs"),
    ({"structured_outputs": {}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json"),
    ({"structured_outputs": {"json": "[1]"}}, "structured_outputs.json"),
    ({"structured_outputs": {"json": 5}}, "structured_outputs.json"),
    ({"structured_outputs": {"regex": ""}}, "structured_outputs.regex"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ({"structured_outputs": {"choice": ["a", ""]}}, "structured_outputs.choice"),
    ({"structured_outputs": {"choice": "a"}}, "structured_outputs.choice"),
    ({"structured_outputs": {"grammar": 3}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"json_object": False}}, "structured_outputs.json_object"),
    ({"structured_outputs": {"regex": "a", "structural_tag": "{}"}}, "structured_outputs.structural_tag"),
    ({"structured_outputs": {"regex": "a", "whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern"),
    ({"structured_outputs": {"regex": "a", "disable_any_whitespace": True}},
     "structured_outputs.disable_any_whitespace"),
    ({"structured_outputs": {"regex": "a", "frobnicate": 1}}, "structured_outputs.frobnicate"),
    ({"structured_outputs": {"regex": "a", "backend": 1}}, "structured_outputs.backend"),
    ({"guided_json": [1]}, "guided_json"),
    ({"guided_choice": [1, 2]}, "guided_choice"),
    ({"guided_regex": 5}, "guided_regex"),
    ({"guided_grammar": ""}, "guided_grammar"),
    ({"guided_regex": "a", "guided_decoding_backend": 3}, "guided_decoding_backend"),
    ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern"),
])
def test_errors_name_the_field(body, param):
    err = error_of(body)
    assert err.param == param and param in err.message


@pytest.mark.parametrize("body,second", [
    ({"response_format": {"type": "json_object"}, "guided_json": SCHEMA}, "guided_json"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a"}, "guided_choice": ["a"]}, "guided_choice"),
    ({"guided_regex": "a", "guided_grammar": "g"}, "guided_grammar"),
])
def test_only_one_constraint(body, second):
    err = error_of(body)
    assert err.param == second and "only one structured-output constraint per request" in err.message


def test_size_caps():
    big = {"type": "object", "description": "x" * MAX_SPEC_BYTES}
    assert error_of({"guided_json": big}).param == "guided_json"
    assert error_of({"response_format": {"type": "json_schema", "json_schema": {"schema": big}}}).param == \
        "response_format"
    assert error_of({"guided_regex": "a" * (MAX_SPEC_BYTES + 1)}).param == "guided_regex"
    assert error_of({"structured_outputs": {"grammar": "é" * (MAX_SPEC_BYTES // 2 + 1)}}).param == \
        "structured_outputs.grammar"
    assert error_of({"guided_choice": ["a"] * (MAX_CHOICES + 1)}).param == "guided_choice"
    assert parse_constraint({"guided_choice": ["a"] * MAX_CHOICES}).kind == "choice"
    assert parse_constraint({"guided_regex": "a" * MAX_SPEC_BYTES}).kind == "regex"


def test_too_deep_schema_is_a_400_not_a_crash():
    schema: dict = {}
    for _ in range(300):
        schema = {"items": schema}
    assert error_of({"guided_json": schema}).param == "guided_json"


def test_eas_and_websocket_carry_response_format():
    from protocol.eas import parse_eas_request
    from protocol.ws import SessionState, SetSystemPrompt, parse_ws_message

    body = orjson.dumps({"prompt": "Give JSON", "response_format": {"type": "json_object"}, "guided_regex": "x"})
    parsed = parse_eas_request(body, "application/json", "r")
    assert parsed.request.constraint == Constraint("json", {"type": "object"})   # guided_* is OpenAI-only
    assert parse_eas_request(b"plain prompt", None, "r").request.constraint is None
    with pytest.raises(ProtocolError) as info:
        parse_eas_request(orjson.dumps({"prompt": "p", "response_format": {"type": "yaml"}}), None, "r")
    assert info.value.param == "response_format"
    session = SessionState()
    action = parse_ws_message(orjson.dumps({"prompt": "p", "response_format": {
        "type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}}}), session, "r")
    assert action.request.constraint == Constraint("json", SCHEMA)
    assert parse_ws_message('{"prompt": "again"}', session, "r2").request.constraint is None
    assert isinstance(parse_ws_message('{"system_prompt": "s", "response_format": {"type": "json_object"}}',
                                       session, "r3"), SetSystemPrompt)
    with pytest.raises(ProtocolError) as info:
        parse_ws_message('{"prompt": "p", "response_format": 1}', session, "r4")
    assert info.value.param == "response_format"
