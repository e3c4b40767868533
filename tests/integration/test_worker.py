"""The `tripwire worker` process on the real broker and Redis, end to end."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from support.worker_process import WorkerProcess as Worker
from support.worker_process import delete_topics, launch_worker

from tripwire.schemas.events import Alert, KillCommand, Scope, SpanEvent, SpanKind
from tripwire.schemas.killswitch import redis_kill_key
from tripwire.schemas.native import decode_native, encode_native
from tripwire.schemas.otlp import decode_otlp
from tripwire.streams.app import DLQ_OFFSET, DLQ_PARTITION, DLQ_REASON, DLQ_TOPIC
from tripwire.streams.core import Detector
from tripwire.streams.embedded import EmbeddedRuntime
from tripwire.streams.policy import Policy
from tripwire.streams.pricing import PriceBook
from tripwire.streams.simulate import simulate_fleet

START_SECONDS = 120.0
WAIT_SECONDS = 60.0
BASE_TIME = 1_750_000_000.0
PARTITIONS = 2

# The policy the worker and the in-process reference both run with; the
# defaults, spelled out so that an environment variable cannot change them.
POLICY_ENV = {"TRIPWIRE_SESSION_BUDGET_USD": "2.0"}

Decision = KillCommand | Alert
Key = tuple[str, str, str]

# Marks the output texts of the OTLP test: they must never reach a topic.
SECRET = "Confidential-7f3a"
HEALTHY_STEPS = (
    "reading the invoice archive for March.",
    "comparing freight quotes from three carriers.",
    "drafting the purchase order for approval.",
)


def _metric(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float],
    name: str,
    **labels: str,
) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _launch(
    bootstrap: str,
    redis_url: str,
    prefix: str,
    data: Path,
    store: str = "memory://",
    **extra_env: str,
) -> Worker:
    """Start `tripwire worker` with the test policy, store and Redis key prefix."""
    return launch_worker(
        bootstrap,
        redis_url,
        prefix,
        data,
        **POLICY_ENV,
        TRIPWIRE_REDIS_KEY_PREFIX=f"{prefix}:kill",
        TRIPWIRE_STORE=store,
        TRIPWIRE_PARTITIONS=str(PARTITIONS),
        **extra_env,
    )


def _delete_keys(redis_url: str, pattern: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=pattern))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture(scope="module")
def worker(
    kafka_bootstrap: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Worker]:
    """Start one worker on fresh topics and a fresh app id for this module."""
    prefix = f"tripwire-test-worker-{uuid.uuid4().hex[:10]}"
    data = tmp_path_factory.mktemp("worker")
    running = _launch(kafka_bootstrap, redis_url, prefix, data)
    try:
        yield running
    finally:
        running.stop()
        asyncio.run(delete_topics(kafka_bootstrap, prefix))
        _delete_keys(redis_url, f"{prefix}:*")
    assert running.process.returncode == 0, running.log_tail()


@pytest.fixture
async def producer(worker: Worker) -> AsyncIterator[AIOKafkaProducer]:
    """An idle Kafka producer on the test broker."""
    client = AIOKafkaProducer(bootstrap_servers=worker.bootstrap, acks="all")
    await client.start()
    try:
        yield client
    finally:
        await client.stop()


async def _produce(
    producer: AIOKafkaProducer,
    topic: str,
    records: Iterable[tuple[bytes | None, bytes]],
) -> None:
    for key, value in records:
        await producer.send(topic, value=value, key=key)
    await producer.flush()


def _spans_records(spans: Iterable[SpanEvent]) -> list[tuple[bytes | None, bytes]]:
    return [
        (span.session_id.encode(), encode_native(span, include_text=True))
        for span in spans
    ]


async def _consume_until(
    bootstrap: str,
    topics: list[str],
    done: Callable[[list[Any]], bool],
    timeout: float = WAIT_SECONDS,
) -> list[Any]:
    """Read ``topics`` from the start until ``done(records)`` or the timeout."""
    consumer = AIOKafkaConsumer(
        *topics,
        bootstrap_servers=bootstrap,
        group_id=f"tripwire-test-reader-{uuid.uuid4().hex[:10]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    records: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while not done(records) and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=300)
            for batch in batches.values():
                records.extend(batch)
    finally:
        await consumer.stop()
    return records


async def _read_to_end(bootstrap: str, topics: list[str]) -> list[Any]:
    """Read every record ``topics`` hold now, from the first to the last."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(topics)
    finally:
        await admin.close()
    partitions = [
        TopicPartition(topic["topic"], partition["partition"])
        for topic in described
        for partition in topic["partitions"]
    ]
    assert partitions, f"no partitions found for {topics}"

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    records: list[Any] = []
    try:
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        deadline = time.monotonic() + WAIT_SECONDS
        while [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
            assert time.monotonic() < deadline, "timed out reading to the end"
            batches = await consumer.getmany(timeout_ms=300)
            for batch in batches.values():
                records.extend(batch)
    finally:
        await consumer.stop()
    return records


async def _wait_for(
    predicate: Callable[[], bool], timeout: float = WAIT_SECONDS
) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await asyncio.to_thread(predicate):
            return True
        await asyncio.sleep(0.2)
    return False


def _llm_span(
    session_id: str, index: int, cost_usd: float, user_id: str | None = None
) -> SpanEvent:
    end = BASE_TIME + index * 120.0
    return SpanEvent(
        span_id=f"{session_id}-span-{index}",
        trace_id=f"{session_id}-trace",
        session_id=session_id,
        kind=SpanKind.LLM,
        start_time=end - 2.0,
        end_time=end,
        user_id=user_id or f"{session_id}-user",
        agent_name="researcher",
        model="gpt-4o",
        provider="openai",
        input_tokens=1200,
        output_tokens=300,
        cost_usd=cost_usd,
    )


def _decision_key(decision: Decision) -> Key:
    if isinstance(decision, KillCommand):
        return ("kill", decision.target, decision.reason)
    return ("alert", decision.target, decision.rule)


def _record_key(topic: str, value: bytes, topics: dict[str, str]) -> Key:
    record = orjson.loads(value)
    if topic == topics["killswitch"]:
        return ("kill", record["target"], record["reason"])
    return ("alert", record["target"], record["rule"])


def _reference_decisions(spans: Iterable[SpanEvent]) -> set[Key]:
    """Run the spans through the detector in-process, as `tripwire replay` does."""
    policy = Policy.from_env({**POLICY_ENV})
    runtime = EmbeddedRuntime(Detector(policy, PriceBook.load()))
    decisions: set[Key] = set()
    for span in spans:
        decisions.update(_decision_key(d) for d in runtime.feed(span))
    return decisions


# Tests ------------------------------------------------------------------------


async def test_runaway_session_is_killed_and_healthy_one_is_not(
    worker: Worker, producer: AIOKafkaProducer
) -> None:
    run = uuid.uuid4().hex[:8]
    runaway, healthy = f"runaway-{run}", f"healthy-{run}"
    spans = [_llm_span(runaway, i, 0.45) for i in range(6)]
    spans += [_llm_span(healthy, i, 0.01) for i in range(3)]

    await _produce(producer, worker.topics["spans"], _spans_records(spans))
    records = await _consume_until(
        worker.bootstrap,
        [worker.topics["killswitch"]],
        lambda got: any(r.key == runaway.encode() for r in got),
    )
    assert await _wait_for(lambda: (worker.session(healthy) or {}).get("spans") == 3)

    kills = [orjson.loads(r.value) for r in records if r.key == runaway.encode()]
    assert [k["reason"] for k in kills] == ["session_cost_budget"]
    assert kills[0]["scope"] == "session"
    flag = redis.Redis.from_url(worker.redis_url)
    try:
        prefix = f"{worker.app_id}:kill"
        stored = flag.get(redis_kill_key(Scope.SESSION, runaway, prefix))
        assert stored is not None
        assert orjson.loads(stored)["command_id"] == kills[0]["command_id"]
        assert 0 < flag.ttl(redis_kill_key(Scope.SESSION, runaway, prefix)) <= 3600
        assert flag.get(redis_kill_key(Scope.SESSION, healthy, prefix)) is None
    finally:
        flag.close()
    later = await _read_to_end(worker.bootstrap, [worker.topics["killswitch"]])
    assert [r for r in later if r.key == runaway.encode()]
    assert not [r for r in later if r.key == healthy.encode()]


async def test_worker_decisions_match_the_embedded_runtime(
    worker: Worker, producer: AIOKafkaProducer
) -> None:
    run = uuid.uuid4().hex[:8]
    fleet = simulate_fleet(sessions=24, seed=7)
    # Fresh ids, so that no other test's sessions or users mix in.
    spans = [
        replace(
            span,
            session_id=f"{run}-{span.session_id}",
            user_id=f"{run}-{span.user_id}" if span.user_id else None,
            span_id=f"{run}-{span.span_id}",
        )
        for span in fleet.spans()
    ]
    expected = _reference_decisions(spans)
    assert any(kind == "kill" for kind, _, _ in expected)

    await _produce(producer, worker.topics["spans"], _spans_records(spans))

    def ours(records: list[Any]) -> set[Key]:
        keys = {_record_key(r.topic, r.value, worker.topics) for r in records}
        return {key for key in keys if key[1].startswith(run)}

    records = await _consume_until(
        worker.bootstrap,
        [worker.topics["killswitch"], worker.topics["alerts"]],
        lambda got: ours(got) >= expected,
    )
    assert ours(records) == expected


async def test_malformed_records_are_dead_lettered_and_good_ones_processed(
    worker: Worker, producer: AIOKafkaProducer
) -> None:
    session = f"dlq-{uuid.uuid4().hex[:8]}"
    good = _spans_records([_llm_span(session, 0, 0.01), _llm_span(session, 1, 0.01)])
    bad = [
        (session.encode(), b"{not json"),
        (session.encode(), b'{"span_id": "x", "kind": "llm"}'),
        (None, b"[1, 2, 3]"),
    ]
    records = [good[0], bad[0], bad[1], good[1], bad[2]]

    await _produce(producer, worker.topics["spans"], records)
    dead = await _consume_until(
        worker.bootstrap,
        [worker.topics["dlq"]],
        lambda got: sum(r.value in {v for _, v in bad} for r in got) >= len(bad),
    )
    assert await _wait_for(lambda: (worker.session(session) or {}).get("spans") == 2)

    ours = [r for r in dead if r.value in {v for _, v in bad}]
    assert sorted(r.value for r in ours) == sorted(v for _, v in bad)
    for record in ours:
        headers = dict(record.headers)
        assert headers[DLQ_REASON]
        assert headers[DLQ_TOPIC] == worker.topics["spans"].encode()
        assert int(headers[DLQ_PARTITION]) in range(PARTITIONS)
        assert int(headers[DLQ_OFFSET]) >= 0
    reasons = {dict(r.headers)[DLQ_REASON].decode() for r in ours}
    assert any("JSON" in reason for reason in reasons)
    assert worker.process.poll() is None


async def test_duplicated_spans_leave_session_totals_unchanged(
    worker: Worker, producer: AIOKafkaProducer
) -> None:
    session = f"dup-{uuid.uuid4().hex[:8]}"
    records = _spans_records(_llm_span(session, i, 0.1) for i in range(4))
    before = worker.metrics()

    await _produce(producer, worker.topics["spans"], records)
    assert await _wait_for(lambda: (worker.session(session) or {}).get("spans") == 4)
    first = worker.session(session)
    await _produce(producer, worker.topics["spans"], records)
    assert await _wait_for(
        lambda: (
            _metric(worker.metrics(), "tripwire_spans_total", outcome="duplicate")
            >= _metric(before, "tripwire_spans_total", outcome="duplicate") + 4
        )
    )

    assert first is not None
    assert worker.session(session) == first
    assert first["llm_calls"] == 4
    assert first["cost_usd"] == pytest.approx(0.4)


async def test_metrics_counters_move(
    worker: Worker, producer: AIOKafkaProducer
) -> None:
    session = f"metrics-{uuid.uuid4().hex[:8]}"
    before = worker.metrics()
    labels = {"model": "gpt-4o", "provider": "openai", "agent": "researcher"}

    await _produce(
        producer,
        worker.topics["spans"],
        _spans_records(_llm_span(session, i, 0.25) for i in range(2)),
    )
    assert await _wait_for(lambda: (worker.session(session) or {}).get("spans") == 2)
    after = worker.metrics()

    def moved(name: str, **extra: str) -> float:
        return _metric(after, name, **extra) - _metric(before, name, **extra)

    assert moved("tripwire_spans_total", outcome="processed") >= 2
    assert moved("llm_calls_total", **labels) >= 2
    assert moved("llm_cost_usd_total", **labels) >= 0.5 - 1e-9
    assert (
        moved("llm_tokens_total", type="input", model="gpt-4o", provider="openai")
        >= 2400
    )
    assert (
        moved("gen_ai_usage_input_tokens_count", model="gpt-4o", provider="openai") >= 2
    )
    assert moved("tripwire_processing_lag_seconds_count") >= 2
    assert _metric(after, "tripwire_last_batch_timestamp_seconds") > 0
    for (name, label_set), _ in after.items():
        assert not any(session in value for _, value in label_set), name


async def test_unknown_session_is_404(worker: Worker) -> None:
    status, body = worker.get(f"/sessions/never-seen-{uuid.uuid4().hex[:8]}")

    assert status == 404
    assert b"not in this worker" in body


def _otlp_record(run: str) -> tuple[bytes, list[str]]:
    """Record one runaway and one healthy session with the OTel SDK, as OTLP."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "planner"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("tripwire.tests")
    plan = {f"otlp-runaway-{run}": (12, 60_000), f"otlp-healthy-{run}": (3, 800)}
    for session, (calls, input_tokens) in plan.items():
        for call in range(calls):
            # The runaway repeats itself; the healthy session makes progress.
            text = (
                f"{SECRET} Let me search the supplier list again for the cheapest."
                if "runaway" in session
                else f"{SECRET} Step {call}: {HEALTHY_STEPS[call]}"
            )
            start = int((BASE_TIME + call * 30.0) * 1e9)
            span = tracer.start_span(
                "chat gpt-4o",
                start_time=start,
                attributes={
                    "session.id": session,
                    "user.id": f"{session}-user",
                    "gen_ai.operation.name": "chat",
                    "gen_ai.provider.name": "openai",
                    "gen_ai.request.model": "gpt-4o",
                    "gen_ai.usage.input_tokens": input_tokens,
                    "gen_ai.usage.output_tokens": 200,
                    "gen_ai.completion.0.content": text,
                },
            )
            span.end(end_time=start + 2_000_000_000)
    record = encode_spans(list(exporter.get_finished_spans())).SerializeToString()
    return record, list(plan)


async def test_otlp_records_get_the_same_decisions_as_native_spans(
    worker: Worker, producer: AIOKafkaProducer
) -> None:
    run = uuid.uuid4().hex[:8]
    record, sessions = _otlp_record(run)
    decoded = decode_otlp(record, "otlp_proto")
    assert all(SECRET in (span.output_text or "") for span in decoded.spans)
    expected = _reference_decisions(decoded.spans)
    assert ("kill", sessions[0], "token_budget") in expected
    assert ("kill", sessions[0], "loop_similarity") in expected

    await _produce(producer, worker.topics["otlp"], [(None, record)])

    def ours(records: list[Any]) -> set[Key]:
        keys = {_record_key(r.topic, r.value, worker.topics) for r in records}
        return {key for key in keys if run in key[1]}

    records = await _consume_until(
        worker.bootstrap,
        [worker.topics["killswitch"], worker.topics["alerts"]],
        lambda got: ours(got) >= expected,
    )
    assert await _wait_for(
        lambda: (worker.session(sessions[1]) or {}).get("spans") == 3
    )
    assert ours(records) == expected
    assert (worker.session(sessions[0]) or {}).get("llm_calls") == 12

    # The spans the worker forwarded carry text codes, never the text.
    forwarded = await _consume_until(
        worker.bootstrap,
        [worker.topics["spans"]],
        lambda got: sum(run.encode() in r.value for r in got) >= 15,
    )
    ours_forwarded = [r.value for r in forwarded if run.encode() in r.value]
    assert len(ours_forwarded) == 15
    for value in ours_forwarded:
        assert SECRET.encode() not in value
        span = decode_native(value)
        assert span.output_text is None
        assert span.output_code is not None


@pytest.mark.parametrize("store", ["memory://", "rocksdb://"])
async def test_restart_restores_state_and_never_repeats_a_kill(
    kafka_bootstrap: str, redis_url: str, tmp_path: Path, store: str
) -> None:
    if store == "rocksdb://":
        # The rocksdb extra; .ci/run installs it.
        pytest.importorskip("rocksdict")
    prefix = f"tripwire-test-restart-{uuid.uuid4().hex[:10]}"
    session = f"restart-{uuid.uuid4().hex[:8]}"
    first_half = _spans_records(_llm_span(session, i, 0.45) for i in range(6))
    second_half = _spans_records(_llm_span(session, i, 0.45) for i in range(6, 8))
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    workers: list[Worker] = []
    try:
        first = await asyncio.to_thread(
            _launch, kafka_bootstrap, redis_url, prefix, tmp_path, store
        )
        workers.append(first)
        await _produce(producer, first.topics["spans"], first_half)
        assert await _wait_for(lambda: (first.session(session) or {}).get("spans") == 6)
        before = first.session(session)
        await asyncio.to_thread(first.stop)
        assert first.process.returncode == 0, first.log_tail()

        second = await asyncio.to_thread(
            _launch, kafka_bootstrap, redis_url, prefix, tmp_path, store
        )
        workers.append(second)
        assert second.session(session) == before
        # The first half again (a redelivery), then two new spans.
        await _produce(producer, second.topics["spans"], first_half + second_half)
        assert await _wait_for(
            lambda: (second.session(session) or {}).get("spans") == 8
        )
        samples = second.metrics()
        await asyncio.to_thread(second.stop)
        assert second.process.returncode == 0, second.log_tail()

        kills = await _read_to_end(kafka_bootstrap, [first.topics["killswitch"]])
        assert [orjson.loads(r.value)["reason"] for r in kills] == [
            "session_cost_budget"
        ]
        assert (
            _metric(samples, "tripwire_kills_total", reason="session_cost_budget") == 0
        )
        assert _metric(samples, "tripwire_spans_total", outcome="duplicate") == 6
    finally:
        for running in workers:
            await asyncio.to_thread(running.stop)
        await producer.stop()
        await delete_topics(kafka_bootstrap, prefix)
        _delete_keys(redis_url, f"{prefix}:*")


async def test_idle_sessions_are_evicted_by_event_time(
    kafka_bootstrap: str, redis_url: str, tmp_path: Path
) -> None:
    prefix = f"tripwire-test-idle-{uuid.uuid4().hex[:10]}"
    old, new = f"idle-old-{uuid.uuid4().hex[:6]}", f"idle-new-{uuid.uuid4().hex[:6]}"
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        worker = await asyncio.to_thread(
            _launch,
            kafka_bootstrap,
            redis_url,
            prefix,
            tmp_path,
            TRIPWIRE_SESSION_IDLE_SECONDS="600",
            TRIPWIRE_SWEEP_INTERVAL_SECONDS="1",
        )
    except BaseException:
        await producer.stop()
        await delete_topics(kafka_bootstrap, prefix)
        raise
    try:
        await _produce(
            producer, worker.topics["spans"], _spans_records([_llm_span(old, 0, 0.1)])
        )
        assert await _wait_for(lambda: worker.session(old) is not None)
        # Two hours of event time later, in another session: "old" is idle.
        late = [_llm_span(new, i, 0.1) for i in range(60, 62)]
        await _produce(producer, worker.topics["spans"], _spans_records(late))
        assert await _wait_for(lambda: worker.session(old) is None)

        assert (worker.session(new) or {}).get("spans") == 2
        steps = _metric(
            worker.metrics(), "agent_session_steps_count", agent="researcher"
        )
        assert steps == 1
        # The evicted session starts afresh when it comes back.
        await _produce(
            producer, worker.topics["spans"], _spans_records([_llm_span(old, 61, 0.1)])
        )
        assert await _wait_for(lambda: (worker.session(old) or {}).get("spans") == 1)
    finally:
        await asyncio.to_thread(worker.stop)
        await producer.stop()
        await delete_topics(kafka_bootstrap, prefix)
        _delete_keys(redis_url, f"{prefix}:*")
    assert worker.process.returncode == 0, worker.log_tail()
