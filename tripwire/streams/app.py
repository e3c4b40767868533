"""The Faust worker: topics, tables and processors around the detection core."""

from __future__ import annotations

import asyncio
import io
import logging
import math
import socket
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from typing import Any, cast

import faust
import orjson
from faust import streams as faust_streams
from faust.exceptions import SameNode
from faust.types import EventT

from tripwire.config import WorkerSettings
from tripwire.errors import ConfigError, SpanValidationError, TripwireError
from tripwire.schemas.events import Alert, KillCommand, Scope, SpanEvent
from tripwire.schemas.native import decode_native, encode_native
from tripwire.schemas.otlp import OtlpEncoding, decode_otlp
from tripwire.streams.core import Detector, Usage
from tripwire.streams.effects import DecisionPublisher, RedisMirror, Send
from tripwire.streams.metrics import CONTENT_TYPE, WorkerMetrics
from tripwire.streams.policy import RULE_BIT, RULES
from tripwire.streams.state import SessionState, StateDecodeError, UserDayState

logger = logging.getLogger(__name__)

Decision = KillCommand | Alert
Event = EventT[Any]

SESSION_TABLE = "sessions"
USER_DAY_TABLE = "user-days"

# Headers of a dead-letter record; its key and value are the original ones.
DLQ_REASON = "tripwire.dlq.reason"
DLQ_FIELD = "tripwire.dlq.field"
DLQ_TOPIC = "tripwire.dlq.topic"
DLQ_PARTITION = "tripwire.dlq.partition"
DLQ_OFFSET = "tripwire.dlq.offset"
DLQ_AT = "tripwire.dlq.at"

# Usages of one user from one span batch share a usage-topic record of at most
# this many bytes (one usage is a few kilobytes at most): far below Kafka's 1 MB.
USAGE_RECORD_BYTES = 256 * 1024


@dataclass(slots=True)
class _SessionBatch:
    """The spans of one session in a batch, with the last event that carried one."""

    event: Event
    spans: list[SpanEvent] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)


@dataclass(slots=True)
class _UserDayBatch:
    """The usage records of one user-day in a batch, with the last event."""

    event: Event
    usages: list[Usage] = field(default_factory=list)


