"""OTLP protobuf and JSON trace exports, and span files, decode to spans."""

from __future__ import annotations

import base64
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from google.protobuf.json_format import MessageToDict, MessageToJson
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import Status, StatusCode

from tripwire.errors import ConfigError, SpanValidationError, TripwireError
from tripwire.schemas.conventions import SKIP_NOT_GENAI, Skipped, span_from_readable
from tripwire.schemas.events import SpanEvent, SpanKind, ToolStatus
from tripwire.schemas.native import decode_native, encode_native
from tripwire.schemas.otlp import decode_otlp, iter_file_spans, sniff_encoding


def record_agent_sessions() -> list[ReadableSpan]:
    """Record two agent services, two sessions each, with the real SDK."""
    exporter = InMemorySpanExporter()
    for service in ("billing-agent", "search-agent"):
        provider = TracerProvider(resource=Resource.create({"service.name": service}))
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        tracer = provider.get_tracer("tripwire.tests", "1.0")
        for session in ("s-1", "s-2"):
            common = {"gen_ai.conversation.id": f"{service}/{session}"}
            with tracer.start_as_current_span(
                "invoke_agent",
                attributes={**common, "gen_ai.operation.name": "invoke_agent"},
            ):
                with tracer.start_as_current_span(
                    "chat gpt-4o",
                    attributes={
                        **common,
                        "gen_ai.operation.name": "chat",
                        "gen_ai.provider.name": "openai",
                        "gen_ai.request.model": "gpt-4o",
                        "gen_ai.usage.input_tokens": 1200,
                        "gen_ai.usage.output_tokens": 80,
                        "gen_ai.usage.cache_read.input_tokens": 1024,
                        "gen_ai.response.finish_reasons": ("tool_calls",),
                    },
                ) as chat:
                    chat.add_event(
                        "gen_ai.choice",
                        {"finish_reason": "tool_calls", "message": '{"content": "ok"}'},
                    )
                with tracer.start_as_current_span(
                    "execute_tool lookup",
                    attributes={
                        **common,
                        "gen_ai.operation.name": "execute_tool",
                        "gen_ai.tool.name": "lookup",
                        "gen_ai.tool.call.arguments": '{"id": 7}',
                    },
                ) as tool:
                    tool.set_status(Status(StatusCode.ERROR, "not found"))
                with tracer.start_as_current_span("GET /health"):
                    pass
    return list(exporter.get_finished_spans())


def published_natively(spans: list[ReadableSpan]) -> list[SpanEvent]:
    """What an agent's exporter would publish to tripwire.spans, decoded back."""
    events = [span_from_readable(span) for span in spans]
    return [
        decode_native(encode_native(event, include_text=True))
        for event in events
        if isinstance(event, SpanEvent)
    ]


def hex_ids(document: dict[str, Any]) -> dict[str, Any]:
    """Turn protobuf-JSON base64 ids into OTLP/JSON hex ids, in place."""
    for resource_spans in document["resourceSpans"]:
        for scope_spans in resource_spans["scopeSpans"]:
            for span in scope_spans["spans"]:
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in span:
                        span[key] = base64.b64decode(span[key]).hex()
    return document


@pytest.fixture(scope="module")
def sdk_spans() -> list[ReadableSpan]:
    return record_agent_sessions()


@pytest.fixture(scope="module")
def request_message(sdk_spans: list[ReadableSpan]) -> ExportTraceServiceRequest:
    return encode_spans(sdk_spans)


def sort_key(span: SpanEvent) -> tuple[str, str]:
    return span.trace_id, span.span_id


def test_proto_export_equals_native_publication(
    sdk_spans: list[ReadableSpan], request_message: ExportTraceServiceRequest
) -> None:
    batch = decode_otlp(request_message.SerializeToString(), "otlp_proto")

    assert batch.errors == []
    assert batch.skipped == 4
    assert batch.skip_reasons == Counter({SKIP_NOT_GENAI: 4})
    assert sorted(batch.spans, key=sort_key) == sorted(
        published_natively(sdk_spans), key=sort_key
    )
    assert len(batch.spans) == 12
    assert len({span.session_id for span in batch.spans}) == 4


def test_proto_export_fields(request_message: ExportTraceServiceRequest) -> None:
    batch = decode_otlp(request_message.SerializeToString(), "otlp_proto")

    chats = [s for s in batch.spans if s.kind is SpanKind.LLM]
    tools = [s for s in batch.spans if s.kind is SpanKind.TOOL]
    agents = [s for s in batch.spans if s.kind is SpanKind.AGENT]
    assert {s.agent_name for s in chats} == {"billing-agent", "search-agent"}
    assert {(s.input_tokens, s.cache_read_tokens, s.output_tokens) for s in chats} == {
        (1200, 1024, 80)
    }
    assert {s.finish_reason for s in chats} == {"tool_calls"}
    assert {s.output_text for s in chats} == {"ok"}
    assert {s.tool_status for s in tools} == {ToolStatus.ERROR}
    parents = {s.span_id for s in agents}
    assert all(s.parent_span_id in parents for s in chats + tools)
    assert all(s.parent_span_id is None for s in agents)


