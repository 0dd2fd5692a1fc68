"""Request-side checks of tools / tool_choice / response_format (HTTP 400 material)."""

import pytest

from squish.tools import spec, validate
from squish.tools.errors import ToolRequestError

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_parse_tools_ok_and_defaults():
    tools = spec.parse_tools([WEATHER, {"type": "function", "function": {"name": "now"}}])
    assert [t.name for t in tools] == ["get_weather", "now"]
    assert tools[1].parameters == {"type": "object", "properties": {}}
    assert tools[0].openai()["function"]["description"] == "Weather for a city"


@pytest.mark.parametrize("tool, needle", [
    ({"type": "retrieval"}, "type must be 'function'"),
    ({"type": "function"}, "function is required"),
    ({"type": "function", "function": {"name": "bad name"}}, "function.name"),
    ({"type": "function", "function": {"name": "f", "parameters": {"type": "objectx"}}}, "not a valid JSON Schema"),
    ({"type": "function", "function": {"name": "f", "parameters": {"properties": {"a": {"minimum": "x"}}}}},
     "properties/a/minimum"),
    ({"type": "function", "function": {"name": "f", "parameters": []}}, "must be a JSON Schema object"),
])
def test_parse_tools_rejects(tool, needle):
    with pytest.raises(ToolRequestError, match=needle) as ei:
        spec.parse_tools([tool])
    assert ei.value.status == 400 and ei.value.exit_code == 1


def test_duplicate_tool_names_rejected():
    with pytest.raises(ToolRequestError, match="duplicate"):
        spec.parse_tools([WEATHER, WEATHER])


def test_tool_choice_forms():
    tools = spec.parse_tools([WEATHER])
    assert spec.parse_tool_choice(None, tools).mode == "auto"
    assert spec.parse_tool_choice(None, []).mode == "none"
    assert spec.parse_tool_choice("required", tools).mode == "required"
    assert spec.parse_tool_choice("none", tools).mode == "none"
    named = spec.parse_tool_choice({"type": "function", "function": {"name": "get_weather"}}, tools)
    assert (named.mode, named.name) == ("function", "get_weather")


@pytest.mark.parametrize("choice, needle", [
    ({"type": "function", "function": {"name": "nope"}}, "not in tools"),
    ("sometimes", "must be 'none'"),
    ({"type": "function"}, "tool_choice object"),
])
def test_tool_choice_rejects(choice, needle):
    with pytest.raises(ToolRequestError, match=needle) as ei:
        spec.parse_tool_choice(choice, spec.parse_tools([WEATHER]))
    assert ei.value.param == "tool_choice"


def test_required_without_tools_rejected():
    with pytest.raises(ToolRequestError, match="needs a non-empty"):
        spec.parse_tool_choice("required", [])


def test_response_format():
    assert spec.parse_response_format(None) is None
    assert spec.parse_response_format({"type": "text"}) is None
    assert spec.parse_response_format({"type": "json_object"}).schema is None
    fmt = spec.parse_response_format({"type": "json_schema", "json_schema": {
        "name": "cat", "strict": True, "schema": {"type": "object"}}})
    assert (fmt.kind, fmt.name, fmt.strict) == ("json_schema", "cat", True)


@pytest.mark.parametrize("fmt, needle", [
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "schema is required"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}, "not a valid JSON Schema"),
    ({"type": "json_schema"}, "json_schema is required"),
    ({"type": "yaml"}, "response_format.type"),
])
def test_response_format_rejects(fmt, needle):
    with pytest.raises(ToolRequestError, match=needle):
        spec.parse_response_format(fmt)


def test_validate_json_output_strict():
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    assert validate.check_json_output('{"n": 3}', schema) == ({"n": 3}, None)
    assert validate.check_json_output('{"n": NaN}', schema)[1][0] == validate.PARSE
    assert validate.check_json_output('{"n": Infinity}', None)[1][0] == validate.PARSE
    _, err = validate.check_json_output('{"n": "3"}', schema)
    assert err[0] == validate.SCHEMA and "$.n" in err[1]
    assert validate.check_json_output("[1]", None)[1][0] == validate.SCHEMA
