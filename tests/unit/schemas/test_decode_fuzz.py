"""Decoders never raise anything but SpanValidationError, whatever the input."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from tripwire.errors import SpanValidationError
from tripwire.schemas.conventions import (
    OtelEvent,
    OtelSpan,
    Skipped,
    iter_attribute_names,
    normalise_span,
)
from tripwire.schemas.events import SpanEvent
from tripwire.schemas.native import decode_native
from tripwire.schemas.otlp import OtlpBatch, decode_otlp

SPAN_FIELDS = [spec.name for spec in fields(SpanEvent)]
ATTRIBUTE_NAMES = [
    *iter_attribute_names(),
    "gen_ai.operation.name",
    "openinference.span.kind",
    "traceloop.span.kind",
    "traceloop.entity.name",
    "llm.request.type",
    "gen_ai.output.messages",
    "gen_ai.response.finish_reasons",
    "gen_ai.completion.0.content",
    "llm.output_messages.0.message.content",
    "output.value",
    "error.type",
    "gen_ai.tool.call.id",
]


def seed_request() -> bytes:
    """Return a valid ExportTraceServiceRequest with one GenAI chat span."""
    attributes = [
        KeyValue(key="gen_ai.operation.name", value=AnyValue(string_value="chat")),
        KeyValue(key="gen_ai.usage.input_tokens", value=AnyValue(int_value=120)),
        KeyValue(key="gen_ai.usage.cost", value=AnyValue(double_value=0.25)),
        KeyValue(
            key="gen_ai.response.finish_reasons",
            value=AnyValue(
                array_value=ArrayValue(values=[AnyValue(string_value="stop")])
            ),
        ),
    ]
    span = Span(
        trace_id=bytes(range(16)),
        span_id=bytes(range(1, 9)),
        name="chat gpt-4o",
        start_time_unix_nano=1_714_564_800_000_000_000,
        end_time_unix_nano=1_714_564_801_000_000_000,
        attributes=attributes,
    )
    service = KeyValue(key="service.name", value=AnyValue(string_value="billing"))
    request = ExportTraceServiceRequest(
        resource_spans=[
            ResourceSpans(
                resource=Resource(attributes=[service]),
                scope_spans=[ScopeSpans(spans=[span])],
            )
        ]
    )
    payload: bytes = request.SerializeToString()
    return payload


VALID_PROTO = seed_request()

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
field_values = (
    json_values
    | st.sampled_from(["llm", "tool", "agent", "ok", "error", "2025-01-31T12:00:00Z"])
    | st.integers(min_value=0, max_value=2 * 10**18)
)
VALID_RECORD: dict[str, Any] = {
    "span_id": "a1b2c3d4e5f60718",
    "trace_id": "0af7651916cd43dd8448eb211c80319c",
    "kind": "llm",
    "start_time": 1_714_564_800.5,
    "end_time": 1_714_564_801.5,
    "input_tokens": 1200,
    "output_tokens": 30,
    "cache_read_tokens": 1000,
}


def mutate_record(
    base: dict[str, Any], overrides: dict[str, Any], dropped: list[str]
) -> dict[str, Any]:
    record = {**base, **overrides}
    for name in dropped:
        record.pop(name, None)
    return record


# Mostly-valid records with a few fields replaced or dropped reach every rule.
native_records = st.builds(
    mutate_record,
    st.just(VALID_RECORD),
    st.dictionaries(
        st.sampled_from(SPAN_FIELDS) | st.text(max_size=6), field_values, max_size=3
    ),
    st.lists(st.sampled_from(SPAN_FIELDS), max_size=2),
)
attribute_values = (
    json_values
    | st.binary(max_size=8)
    | st.sampled_from(
        [
            "chat",
            "execute_tool",
            "invoke_agent",
            "LLM",
            "TOOL",
            "CHAIN",
            "workflow",
            "task",
            '[{"parts": [{"type": "text", "content": "x"}]}]',
            '{"content": ["a", {"text": "b"}]}',
        ]
    )
    | st.integers(min_value=-5, max_value=20_000_000)
)
attribute_maps = st.dictionaries(
    st.sampled_from(ATTRIBUTE_NAMES), attribute_values, max_size=10
)

any_values: st.SearchStrategy[Any] = st.deferred(
    lambda: (
        st.fixed_dictionaries({}, optional={"stringValue": json_scalars})
        | st.fixed_dictionaries({"intValue": st.integers() | st.text(max_size=6)})
        | st.fixed_dictionaries({"doubleValue": json_scalars})
        | st.fixed_dictionaries({"boolValue": json_scalars})
        | st.fixed_dictionaries({"bytesValue": st.text(max_size=8)})
        | st.fixed_dictionaries(
            {
                "arrayValue": st.fixed_dictionaries(
                    {"values": st.lists(any_values, max_size=3)}
                )
            }
        )
        | st.fixed_dictionaries(
            {
                "kvlistValue": st.fixed_dictionaries(
                    {"values": st.lists(key_values, max_size=3)}
                )
            }
        )
        | json_values
    )
)
key_values: st.SearchStrategy[Any] = st.fixed_dictionaries(
    {"key": st.sampled_from(ATTRIBUTE_NAMES) | json_scalars, "value": any_values}
)
VALID_OTLP_SPAN: dict[str, Any] = {
    "traceId": "5b8efff798038103d269b633813fc60c",
    "spanId": "eee19b7ec3c1b174",
    "parentSpanId": "",
    "name": "chat gpt-4o",
    "startTimeUnixNano": "1714564800000000000",
    "endTimeUnixNano": "1714564801000000000",
    "attributes": [
        {"key": "gen_ai.operation.name", "value": {"stringValue": "chat"}},
        {"key": "gen_ai.usage.input_tokens", "value": {"intValue": "150"}},
    ],
    "events": [
        {
            "name": "gen_ai.choice",
            "attributes": [{"key": "message", "value": {"stringValue": "{}"}}],
        }
    ],
    "status": {"code": 0},
}


def mutate_span(
    overrides: dict[str, Any], dropped: list[str], extra: list[Any]
) -> dict[str, Any]:
    span = mutate_record(VALID_OTLP_SPAN, overrides, dropped)
    if isinstance(span.get("attributes"), list):
        span["attributes"] = [*span["attributes"], *extra]
    return span


# Mostly-valid spans with a few fields replaced and random attributes added.
otlp_spans = st.builds(
    mutate_span,
    st.dictionaries(
        st.sampled_from(list(VALID_OTLP_SPAN)),
        json_values
        | st.lists(key_values, max_size=3)
        | st.sampled_from(["W47/95gDgQPSabYzgT/GDA==", "7uGbfsPBsXQ=", "0"]),
        max_size=2,
    ),
    st.lists(st.sampled_from(list(VALID_OTLP_SPAN)), max_size=1),
    st.lists(key_values, max_size=4),
)
otlp_documents = st.fixed_dictionaries(
    {
        "resourceSpans": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "resource": st.fixed_dictionaries(
                        {"attributes": st.lists(key_values, max_size=3)}
                    )
                    | json_values,
                    "scopeSpans": st.lists(
                        st.fixed_dictionaries(
                            {"spans": st.lists(otlp_spans, max_size=3)}
                        )
                        | json_values,
                        max_size=2,
                    )
                    | json_values,
                },
            )
            | json_values,
            max_size=2,
        )
        | json_values
    }
)

FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def native_outcome(data: Any) -> SpanEvent | SpanValidationError:
    try:
        return decode_native(data)
    except SpanValidationError as err:
        return err


def otlp_outcome(data: Any, encoding: Any) -> OtlpBatch | SpanValidationError:
    try:
        batch = decode_otlp(data, encoding)
    except SpanValidationError as err:
        return err
    assert all(isinstance(span, SpanEvent) for span in batch.spans)
    assert all(isinstance(err, SpanValidationError) for err in batch.errors)
    return batch


def test_mutation_seed_is_a_valid_request() -> None:
    batch = decode_otlp(VALID_PROTO, "otlp_proto")

    assert batch.errors == []
    assert [(s.input_tokens, s.cost_usd, s.agent_name) for s in batch.spans] == [
        (120, 0.25, "billing")
    ]


@FUZZ
@given(st.binary(max_size=300))
def test_native_arbitrary_bytes(data: bytes) -> None:
    assert isinstance(native_outcome(data), SpanEvent | SpanValidationError)


@FUZZ
@given(native_records)
def test_native_arbitrary_records(record: dict[str, Any]) -> None:
    assert isinstance(native_outcome(record), SpanEvent | SpanValidationError)
    try:
        encoded = orjson.dumps(record)
    except (TypeError, orjson.JSONEncodeError):
        return
    assert isinstance(native_outcome(encoded), SpanEvent | SpanValidationError)


@FUZZ
@given(st.binary(max_size=300))
def test_otlp_proto_arbitrary_bytes(data: bytes) -> None:
    assert isinstance(otlp_outcome(data, "otlp_proto"), OtlpBatch | SpanValidationError)


@FUZZ
@given(st.binary(max_size=300))
def test_otlp_json_arbitrary_bytes(data: bytes) -> None:
    assert isinstance(otlp_outcome(data, "otlp_json"), OtlpBatch | SpanValidationError)


@FUZZ
@given(st.data())
def test_otlp_proto_mutated_request(data: st.DataObject) -> None:
    payload = bytearray(VALID_PROTO)
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        position = data.draw(st.integers(min_value=0, max_value=len(payload) - 1))
        payload[position] = data.draw(st.integers(min_value=0, max_value=255))

    assert isinstance(
        otlp_outcome(bytes(payload), "otlp_proto"), OtlpBatch | SpanValidationError
    )


@FUZZ
@given(otlp_documents)
def test_otlp_json_structured_documents(document: dict[str, Any]) -> None:
    try:
        encoded = orjson.dumps(document)
    except (TypeError, orjson.JSONEncodeError):
        return

    assert isinstance(
        otlp_outcome(encoded, "otlp_json"), OtlpBatch | SpanValidationError
    )


@FUZZ
@given(attribute_maps, attribute_maps, st.booleans())
def test_convention_mapping_arbitrary_attributes(
    attributes: dict[str, Any], resource: dict[str, Any], failed: bool
) -> None:
    span = OtelSpan(
        trace_id="5b8efff798038103d269b633813fc60c",
        span_id="eee19b7ec3c1b174",
        name="span",
        start_time_ns=1_714_564_800_000_000_000,
        end_time_ns=1_714_564_801_000_000_000,
        attributes=attributes,
        events=[OtelEvent("gen_ai.choice", attributes)],
        resource=resource,
        status_error=failed,
    )

    try:
        result = normalise_span(span)
    except SpanValidationError:
        return
    assert isinstance(result, SpanEvent | Skipped)


@pytest.mark.soak
@settings(max_examples=20_000, deadline=None)
@given(st.binary(max_size=2_000))
def test_soak_all_decoders_arbitrary_bytes(data: bytes) -> None:
    assert isinstance(native_outcome(data), SpanEvent | SpanValidationError)
    assert isinstance(otlp_outcome(data, "otlp_proto"), OtlpBatch | SpanValidationError)
    assert isinstance(otlp_outcome(data, "otlp_json"), OtlpBatch | SpanValidationError)