def test_protobuf_json_with_base64_ids_equals_native_publication(
    sdk_spans: list[ReadableSpan], request_message: ExportTraceServiceRequest
) -> None:
    text = MessageToJson(request_message)

    batch = decode_otlp(text.encode(), "otlp_json")

    assert '"traceId"' in text
    assert batch.errors == []
    assert sorted(batch.spans, key=sort_key) == sorted(
        published_natively(sdk_spans), key=sort_key
    )


def test_otlp_json_with_hex_ids_equals_native_publication(
    sdk_spans: list[ReadableSpan], request_message: ExportTraceServiceRequest
) -> None:
    document = hex_ids(MessageToDict(request_message))

    batch = decode_otlp(orjson.dumps(document), "otlp_json")

    assert batch.errors == []
    assert sorted(batch.spans, key=sort_key) == sorted(
        published_natively(sdk_spans), key=sort_key
    )


def test_snake_case_field_names_are_accepted(
    request_message: ExportTraceServiceRequest,
) -> None:
    document = MessageToDict(request_message, preserving_proto_field_name=True)

    batch = decode_otlp(orjson.dumps(document), "otlp_json")
    reference = decode_otlp(request_message.SerializeToString(), "otlp_proto")

    assert "resource_spans" in document
    assert batch.errors == []
    assert batch.spans == reference.spans


def otlp_json_span(**overrides: Any) -> dict[str, Any]:
    span: dict[str, Any] = {
        "traceId": "5b8efff798038103d269b633813fc60c",
        "spanId": "eee19b7ec3c1b174",
        "parentSpanId": "",
        "name": "chat claude",
        "kind": 3,
        "startTimeUnixNano": "1714564800000000000",
        "endTimeUnixNano": "1714564801000000000",
        "attributes": [
            {"key": "gen_ai.operation.name", "value": {"stringValue": "chat"}},
            {"key": "gen_ai.usage.input_tokens", "value": {"intValue": "150"}},
            {"key": "gen_ai.usage.output_tokens", "value": {"intValue": 20}},
            {"key": "gen_ai.usage.cost", "value": {"doubleValue": 0.5}},
            {
                "key": "gen_ai.response.finish_reasons",
                "value": {"arrayValue": {"values": [{"stringValue": "stop"}]}},
            },
            {"key": "session.id", "value": {"stringValue": "S"}},
        ],
        "status": {},
    }
    span.update(overrides)
    return span


def otlp_json(*spans: dict[str, Any], resource: list[Any] | None = None) -> bytes:
    return orjson.dumps(
        {
            "resourceSpans": [
                {
                    "resource": {"attributes": resource or []},
                    "scopeSpans": [{"scope": {"name": "x"}, "spans": list(spans)}],
                }
            ]
        }
    )


def test_otlp_json_any_values_decode() -> None:
    resource = [{"key": "service.name", "value": {"stringValue": "svc"}}]

    batch = decode_otlp(otlp_json(otlp_json_span(), resource=resource), "otlp_json")

    (span,) = batch.spans
    assert (span.input_tokens, span.output_tokens) == (150, 20)
    assert span.cost_usd == 0.5
    assert span.finish_reason == "stop"
    assert span.session_id == "S"
    assert span.agent_name == "svc"
    assert span.parent_span_id is None
    assert span.start_time == 1_714_564_800.0


@pytest.mark.parametrize("code", [2, "STATUS_CODE_ERROR"])
def test_otlp_json_error_status_marks_tool_failed(code: Any) -> None:
    attributes = [
        {"key": "gen_ai.tool.name", "value": {"stringValue": "fetch"}},
        {
            "key": "flags",
            "value": {
                "kvlistValue": {"values": [{"key": "a", "value": {"boolValue": True}}]}
            },
        },
        {"key": "blob", "value": {"bytesValue": "AAEC"}},
        {"key": "empty", "value": {}},
    ]
    span = otlp_json_span(attributes=attributes, status={"code": code})

    batch = decode_otlp(otlp_json(span), "otlp_json")

    assert batch.spans[0].kind is SpanKind.TOOL
    assert batch.spans[0].tool_status is ToolStatus.ERROR