class TripwireApp:
    """The Faust application of one worker, and the state its processors share.

    Args:
        settings: validated worker settings.
        detector: the detection core, with its policy and price book.
        metrics: where to count; a fresh private registry when omitted.
    """

    def __init__(
        self,
        settings: WorkerSettings,
        detector: Detector,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.detector = detector
        self.metrics = metrics if metrics is not None else WorkerMetrics()
        self.mirror: RedisMirror | None = None
        self._watermark = -math.inf
        # Which partition each session's state lives on, and the newest event
        # of each partition: what a table delete outside a batch needs.
        self._session_partitions: dict[bytes, int] = {}
        self._partition_events: dict[int, Event] = {}
        self.app = self._build_app()
        self._declare_topics()
        self._declare_tables()
        self.publisher = DecisionPublisher(
            self._sender(self.killswitch_topic),
            self._sender(self.alerts_topic),
            self.metrics,
            None,
        )
        self._declare_processors()
        self._declare_views()

    # Wiring ------------------------------------------------------------------

    def _build_app(self) -> faust.App:
        settings = self.settings
        advertised = settings.web_host
        if advertised in ("0.0.0.0", "::"):
            advertised = socket.gethostname()
        return faust.App(
            settings.app_id,
            broker=settings.broker_url,
            store=settings.store,
            datadir=str(settings.data_dir),
            topic_partitions=settings.partitions,
            topic_replication_factor=settings.replication_factor,
            topic_allow_declare=True,
            key_serializer="raw",
            value_serializer="raw",
            web_enabled=True,
            web_bind=settings.web_host,
            web_port=settings.web_port,
            canonical_url=f"http://{advertised}:{settings.web_port}",
            broker_commit_interval=settings.commit_interval_seconds,
            broker_session_timeout=settings.session_timeout_seconds,
            broker_heartbeat_interval=settings.heartbeat_interval_seconds,
            broker_rebalance_timeout=settings.session_timeout_seconds,
            consumer_auto_offset_reset="earliest",
            # Effects are idempotent (deterministic command ids, the Redis
            # marker, span-id dedupe), so a batch cut short by a rebalance is
            # simply processed again.
            stream_wait_empty=False,
            stream_recovery_delay=0.0,
            table_standby_replicas=0,
            producer_acks=-1,
            autodiscover=False,
            web_in_thread=False,
        )

    def _declare_topics(self) -> None:
        settings = self.settings
        names = settings.topics

        def topic(name: str, partitions: int | None = None) -> faust.TopicT:
            return self.app.topic(
                name,
                key_type=bytes,
                value_type=bytes,
                key_serializer="raw",
                value_serializer="raw",
                partitions=partitions,
            )

        self.spans_topic = topic(names.spans, settings.partitions)
        self.otlp_topic = topic(names.otlp)
        self.killswitch_topic = topic(names.killswitch)
        self.alerts_topic = topic(names.alerts)
        self.dlq_topic = topic(names.dlq)
        self.usage_topic = topic(settings.usage_topic, settings.partitions)

    def _declare_tables(self) -> None:
        partitions = self.settings.partitions
        self.sessions = self.app.Table(
            SESSION_TABLE,
            default=None,
            partitions=partitions,
            key_type=bytes,
            value_type=bytes,
            help="session id -> encoded SessionState",
            on_changelog_event=self._on_session_changelog,
        )
        self.user_days = self.app.Table(
            USER_DAY_TABLE,
            default=None,
            partitions=partitions,
            key_type=bytes,
            value_type=bytes,
            help="user id + event-time day -> encoded UserDayState",
        )

    def _declare_processors(self) -> None:
        settings = self.settings
        app = self.app

        @app.agent(self.spans_topic, name="tripwire.process_spans")
        async def process_spans(stream: Any) -> None:
            async for events in stream.take_events(
                settings.batch_size, within=settings.batch_within_seconds
            ):
                await self.handle_span_batch(events)

        @app.agent(self.usage_topic, name="tripwire.process_usage")
        async def process_usage(stream: Any) -> None:
            async for events in stream.take_events(
                settings.batch_size, within=settings.batch_within_seconds
            ):
                await self.handle_usage_batch(events)

        if settings.otlp_enabled:

            @app.agent(self.otlp_topic, name="tripwire.process_otlp")
            async def process_otlp(stream: Any) -> None:
                async for events in stream.take_events(
                    settings.batch_size, within=settings.batch_within_seconds
                ):
                    await self.handle_otlp_batch(events)

        # A timer, not the end of a batch: a session must go idle even when no
        # batch follows the one that moved the event-time watermark on.
        async def sweep_idle_sessions() -> None:
            self.evict_idle_sessions()

        app.timer(settings.sweep_interval_seconds, name="tripwire.sweep_idle")(
            sweep_idle_sessions
        )

        async def on_rebalance_complete(sender: Any, **kwargs: Any) -> None:
            sources = {
                self.spans_topic.get_topic_name(),
                self.usage_topic.get_topic_name(),
            }
            if settings.otlp_enabled:
                sources.add(self.otlp_topic.get_topic_name())
            assigned = sorted(
                f"{tp.topic}[{tp.partition}]"
                for tp in app.consumer.assignment()
                if tp.topic in sources
            )
            logger.info("partitions assigned: %s", ", ".join(assigned) or "none")

        # Faust's signal stubs reject coroutine receivers; the call is fine.
        cast(Any, app.on_rebalance_complete).connect(on_rebalance_complete)

        async def announce_ready() -> None:
            while not self.ready:
                await asyncio.sleep(0.2)
            logger.info(
                "worker ready: %d session(s) and %d user-day(s) in the local tables",
                len(self.sessions),
                len(self.user_days),
            )

        app.task(announce_ready)

    def _declare_views(self) -> None:
        app = self.app
        metrics = self.metrics

        @app.page("/metrics")
        async def metrics_view(web: Any, request: Any) -> Any:
            metrics.sessions_in_table.set(len(self.sessions))
            # aiohttp refuses a charset inside content_type; a header may carry it.
            return web.bytes(metrics.render(), headers={"Content-Type": CONTENT_TYPE})

        @app.page("/ready")
        async def ready_view(web: Any, request: Any) -> Any:
            if not self.ready:
                return web.json({"ready": False}, status=503)
            return web.json({"ready": True})

        @app.page("/sessions/{session_id}")
        async def session_view(web: Any, request: Any, session_id: str) -> Any:
            if not self.ready:
                return web.json(
                    {"error": "the worker is assigning partitions; retry shortly"},
                    status=503,
                )
            try:
                # The owner of the session's partition answers: this worker,
                # or another one the request is forwarded to.
                return await app.router.route_req(
                    self.sessions.name, session_id.encode(), web, request
                )
            except SameNode:
                pass
            document = self.session_document(session_id)
            if document is None:
                return web.json(
                    {"error": f"session {session_id!r} is not in this worker's table"},
                    status=404,
                )
            return web.json(document)

    @property
    def ready(self) -> bool:
        """Whether partitions are assigned and the tables recovered."""
        app = self.app
        recovery = cast(Any, app.tables).recovery
        return bool(
            not app.rebalancing
            and recovery.completed.is_set()
            and app.consumer.assignment()
        )

    def _sender(self, topic: faust.TopicT) -> Send:
        async def send(key: bytes, value: bytes) -> None:
            delivery = await topic.send(key=key, value=value)
            await delivery

        return send

    def attach_mirror(self, mirror: RedisMirror | None) -> None:
        """Set (or clear) the Redis mirror used for kill commands."""
        self.mirror = mirror
        self.publisher.mirror = mirror

    # Span processing -----------------------------------------------------------

    async def handle_span_batch(self, events: Sequence[Event]) -> None:
        """Decode, detect and publish for one batch of native span records.

        Each session's state is read once and written once per batch, which
        keeps changelog traffic to one record per session and batch.

        Args:
            events: Faust events of the spans topic, in arrival order.
        """
        by_session: dict[str, _SessionBatch] = {}
        for event in events:
            self._partition_events[event.message.partition] = event
            span = await self._decode_native(event)
            if span is None:
                continue
            key = span.session_id.encode()
            if event.message.key != key:
                await self._rekey(span, event)
                continue
            batch = by_session.get(span.session_id)
            if batch is None:
                batch = by_session[span.session_id] = _SessionBatch(event)
            batch.event = event
            batch.spans.append(span)
            batch.events.append(event)

        decisions: list[Decision] = []
        usages: list[Usage] = []
        end_times: list[float] = []
        failed: list[tuple[Event, str]] = []
        for session_id, batch in by_session.items():
            _bind_event(batch.event)
            decisions.extend(self._observe_session(session_id, batch, usages, failed))
            end_times.extend(span.end_time for span in batch.spans)

        for event, reason in failed:
            await self.dead_letter(event, reason, None)

        for user_id, of_user in _by_user(usages).items():
            key = user_id.encode()
            for record in usage_records(of_user):
                await self.usage_topic.send(key=key, value=record)
        await self.publisher.publish(decisions)
        self.metrics.observe_batch(end_times)
        self._watermark = max(self._watermark, max(end_times, default=-math.inf))

    def _observe_session(
        self,
        session_id: str,
        batch: _SessionBatch,
        usages: list[Usage],
        failed: list[tuple[Event, str]],
    ) -> list[Decision]:
        key = session_id.encode()
        state = self._load_session(key)
        decisions: list[Decision] = []
        for span, event in zip(batch.spans, batch.events, strict=True):
            try:
                state, outcome = self.detector.observe_span(state, span)
            except Exception as exc:
                # A detector fault on one span must not stop the stream, nor
                # lose the span: it goes to the dead-letter topic to replay.
                logger.exception(
                    "detector failed on span %s of session %s",
                    span.span_id,
                    session_id,
                )
                failed.append((event, f"detector failed: {exc!r}"))
                continue
            if outcome.duplicate:
                self.metrics.count_spans("duplicate")
                continue
            cost = outcome.cost
            self.metrics.observe_span(
                span,
                cost.cost_usd if cost is not None else 0.0,
                cost.priced if cost is not None else True,
            )
            if outcome.usage is not None:
                usages.append(outcome.usage)
            decisions.extend(outcome.decisions)

        if state is not None:
            self.sessions[key] = state.encode()
            self._session_partitions[key] = batch.event.message.partition
            if any(_kills_session(decision, session_id) for decision in decisions):
                self._observe_session_end(state)
        return decisions

    def _load_session(self, key: bytes) -> SessionState | None:
        stored = self.sessions.get(key)
        if stored is None:
            return None
        try:
            return SessionState.decode(stored)
        except StateDecodeError as exc:
            logger.warning(
                "session %r has an unreadable stored state (%s); starting it afresh",
                key.decode(errors="replace"),
                exc,
            )
            return None

    def _observe_session_end(self, state: SessionState) -> None:
        self.metrics.observe_session_end(
            state.agent_name, state.llm_calls + state.tool_calls, state.cost_usd
        )

    def evict_idle_sessions(self) -> int:
        """Drop the sessions idle longer than the idle timeout, in event time.

        A session whose newest span ended more than ``session_idle_seconds``
        before the newest span this worker has seen is removed from the table
        (a tombstone on its changelog partition); its size goes to the session
        histograms unless a kill already reported it. Only sessions of
        partitions this worker owns, and has seen an event of since it
        started, are touched.

        Returns:
            How many sessions were evicted.
        """
        idle = self.settings.session_idle_seconds
        if idle <= 0 or self._watermark == -math.inf:
            return 0

        horizon = self._watermark - idle
        spans_topic = self.spans_topic.get_topic_name()
        owned = {
            tp.partition
            for tp in self.app.consumer.assignment()
            if tp.topic == spans_topic
        }
        evicted = 0
        # Limitation: the sweep decodes every local session state; huge tables slow it.
        for key, stored in list(self.sessions.items()):
            partition = self._session_partitions.get(key)
            event = (
                self._partition_events.get(partition) if partition in owned else None
            )
            if event is None:
                continue
            try:
                state = SessionState.decode(stored)
            except StateDecodeError:
                state = None
            if state is not None and state.last_at >= horizon:
                continue
            _bind_event(event)
            del self.sessions[key]
            self._session_partitions.pop(key, None)
            if state is not None and not state.killed:
                self._observe_session_end(state)
            evicted += 1

        if evicted:
            logger.info(
                "evicted %d session(s) idle for more than %.0f s of event time",
                evicted,
                idle,
            )
        return evicted

    async def _on_session_changelog(self, event: Event) -> None:
        """Learn each recovered session's partition, for the idle sweep."""
        key = event.message.key
        if key is None:
            return
        if event.message.value is None:
            self._session_partitions.pop(key, None)
        else:
            self._session_partitions[key] = event.message.partition

    async def _decode_native(self, event: Event) -> SpanEvent | None:
        value = event.message.value
        try:
            return decode_native(value if value is not None else b"")
        except SpanValidationError as exc:
            await self.dead_letter(event, exc.reason, exc.field)
        except Exception as exc:
            # Decoder faults are dead-lettered too: bad input never stops a worker.
            await self.dead_letter(event, f"decoder failed: {exc!r}", None)
        return None

    async def _rekey(self, span: SpanEvent, event: Event) -> None:
        """Forward a span whose record key is not its session id, keyed right.

        The session table is partitioned like the spans topic, by session id;
        a span keyed otherwise would reach the wrong partition's state.
        """
        logger.debug(
            "span %s of session %s arrived with key %r; forwarded keyed by session",
            span.span_id,
            span.session_id,
            event.message.key,
        )
        await self.spans_topic.send(
            key=span.session_id.encode(), value=self._forwarded(span)
        )

    def _forwarded(self, span: SpanEvent) -> bytes:
        """Encode a span for the spans topic with its text replaced by its code.

        The code is what the loop detector would compute from the text, so
        the span gets the same decisions, and no text reaches a topic this
        worker writes.
        """
        text = span.output_text
        if text:
            span.output_code = self.detector.embedder.wire_code(text)
            span.output_text = None
        return encode_native(span)

    async def dead_letter(
        self, event: Event, reason: str, field_name: str | None
    ) -> None:
        """Send a record that cannot be processed to the dead-letter topic.

        The dead-letter record keeps the original key and bytes; headers carry
        the reason, the offending field and the source topic, partition and
        offset.

        Args:
            event: the Faust event of the bad record.
            reason: why it was rejected.
            field_name: the offending field, when one is to blame.
        """
        message = event.message
        headers = [
            (DLQ_REASON, reason.encode()),
            (DLQ_TOPIC, str(message.topic).encode()),
            (DLQ_PARTITION, str(message.partition).encode()),
            (DLQ_OFFSET, str(message.offset).encode()),
            (DLQ_AT, f"{time.time():.3f}".encode()),
        ]
        if field_name:
            headers.append((DLQ_FIELD, field_name.encode()))
        await self.dlq_topic.send(
            key=message.key, value=message.value or b"", headers=headers
        )
        self.metrics.count_spans("dead_lettered")
        logger.warning(
            "record %s[%d]@%d sent to the dead-letter topic %s: %s",
            message.topic,
            message.partition,
            message.offset,
            self.settings.topics.dlq,
            reason,
        )

    # Usage processing ----------------------------------------------------------

    async def handle_usage_batch(self, events: Sequence[Event]) -> None:
        """Apply the per-user daily step to a batch of usage records.

        Usage records arrive keyed by user id, so every record of a user lands
        on the partition that owns that user's daily state. A record holds one
        or more usages of its user, in the order the session step made them.

        Args:
            events: Faust events of the usage topic, in arrival order.
        """
        by_day: dict[bytes, _UserDayBatch] = {}
        for event in events:
            try:
                usages = decode_usages(event.message.value or b"")
            except (ValueError, TypeError) as exc:
                logger.error("undecodable usage record skipped: %s", exc)
                continue
            for usage in usages:
                key = user_day_key(usage)
                batch = by_day.get(key)
                if batch is None:
                    batch = by_day[key] = _UserDayBatch(event)
                batch.event = event
                batch.usages.append(usage)

        decisions: list[Decision] = []
        for key, batch in by_day.items():
            _bind_event(batch.event)
            stored = self.user_days.get(key)
            state = UserDayState.decode(stored) if stored is not None else None
            for usage in batch.usages:
                state, more = self.detector.observe_usage(state, usage)
                decisions.extend(more)
            if state is not None:
                self.user_days[key] = state.encode()
            self._prune_user_days(batch.usages[-1])

        await self.publisher.publish(decisions)

    def _prune_user_days(self, usage: Usage) -> None:
        """Delete the user's day states two to seven days before this usage's day.

        The embedded runtime drops a user-day once its day is two days behind;
        here the user's own traffic triggers the clean-up.
        """
        try:
            day = date.fromisoformat(usage.day)
        except ValueError:
            return
        for back in range(2, 8):
            older = (day - timedelta(days=back)).isoformat()
            key = user_day_key(replace(usage, day=older))
            if key in self.user_days:
                del self.user_days[key]

    # OTLP processing -----------------------------------------------------------

    async def handle_otlp_batch(self, events: Sequence[Event]) -> None:
        """Decode OTLP export records and forward their spans keyed by session.

        The Collector's kafkaexporter writes unkeyed records holding spans of
        many sessions; each span goes to the spans topic keyed by its session
        id, so it reaches the partition that owns the session's state and gets
        the same decisions as a native span. Output text is replaced by its
        text code on the way.

        Args:
            events: Faust events of the OTLP topic.
        """
        encoding = cast(OtlpEncoding, self.settings.otlp_encoding)
        for event in events:
            value = event.message.value or b""
            try:
                batch = decode_otlp(value, encoding)
            except SpanValidationError as exc:
                await self.dead_letter(event, exc.reason, exc.field)
                continue
            except Exception as exc:
                await self.dead_letter(event, f"OTLP decoder failed: {exc!r}", None)
                continue

            for span in batch.spans:
                await self.spans_topic.send(
                    key=span.session_id.encode(), value=self._forwarded(span)
                )
            self.metrics.count_spans("skipped", int(batch.skipped))
            if batch.errors:
                reasons = "; ".join(error.reason for error in batch.errors[:3])
                await self.dead_letter(
                    event,
                    f"{len(batch.errors)} span(s) of this OTLP record are invalid "
                    f"(the other {len(batch.spans)} were processed): {reasons}",
                    None,
                )

    # Web -----------------------------------------------------------------------

    def session_document(self, session_id: str) -> dict[str, Any] | None:
        """Return a session's current state as JSON-ready data, or ``None``."""
        stored = self.sessions.get(session_id.encode())
        if stored is None:
            return None
        return session_summary(SessionState.decode(stored))


def _bind_event(event: Event) -> None:
    """Make ``event`` the one Faust attributes table writes to.

    Faust sends a table write to the changelog partition of the event being
    processed (and, with rocksdb, to that partition's local store). A batch
    holds events of several partitions, so each session's write names the
    event that carried the session's spans.
    """
    faust_streams._current_event.set(weakref.ref(event))


def _kills_session(decision: Decision, session_id: str) -> bool:
    return (
        isinstance(decision, KillCommand)
        and decision.scope is Scope.SESSION
        and decision.target == session_id
    )


def session_summary(state: SessionState) -> dict[str, Any]:
    """Return a JSON-ready view of a session state: counters and totals only.

    Args:
        state: the decoded session state.

    Returns:
        Steps, calls, tokens, cost and event times; never text, vectors or
        span ids.
    """
    return {
        "user_id": state.user_id,
        "agent_name": state.agent_name,
        "steps": state.llm_calls + state.tool_calls,
        "spans": state.spans,
        "llm_calls": state.llm_calls,
        "tool_calls": state.tool_calls,
        "agent_spans": state.agent_spans,
        "tokens": state.tokens,
        "cost_usd": state.cost_usd,
        "unpriced_spans": state.unpriced,
        "depth": state.depth,
        "first_at": state.first_at,
        "last_at": state.last_at,
        "killed": [rule for rule in RULES if state.killed & RULE_BIT[rule]],
        "alerted": [rule for rule in RULES if state.alerted & RULE_BIT[rule]],
    }


def user_day_key(usage: Usage) -> bytes:
    """Return the user-day table key: the user id and the event-time day."""
    return f"{usage.user_id}\x1f{usage.day}".encode()


def encode_usage(usage: Usage) -> bytes:
    """Encode one usage as a usage-topic record: a JSON object of its fields."""
    return orjson.dumps(usage)


def decode_usage(data: bytes) -> Usage:
    """Decode a usage record written by :func:`encode_usage`.

    Raises:
        ValueError: the bytes are not a JSON object.
        TypeError: the object's fields do not match ``Usage``.
    """
    return _usage_from(orjson.loads(data))


def usage_records(
    usages: Sequence[Usage], limit: int = USAGE_RECORD_BYTES
) -> list[bytes]:
    """Encode usages of one user as few usage-topic records, in their order.

    Each record is a JSON array of usage objects, of at most ``limit`` bytes
    unless a single usage is longer. Each usage keeps its span id, so the user
    step still drops a redelivered one.

    Args:
        usages: usages of one user, in the order the session step made them.
        limit: the most bytes a record of several usages may have.

    Returns:
        The records' values, for :func:`decode_usages`.
    """
    records: list[bytes] = []
    parts: list[bytes] = []
    size = 2
    for usage in usages:
        part = orjson.dumps(usage)
        if parts and size + len(part) + 1 > limit:
            records.append(b"[" + b",".join(parts) + b"]")
            parts, size = [], 2
        parts.append(part)
        size += len(part) + 1
    if parts:
        records.append(b"[" + b",".join(parts) + b"]")
    return records


def decode_usages(data: bytes) -> list[Usage]:
    """Decode a usage-topic record: one usage object, or an array of them.

    Reads what :func:`usage_records` and :func:`encode_usage` write.

    Raises:
        ValueError: the bytes are not JSON, or not an object or a non-empty
            array of objects.
        TypeError: an object's fields do not match ``Usage``.
    """
    record = orjson.loads(data)
    if isinstance(record, list):
        if not record:
            raise ValueError("usage record must hold at least one usage, got []")
        return [_usage_from(item) for item in record]
    return [_usage_from(record)]


def _usage_from(record: Any) -> Usage:
    if not isinstance(record, dict):
        raise ValueError(f"usage record must be a JSON object, got {record!r}")
    return Usage(**record)


def _by_user(usages: Sequence[Usage]) -> dict[str, list[Usage]]:
    """Group usages by user id, keeping their order within each user."""
    grouped: dict[str, list[Usage]] = {}
    for usage in usages:
        records = grouped.get(usage.user_id)
        if records is None:
            records = grouped[usage.user_id] = []
        records.append(usage)
    return grouped


async def prepare_topics(
    settings: WorkerSettings, timeout_seconds: float = 30.0
) -> None:
    """Create the worker's topics that are missing and check the partition counts.

    The spans topic and the usage topic feed the tables, whose changelogs have
    ``settings.partitions`` partitions; Faust needs them co-partitioned.

    Args:
        settings: the worker settings.
        timeout_seconds: how long to wait for the broker.

    Raises:
        ConfigError: a table-feeding topic exists with another partition count.
        TripwireError: the broker cannot be reached or refuses to create a topic.
    """
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaError

    names = settings.topics
    wanted = {
        names.spans: settings.partitions,
        settings.usage_topic: settings.partitions,
        names.killswitch: settings.partitions,
        names.alerts: settings.partitions,
        names.dlq: settings.partitions,
    }
    if settings.otlp_enabled:
        wanted[names.otlp] = settings.partitions
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.bootstrap_servers,
        request_timeout_ms=int(timeout_seconds * 1000),
    )
    try:
        await admin.start()
        existing = await _partition_counts(admin, list(wanted))
        _check_copartitioned(settings, existing)
        missing = {n: count for n, count in wanted.items() if n not in existing}
        if missing:
            await _create_topics(admin, settings, missing, int(timeout_seconds * 1000))
            logger.info("created topics %s", ", ".join(missing))
    except KafkaError as exc:
        raise TripwireError(
            f"Kafka at {settings.bootstrap_servers} refused the topic set-up: {exc} "
            "(TRIPWIRE_BROKER): check that the broker runs and accepts admin requests"
        ) from exc
    finally:
        await admin.close()


