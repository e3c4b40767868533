"""The Kafka span exporter's conversion, queueing and dropping, with no broker."""

import os
import socket
import time
from collections.abc import Iterator

import orjson
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)

from tripwire.agents.exporter import KafkaSpanExporter
from tripwire.errors import ConfigError
from tripwire.schemas.events import SpanKind
from tripwire.schemas.native import decode_native
from tripwire.streams.embedder import TextEmbedder

# Only a guard against a hang: export() returns in microseconds when it works.
HANG_GUARD_SECONDS = 10.0


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def finished() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    yield provider, memory
    provider.shutdown()


def _llm_spans(
    provider: TracerProvider, memory: InMemorySpanExporter, count: int = 1, **extra
) -> list[ReadableSpan]:
    tracer = provider.get_tracer("test-agent")
    for step in range(count):
        with tracer.start_as_current_span("chat gpt-4o") as span:
            span.set_attributes(
                {
                    "gen_ai.operation.name": "chat",
                    "gen_ai.provider.name": "openai",
                    "gen_ai.request.model": "gpt-4o",
                    "gen_ai.usage.input_tokens": 1200 + step,
                    "gen_ai.usage.output_tokens": 80,
                    "gen_ai.completion.0.content": "I will search the docs again.",
                    "session.id": "session-42",
                    "user.id": "user-7",
                    **extra,
                }
            )
    spans = list(memory.get_finished_spans())
    memory.clear()
    return spans


@pytest.fixture
def unreachable() -> Iterator[KafkaSpanExporter]:
    exporter = KafkaSpanExporter(
        f"127.0.0.1:{_closed_port()}", max_queue=5, shutdown_timeout=2.0
    )
    yield exporter
    exporter.shutdown()


def test_encode_turns_an_sdk_span_into_a_native_record(finished, unreachable):
    provider, memory = finished
    (span,) = _llm_spans(provider, memory)

    records, skipped, failed = unreachable._encode([span])

    assert (skipped, failed) == (0, 0)
    (record,) = records
    assert record.key == b"session-42"
    event = decode_native(record.value)
    assert event.kind is SpanKind.LLM
    assert event.session_id == "session-42"
    assert event.user_id == "user-7"
    assert event.model == "gpt-4o"
    assert event.input_tokens == 1200
    assert event.output_tokens == 80
    assert event.span_id == f"{span.context.span_id:016x}"


def test_output_text_is_left_out_by_default(finished, unreachable):
    provider, memory = finished
    (span,) = _llm_spans(provider, memory)

    (record,), _, _ = unreachable._encode([span])

    assert b"search the docs" not in record.value
    assert "output_text" not in orjson.loads(record.value)


def test_output_code_is_published_instead_of_the_text_by_default(finished, unreachable):
    provider, memory = finished
    (span,) = _llm_spans(provider, memory)

    (record,), _, _ = unreachable._encode([span])

    event = decode_native(record.value)
    assert event.output_text is None
    assert event.output_code == TextEmbedder().wire_code(
        "I will search the docs again."
    )


def test_output_code_can_be_turned_off(finished):
    provider, memory = finished
    (span,) = _llm_spans(provider, memory)
    exporter = KafkaSpanExporter(
        f"127.0.0.1:{_closed_port()}", include_output_code=False
    )
    try:
        (record,), _, _ = exporter._encode([span])
    finally:
        exporter.shutdown()

    assert set(orjson.loads(record.value)).isdisjoint({"output_text", "output_code"})


def test_output_text_is_published_when_opted_in(finished):
    provider, memory = finished
    (span,) = _llm_spans(provider, memory)
    exporter = KafkaSpanExporter(
        f"127.0.0.1:{_closed_port()}", include_output_text=True
    )
    try:
        (record,), _, _ = exporter._encode([span])
    finally:
        exporter.shutdown()

    event = decode_native(record.value)
    assert event.output_text == "I will search the docs again."
    assert event.output_code == TextEmbedder().wire_code(event.output_text)


def test_session_attribute_is_read_first(finished):
    provider, memory = finished
    (span,) = _llm_spans(provider, memory, **{"app.conversation": "conv-9"})
    exporter = KafkaSpanExporter(
        f"127.0.0.1:{_closed_port()}",
        session_attribute="app.conversation",
        user_attribute="app.customer",
    )
    try:
        (record,), _, _ = exporter._encode([span])
    finally:
        exporter.shutdown()

    assert record.key == b"conv-9"
    event = decode_native(record.value)
    assert event.session_id == "conv-9"
    assert event.user_id == "user-7"