def test_one_bad_span_never_loses_the_good_ones() -> None:
    negative = otlp_json_span(
        spanId="00000000000000aa",
        attributes=[{"key": "gen_ai.usage.input_tokens", "value": {"intValue": "-3"}}],
    )
    bad_id = otlp_json_span(spanId="xyz")
    bad_value = otlp_json_span(
        spanId="00000000000000bb",
        attributes=[{"key": "gen_ai.usage.input_tokens", "value": {"intValue": "ten"}}],
    )
    good = otlp_json_span()

    junk: Any = "junk"

    batch = decode_otlp(otlp_json(negative, bad_id, good, bad_value, junk), "otlp_json")

    assert [s.span_id for s in batch.spans] == ["eee19b7ec3c1b174"]
    reasons = [e.reason for e in batch.errors]
    assert len(reasons) == 4
    assert "gen_ai.usage.input_tokens must be between 0 and" in reasons[0]
    assert reasons[0].startswith("span 00000000000000aa of trace")
    assert "spanId must be 8 bytes" in reasons[1]
    assert "malformed intValue" in reasons[2]
    assert "span must be a JSON object" in reasons[3]


def test_one_bad_span_in_protobuf_keeps_the_others(
    request_message: ExportTraceServiceRequest,
) -> None:
    request = ExportTraceServiceRequest()
    request.CopyFrom(request_message)
    spans = request.resource_spans[0].scope_spans[0].spans
    spans[0].trace_id = b"\x01\x02"
    target = next(s for s in spans[1:] if s.name.startswith("chat"))
    for key_value in target.attributes:
        if key_value.key == "gen_ai.usage.output_tokens":
            key_value.value.int_value = -1

    batch = decode_otlp(request.SerializeToString(), "otlp_proto")

    assert len(batch.errors) == 2
    assert "trace_id must be 16 bytes" in batch.errors[0].reason
    assert batch.errors[1].field == "gen_ai.usage.output_tokens"
    total = sum(
        len(scope.spans)
        for resource in request.resource_spans
        for scope in resource.scope_spans
    )
    assert len(batch.spans) + batch.skipped == total - 2
    assert len(batch.spans) == 10


@pytest.mark.parametrize(
    ("data", "encoding", "words"),
    [
        (b"\x0a\xff\xff\xff\xff\x0f", "otlp_proto", "not a protobuf"),
        (b"\xff" * 10, "otlp_proto", "not a protobuf"),
        ("text", "otlp_proto", "must be bytes"),
        (b"{", "otlp_json", "not valid JSON"),
        (b"[]", "otlp_json", "must be an ExportTraceServiceRequest object"),
        (b'{"resourceLogs": []}', "otlp_json", "no resourceSpans"),
        (b'{"resourceSpans": {}}', "otlp_json", "must be a JSON list"),
    ],
)
def test_undecodable_records_raise(data: Any, encoding: Any, words: str) -> None:
    with pytest.raises(SpanValidationError) as info:
        decode_otlp(data, encoding)

    assert words in info.value.reason


def test_oversized_record_raises() -> None:
    data = otlp_json(otlp_json_span())

    with pytest.raises(SpanValidationError, match="over the 100-byte limit"):
        decode_otlp(data, "otlp_json", max_bytes=100)


def test_unknown_encoding_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="'otlp_proto' or 'otlp_json'"):
        decode_otlp(b"", "json")  # type: ignore[arg-type]


def test_empty_protobuf_record_has_no_spans() -> None:
    batch = decode_otlp(b"", "otlp_proto")

    assert (batch.spans, batch.skipped, batch.errors) == ([], 0, [])


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b'{"resourceSpans": []}', "otlp_json"),
        (b'\xef\xbb\xbf  {\n  "resource_spans": [', "otlp_json"),
        (b'{"span_id": "a", "resourceSpans": 1}', "native"),
        (b"\n{}", "native"),
        (b"", "native"),
        (b"not json at all", "native"),
        (b"\x0a\x10", "otlp_proto"),
        (b'{\n\x12"resourceSpans"', "otlp_proto"),
    ],
)
def test_sniff_encoding(data: bytes, expected: str) -> None:
    assert sniff_encoding(data) == expected


def test_sniff_recognises_real_exports(
    request_message: ExportTraceServiceRequest,
) -> None:
    assert sniff_encoding(request_message.SerializeToString()) == "otlp_proto"
    assert sniff_encoding(MessageToJson(request_message).encode()) == "otlp_json"


def test_file_of_native_lines(tmp_path: Path, sdk_spans: list[ReadableSpan]) -> None:
    spans = published_natively(sdk_spans)
    path = tmp_path / "spans.jsonl"
    lines = [encode_native(span) for span in spans]
    path.write_bytes(b"\n".join([*lines[:2], b"{oops", *lines[2:]]) + b"\n")

    results = list(iter_file_spans(path))

    assert [r for r in results if isinstance(r, SpanEvent)] == [
        decode_native(line) for line in lines
    ]
    (error,) = [r for r in results if isinstance(r, SpanValidationError)]
    assert error.reason.startswith("line 3: ")