async def _partition_counts(admin: Any, names: list[str]) -> dict[str, int]:
    # List first: describing a missing topic can make a broker with
    # auto.create.topics.enable create it, with the broker's default partitions.
    present = set(await admin.list_topics())
    wanted = [name for name in names if name in present]
    counts: dict[str, int] = {}
    if not wanted:
        return counts
    for topic in await admin.describe_topics(wanted):
        if topic.get("error_code", 0) == 0 and topic.get("partitions"):
            counts[topic["topic"]] = len(topic["partitions"])
    return counts


async def _create_topics(
    admin: Any, settings: WorkerSettings, wanted: dict[str, int], timeout_ms: int
) -> None:
    from aiokafka.admin import NewTopic

    response = await admin.create_topics(
        [
            NewTopic(name, count, settings.replication_factor)
            for name, count in wanted.items()
        ],
        timeout_ms=timeout_ms,
    )
    topic_already_exists = 36
    for name, code, message in response.topic_errors:
        if code not in (0, topic_already_exists):
            raise TripwireError(
                f"Kafka refused to create topic {name!r}: error {code} {message} "
                "(TRIPWIRE_TOPIC_*): check the broker's ACLs and limits, or create "
                "the topic yourself"
            )


def _check_copartitioned(settings: WorkerSettings, existing: dict[str, int]) -> None:
    for name in (settings.topics.spans, settings.usage_topic):
        count = existing.get(name)
        if count is not None and count != settings.partitions:
            raise ConfigError(
                f"topic {name!r} has {count} partitions but the worker's tables use "
                f"{settings.partitions} (TRIPWIRE_PARTITIONS): set "
                f"TRIPWIRE_PARTITIONS={count}, or recreate the topic"
            )


