"""Fixtures for the integration tests: the real Kafka broker and Redis."""

import asyncio
import logging
import os
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NoReturn

import pytest
import redis
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

logger = logging.getLogger(__name__)

KAFKA_ENV = "TRIPWIRE_TEST_KAFKA"
REDIS_ENV = "TRIPWIRE_TEST_REDIS"
DEFAULT_KAFKA = "127.0.0.1:9092"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
PROBE_SECONDS = 15.0
TOPIC_READY_SECONDS = 30.0

_HERE = Path(__file__).resolve().parent

NameFactory = Callable[..., str]
TopicFactory = Callable[..., Awaitable[list[str]]]


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    """Mark every test under tests/integration with ``integration``."""
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.integration)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes", "on"}


def _unavailable(message: str) -> NoReturn:
    """Fail in CI, where the services must run; skip on a developer machine."""
    if _in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _describe_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _run_in_thread(coro_factory: Callable[[], Awaitable[Any]]) -> Any:
    """Run a coroutine on a private event loop, away from the test's own loop."""

    async def runner() -> Any:
        return await coro_factory()

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, runner()).result()


async def _describe_kafka(bootstrap: str) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PROBE_SECONDS
    while True:
        admin = AIOKafkaAdminClient(
            bootstrap_servers=bootstrap, request_timeout_ms=5000
        )
        try:
            await admin.start()
            cluster: dict[str, Any] = await admin.describe_cluster()
            return cluster
        except Exception:
            if loop.time() >= deadline:
                raise
        finally:
            await _close_quietly(admin)
        await asyncio.sleep(0.5)


async def _close_quietly(admin: AIOKafkaAdminClient) -> None:
    try:
        await admin.close()
    except Exception:
        logger.debug("closing the Kafka admin client failed", exc_info=True)


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """Return the bootstrap address of the test broker, once it answers metadata."""
    bootstrap = os.environ.get(KAFKA_ENV, DEFAULT_KAFKA)
    try:
        cluster = _run_in_thread(lambda: _describe_kafka(bootstrap))
    except Exception as exc:
        problem = _describe_error(exc)
    else:
        problem = None
    if problem is not None:
        _unavailable(
            f"Kafka at {bootstrap} ({KAFKA_ENV}) answered no metadata request "
            f"within {PROBE_SECONDS:.0f}s ({problem}); start it with "
            "`scripts/services up` or point the variable at a running broker"
        )

    logger.info(
        "Kafka %s: cluster %s, %d broker(s)",
        bootstrap,
        cluster.get("cluster_id"),
        len(cluster.get("brokers", [])),
    )
    return bootstrap


@pytest.fixture(scope="session")
def redis_url() -> str:
    """Return the URL of the test Redis, once it answers PING."""
    url = os.environ.get(REDIS_ENV, DEFAULT_REDIS)
    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    try:
        client.ping()
    except Exception as exc:
        problem = _describe_error(exc)
    else:
        problem = None
    finally:
        client.close()
    if problem is not None:
        _unavailable(
            f"Redis at {url} ({REDIS_ENV}) did not answer PING ({problem}); start "
            "it with `scripts/services up` or point the variable at a running Redis"
        )

    return url


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> NameFactory:
    """Return a factory of topic and group names unique to this test run.

    Call it as ``unique_name("spans")``: the name joins the prefix, the test's
    name and a random suffix, using only the characters Kafka allows.
    """
    test_name = re.sub(r"[^A-Za-z0-9._-]+", "-", request.node.name)[:40].strip("-")

    def make(prefix: str = "tripwire-test") -> str:
        return f"{prefix}.{test_name}.{uuid.uuid4().hex[:12]}"

    return make


@pytest.fixture
async def create_topics(kafka_bootstrap: str) -> AsyncIterator[TopicFactory]:
    """Yield ``await create_topics(names, partitions=1)``, which creates topics.

    The call returns once every partition of every topic has a leader; the
    topics are deleted when the test ends.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    created: list[str] = []

    async def create(names: Iterable[str], partitions: int = 1) -> list[str]:
        wanted = list(names)
        response = await admin.create_topics(
            [NewTopic(name, partitions, 1) for name in wanted], timeout_ms=10_000
        )
        for topic, error_code, error_message in response.topic_errors:
            if error_code != 0:
                raise RuntimeError(
                    f"creating topic {topic!r} failed with Kafka error "
                    f"{error_code}: {error_message}"
                )
        created.extend(wanted)
        await _wait_for_leaders(admin, wanted, partitions)
        return wanted

    try:
        yield create
    finally:
        if created:
            try:
                await admin.delete_topics(created)
            except Exception:
                logger.warning("deleting test topics %s failed", created, exc_info=True)
        await _close_quietly(admin)


async def _wait_for_leaders(
    admin: AIOKafkaAdminClient, names: list[str], partitions: int
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TOPIC_READY_SECONDS
    while True:
        topics = await admin.describe_topics(names)
        ready = {
            topic["topic"]
            for topic in topics
            if topic["error_code"] == 0
            and len(topic["partitions"]) == partitions
            and all(p["leader"] >= 0 for p in topic["partitions"])
        }
        if ready >= set(names):
            return
        if loop.time() >= deadline:
            raise TimeoutError(
                f"topics {sorted(set(names) - ready)} have no leader for every "
                f"partition after {TOPIC_READY_SECONDS:.0f}s"
            )
        await asyncio.sleep(0.2)
