"""Simulated engines under structured outputs: JSON that holds the request's schema."""

import json

import jsonschema
import pytest

from serving.engines.base import GenerateRequest
from serving.engines.sim import SimEngine
from serving.engines.sim_json import json_pieces
from serving.ingress.tools import guided_format

CITY = {"type": "function", "function": {"name": "pick_city", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["city"], "properties": {
        "city": {"enum": ["lima", "oslo"]}, "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "when": {"type": "string", "format": "date-time"}, "id": {"type": "string", "format": "uuid"}}}}}
TRIP = {"type": "function", "function": {"name": "plan_trip", "parameters": {
    "type": "object", "required": ["stops"], "properties": {
        "stops": {"type": "array", "minItems": 2, "maxItems": 4, "items": {"$ref": "#/$defs/stop"}},
        "budget": {"type": ["number", "null"], "exclusiveMinimum": 0, "exclusiveMaximum": 1},
        "note": {"type": "string", "minLength": 30, "maxLength": 40}},
    "$defs": {"stop": {"type": "object", "required": ["name", "nights"], "properties": {
        "name": {"type": "string"}, "nights": {"type": "integer", "minimum": -3, "maximum": -1},
        "ok": {"type": "boolean"}, "kind": {"oneOf": [{"const": "city"}, {"type": "null"}]}}}}}}}
TREE = {"type": "object", "required": ["kids"], "properties": {"kids": {"type": "array", "items": {"$ref": "#"}}}}
MIXED = {"allOf": [{"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
                   {"properties": {"b": {"type": "integer"}}, "required": ["b"]}]}


def _schemas():
    yield "named", guided_format((CITY,), "function", "pick_city", None)
    yield "required", guided_format((CITY, TRIP), "required", None, None)
    yield "one call", guided_format((CITY, TRIP), "required", None, False)
    for name, schema in (("trip", TRIP["function"]["parameters"]), ("all of", MIXED),
                         ("tree", {"$defs": {"t": TREE}, "$ref": "#/$defs/t"})):
        yield name, {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("name,fmt", list(_schemas()), ids=[n for n, _ in _schemas()])
def test_the_json_holds_the_schema(name, fmt, seed):
    pieces = json_pieces(fmt, seed)
    value = json.loads("".join(pieces))
    jsonschema.validate(value, fmt["json_schema"]["schema"])
    assert all(pieces) and len(pieces) > 1  # word and punctuation pieces, one token each
    assert json_pieces(fmt, seed) == pieces  # the seed decides it


def test_json_object_is_an_object_and_free_text_is_none():
    shapes = {tuple(sorted(json.loads("".join(json_pieces({"type": "json_object"}, s))))) for s in range(20)}
    assert len(shapes) > 10 and all(shapes)
    assert json_pieces(None, 1) is None and json_pieces({"type": "text"}, 1) is None


def test_a_schema_that_requires_itself_or_makes_no_sense_still_ends():
    loop = {"type": "object", "required": ["a"], "properties": {"a": {"$ref": "#"}}}
    assert json.loads("".join(json_pieces({"type": "json_schema", "json_schema": {"schema": loop}}, 3)))["a"]
    nonsense = {"type": "array", "minItems": "many"}
    assert json_pieces({"type": "json_schema", "json_schema": {"schema": nonsense}}, 3) == ["{}"]


async def test_a_sim_engine_writes_the_json_then_stops():
    eng = SimEngine("e0", model="m", kv_capacity_tokens=50_000)
    fmt = guided_format((CITY,), "function", "pick_city", None)
    want = json_pieces(fmt, 7)
    chunks = [c async for c in eng.generate(GenerateRequest("j", tuple(range(50)), max_tokens=100, model="m",
                                                            seed=7, response_format=fmt, logprobs=1))]
    assert "".join(c.text for c in chunks) == "".join(want) and chunks[-1].finish_reason == "stop"
    assert chunks[-1].completion_tokens == len(want) == sum(len(c.token_ids) for c in chunks)
    assert [lp[0] for c in chunks for lp in c.logprobs] == want  # each token's own text
    assert eng.core.idle  # the rest is not generated
    cut = [c async for c in eng.generate(GenerateRequest("k", tuple(range(50)), max_tokens=3, model="m",
                                                         seed=7, response_format=fmt))]
    assert "".join(c.text for c in cut) == "".join(want[:3]) and cut[-1].finish_reason == "length"
    await eng.close()


from hypothesis import given, settings, strategies as st  # noqa: E402

_KEYS = st.sampled_from(["type", "properties", "required", "items", "enum", "const", "anyOf", "oneOf", "allOf",
                         "$ref", "$defs", "minItems", "maxItems", "minLength", "maxLength", "minimum", "maximum",
                         "exclusiveMinimum", "exclusiveMaximum", "format", "a", "b"])
_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=False),
                    st.text(max_size=8), st.sampled_from(["object", "array", "string", "integer", "number",
                                                          "boolean", "null", "#", "#/$defs/a", "#/a/b", "uuid"]))
_SCHEMAS = st.recursive(_LEAVES, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS, inner, max_size=5),
                        max_leaves=40)


@settings(max_examples=400, deadline=None, derandomize=True)  # explored with 30,000 random ones
@given(schema=_SCHEMAS, seed=st.integers(0, 2**32))
def test_any_schema_whatever_it_holds_gives_json_and_never_raises(schema, seed):
    pieces = json_pieces({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}, seed)
    json.loads("".join(pieces))
