"""Native span records: strict decoding, encoding and JSON-lines reading."""

from __future__ import annotations

import base64
import io
import math
from dataclasses import fields
from typing import Any

import orjson
import pytest

from tripwire.errors import SpanValidationError
from tripwire.schemas.events import SpanEvent, SpanKind, ToolStatus
from tripwire.schemas.native import (
    MAX_ATTRIBUTE_VALUE_CHARS,
    MAX_ATTRIBUTES,
    MAX_EMBEDDING_DIMS,
    MAX_OUTPUT_TEXT_CHARS,
    MAX_TOKENS_PER_SPAN,
    decode_native,
    encode_native,
    iter_native_lines,
)
from tripwire.schemas.textcode import TextCode
from tripwire.streams.embedder import TextEmbedder

T0 = 1_714_564_800.25
CODE = TextEmbedder().wire_code("Looking it up in the report, then the Q3 tab.")
assert CODE is not None


def record(**overrides: Any) -> dict[str, Any]:
    """Return a valid native LLM span record with some fields replaced."""
    base: dict[str, Any] = {
        "span_id": "a1b2c3d4e5f60718",
        "trace_id": "0af7651916cd43dd8448eb211c80319c",
        "session_id": "sess-42",
        "kind": "llm",
        "start_time": T0,
        "end_time": T0 + 1.5,
        "model": "gpt-4o-mini",
        "provider": "openai",
        "input_tokens": 1200,
        "output_tokens": 300,
        "cache_read_tokens": 1000,
    }
    base.update(overrides)
    return {key: value for key, value in base.items() if value is not ...}


def rejected(data: Any, **kwargs: Any) -> SpanValidationError:
    """Decode ``data``, expecting a SpanValidationError, and return it."""
    with pytest.raises(SpanValidationError) as info:
        decode_native(data, **kwargs)
    return info.value


def full_span() -> SpanEvent:
    """Return a span with every field set to a distinct, valid value."""
    return SpanEvent(
        span_id="s1",
        trace_id="t1",
        session_id="sess",
        kind=SpanKind.TOOL,
        start_time=T0,
        end_time=T0 + 2.0,
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
        tool_status=ToolStatus.ERROR,
        finish_reason="tool_calls",
        depth=2,
        output_text="looking it up",
        output_code=CODE,
        embedding=[0.25, -0.5, 1.0],
        outcome="gave_up",
        attributes={"team": "growth", "retries": 3, "canary": True, "ratio": 0.5},
    )


def test_good_record_decodes_to_its_values() -> None:
    span = decode_native(orjson.dumps(record()))

    assert span.span_id == "a1b2c3d4e5f60718"
    assert span.session_id == "sess-42"
    assert span.kind is SpanKind.LLM
    assert (span.start_time, span.end_time) == (T0, T0 + 1.5)
    assert (span.input_tokens, span.output_tokens) == (1200, 300)
    assert (span.cache_read_tokens, span.cache_creation_tokens) == (1000, 0)
    assert span.model == "gpt-4o-mini"
    assert span.tool_status is None
    assert span.attributes == {}


def test_every_field_survives_encode_and_decode() -> None:
    span = full_span()

    decoded = decode_native(encode_native(span, include_text=True))

    assert decoded == span
    assert {f.name for f in fields(SpanEvent)} == set(
        orjson.loads(encode_native(span, include_text=True))
    )


def test_text_str_and_mapping_inputs_decode_alike() -> None:
    raw = orjson.dumps(record())

    assert decode_native(raw.decode()) == decode_native(raw)
    assert decode_native(record()) == decode_native(raw)
    assert decode_native(bytearray(raw)) == decode_native(raw)


def test_encode_leaves_text_out_unless_asked() -> None:
    span = full_span()

    plain = orjson.loads(encode_native(span))
    with_text = orjson.loads(encode_native(span, include_text=True))

    assert "output_text" not in plain
    assert plain["output_code"] == CODE
    assert with_text["output_text"] == "looking it up"
    assert plain["kind"] == "tool"
    assert plain["tool_status"] == "error"


