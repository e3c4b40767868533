"""GenAI, OpenLLMetry and OpenInference attributes map to the normalised span."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import Status, StatusCode

from tripwire.errors import ConfigError, SpanValidationError
from tripwire.schemas.conventions import (
    SKIP_NOT_GENAI,
    MappingConfig,
    OtelEvent,
    OtelSpan,
    Skipped,
    hash_tool_args,
    iter_attribute_names,
    normalise_span,
    span_from_readable,
)
from tripwire.schemas.events import SpanEvent, SpanKind
from tripwire.schemas.native import (
    MAX_OUTPUT_TEXT_CHARS,
    MAX_TOKENS_PER_SPAN,
    decode_native,
    encode_native,
)
from tripwire.schemas.otlp import decode_otlp

FIXTURES = Path(__file__).parent / "fixtures"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"
START_NS = 1_714_564_800_000_000_000
END_NS = START_NS + 1_250_000_000


def fixture_cases() -> list[Any]:
    cases = []
    for path in sorted(FIXTURES.glob("*.json")):
        document = orjson.loads(path.read_bytes())
        for case in document["cases"]:
            label = f"{path.stem}-{case['name']}"
            cases.append(pytest.param(case, document["resource"], id=label))
    return cases


def otel_span(
    attributes: dict[str, Any],
    *,
    resource: dict[str, Any] | None = None,
    events: list[OtelEvent] | None = None,
    status_error: bool = False,
    name: str = "span",
    start_ns: int = START_NS,
) -> OtelSpan:
    return OtelSpan(
        trace_id=TRACE_ID,
        span_id=SPAN_ID,
        name=name,
        start_time_ns=start_ns,
        end_time_ns=END_NS,
        attributes=attributes,
        events=events or [],
        resource=resource or {},
        status_error=status_error,
    )


def case_span(case: dict[str, Any], resource: dict[str, Any]) -> OtelSpan:
    return otel_span(
        case["attributes"],
        resource=resource,
        events=[OtelEvent(e["name"], e["attributes"]) for e in case.get("events", [])],
        status_error=case.get("status_error", False),
        name=case["span_name"],
    )


def check_expected(result: SpanEvent | Skipped, expected: dict[str, Any]) -> None:
    if "skipped" in expected:
        assert result == Skipped(expected["skipped"])
        return
    assert isinstance(result, SpanEvent), result
    for key, value in expected.items():
        if key == "tool_args":
            assert result.tool_args_hash == hash_tool_args(value)
        elif key == "session_id" and value == "<trace>":
            assert result.session_id == result.trace_id
        else:
            assert getattr(result, key) == value, key


def sdk_spans(cases: list[tuple[dict[str, Any], dict[str, Any]]]) -> list[ReadableSpan]:
    """Record each case with the real OpenTelemetry SDK, one provider per resource."""
    exporter = InMemorySpanExporter()
    for case, resource in cases:
        provider = TracerProvider(resource=Resource.create(resource))
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        tracer = provider.get_tracer("tests.fixtures")
        with tracer.start_as_current_span(
            case["span_name"], attributes=case["attributes"]
        ) as span:
            for event in case.get("events", []):
                span.add_event(event["name"], event["attributes"])
            if case.get("status_error"):
                span.set_status(Status(StatusCode.ERROR, "failed"))
    return list(exporter.get_finished_spans())


@pytest.mark.parametrize(("case", "resource"), fixture_cases())
def test_fixture_span_normalises_to_expected_fields(
    case: dict[str, Any], resource: dict[str, Any]
) -> None:
    result = normalise_span(case_span(case, resource))

    check_expected(result, case["expected"])
    if isinstance(result, SpanEvent):
        assert result.span_id == SPAN_ID
        assert result.trace_id == TRACE_ID
        assert result.start_time == START_NS / 1e9
        assert result.end_time == END_NS / 1e9


@pytest.mark.parametrize(("case", "resource"), fixture_cases())
def test_fixture_recorded_by_sdk_maps_the_same_through_otlp(
    case: dict[str, Any], resource: dict[str, Any]
) -> None:
    (span,) = sdk_spans([(case, resource)])

    direct = span_from_readable(span)
    batch = decode_otlp(encode_spans([span]).SerializeToString(), "otlp_proto")

    check_expected(direct, case["expected"])
    assert batch.errors == []
    if isinstance(direct, Skipped):
        assert batch.spans == []
        assert batch.skip_reasons == {direct.reason: 1}
    else:
        assert batch.spans == [direct]
        assert decode_native(encode_native(direct, include_text=True)) == direct


def test_session_and_user_candidates_are_configurable() -> None:
    attributes = {
        "gen_ai.operation.name": "chat",
        "app.session": "S9",
        "session.id": "x",
    }
    mapping = MappingConfig(
        session_attributes=["app.session"], user_attributes=["app.user"]
    )

    span = normalise_span(otel_span(attributes, resource={"app.user": 42}), mapping)

    assert isinstance(span, SpanEvent)
    assert span.session_id == "S9"
    assert span.user_id == "42"


def test_without_a_session_attribute_the_trace_is_the_session() -> None:
    span = normalise_span(otel_span({"gen_ai.operation.name": "chat"}))

    assert isinstance(span, SpanEvent)
    assert span.session_id == TRACE_ID
    assert span.user_id is None


def test_resource_session_attribute_is_used_when_the_span_has_none() -> None:
    span = normalise_span(
        otel_span({"gen_ai.operation.name": "chat"}, resource={"session.id": "R1"})
    )

    assert isinstance(span, SpanEvent)
    assert span.session_id == "R1"


@pytest.mark.parametrize("value", ["session.id", [3], [""]])
def test_mapping_config_rejects_non_lists_of_names(value: Any) -> None:
    with pytest.raises(ConfigError, match="session_attributes must be a list"):
        MappingConfig(session_attributes=value)


def test_cache_larger_than_input_means_input_left_it_out() -> None:
    attributes = {
        "gen_ai.operation.name": "chat",
        "gen_ai.usage.input_tokens": 40,
        "gen_ai.usage.cache_read.input_tokens": 3000,
    }

    span = normalise_span(otel_span(attributes))

    assert isinstance(span, SpanEvent)
    assert span.input_tokens == 3040
    assert span.cache_read_tokens == 3000


def test_total_that_equals_input_plus_output_means_input_includes_cache() -> None:
    attributes = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "anthropic",
        "gen_ai.usage.input_tokens": 1000,
        "gen_ai.usage.output_tokens": 10,
        "gen_ai.usage.cache_read.input_tokens": 800,
        "gen_ai.usage.total_tokens": 1010,
    }
    mapping = MappingConfig(input_excludes_cache_providers=["anthropic"])

    span = normalise_span(otel_span(attributes), mapping)

    assert isinstance(span, SpanEvent)
    assert span.input_tokens == 1000


def test_listed_provider_input_excludes_cache_without_total() -> None:
    attributes = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "anthropic",
        "gen_ai.usage.input_tokens": 1000,
        "gen_ai.usage.cache_read.input_tokens": 800,
    }
    listed = MappingConfig(input_excludes_cache_providers=["anthropic"])

    default = normalise_span(otel_span(attributes))
    configured = normalise_span(otel_span(attributes), listed)

    assert isinstance(default, SpanEvent)
    assert isinstance(configured, SpanEvent)
    assert default.input_tokens == 1000
    assert configured.input_tokens == 1800


def test_agent_usage_is_kept_only_when_configured() -> None:
    attributes = {
        "gen_ai.operation.name": "invoke_agent",
        "gen_ai.usage.input_tokens": 9,
    }

    kept = normalise_span(otel_span(attributes), MappingConfig(count_agent_usage=True))

    assert isinstance(kept, SpanEvent)
    assert kept.input_tokens == 9


@pytest.mark.parametrize(
    ("value", "expected"), [(12, 12), (12.0, 12), ("12", 12), (0, 0)]
)
def test_token_attribute_representations(value: Any, expected: int) -> None:
    span = normalise_span(
        otel_span(
            {"gen_ai.operation.name": "chat", "gen_ai.usage.output_tokens": value}
        )
    )

    assert isinstance(span, SpanEvent)
    assert span.output_tokens == expected


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (-5, "between 0 and"),
        (MAX_TOKENS_PER_SPAN + 1, "between 0 and"),
        ("9" * 30, "between 0 and"),
        (True, "whole number"),
        (1.5, "whole number"),
        ("12k", "whole number"),
        ([12], "whole number"),
    ],
)
def test_bad_token_attribute_is_rejected_naming_span_and_attribute(
    value: Any, words: str
) -> None:
    attributes = {"gen_ai.operation.name": "chat", "llm.token_count.prompt": value}

    with pytest.raises(SpanValidationError) as info:
        normalise_span(otel_span(attributes))

    assert info.value.field == "llm.token_count.prompt"
    assert words in info.value.reason
    assert info.value.reason.startswith(f"span {SPAN_ID} of trace {TRACE_ID}: ")


@pytest.mark.parametrize("value", [-0.1, float("nan"), "0.2"])
def test_bad_cost_attribute_is_rejected(value: Any) -> None:
    with pytest.raises(SpanValidationError) as info:
        normalise_span(
            otel_span({"gen_ai.operation.name": "chat", "llm.cost.total": value})
        )

    assert info.value.field == "llm.cost.total"


def test_bad_text_attribute_is_rejected() -> None:
    with pytest.raises(SpanValidationError) as info:
        normalise_span(
            otel_span({"gen_ai.operation.name": "chat", "gen_ai.request.model": 4})
        )

    assert info.value.field == "gen_ai.request.model"


def test_unset_start_time_is_rejected() -> None:
    with pytest.raises(SpanValidationError) as info:
        normalise_span(otel_span({"gen_ai.operation.name": "chat"}, start_ns=0))

    assert info.value.field == "start_time"


def test_cache_parts_cannot_exceed_a_reported_total() -> None:
    attributes = {
        "gen_ai.operation.name": "chat",
        "gen_ai.usage.input_tokens": 10,
        "gen_ai.usage.output_tokens": 0,
        "gen_ai.usage.cache_read.input_tokens": 50,
        "gen_ai.usage.total_tokens": 10,
    }

    with pytest.raises(SpanValidationError) as info:
        normalise_span(otel_span(attributes))

    assert "exceed input_tokens" in info.value.reason


@pytest.mark.parametrize(
    ("scope", "provider"),
    [
        ("opentelemetry.instrumentation.openai.v1", "openai"),
        ("openinference.instrumentation.anthropic", "anthropic"),
        ("openinference.instrumentation.langchain", None),
        ("my.tracer", None),
        (None, None),
    ],
)
def test_provider_falls_back_to_the_instrumentation_scope(
    scope: str | None, provider: str | None
) -> None:
    span = otel_span({"llm.request.type": "chat"})
    span.scope_name = scope

    result = normalise_span(span)

    assert isinstance(result, SpanEvent)
    assert result.provider == provider


def test_provider_attribute_wins_over_the_scope() -> None:
    span = otel_span({"gen_ai.operation.name": "chat", "gen_ai.system": "Groq"})
    span.scope_name = "opentelemetry.instrumentation.openai"

    result = normalise_span(span)

    assert isinstance(result, SpanEvent)
    assert result.provider == "groq"


def test_http_span_is_skipped_not_rejected() -> None:
    result = normalise_span(otel_span({"http.request.method": "POST"}))

    assert result == Skipped(SKIP_NOT_GENAI)


def test_output_text_is_truncated_and_can_be_turned_off() -> None:
    attributes = {
        "gen_ai.operation.name": "chat",
        "gen_ai.completion.0.content": "a" * MAX_OUTPUT_TEXT_CHARS,
        "gen_ai.completion.1.content": "b" * 100,
    }

    span = normalise_span(otel_span(attributes))
    quiet = normalise_span(
        otel_span(attributes), MappingConfig(extract_output_text=False)
    )

    assert isinstance(span, SpanEvent)
    assert isinstance(quiet, SpanEvent)
    assert span.output_text == "a" * MAX_OUTPUT_TEXT_CHARS
    assert quiet.output_text is None


def test_output_text_from_legacy_completion_event() -> None:
    completion = '[{"role": "assistant", "content": "same answer again"}]'
    event = OtelEvent("gen_ai.content.completion", {"gen_ai.completion": completion})

    span = normalise_span(otel_span({"gen_ai.operation.name": "chat"}, events=[event]))

    assert isinstance(span, SpanEvent)
    assert span.output_text == "same answer again"


def test_output_messages_skip_tool_calls_and_give_finish_reason() -> None:
    messages = [
        {
            "role": "assistant",
            "parts": [
                {"type": "reasoning", "content": "thinking..."},
                {"type": "text", "content": "first"},
                {"type": "tool_call", "name": "search", "arguments": {"q": "x"}},
            ],
            "finish_reason": "tool_call",
        },
        {"role": "assistant", "parts": [{"type": "text", "content": "second"}]},
    ]
    attributes = {
        "gen_ai.operation.name": "chat",
        "gen_ai.output.messages": orjson.dumps(messages).decode(),
    }

    span = normalise_span(otel_span(attributes))

    assert isinstance(span, SpanEvent)
    assert span.output_text == "first\nsecond"
    assert span.finish_reason == "tool_call"


def test_tool_name_falls_back_to_the_span_name() -> None:
    span = normalise_span(
        otel_span(
            {"gen_ai.operation.name": "execute_tool"}, name="execute_tool fetch_page"
        )
    )

    assert isinstance(span, SpanEvent)
    assert span.kind is SpanKind.TOOL
    assert span.tool_name == "fetch_page"
    assert span.tool_status == "ok"
    assert span.tool_args_hash is None


def test_tool_args_hash_ignores_spacing_and_key_order() -> None:
    first = hash_tool_args('{"query": "kafka", "top_k": 5}')
    second = hash_tool_args('{"top_k":5,"query":"kafka"}')

    assert first == second == hash_tool_args({"top_k": 5, "query": "kafka"})
    assert first != hash_tool_args('{"top_k": 6, "query": "kafka"}')
    assert len(first) == 32
    assert int(first, 16) >= 0


def test_tool_args_hash_accepts_plain_text() -> None:
    assert hash_tool_args("ls -la") == hash_tool_args(b"ls -la")
    assert hash_tool_args("ls -la") != hash_tool_args("ls -l")


def test_attribute_names_cover_the_three_conventions() -> None:
    names = set(iter_attribute_names())

    assert {"gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens"} <= names
    assert {"gen_ai.usage.cache_read_input_tokens", "llm.usage.total_tokens"} <= names
    assert {"llm.token_count.prompt", "session.id", "user.id"} <= names