def test_span_without_session_is_keyed_by_its_trace(finished, unreachable):
    provider, memory = finished
    tracer = provider.get_tracer("test-agent")
    with tracer.start_as_current_span("chat") as span:
        span.set_attribute("gen_ai.operation.name", "chat")
        span.set_attribute("gen_ai.usage.input_tokens", 10)
    (readable,) = memory.get_finished_spans()

    (record,), _, _ = unreachable._encode([readable])

    assert record.key == f"{readable.context.trace_id:032x}".encode()


def test_non_genai_spans_are_skipped(finished, unreachable):
    provider, memory = finished
    tracer = provider.get_tracer("http")
    with tracer.start_as_current_span("GET /search") as span:
        span.set_attribute("http.request.method", "GET")
        span.set_attribute("url.full", "https://example.invalid/search")
    spans = list(memory.get_finished_spans())

    result = unreachable.export(spans)

    assert result is SpanExportResult.SUCCESS
    assert unreachable.skipped == 1
    assert unreachable.stats().queued == 0


def test_malformed_genai_span_is_counted_failed_not_raised(finished, unreachable):
    provider, memory = finished
    (span,) = _llm_spans(provider, memory, **{"gen_ai.usage.input_tokens": -5})

    result = unreachable.export([span])

    assert result is SpanExportResult.FAILURE
    assert unreachable.failed == 1
    assert unreachable.dropped == 0


def test_unreachable_broker_drops_and_counts_without_blocking(finished, unreachable):
    provider, memory = finished
    spans = _llm_spans(provider, memory, count=20)

    started = time.monotonic()
    result = unreachable.export(spans)
    assert time.monotonic() - started < HANG_GUARD_SECONDS

    assert result is SpanExportResult.FAILURE
    assert unreachable.dropped == 15
    assert unreachable.stats().queued == 5
    assert unreachable.force_flush(timeout_millis=100) is False

    unreachable.shutdown()
    stats = unreachable.stats()
    assert stats.dropped == 20
    assert (stats.exported, stats.failed, stats.queued) == (0, 0, 0)


def test_export_after_shutdown_drops(finished, unreachable):
    provider, memory = finished
    spans = _llm_spans(provider, memory, count=2)
    unreachable.shutdown()

    assert unreachable.export(spans) is SpanExportResult.FAILURE
    assert unreachable.dropped == 2


def test_shutdown_is_bounded_when_the_broker_is_away(finished):
    provider, memory = finished
    exporter = KafkaSpanExporter(f"127.0.0.1:{_closed_port()}", shutdown_timeout=1.0)
    exporter.export(_llm_spans(provider, memory, count=3))

    started = time.monotonic()
    exporter.shutdown()

    assert time.monotonic() - started < HANG_GUARD_SECONDS
    assert exporter.dropped == 3


def test_force_flush_with_nothing_queued_succeeds(unreachable):
    assert unreachable.force_flush(timeout_millis=100) is True


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"bootstrap_servers": ""}, "at least one broker"),
        ({"topic": ""}, "must be a Kafka topic name"),
        ({"topic": "spans for agents"}, "must be a Kafka topic name"),
        ({"max_queue": 0}, "max_queue must be >= 1"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"shutdown_timeout": 0}, "shutdown_timeout must be > 0"),
        ({"linger_ms": -1}, "linger_ms must be >= 0"),
    ],
)
def test_bad_settings_are_rejected(options, problem):
    arguments = {"bootstrap_servers": "127.0.0.1:9092", **options}
    with pytest.raises(ConfigError, match=problem):
        KafkaSpanExporter(**arguments)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_gets_a_sender_of_its_own(finished, unreachable):
    provider, memory = finished
    unreachable.export(_llm_spans(provider, memory, count=2))
    spans = _llm_spans(provider, memory, count=1)

    pid = os.fork()
    if pid == 0:
        # In the child: a live sender, an empty queue, and export still works.
        alive = unreachable._thread.is_alive()
        queued_before = unreachable.stats().queued
        unreachable.export(spans)
        queued_after = unreachable.stats().queued
        os._exit(0 if (alive, queued_before, queued_after) == (True, 0, 1) else 1)

    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert unreachable.stats().queued == 2
