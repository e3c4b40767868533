"""Decision effects against the real Redis: one mirror per command id."""

from __future__ import annotations

import asyncio
import uuid

import redis.asyncio as aioredis

from tripwire.schemas.events import Alert, KillCommand, Scope
from tripwire.schemas.killswitch import redis_kill_key
from tripwire.streams.effects import DecisionPublisher, RedisMirror, marker_key
from tripwire.streams.metrics import WorkerMetrics


def _kill(session_id: str) -> KillCommand:
    return KillCommand.create(
        Scope.SESSION,
        session_id,
        "session_cost_budget",
        "cost 12.0 USD > budget 10.0 USD",
        issued_at=1_700_000_000.0,
        session_id=session_id,
        ttl_seconds=120,
    )


async def test_kill_is_sent_once_to_kafka_sender_and_mirrored_once(
    redis_url: str,
) -> None:
    prefix = f"tripwire-test:{uuid.uuid4().hex[:12]}"
    channel = f"{prefix}:channel"
    metrics = WorkerMetrics()
    mirror = RedisMirror(redis_url, metrics, channel=channel, key_prefix=prefix)
    sent: list[tuple[str, bytes, bytes]] = []

    async def send_kill(key: bytes, value: bytes) -> None:
        sent.append(("kill", key, value))

    async def send_alert(key: bytes, value: bytes) -> None:
        sent.append(("alert", key, value))

    publisher = DecisionPublisher(send_kill, send_alert, metrics, mirror)
    client = aioredis.Redis.from_url(redis_url)
    pubsub = client.pubsub()
    await pubsub.subscribe(channel)
    await pubsub.get_message(timeout=1.0)  # the subscribe confirmation
    command = _kill("sess-42")
    alert = Alert.create(
        Scope.SESSION, "sess-42", "session_cost_warning", "warning", "80%", 1.0
    )
    try:
        await publisher.publish([command, alert])
        await publisher.publish([command])  # a replay re-emits the same command

        flag = redis_kill_key(Scope.SESSION, "sess-42", prefix)
        assert await client.get(flag) == command.to_json()
        assert 0 < await client.ttl(flag) <= 120
        assert await client.exists(marker_key(command.command_id, prefix)) == 1
        messages = []
        for _ in range(3):
            message = await pubsub.get_message(timeout=0.5)
            if message is not None and message["type"] == "message":
                messages.append(message["data"])
        assert messages == [command.to_json()]
        assert [(kind, key) for kind, key, _ in sent] == [
            ("kill", b"sess-42"),
            ("alert", b"sess-42"),
            ("kill", b"sess-42"),
        ]
        samples = metrics.registry.get_sample_value
        assert samples("tripwire_kills_total", {"reason": "session_cost_budget"}) == 2
        assert samples("tripwire_alerts_total", {"rule": "session_cost_warning"}) == 1
    finally:
        await pubsub.aclose()
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
        await mirror.close()


async def test_redis_down_is_counted_and_does_not_raise() -> None:
    metrics = WorkerMetrics()
    # Port 1 on loopback refuses connections at once.
    mirror = RedisMirror("redis://127.0.0.1:1/0", metrics, timeout_seconds=0.2)
    sent: list[bytes] = []

    async def send(key: bytes, value: bytes) -> None:
        sent.append(key)

    publisher = DecisionPublisher(send, send, metrics, mirror)
    try:
        await asyncio.wait_for(publisher.publish([_kill("sess-7")]), 5.0)

        assert sent == [b"sess-7"]
        assert metrics.registry.get_sample_value("tripwire_redis_errors_total") == 1
        assert await mirror.ping() is False
    finally:
        await mirror.close()
