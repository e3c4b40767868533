"""Spans per second of ``tripwire worker`` on a Kafka broker, against raw consumption.

Run it with ``python benchmarks/bench_worker.py [--spans N] [--runs R]`` while
Kafka and Redis are up (``scripts/services up``). It produces N native span
records (simulated fleets, no output text, keyed by session id, ``acks=all``)
to a fresh spans topic whose name starts with a fresh prefix, then, in each
run, reads them all with:

- ``aiokafka raw``: a plain ``AIOKafkaConsumer`` in its own group that decodes
  nothing, the baseline;
- ``aiokafka + detector``: the same consumer, plus ``decode_native`` and the
  in-process detector (``EmbeddedRuntime``): the worker's work without Faust,
  its tables, their changelogs and the published effects;
- ``worker, batch B``: the real ``tripwire worker`` in a subprocess, with its own
  app id, topics and Redis key prefix, and ``TRIPWIRE_BATCH_SIZE=B``, for each
  B of ``--batch-sizes``. Its progress is read from ``tripwire_spans_total`` on
  its ``/metrics`` every 0.2 s.

Each setting is timed from the moment it hands over its first records (the
first ``getmany`` that returns some, of at most 500, or the first poll of
``/metrics`` that counts some) to the moment it has them all; its rate is the
records handed over in that interval divided by its length. Consumer group
join, table recovery and process start-up are left out, and reported apart as
the start-up time: from the consumer's or the process's start to its first
records. The worker is done when it has counted every span; the per-user
processor may still be applying the last usage records then. After it stops,
the end offsets of its table changelogs (``<app id>-sessions-changelog`` and
``<app id>-user-days-changelog``) give the records written per span, which
shows what batching saves. ``x BASELINE`` is a setting's time per span as a
multiple of the baseline's. The table shows the median of each figure over
the runs. The worker, the benchmark and the broker share the machine's cores.

Every topic under the prefix and every Redis key under it is deleted at the
end, and each worker is stopped, whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import TopicPartition

from tripwire.errors import TripwireError
from tripwire.schemas.native import decode_native, encode_native
from tripwire.streams.core import Detector
from tripwire.streams.embedded import EmbeddedRuntime
from tripwire.streams.policy import Policy
from tripwire.streams.pricing import PriceBook
from tripwire.streams.simulate import simulate_fleet

POLL_SECONDS = 0.2
# Records per getmany of the baselines: small enough that the first one, left
# out of the timed interval, is a small share of the run.
POLL_RECORDS = 500
# Fewer spans than this can be done within one poll of the worker's metrics.
MIN_SPANS = 5_000
# A setting that has not read every record by then is reported as failed.
DEADLINE_SECONDS = 300.0
WORKER_TOPICS = ("spans", "otlp", "killswitch", "alerts", "dlq")
SPANS_METRIC = "tripwire_spans_total{"

Records = list[tuple[bytes, bytes]]
Handler = Callable[[list[ConsumerRecord[bytes, bytes]]], None]


class BenchmarkError(TripwireError):
    """A setting could not be measured: a worker failed or did not finish."""


@dataclass(frozen=True)
class Timing:
    """One measured run of one setting."""

    records: int
    startup_s: float
    seconds: float
    handed_over: int
    changelog: dict[str, int] | None = None

    @property
    def rate(self) -> float:
        """Records per second between the first and the last handed over."""
        return self.handed_over / self.seconds


@dataclass(frozen=True)
class Broker:
    """Where the benchmark runs and the names it owns."""

    bootstrap: str
    redis_url: str
    prefix: str
    partitions: int

    def topic(self, name: str) -> str:
        return f"{self.prefix}.{name}"


def simulated_records(spans: int) -> Records:
    """Return ``spans`` native span records without text, keyed by session id."""
    records: Records = []
    seed = 0
    while len(records) < spans:
        fleet = simulate_fleet(200, seed).with_run_id(f"b{seed}")
        for span in fleet.spans():
            records.append((span.session_id.encode(), encode_native(span)))
        seed += 1
    return records[:spans]


async def produce(broker: Broker, records: Records) -> None:
    """Create the spans topic and write ``records`` to it, acknowledged by all."""
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(broker.topic("spans"), broker.partitions, 1)]
        )
        await wait_for_leaders(admin, broker.topic("spans"))
    finally:
        await admin.close()

    producer = AIOKafkaProducer(
        bootstrap_servers=broker.bootstrap, acks="all", linger_ms=5
    )
    await producer.start()
    try:
        sent = [
            await producer.send(broker.topic("spans"), value, key=key)
            for key, value in records
        ]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


async def wait_for_leaders(admin: AIOKafkaAdminClient, topic: str) -> None:
    """Wait until every partition of a new topic has a leader to produce to."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        (described,) = await admin.describe_topics([topic])
        leaders = [p["leader"] for p in described["partitions"]]
        if leaders and min(leaders) >= 0:
            return
        await asyncio.sleep(0.1)
    raise BenchmarkError(f"topic {topic} has partitions without a leader after 30s")


