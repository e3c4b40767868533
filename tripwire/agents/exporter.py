"""OpenTelemetry span exporter that publishes normalised LLM spans to Kafka."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, MessageSizeTooLargeError
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from tripwire.agents.killswitch import valid_topic_name
from tripwire.errors import ConfigError, SpanValidationError
from tripwire.schemas.conventions import (
    DEFAULT_SESSION_ATTRIBUTES,
    DEFAULT_USER_ATTRIBUTES,
    MappingConfig,
    Skipped,
    span_from_readable,
)
from tripwire.schemas.events import SpanEvent
from tripwire.schemas.native import encode_native
from tripwire.streams.embedder import TextEmbedder

logger = logging.getLogger(__name__)

SPANS_TOPIC = "tripwire.spans"

# Seconds between two attempts to reach an unreachable broker.
_RECONNECT_SECONDS = 2.0
# Seconds between two warnings about dropped spans.
_DROP_WARNING_SECONDS = 30.0


def _call_if_alive(method: weakref.WeakMethod[Callable[[], None]]) -> None:
    """Call a weakly referenced method unless its object is gone."""
    bound = method()
    if bound is not None:
        bound()


def _first(name: str | None, defaults: Sequence[str]) -> tuple[str, ...]:
    """Return the attribute names to try, the configured one first."""
    if not name:
        return tuple(defaults)
    return (name, *(default for default in defaults if default != name))


@dataclass(frozen=True, slots=True)
class ExporterStats:
    """What the exporter did with the spans it was given, since it started.

    Attributes:
        exported: spans the broker acknowledged.
        dropped: spans never sent: the queue was full, the broker was
            unreachable until shutdown, or the exporter was shut down.
        failed: spans that could not be converted, or that the broker
            rejected or did not acknowledge in time.
        skipped: spans that are not LLM, tool or agent spans, not published.
        queued: spans waiting to be sent right now.
    """

    exported: int
    dropped: int
    failed: int
    skipped: int
    queued: int


@dataclass(frozen=True, slots=True)
class _Record:
    """One encoded span waiting to be sent."""

    key: bytes
    value: bytes


class KafkaSpanExporter(SpanExporter):
    """Publish finished LLM, tool and agent spans to Kafka, keyed by session id.

    Use it under a ``BatchSpanProcessor``. ``export`` converts each span to
    the native span format and puts it on a bounded queue; a background
    thread with its own event loop sends the queue to Kafka. The host
    application is never blocked or failed by Kafka: when the queue is full
    the newest spans are dropped and counted, and spans still queued when the
    exporter shuts down are counted as dropped.

    Args:
        bootstrap_servers: Kafka bootstrap servers.
        topic: the topic the worker reads native spans from.
        session_attribute: span attribute holding the session id, looked up
            before the ones the conventions know (``session.id``,
            ``gen_ai.conversation.id``...); without any, the trace id is the
            session.
        user_attribute: span attribute holding the user id, likewise.
        include_output_text: publish the completion text itself. Off by
            default: the text never leaves the process, and the worker's
            loop detector compares the text codes sent instead.
        include_output_code: compute the completion's text code here
            (``TextEmbedder.wire_code``) and publish it as ``output_code``,
            which gives the worker's loop-similarity rule the decisions the
            text would give. Turn it off to publish nothing derived from the
            text; the rule then relies on embeddings carried by the span.
        max_queue: spans held while Kafka is slow or away; beyond it, dropped.
        batch_size: spans sent before waiting for the broker's acknowledgement.
        linger_ms: how long the producer waits to fill a request.
        delivery_timeout: seconds the broker has to acknowledge a batch.
        shutdown_timeout: seconds ``shutdown`` waits for queued spans.
        mapping: the full attribute mapping, instead of ``session_attribute``
            and ``user_attribute``; its ``extract_output_text`` decides
            whether the text is read at all, ``include_output_text`` and
            ``include_output_code`` what is published of it.
        producer_options: extra ``AIOKafkaProducer`` keyword arguments
            (security settings, compression).

    Raises:
        ConfigError: a setting is out of range.
    """

    def __init__(
        self,
        bootstrap_servers: str | Sequence[str],
        topic: str = SPANS_TOPIC,
        *,
        session_attribute: str | None = None,
        user_attribute: str | None = None,
        include_output_text: bool = False,
        include_output_code: bool = True,
        max_queue: int = 10_000,
        batch_size: int = 500,
        linger_ms: int = 5,
        delivery_timeout: float = 15.0,
        shutdown_timeout: float = 5.0,
        mapping: MappingConfig | None = None,
        producer_options: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(bootstrap_servers, str):
            bootstrap_servers = ",".join(bootstrap_servers)
        if not bootstrap_servers:
            raise ConfigError(
                "bootstrap_servers must name at least one broker, got an empty "
                "value; pass host:port, for example '127.0.0.1:9092'"
            )

        if not valid_topic_name(topic):
            raise ConfigError(
                f"span topic must be a Kafka topic name (1 to 249 letters, digits, "
                f"'.', '_' or '-'), got {topic!r}; the worker reads {SPANS_TOPIC!r}"
            )

        for name, value in (("max_queue", max_queue), ("batch_size", batch_size)):
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value!r}")

        for name, seconds in (
            ("delivery_timeout", delivery_timeout),
            ("shutdown_timeout", shutdown_timeout),
        ):
            if seconds <= 0:
                raise ConfigError(f"{name} must be > 0 seconds, got {seconds!r}")

        if linger_ms < 0:
            raise ConfigError(f"linger_ms must be >= 0, got {linger_ms!r}")

        self._bootstrap_servers = bootstrap_servers
        self._topic = topic
        if mapping is None:
            mapping = MappingConfig(
                session_attributes=_first(
                    session_attribute, DEFAULT_SESSION_ATTRIBUTES
                ),
                user_attributes=_first(user_attribute, DEFAULT_USER_ATTRIBUTES),
                extract_output_text=include_output_text or include_output_code,
            )
        self._mapping = mapping
        self._include_output_text = include_output_text
        self._embedder = TextEmbedder() if include_output_code else None
        self._max_queue = max_queue
        self._batch_size = batch_size
        self._shutdown_timeout = shutdown_timeout
        self._producer_options: dict[str, Any] = {
            "linger_ms": linger_ms,
            "request_timeout_ms": int(delivery_timeout * 1000),
            "acks": 1,
            **(producer_options or {}),
        }

        # One lock guards the queue and the counters; the condition wakes
        # force_flush when the queue drains.
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._pending: deque[_Record] = deque()
        self._in_flight = 0
        self._exported = 0
        self._dropped = 0
        self._failed = 0
        self._skipped = 0
        self._closed = False
        self._unsent_drops = 0
        self._last_drop_warning = 0.0

        self._start_sender()
        # A forked child (a pre-forking web server) inherits no threads: it
        # gets a sender of its own, and the parent's queued spans stay with
        # the parent.
        restart = weakref.WeakMethod(self._restart_in_child)
        os.register_at_fork(after_in_child=lambda: _call_if_alive(restart))

    @property
    def exported(self) -> int:
        """Spans the broker acknowledged."""
        return self._exported

    @property
    def dropped(self) -> int:
        """Spans never sent (queue full, broker unreachable, shut down)."""
        return self._dropped

    @property
    def failed(self) -> int:
        """Spans not convertible, or rejected or unacknowledged by the broker."""
        return self._failed

    @property
    def skipped(self) -> int:
        """Spans that are not LLM, tool or agent spans."""
        return self._skipped

    def stats(self) -> ExporterStats:
        """Return a consistent snapshot of the counters."""
        with self._lock:
            return ExporterStats(
                exported=self._exported,
                dropped=self._dropped,
                failed=self._failed,
                skipped=self._skipped,
                queued=len(self._pending) + self._in_flight,
            )

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Queue the LLM, tool and agent spans among ``spans`` for Kafka.

        Returns at once; it never waits for the broker.

        Args:
            spans: finished spans, as the span processor hands them over.

        Returns:
            SUCCESS when every span was queued or skipped as not relevant,
            FAILURE when some were dropped or could not be converted.
        """
        records, skipped, failed = self._encode(spans)

        with self._lock:
            self._skipped += skipped
            self._failed += failed
            if self._closed:
                self._dropped += len(records)
                return SpanExportResult.FAILURE
            was_empty = not self._pending
            room = self._max_queue - len(self._pending) - self._in_flight
            accepted = records[: max(room, 0)]
            overflow = len(records) - len(accepted)
            self._pending.extend(accepted)
            self._dropped += overflow

        if accepted and was_empty:
            self._signal(self._wake.set)
        if overflow:
            self._warn_dropped(overflow, "the queue is full")
        if overflow or failed:
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Wait until every queued span was sent or given up on.

        Args:
            timeout_millis: how long to wait at most.

        Returns:
            True if the queue drained in time, False otherwise (the broker is
            slow or unreachable; the spans stay queued).
        """
        deadline = time.monotonic() + timeout_millis / 1000
        with self._drained:
            while self._pending or self._in_flight:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._drained.wait(remaining)
        return True

    def shutdown(self) -> None:
        """Send what is queued, within ``shutdown_timeout``, then stop.

        Spans that could not be sent in time are counted as dropped. Later
        calls to ``export`` drop their spans.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True

        self._signal(self._stop.set)
        self._thread.join(self._shutdown_timeout)
        if self._thread.is_alive():
            logger.warning(
                "span exporter did not finish sending within %.1f s; the spans "
                "still queued are dropped",
                self._shutdown_timeout,
            )

        with self._drained:
            unsent = len(self._pending)
            self._dropped += unsent
            self._pending.clear()
            self._drained.notify_all()
        if unsent:
            logger.warning(
                "span exporter shut down with %d spans unsent (counted as dropped)",
                unsent,
            )
        logger.info(
            "span exporter stopped: %d exported, %d dropped, %d failed, %d skipped",
            self._exported,
            self._dropped,
            self._failed,
            self._skipped,
        )

    def _start_sender(self) -> None:
        """Create the sender's event loop and start its thread."""
        self._loop = asyncio.new_event_loop()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._thread = threading.Thread(
            target=self._run, name="tripwire-span-exporter", daemon=True
        )
        self._thread.start()

    def _restart_in_child(self) -> None:
        """Start afresh in a forked child process."""
        self._lock = threading.Lock()
        self._drained = threading.Condition(self._lock)
        self._pending.clear()
        self._in_flight = 0
        if not self._closed:
            self._start_sender()

    def _encode(self, spans: Sequence[ReadableSpan]) -> tuple[list[_Record], int, int]:
        """Convert and encode spans; return records, skipped and failed counts."""
        records: list[_Record] = []
        skipped = failed = 0
        for span in spans:
            try:
                event = span_from_readable(span, self._mapping)
            # A span the conventions cannot read must not fail the host's
            # tracing pipeline; it is counted and the rest go on.
            except (SpanValidationError, ValueError, TypeError) as exc:
                failed += 1
                logger.debug("span %s not exported: %s", span.name, exc)
                continue
            if isinstance(event, Skipped):
                skipped += 1
                continue
            records.append(self._record(event))
        return records, skipped, failed

    def _record(self, event: SpanEvent) -> _Record:
        """Encode one span as the worker reads it, keyed by its session."""
        text = event.output_text
        if text and self._embedder is not None:
            event.output_code = self._embedder.wire_code(text)
        value = encode_native(event, include_text=self._include_output_text)
        return _Record(key=event.session_id.encode(), value=value)

    def _signal(self, setter: Callable[[], None]) -> None:
        """Set an event of the sender's loop from another thread."""
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(setter)

    def _warn_dropped(self, count: int, why: str) -> None:
        """Warn about dropped spans at most every few seconds."""
        now = time.monotonic()
        with self._lock:
            self._unsent_drops += count
            if now - self._last_drop_warning < _DROP_WARNING_SECONDS:
                return
            total, self._unsent_drops = self._unsent_drops, 0
            self._last_drop_warning = now
        logger.warning(
            "span exporter dropped %d spans because %s (%d dropped in all)",
            total,
            why,
            self._dropped,
        )

    def _run(self) -> None:
        """Body of the sender thread."""
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._send_until_stopped())
        except Exception:
            logger.exception("span exporter's sender stopped on an error")
        finally:
            with contextlib.suppress(Exception):
                self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    async def _send_until_stopped(self) -> None:
        """Connect, send queued spans, reconnect after failures, until stopped."""
        producer: AIOKafkaProducer | None = None
        outage = False
        try:
            while not (self._stop.is_set() and (producer is None or not self._pending)):
                if producer is None:
                    producer = await self._connect()
                    if producer is None:
                        if not outage:
                            outage = True
                            logger.warning(
                                "span exporter cannot reach Kafka at %s; spans "
                                "queue up to %d, then are dropped",
                                self._bootstrap_servers,
                                self._max_queue,
                            )
                        await self._sleep(_RECONNECT_SECONDS)
                        continue
                    if outage:
                        outage = False
                        logger.info("span exporter reached Kafka again")

                batch = self._take_batch()
                if not batch:
                    await self._idle()
                    continue
                await self._send(producer, batch)
        finally:
            if producer is not None:
                with contextlib.suppress(KafkaError, OSError):
                    await producer.stop()

    async def _connect(self) -> AIOKafkaProducer | None:
        """Start a producer; return None when the broker is unreachable."""
        producer = AIOKafkaProducer(
            bootstrap_servers=self._bootstrap_servers, **self._producer_options
        )
        try:
            await producer.start()
        except (KafkaError, OSError) as exc:
            logger.debug("span exporter connection failed: %s", exc)
            with contextlib.suppress(KafkaError, OSError):
                await producer.stop()
            return None
        return producer

    def _take_batch(self) -> list[_Record]:
        """Move up to ``batch_size`` records from the queue to in flight."""
        self._wake.clear()
        with self._lock:
            count = min(self._batch_size, len(self._pending))
            batch = [self._pending.popleft() for _ in range(count)]
            self._in_flight += count
        return batch

    async def _idle(self) -> None:
        """Wait for new spans or for the stop request."""
        waiters = [
            asyncio.ensure_future(self._wake.wait()),
            asyncio.ensure_future(self._stop.wait()),
        ]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def _sleep(self, seconds: float) -> None:
        """Wait before reconnecting, or until stopped."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _send(self, producer: AIOKafkaProducer, batch: list[_Record]) -> None:
        """Send one batch and count each span as exported or failed."""
        exported = failed = 0
        deliveries: list[asyncio.Future[Any]] = []
        for index, record in enumerate(batch):
            try:
                deliveries.append(
                    await producer.send(self._topic, record.value, key=record.key)
                )
            except MessageSizeTooLargeError as exc:
                failed += 1
                logger.debug("span not accepted by the producer: %s", exc)
            except (KafkaError, OSError) as exc:
                # The producer waited delivery_timeout for the topic's metadata
                # or for buffer room: the rest would wait as long, each.
                failed += len(batch) - index
                logger.debug("producer refused the rest of a batch: %s", exc)
                break

        for outcome in await asyncio.gather(*deliveries, return_exceptions=True):
            if isinstance(outcome, BaseException):
                failed += 1
                logger.debug("span delivery failed: %s", outcome)
            else:
                exported += 1

        with self._drained:
            self._in_flight -= len(batch)
            self._exported += exported
            self._failed += failed
            self._drained.notify_all()
        if failed:
            logger.warning(
                "Kafka did not acknowledge %d of %d spans sent to %s",
                failed,
                len(batch),
                self._topic,
            )
