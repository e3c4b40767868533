"""The Kafka span exporter against the real broker."""

import asyncio
import time

from aiokafka import AIOKafkaConsumer
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from tripwire.agents.exporter import KafkaSpanExporter
from tripwire.schemas.events import SpanKind
from tripwire.schemas.native import decode_native

HANG_GUARD_SECONDS = 60.0


async def _read(bootstrap: str, topic: str, group: str, count: int) -> list:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    records = []
    deadline = time.monotonic() + HANG_GUARD_SECONDS
    try:
        while len(records) < count and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for batch in batches.values():
                records.extend(batch)
    finally:
        await consumer.stop()
    return records


def _run_agent(exporter: KafkaSpanExporter) -> None:
    provider = TracerProvider(resource=Resource.create({"service.name": "agent"}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    tracer = provider.get_tracer("test-agent")
    for session in ("session-a", "session-b"):
        with tracer.start_as_current_span("invoke_agent planner") as run:
            run.set_attribute("gen_ai.operation.name", "invoke_agent")
            run.set_attribute("gen_ai.agent.name", "planner")
            run.set_attribute("session.id", session)
            for step in range(3):
                with tracer.start_as_current_span("chat gpt-4o-mini") as span:
                    span.set_attributes(
                        {
                            "gen_ai.operation.name": "chat",
                            "gen_ai.request.model": "gpt-4o-mini",
                            "gen_ai.usage.input_tokens": 100 * (step + 1),
                            "gen_ai.usage.output_tokens": 20,
                            "session.id": session,
                        }
                    )
                with tracer.start_as_current_span("GET /search") as http:
                    http.set_attribute("http.request.method", "GET")
    assert provider.force_flush(int(HANG_GUARD_SECONDS * 1000))
    provider.shutdown()


async def test_exporter_publishes_native_spans_keyed_by_session(
    kafka_bootstrap, create_topics, unique_name
):
    (topic,) = await create_topics([unique_name("spans")], partitions=2)
    exporter = KafkaSpanExporter(kafka_bootstrap, topic)

    await asyncio.to_thread(_run_agent, exporter)

    stats = exporter.stats()
    assert (stats.exported, stats.dropped, stats.failed) == (8, 0, 0)
    assert stats.skipped == 6

    records = await _read(kafka_bootstrap, topic, unique_name("group"), 8)
    assert len(records) == 8
    events = [decode_native(record.value) for record in records]
    for record, event in zip(records, events, strict=True):
        assert record.key == event.session_id.encode()
    by_session = {
        session: sorted(e.input_tokens for e in events if e.session_id == session)
        for session in ("session-a", "session-b")
    }
    assert by_session == {
        "session-a": [0, 100, 200, 300],
        "session-b": [0, 100, 200, 300],
    }
    kinds = sorted(e.kind.value for e in events)
    assert kinds == [SpanKind.AGENT.value] * 2 + [SpanKind.LLM.value] * 6
    partitions = {r.partition for r in records if r.key == b"session-a"}
    assert len(partitions) == 1


async def test_exporter_sends_in_small_batches(
    kafka_bootstrap, create_topics, unique_name
):
    (topic,) = await create_topics([unique_name("spans")])
    exporter = KafkaSpanExporter(kafka_bootstrap, topic, batch_size=2)

    await asyncio.to_thread(_run_agent, exporter)

    assert exporter.force_flush(1000) is True
    assert exporter.exported == 8
    assert exporter.stats().queued == 0