async def consume(
    broker: Broker, group: str, total: int, handle: Handler | None = None
) -> Timing:
    """Read ``total`` records of the spans topic in a fresh group, timing it."""
    consumer = AIOKafkaConsumer(
        broker.topic("spans"),
        bootstrap_servers=broker.bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    started = time.perf_counter()
    await consumer.start()
    try:
        count = 0
        first_at = 0.0
        first_count = 0
        while count < total:
            if time.perf_counter() - started > DEADLINE_SECONDS:
                raise BenchmarkError(
                    f"consumer group {group} read {count} of {total} records in "
                    f"{DEADLINE_SECONDS:.0f}s; check the broker, or lower --spans"
                )
            batches = await consumer.getmany(timeout_ms=500, max_records=POLL_RECORDS)
            for batch in batches.values():
                if handle is not None:
                    handle(batch)
                count += len(batch)
            if count and not first_at:
                first_at = time.perf_counter()
                first_count = count
        finished = time.perf_counter()
    finally:
        await consumer.stop()

    return Timing(total, first_at - started, finished - first_at, total - first_count)


def detector_handler() -> Handler:
    """Return a handler that decodes each record and runs it through the detector."""
    runtime = EmbeddedRuntime(Detector(Policy.from_env({}), PriceBook.load()))
    feed = runtime.feed

    def handle(batch: list[ConsumerRecord[bytes, bytes]]) -> None:
        for record in batch:
            assert record.value is not None
            feed(decode_native(record.value))

    return handle


def free_port() -> int:
    """Return a loopback TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def spans_counted(web: str) -> int | None:
    """Return the records the worker has counted, or None if it does not answer."""
    try:
        with urllib.request.urlopen(web + "/metrics", timeout=2) as response:
            body = response.read().decode()
    except (OSError, urllib.error.URLError):
        return None
    return int(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in body.splitlines()
            if line.startswith(SPANS_METRIC)
        )
    )


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop the worker with SIGTERM, then SIGKILL its process group if it hangs."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def run_worker(
    broker: Broker, app_id: str, batch_size: int, total: int, folder: Path
) -> Timing:
    """Start ``tripwire worker``, time it over ``total`` records, stop it."""
    port = free_port()
    web = f"http://127.0.0.1:{port}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TRIPWIRE_")},
        "TRIPWIRE_APP_ID": app_id,
        "TRIPWIRE_BROKER": broker.bootstrap,
        "TRIPWIRE_REDIS_URL": broker.redis_url,
        "TRIPWIRE_REDIS_KEY_PREFIX": f"{broker.prefix}:kill",
        "TRIPWIRE_WEB_PORT": str(port),
        "TRIPWIRE_DATA_DIR": str(folder / app_id),
        "TRIPWIRE_PARTITIONS": str(broker.partitions),
        "TRIPWIRE_BATCH_SIZE": str(batch_size),
        **{
            f"TRIPWIRE_TOPIC_{name.upper()}": broker.topic(name)
            for name in WORKER_TOPICS
        },
    }
    log = folder / f"{app_id}.log"
    with log.open("wb") as sink:
        started = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-m", "tripwire", "worker"],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        first_at, first_count, finished = watch(process, web, total, started, log)
    finally:
        stop(process)

    return Timing(
        total,
        first_at - started,
        finished - first_at,
        total - first_count,
        changelog=asyncio.run(changelog_records(broker, app_id)),
    )


def watch(
    process: subprocess.Popen[bytes],
    web: str,
    total: int,
    started: float,
    log: Path,
) -> tuple[float, int, float]:
    """Poll the worker's metrics until it has counted ``total`` records.

    Returns:
        When it first counted some, how many, and when it counted them all.
    """
    first_at = 0.0
    first_count = 0
    while True:
        if process.poll() is not None:
            raise BenchmarkError(
                f"worker exited with {process.returncode}; its log:\n{_tail(log)}"
            )
        now = time.perf_counter()
        if now - started > DEADLINE_SECONDS:
            raise BenchmarkError(
                f"worker did not count {total} records in {DEADLINE_SECONDS:.0f}s; "
                f"lower --spans; its log:\n{_tail(log)}"
            )
        count = spans_counted(web) or 0
        now = time.perf_counter()
        if count and not first_at:
            first_at, first_count = now, count
        if count >= total:
            return first_at, first_count, now
        time.sleep(POLL_SECONDS)


def _tail(log: Path, lines: int = 40) -> str:
    text = log.read_text(encoding="utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


async def changelog_records(broker: Broker, app_id: str) -> dict[str, int]:
    """Return the records written to each table changelog of ``app_id``."""
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap)
    await consumer.start()
    try:
        names = await consumer.topics()
        written = {}
        for table in ("sessions", "user-days"):
            topic = f"{app_id}-{table}-changelog"
            if topic not in names:
                written[table] = 0
                continue
            # A table's changelog has the table's partitions, as many as the
            # spans topic.
            ends = await consumer.end_offsets(
                [TopicPartition(topic, p) for p in range(broker.partitions)]
            )
            written[table] = sum(ends.values())
    finally:
        await consumer.stop()
    return written


async def delete_topics(broker: Broker) -> list[str]:
    """Delete every topic whose name starts with the benchmark's prefix."""
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
    await admin.start()
    try:
        names = [n for n in await admin.list_topics() if n.startswith(broker.prefix)]
        if names:
            await admin.delete_topics(names)
    finally:
        await admin.close()
    return names


def delete_keys(broker: Broker) -> int:
    """Delete the Redis keys the workers wrote under the benchmark's prefix."""
    client = redis.Redis.from_url(broker.redis_url)
    try:
        keys = list(client.scan_iter(match=f"{broker.prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()
    return len(keys)


def measure_once(
    broker: Broker, setting: str, run: int, args: argparse.Namespace, folder: Path
) -> Timing:
    """Measure one setting once, under a group or app id of its own."""
    name = f"{broker.prefix}-{setting}-{run}"
    if setting == "raw":
        return asyncio.run(consume(broker, name, args.spans))
    if setting == "detector":
        return asyncio.run(consume(broker, name, args.spans, detector_handler()))
    size = int(setting.removeprefix("batch"))
    return run_worker(broker, name, size, args.spans, folder)


def setting_label(setting: str) -> str:
    """Return the table's name for a setting."""
    if setting == "raw":
        return "aiokafka raw (baseline)"
    if setting == "detector":
        return "aiokafka + detector"
    return f"worker, batch {setting.removeprefix('batch')}"


def measure(
    broker: Broker, args: argparse.Namespace, folder: Path
) -> dict[str, list[Timing]]:
    """Run every setting ``args.runs`` times, interleaved; return their timings."""
    settings = ["raw", "detector", *(f"batch{size}" for size in args.batch_sizes)]
    timings: dict[str, list[Timing]] = {}
    for run in range(args.runs):
        for setting in settings:
            timing = measure_once(broker, setting, run, args, folder)
            label = setting_label(setting)
            timings.setdefault(label, []).append(timing)
            print(
                f"run {run + 1}: {label}: {timing.rate:,.0f} spans/s, "
                f"start-up {timing.startup_s:.1f}s",
                file=sys.stderr,
                flush=True,
            )
    return timings


def print_table(timings: dict[str, list[Timing]], runs: int) -> None:
    """Print the median figures of each setting, against the baseline."""
    baseline = statistics.median(t.rate for t in next(iter(timings.values())))
    print(
        f"{'SETTING':<24} {'RECORDS':>8} {'START S':>8} {'SECONDS':>8} "
        f"{'SPANS/S':>10} {'x BASELINE':>10} {'SESSION CL':>10} {'USER-DAY CL':>11}"
    )
    for name, rows in timings.items():
        rate = statistics.median(t.rate for t in rows)
        print(
            f"{name:<24} {rows[0].records:>8,} "
            f"{statistics.median(t.startup_s for t in rows):>8.1f} "
            f"{statistics.median(t.seconds for t in rows):>8.2f} "
            f"{rate:>10,.0f} {baseline / rate:>10.1f} "
            f"{per_span(rows, 'sessions'):>10} {per_span(rows, 'user-days'):>11}"
        )
    print(
        f"median of {runs} runs; x BASELINE = time per span over the baseline's; "
        "CL = changelog records written per span;\n"
        f"{os.cpu_count()} cores shared by the worker, the benchmark and the broker; "
        f"Python {sys.version.split()[0]}"
    )


def per_span(rows: list[Timing], table: str) -> str:
    """Return the median changelog records per span of ``table``, or ``-``."""
    written = [t.changelog[table] / t.records for t in rows if t.changelog]
    return f"{statistics.median(written):.3f}" if written else "-"


class HelpFormatter(
    argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter
):
    """Keep the description's paragraphs and show each option's default."""


def batch_sizes(text: str) -> list[int]:
    """Parse a comma-separated list of batch sizes."""
    return [int(part) for part in text.split(",")]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--spans", type=int, default=50_000, help="records to read")
    parser.add_argument("--runs", type=int, default=3, help="runs of each setting")
    parser.add_argument(
        "--batch-sizes",
        type=batch_sizes,
        default="500,1",
        help="TRIPWIRE_BATCH_SIZE of each worker setting, comma-separated",
    )
    parser.add_argument("--broker", default="127.0.0.1:9092", help="Kafka bootstrap")
    parser.add_argument(
        "--redis", default="redis://127.0.0.1:6379/0", help="Redis for the kill flags"
    )
    parser.add_argument(
        "--partitions", type=int, default=4, help="partitions of the spans topic"
    )
    args = parser.parse_args(argv)
    if args.spans < MIN_SPANS:
        parser.error(f"--spans must be at least {MIN_SPANS:,}, got {args.spans:,}")
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")
    if min(args.batch_sizes) < 1:
        parser.error(f"--batch-sizes must all be at least 1, got {args.batch_sizes}")
    if args.partitions < 1:
        parser.error(f"--partitions must be at least 1, got {args.partitions}")
    return args


def main() -> int:
    """Produce the spans, measure every setting, print the table, clean up."""
    args = parse_args()
    broker = Broker(
        args.broker,
        args.redis,
        f"tripwire-bench-worker-{uuid.uuid4().hex[:8]}",
        args.partitions,
    )
    records = simulated_records(args.spans)
    try:
        with tempfile.TemporaryDirectory() as folder:
            started = time.perf_counter()
            asyncio.run(produce(broker, records))
            print(
                f"produced {len(records):,} spans to {broker.topic('spans')} in "
                f"{time.perf_counter() - started:.1f}s",
                file=sys.stderr,
                flush=True,
            )
            timings = measure(broker, args, Path(folder))
    except BenchmarkError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    finally:
        deleted = asyncio.run(delete_topics(broker))
        keys = delete_keys(broker)
        print(
            f"deleted {len(deleted)} topic(s) and {keys} Redis key(s) under "
            f"{broker.prefix}",
            file=sys.stderr,
        )
    print_table(timings, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
