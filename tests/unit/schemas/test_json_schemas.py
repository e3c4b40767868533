"""The JSON Schema documents agree with the dataclasses and accept what we emit."""

from __future__ import annotations

import math
import re
import types
import typing
from dataclasses import MISSING, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

import orjson
import pytest

import tripwire.schemas
from tripwire.errors import SpanValidationError
from tripwire.schemas.events import (
    Alert,
    KillCommand,
    Scope,
    SpanEvent,
    SpanKind,
    ToolStatus,
)
from tripwire.schemas.native import (
    MAX_EMBEDDING_DIMS,
    MAX_ID_CHARS,
    MAX_TOKENS_PER_SPAN,
    decode_native,
    encode_native,
)
from tripwire.schemas.textcode import MAX_WIRE_CHARS
from tripwire.streams.embedder import TextEmbedder

CODE = TextEmbedder().wire_code("Let me search the quarterly report for Q3 revenue.")
assert CODE is not None

SCHEMA_DIR = Path(tripwire.schemas.__file__).parent / "jsonschema"
DRAFT = "https://json-schema.org/draft/2020-12/schema"

# Keywords the validator below understands; a schema using any other keyword
# would be checked only partly, so the test refuses it.
KNOWN_KEYWORDS = {
    "$schema",
    "$id",
    "title",
    "description",
    "default",
    "type",
    "enum",
    "required",
    "properties",
    "additionalProperties",
    "items",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "minLength",
    "maxLength",
    "maxItems",
    "maxProperties",
    "pattern",
    "anyOf",
    "format",
}
RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:[Zz]|[+-]\d{2}:\d{2})"
)

# Representations the span decoder accepts on top of the dataclass type.
EXTRA_SPAN_TYPES = {
    "start_time": {"string"},
    "end_time": {"string"},
    "session_id": {"null"},
}
# Fields the span decoder fills in when they are missing.
DEFAULTED_SPAN_FIELDS = {"session_id"}