def test_encode_omits_null_fields_and_empty_attributes() -> None:
    span = decode_native(record())

    encoded = orjson.loads(encode_native(span))

    assert "tool_name" not in encoded
    assert "attributes" not in encoded
    assert "cost_usd" not in encoded
    assert encoded["cache_creation_tokens"] == 0


@pytest.mark.parametrize("session", [..., None, ""])
def test_missing_session_defaults_to_trace_id(session: Any) -> None:
    span = decode_native(record(session_id=session))

    assert span.session_id == "0af7651916cd43dd8448eb211c80319c"


def test_unknown_fields_are_ignored() -> None:
    span = decode_native(record(schema_version=7, future={"nested": [1, 2]}))

    assert span.span_id == "a1b2c3d4e5f60718"


@pytest.mark.parametrize("field", ["span_id", "trace_id"])
@pytest.mark.parametrize("value", [..., None, ""])
def test_missing_ids_are_rejected(field: str, value: Any) -> None:
    error = rejected(record(**{field: value}))

    assert error.field == field
    assert f"{field} is missing" in error.reason


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("span_id", 12345),
        ("trace_id", ["x"]),
        ("session_id", 7),
        ("span_id", "x" * 257),
        ("parent_span_id", 3.5),
        ("user_id", True),
    ],
)
def test_ids_of_the_wrong_type_or_length_are_rejected(field: str, value: Any) -> None:
    error = rejected(record(**{field: value}))

    assert error.field == field
    assert "must be a string" in error.reason


@pytest.mark.parametrize(
    "field", ["input_tokens", "output_tokens", "cache_read_tokens"]
)
@pytest.mark.parametrize("value", [True, 12.0, "12", [12]])
def test_token_counts_must_be_integers(field: str, value: Any) -> None:
    error = rejected(record(**{field: value}))

    assert error.field == field
    assert "must be an integer" in error.reason


@pytest.mark.parametrize("value", [-1, MAX_TOKENS_PER_SPAN + 1])
def test_negative_or_absurd_token_counts_are_rejected(value: int) -> None:
    error = rejected(record(output_tokens=value))

    assert error.field == "output_tokens"
    assert f"between 0 and {MAX_TOKENS_PER_SPAN}" in error.reason
    assert str(value) in error.reason


def test_token_count_at_the_cap_is_accepted() -> None:
    span = decode_native(record(output_tokens=MAX_TOKENS_PER_SPAN))

    assert span.output_tokens == MAX_TOKENS_PER_SPAN


def test_null_token_count_reads_as_zero() -> None:
    span = decode_native(record(output_tokens=None))

    assert span.output_tokens == 0


def test_cache_tokens_exceeding_input_are_rejected() -> None:
    error = rejected(
        record(input_tokens=500, cache_read_tokens=400, cache_creation_tokens=101)
    )

    assert error.field == "input_tokens"
    assert "exceed input_tokens (500)" in error.reason
    assert "must include cached input" in error.reason


def test_end_before_start_is_rejected() -> None:
    error = rejected(record(start_time=T0, end_time=T0 - 0.001))

    assert error.field == "end_time"
    assert "before start_time" in error.reason


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1_714_564_800, 1_714_564_800.0),
        (1_714_564_800.5, 1_714_564_800.5),
        (1_714_564_800_123_456_789, 1_714_564_800.123456789),
        ("2024-05-01T12:00:00Z", 1_714_564_800.0),
        ("2024-05-01T12:00:00.5Z", 1_714_564_800.5),
        ("2024-05-01T14:00:00.123456789+02:00", 1_714_564_800.123456),
        ("2024-05-01t12:00:00z", 1_714_564_800.0),
        (0, 0.0),
    ],
)
def test_times_accept_seconds_nanoseconds_and_rfc3339(
    value: Any, expected: float
) -> None:
    span = decode_native(record(start_time=value, end_time=value))

    assert span.start_time == pytest.approx(expected, abs=1e-6)
    assert span.end_time == span.start_time