def test_file_of_one_pretty_otlp_json_document(
    tmp_path: Path, request_message: ExportTraceServiceRequest
) -> None:
    path = tmp_path / "export.json"
    path.write_text(MessageToJson(request_message, indent=2))
    skips: Counter[str] = Counter()

    results = list(iter_file_spans(path, skips=skips))

    assert len(results) == 12
    assert all(isinstance(r, SpanEvent) for r in results)
    assert skips == Counter({SKIP_NOT_GENAI: 4})


def test_file_of_otlp_json_lines_reports_bad_line(
    tmp_path: Path, request_message: ExportTraceServiceRequest
) -> None:
    line = orjson.dumps(hex_ids(MessageToDict(request_message)))
    path = tmp_path / "collector-file-exporter.json"
    path.write_bytes(line + b"\n" + b'{"resourceSpans": 5}\n\n' + line + b"\n")

    results = list(iter_file_spans(path))

    spans = [r for r in results if isinstance(r, SpanEvent)]
    errors = [r for r in results if isinstance(r, SpanValidationError)]
    assert len(spans) == 24
    assert len(errors) == 1
    assert errors[0].reason.startswith("line 2: resourceSpans must be a JSON list")


def test_file_of_one_protobuf_request(
    tmp_path: Path, request_message: ExportTraceServiceRequest
) -> None:
    path = tmp_path / "export.pb"
    path.write_bytes(request_message.SerializeToString())

    results = list(iter_file_spans(path))

    assert sorted(results, key=sort_key) == sorted(  # type: ignore[arg-type]
        decode_otlp(path.read_bytes(), "otlp_proto").spans, key=sort_key
    )
    assert len(results) == 12


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def test_file_of_length_delimited_protobuf_requests(
    tmp_path: Path, request_message: ExportTraceServiceRequest
) -> None:
    payload = request_message.SerializeToString()
    path = tmp_path / "export.pbs"
    path.write_bytes((varint(len(payload)) + payload) * 3)

    results = list(iter_file_spans(path))

    assert len(results) == 36
    assert all(isinstance(r, SpanEvent) for r in results)


def test_undecodable_binary_file_yields_one_error(tmp_path: Path) -> None:
    path = tmp_path / "garbage.bin"
    path.write_bytes(b"\x07\xff\xff\xff\x00\x01")

    results = list(iter_file_spans(path))

    assert len(results) == 1
    assert isinstance(results[0], SpanValidationError)
    assert "neither one OTLP protobuf" in results[0].reason


def test_missing_file_raises_tripwire_error(tmp_path: Path) -> None:
    with pytest.raises(TripwireError, match="cannot read span file"):
        list(iter_file_spans(tmp_path / "nope.jsonl"))


def test_skipped_result_type_is_counted_not_yielded(tmp_path: Path) -> None:
    document = otlp_json(
        otlp_json_span(
            attributes=[{"key": "http.method", "value": {"stringValue": "GET"}}]
        )
    )
    path = tmp_path / "http.json"
    path.write_bytes(document)
    skips: Counter[str] = Counter()

    assert list(iter_file_spans(path, skips=skips)) == []
    assert skips == Counter({Skipped(SKIP_NOT_GENAI).reason: 1})


def small_request(name: str) -> bytes:
    """Return a one-span request small enough for a one-byte length prefix."""
    chat = KeyValue(key="llm.request.type", value=AnyValue(string_value="chat"))
    span = Span(
        trace_id=bytes(range(1, 17)),
        span_id=bytes(range(1, 9)),
        name=name,
        start_time_unix_nano=1_714_564_800_000_000_000,
        end_time_unix_nano=1_714_564_801_000_000_000,
        attributes=[chat],
    )
    request = ExportTraceServiceRequest(
        resource_spans=[ResourceSpans(scope_spans=[ScopeSpans(spans=[span])])]
    )
    payload: bytes = request.SerializeToString()
    return payload


@pytest.mark.parametrize("name_length", range(0, 44))
def test_small_length_delimited_records_are_not_mistaken_for_one(
    tmp_path: Path, name_length: int
) -> None:
    payload = small_request("x" * name_length)
    path = tmp_path / "small.pbs"
    path.write_bytes((varint(len(payload)) + payload) * 2)

    results = list(iter_file_spans(path))

    assert len(payload) < 128
    assert len(results) == 2
    assert all(isinstance(r, SpanEvent) for r in results)