def load(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = orjson.loads(
        (SCHEMA_DIR / f"{name}.schema.json").read_bytes()
    )
    return schema


def json_type_matches(value: Any, json_type: str) -> bool:
    """Tell whether a decoded JSON value has the given JSON Schema type."""
    if json_type == "null":
        return value is None
    if json_type == "boolean":
        return isinstance(value, bool)
    if json_type == "integer":
        return type(value) is int or (type(value) is float and value.is_integer())
    if json_type == "number":
        return type(value) in (int, float)
    if json_type == "string":
        return isinstance(value, str)
    if json_type == "array":
        return isinstance(value, list)
    if json_type == "object":
        return isinstance(value, dict)
    raise AssertionError(f"unknown JSON type {json_type!r}")


def validate(value: Any, schema: dict[str, Any], path: str = "$") -> list[str]:
    """Validate against the JSON Schema subset in KNOWN_KEYWORDS; list problems."""
    problems: list[str] = []
    unknown = set(schema) - KNOWN_KEYWORDS
    assert not unknown, f"{path}: keywords the test validator cannot check: {unknown}"

    types_ = schema.get("type")
    if types_ is not None:
        allowed = [types_] if isinstance(types_, str) else types_
        if not any(json_type_matches(value, t) for t in allowed):
            return [f"{path}: {value!r} is not of type {allowed}"]
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{path}: {value!r} not in {schema['enum']}")
    if "anyOf" in schema:
        branches = [validate(value, branch, path) for branch in schema["anyOf"]]
        if all(branches):
            problems.append(f"{path}: no anyOf branch matches {value!r}")

    if type(value) in (int, float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            problems.append(f"{path}: {value} < minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            problems.append(f"{path}: {value} > maximum {schema['maximum']}")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            problems.append(f"{path}: {value} <= {schema['exclusiveMinimum']}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            problems.append(f"{path}: shorter than {schema['minLength']}")
        if len(value) > schema.get("maxLength", math.inf):
            problems.append(f"{path}: longer than {schema['maxLength']}")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            problems.append(f"{path}: {value!r} does not match {schema['pattern']}")
        if schema.get("format") == "date-time" and not RFC3339.fullmatch(value):
            problems.append(f"{path}: {value!r} is not an RFC 3339 date-time")
    if isinstance(value, list):
        if len(value) > schema.get("maxItems", math.inf):
            problems.append(f"{path}: more than {schema['maxItems']} items")
        if "items" in schema:
            for index, item in enumerate(value):
                problems += validate(item, schema["items"], f"{path}[{index}]")
    if isinstance(value, dict):
        problems += [
            f"{path}: missing required {name!r}"
            for name in schema.get("required", [])
            if name not in value
        ]
        if len(value) > schema.get("maxProperties", math.inf):
            problems.append(f"{path}: more than {schema['maxProperties']} properties")
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in properties:
                problems += validate(item, properties[key], f"{path}.{key}")
            elif extra is False:
                problems.append(f"{path}: unexpected property {key!r}")
            elif isinstance(extra, dict):
                problems += validate(item, extra, f"{path}.{key}")
    return problems


def expected_types(annotation: Any) -> tuple[set[str], type[StrEnum] | None]:
    """Return the JSON types of a dataclass annotation, and its enum if any."""
    json_types: set[str] = set()
    enum: type[StrEnum] | None = None
    members = (
        typing.get_args(annotation)
        if isinstance(annotation, types.UnionType)
        else (annotation,)
    )
    for member in members:
        origin = typing.get_origin(member) or member
        if member is type(None):
            json_types.add("null")
        elif isinstance(origin, type) and issubclass(origin, StrEnum):
            json_types.add("string")
            enum = origin
        elif origin is str:
            json_types.add("string")
        elif origin is bool:
            json_types.add("boolean")
        elif origin is int:
            json_types.add("integer")
        elif origin is float:
            json_types.add("number")
        elif origin is list:
            json_types.add("array")
        elif origin is dict:
            json_types.add("object")
        else:
            raise AssertionError(f"no JSON type for {member!r}")
    return json_types, enum


@pytest.mark.parametrize(
    ("name", "cls", "extra_types", "defaulted"),
    [
        ("span", SpanEvent, EXTRA_SPAN_TYPES, DEFAULTED_SPAN_FIELDS),
        ("kill_command", KillCommand, {}, set()),
        ("alert", Alert, {}, set()),
    ],
)
def test_schema_matches_dataclass(
    name: str,
    cls: type,
    extra_types: dict[str, set[str]],
    defaulted: set[str],
) -> None:
    schema = load(name)
    hints = typing.get_type_hints(cls)
    specs = fields(cls)

    assert schema["$schema"] == DRAFT
    assert schema["type"] == "object"
    assert set(schema["properties"]) == {spec.name for spec in specs}
    required = {
        spec.name
        for spec in specs
        if spec.default is MISSING and spec.default_factory is MISSING
    }
    assert set(schema["required"]) == required - defaulted
    for spec in specs:
        prop = schema["properties"][spec.name]
        declared = prop["type"]
        declared = {declared} if isinstance(declared, str) else set(declared)
        json_types, enum = expected_types(hints[spec.name])
        assert declared == json_types | extra_types.get(spec.name, set()), spec.name
        if enum is not None:
            values = {member.value for member in enum}
            if "null" in json_types:
                values.add(None)  # type: ignore[arg-type]
            assert set(prop["enum"]) == values, spec.name
        if spec.default is not MISSING and spec.default is not None:
            assert prop.get("default") == spec.default, spec.name


def test_span_schema_limits_match_decoder_constants() -> None:
    props = load("span")["properties"]

    assert props["input_tokens"]["maximum"] == MAX_TOKENS_PER_SPAN
    assert props["span_id"]["maxLength"] == MAX_ID_CHARS
    assert props["embedding"]["maxItems"] == MAX_EMBEDDING_DIMS
    assert props["output_code"]["maxLength"] == MAX_WIRE_CHARS


def full_span() -> SpanEvent:
    return SpanEvent(
        span_id="s1",
        trace_id="t1",
        session_id="sess",
        kind=SpanKind.TOOL,
        start_time=1_714_564_800.0,
        end_time=1_714_564_801.0,
        parent_span_id="p1",
        user_id="u1",
        agent_name="planner",
        model="gpt-4o",
        provider="openai",
        input_tokens=900,
        output_tokens=50,
        cache_read_tokens=400,
        cache_creation_tokens=100,
        cost_usd=0.0125,
        tool_name="search",
        tool_args_hash="0123456789abcdef0123456789abcdef",
        tool_status=ToolStatus.OK,
        finish_reason="tool_calls",
        depth=1,
        output_text="text",
        output_code=CODE,
        embedding=[0.5, 1.0],
        outcome="success",
        attributes={"team": "growth"},
    )


GOOD_SPANS: list[dict[str, Any]] = [
    {"span_id": "a", "trace_id": "b", "kind": "llm", "start_time": 1, "end_time": 2},
    {
        "span_id": "a",
        "trace_id": "b",
        "kind": "agent",
        "start_time": "2025-01-31T12:00:00.5Z",
        "end_time": 1_738_324_801_000_000_000,
        "session_id": None,
        "future_field": {"ignored": True},
    },
    {
        "span_id": "a",
        "trace_id": "b",
        "kind": "llm",
        "start_time": 1,
        "end_time": 2,
        "output_code": CODE,
    },
]
BAD_SPANS: list[tuple[dict[str, Any], str]] = [
    ({"trace_id": "b", "kind": "llm", "start_time": 1, "end_time": 2}, "span_id"),
    (
        {"span_id": "a", "trace_id": "b", "kind": "x", "start_time": 1, "end_time": 2},
        "kind",
    ),
    (
        {
            "span_id": "a",
            "trace_id": "b",
            "kind": "llm",
            "start_time": 1,
            "end_time": 2,
            "input_tokens": -1,
        },
        "input_tokens",
    ),
    (
        {
            "span_id": "a",
            "trace_id": "b",
            "kind": "llm",
            "start_time": 1_714_564_800_123,
            "end_time": 2,
        },
        "start_time",
    ),
    (
        {
            "span_id": "a",
            "trace_id": "b",
            "kind": "tool",
            "start_time": 1,
            "end_time": 2,
            "tool_status": "timeout",
        },
        "tool_status",
    ),
    (
        {
            "span_id": "a",
            "trace_id": "b",
            "kind": "llm",
            "start_time": 1,
            "end_time": 2,
            "output_tokens": True,
        },
        "output_tokens",
    ),
    (
        {
            "span_id": "a",
            "trace_id": "b",
            "kind": "llm",
            "start_time": "2025-01-31T12:00:00",
            "end_time": 2,
        },
        "start_time",
    ),
    (
        {
            "span_id": "a",
            "trace_id": "b",
            "kind": "llm",
            "start_time": 1,
            "end_time": 2,
            "output_code": "t2:" + CODE[3:],
        },
        "output_code",
    ),
    (
        {
            "span_id": "a",
            "trace_id": "b",
            "kind": "llm",
            "start_time": 1,
            "end_time": 2,
            "output_code": "t1:not-base64!",
        },
        "output_code",
    ),
]


def test_encoded_spans_validate() -> None:
    schema = load("span")

    for raw in (
        encode_native(full_span()),
        encode_native(full_span(), include_text=True),
    ):
        assert validate(orjson.loads(raw), schema) == []


@pytest.mark.parametrize("good", GOOD_SPANS)
def test_good_span_examples_pass_schema_and_decoder(good: dict[str, Any]) -> None:
    assert validate(good, load("span")) == []
    assert decode_native(good).span_id == "a"


@pytest.mark.parametrize(("bad", "field"), BAD_SPANS)
def test_bad_span_examples_fail_schema_and_decoder(
    bad: dict[str, Any], field: str
) -> None:
    problems = validate(bad, load("span"))

    assert problems
    assert any(field in problem for problem in problems)
    with pytest.raises(SpanValidationError) as info:
        decode_native(bad)
    assert info.value.field == field


def test_kill_command_json_validates() -> None:
    command = KillCommand.create(
        Scope.SESSION,
        "sess-1",
        "session_cost_budget",
        "spent $5.20 of a $5.00 budget",
        1_714_564_800.0,
        session_id="sess-1",
        evidence={"cost_usd": 5.2},
    )
    schema = load("kill_command")

    assert validate(orjson.loads(command.to_json()), schema) == []
    broken = orjson.loads(command.to_json())
    broken["scope"] = "galaxy"
    del broken["issued_at"]
    problems = validate(broken, schema)
    assert any("scope" in p for p in problems)
    assert any("issued_at" in p for p in problems)


def test_alert_json_validates() -> None:
    alert = Alert.create(
        Scope.FLEET,
        "tool:web_search",
        "tool_failure_rate",
        "warning",
        "web_search failed 40% of calls in 5 minutes",
        1_714_564_800.0,
        dedupe_key="1714564500",
        evidence={"failure_rate": 0.4},
    )
    schema = load("alert")

    assert validate(orjson.loads(alert.to_json()), schema) == []
    broken = orjson.loads(alert.to_json())
    broken["at"] = "now"
    assert any("$.at" in p for p in validate(broken, schema))