@pytest.mark.parametrize(
    "value",
    [
        1_714_564_800_123,  # milliseconds: ambiguous, rejected
        1_714_564_800_123_456,  # microseconds
        -1,
        math.inf,
        math.nan,
        True,
        "2024-05-01T12:00:00",  # no offset
        "yesterday",
        "2024-13-01T12:00:00Z",
        [T0],
    ],
)
def test_bad_times_are_rejected(value: Any) -> None:
    error = rejected(record(start_time=value, end_time=T0 + 10))

    assert error.field == "start_time"


def test_missing_time_is_rejected() -> None:
    error = rejected(record(end_time=...))

    assert error.field == "end_time"
    assert "missing" in error.reason


@pytest.mark.parametrize("kind", ["LLM", "chain", None, 3])
def test_unknown_kind_is_rejected(kind: Any) -> None:
    error = rejected(record(kind=kind))

    assert error.field == "kind"
    assert "'llm', 'tool', 'agent'" in error.reason


def test_unknown_tool_status_is_rejected() -> None:
    error = rejected(record(kind="tool", tool_status="timeout"))

    assert error.field == "tool_status"
    assert "'timeout'" in error.reason


def test_oversized_record_is_rejected_before_parsing() -> None:
    raw = orjson.dumps(record(padding="x" * 2_000))

    error = rejected(raw, max_bytes=1_000)

    assert f"{len(raw)} bytes, over the 1000-byte limit" in error.reason
    assert decode_native(raw).span_id == "a1b2c3d4e5f60718"


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object, got list"),
        (b'"span"', "must be a JSON object, got str"),
        (b'{"input_tokens": NaN}', "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
    ],
)
def test_undecodable_records_are_rejected(raw: bytes, words: str) -> None:
    assert words in rejected(raw).reason


@pytest.mark.parametrize("value", [math.nan, math.inf, -0.01, 100_001.0, "0.1", True])
def test_bad_cost_is_rejected(value: Any) -> None:
    assert rejected(record(cost_usd=value)).field == "cost_usd"


def test_integer_cost_reads_as_float() -> None:
    span = decode_native(record(cost_usd=2))

    assert span.cost_usd == 2.0
    assert type(span.cost_usd) is float


@pytest.mark.parametrize("value", [-1, 10_001, 1.5, True])
def test_bad_depth_is_rejected(value: Any) -> None:
    assert rejected(record(depth=value)).field == "depth"


@pytest.mark.parametrize("field", ["model", "provider", "tool_name", "finish_reason"])
def test_names_must_be_short_strings(field: str) -> None:
    assert rejected(record(**{field: 42})).field == field
    assert rejected(record(**{field: "m" * 257})).field == field


def test_output_text_is_truncated_not_rejected() -> None:
    span = decode_native(record(output_text="y" * (MAX_OUTPUT_TEXT_CHARS + 500)))

    assert span.output_text == "y" * MAX_OUTPUT_TEXT_CHARS


def test_output_text_must_be_a_string() -> None:
    assert rejected(record(output_text=["hi"])).field == "output_text"


def test_output_code_is_kept_as_sent() -> None:
    span = decode_native(record(output_code=CODE))

    assert span.output_code == CODE
    assert span.output_text is None


def _code_with(vector: bytes, sketch: bytes) -> str:
    return "t1:" + base64.b64encode(vector + sketch).decode()


VECTOR = bytes(range(1, 128)) + bytes(129)


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (["t1:"], "must be a string"),
        ("t2:" + CODE[3:], "must start with 't1:'"),
        ("t1:" + "A" * 400, "at most 387 characters"),
        ("t1:" + CODE[4:], "not valid base64"),
        ("t1:" + CODE[3:] + "!", "not valid base64"),
        (_code_with(VECTOR[:255], b""), "256-byte vector"),
        (_code_with(VECTOR, b"\x01"), "2 bytes per sketch hash"),
        (_code_with(VECTOR, b"\x00" * 34), "at most 387 characters"),
        (_code_with(bytes(256), b""), "all-zero vector"),
        (_code_with(VECTOR, b"\x02\x00\x01\x00"), "strictly ascending"),
        (_code_with(VECTOR, b"\x02\x00\x02\x00"), "strictly ascending"),
    ],
)
def test_malformed_output_codes_are_rejected(value: Any, words: str) -> None:
    error = rejected(record(output_code=value))

    assert error.field == "output_code"
    assert words in error.reason