def run_worker(
    settings: WorkerSettings, detector: Detector, log_level: str = "INFO"
) -> int:
    """Run a worker until SIGINT or SIGTERM; return the exit code.

    Creates missing topics, checks Redis, starts the Faust worker (consumer,
    tables, processors, web server) on a fresh event loop, and shuts it down
    cleanly on a signal: processors stop, offsets are committed, the producer
    flushes and the Redis pool closes.

    Args:
        settings: validated worker settings.
        detector: the detection core.
        log_level: level for Faust's own log records.

    Returns:
        The process exit code, 0 after a clean shutdown.

    Raises:
        ConfigError: a topic's partition count does not match the settings.
        TripwireError: Kafka refuses the topic set-up.
    """
    if logging.getLevelName(log_level) != logging.DEBUG:
        # Faust, mode and aiokafka narrate every service start and stop at INFO;
        # their warnings and errors still show.
        for name in ("faust", "mode", "aiokafka"):
            logging.getLogger(name).setLevel(logging.WARNING)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    loop.run_until_complete(prepare_topics(settings))

    worker_app = TripwireApp(settings, detector)
    if settings.redis_url is not None:
        mirror = RedisMirror(
            settings.redis_url,
            worker_app.metrics,
            timeout_seconds=settings.redis_timeout_seconds,
            key_prefix=settings.redis_key_prefix,
        )
        if loop.run_until_complete(mirror.ping()):
            logger.info("Redis mirror ready")
        worker_app.attach_mirror(mirror)

        async def close_mirror(sender: Any, **kwargs: Any) -> None:
            await mirror.close()

        # Faust's signal stubs reject coroutine receivers; the call is fine.
        cast(Any, worker_app.app.on_before_shutdown).connect(close_mirror)

    worker = faust.Worker(
        worker_app.app,
        loop=loop,
        loglevel=log_level,
        quiet=True,
        # The start-up spinner writes terminal escapes; logs say the same.
        stdout=io.StringIO(),
        redirect_stdouts=False,
        override_logging=False,
    )
    logger.info(
        "worker %s starting: broker %s, store %s, %d partitions, web %s",
        settings.app_id,
        settings.broker_url,
        settings.store,
        settings.partitions,
        f"http://{settings.web_host}:{settings.web_port}",
    )
    try:
        worker.execute_from_commandline()
    except SystemExit as stop:
        code = stop.code
        return code if isinstance(code, int) else 1
    return 0
