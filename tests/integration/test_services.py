"""The Kafka broker and Redis the integration tests use are real and answer."""

import asyncio
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition

NameFactory = Callable[..., str]
TopicFactory = Callable[..., Awaitable[list[str]]]


async def test_kafka_round_trips_key_value_and_headers(
    kafka_bootstrap: str, unique_name: NameFactory, create_topics: TopicFactory
) -> None:
    topic = unique_name("services")
    group = unique_name("services-group")
    await create_topics([topic], partitions=2)
    headers = [("content-type", b"application/json"), ("x-tripwire", b"\x00\x01")]

    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        sent = await producer.send_and_wait(
            topic, b'{"span": 1}', key=b"session-1", headers=headers
        )
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        record = await asyncio.wait_for(consumer.getone(), timeout=30)
        await consumer.commit()
        committed = await consumer.committed(TopicPartition(topic, record.partition))
    finally:
        await consumer.stop()

    assert (record.key, record.value) == (b"session-1", b'{"span": 1}')
    assert list(record.headers) == headers
    assert (record.partition, record.offset) == (sent.partition, sent.offset)
    assert committed == record.offset + 1


async def test_redis_keeps_value_with_ttl(
    redis_url: str, unique_name: NameFactory
) -> None:
    key = unique_name("tripwire:test")
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.set(key, b"killed", ex=30)
        value = await client.get(key)
        ttl = await client.ttl(key)
    finally:
        await client.delete(key)
        await client.aclose()

    assert value == b"killed"
    assert 0 < ttl <= 30


async def test_redis_pubsub_delivers_message(
    redis_url: str, unique_name: NameFactory
) -> None:
    channel = unique_name("tripwire:test-channel")
    client = aioredis.Redis.from_url(redis_url)
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe(channel)
        confirmation = await pubsub.get_message(timeout=5)
        receivers = await client.publish(channel, b'{"action": "kill"}')
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
    finally:
        await pubsub.aclose()
        await client.aclose()

    assert confirmation is not None and confirmation["type"] == "subscribe"
    assert receivers == 1
    assert message is not None
    assert (message["channel"], message["data"]) == (
        channel.encode(),
        b'{"action": "kill"}',
    )