def test_output_code_of_any_sketch_length_round_trips() -> None:
    for size in range(17):
        sketch = tuple(range(10, 10 + 3 * size, 3))
        code = TextCode(VECTOR, sketch)

        assert decode_native(record(output_code=code.to_wire())).output_code
        assert TextCode.from_wire(code.to_wire()) == code


def test_embedding_integers_become_floats_and_empty_is_none() -> None:
    assert decode_native(record(embedding=[1, 0.5, 0])).embedding == [1.0, 0.5, 0.0]
    assert decode_native(record(embedding=[])).embedding is None


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ({"x": 1}, "must be a list"),
        ([0.1, "0.2"], "only numbers"),
        ([0.1, True], "only numbers"),
        ([0.1, None], "only numbers"),
        ([0.1, math.nan], "finite"),
        ([math.inf], "finite"),
        ([1e308, 1e308], "finite"),
        ([10**400], "finite"),
        ([0.0] * (MAX_EMBEDDING_DIMS + 1), "over the 4096 limit"),
    ],
)
def test_bad_embeddings_are_rejected(value: Any, words: str) -> None:
    error = rejected(record(embedding=value))

    assert error.field == "embedding"
    assert words in error.reason


def test_attributes_keep_only_a_few_scalars() -> None:
    attributes: dict[str, Any] = {
        "team": "growth",
        "nested": {"a": 1},
        "list": [1, 2],
        "nan": math.nan,
        "k" * 129: "long key",
        "long": "v" * 1_000,
        "n": 3,
        "flag": False,
        "none": None,
    }
    attributes.update({f"extra{i}": i for i in range(40)})

    span = decode_native(record(attributes=attributes))

    assert span.attributes["team"] == "growth"
    assert span.attributes["long"] == "v" * MAX_ATTRIBUTE_VALUE_CHARS
    assert span.attributes["flag"] is False
    assert "none" not in span.attributes
    assert "nested" not in span.attributes
    assert "list" not in span.attributes
    assert "nan" not in span.attributes
    assert len(span.attributes) == MAX_ATTRIBUTES


def test_attributes_must_be_an_object() -> None:
    assert rejected(record(attributes=[1, 2])).field == "attributes"


def test_json_lines_yield_spans_and_numbered_errors() -> None:
    lines = [
        orjson.dumps(record(span_id="one")),
        b"",
        b"   ",
        b"{broken",
        orjson.dumps(record(span_id="two", kind="banana")),
        orjson.dumps(record(span_id="three")),
    ]
    stream = io.BytesIO(b"\n".join(lines) + b"\n")

    results = list(iter_native_lines(stream))

    assert [r.span_id for r in results if isinstance(r, SpanEvent)] == ["one", "three"]
    errors = [r for r in results if isinstance(r, SpanValidationError)]
    assert [e.reason.split(":")[0] for e in errors] == ["line 4", "line 5"]
    assert errors[1].field == "kind"


def test_json_lines_from_text_stream_and_plain_list() -> None:
    text = orjson.dumps(record(span_id="a")).decode() + "\r\n"

    from_text = list(iter_native_lines(io.StringIO(text * 2)))
    from_list = list(iter_native_lines([text, text]))

    assert [s.span_id for s in from_text] == ["a", "a"]  # type: ignore[union-attr]
    assert from_list == from_text


def test_oversized_line_is_skipped_without_losing_the_next() -> None:
    big = orjson.dumps(record(span_id="big", padding="x" * 5_000))
    small = orjson.dumps(record(span_id="small"))
    stream = io.BytesIO(big + b"\n" + small + b"\n" + big)

    results = list(iter_native_lines(stream, max_bytes=1_000))

    assert isinstance(results[0], SpanValidationError)
    assert results[0].reason.startswith("line 1: span record is over the 1000-byte")
    assert isinstance(results[1], SpanEvent)
    assert results[1].span_id == "small"
    assert isinstance(results[2], SpanValidationError)
    assert results[2].reason.startswith("line 3:")
    assert len(results) == 3
