"""The agent kill switch against the real Kafka broker and Redis."""

import asyncio
import time
from collections.abc import Callable

import pytest
import redis
from aiokafka import AIOKafkaProducer

from tripwire.agents.killswitch import AsyncKillSwitch, KillSwitch
from tripwire.errors import SessionKilled
from tripwire.schemas.events import KillCommand, Scope
from tripwire.schemas.killswitch import redis_kill_key

HANG_GUARD_SECONDS = 60.0


def _command(
    scope: Scope, target: str, reason: str = "session_step_budget"
) -> KillCommand:
    return KillCommand.create(
        scope,
        target,
        reason,
        "26 LLM calls, over the budget of 25",
        time.time(),
        session_id=target if scope is Scope.SESSION else None,
        user_id=target if scope is Scope.USER else None,
        ttl_seconds=600,
    )


async def _publish(bootstrap: str, topic: str, command: KillCommand) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(
            topic, command.to_json(), key=command.target.encode()
        )
    finally:
        await producer.stop()


async def _eventually(predicate: Callable[[], object]) -> None:
    deadline = time.monotonic() + HANG_GUARD_SECONDS
    while not predicate():
        assert time.monotonic() < deadline, "condition not met before the hang guard"
        await asyncio.sleep(0.05)


async def test_kill_switch_receives_a_command_from_kafka(
    kafka_bootstrap, create_topics, unique_name
):
    (topic,) = await create_topics([unique_name("killswitch")])
    received: list[KillCommand] = []
    switch = KillSwitch(kafka_bootstrap, topic, on_kill=received.append)
    with switch:
        assert await asyncio.to_thread(switch.wait_ready, HANG_GUARD_SECONDS)
        assert switch.check("session-a") is None

        command = _command(Scope.SESSION, "session-a")
        await _publish(kafka_bootstrap, topic, command)
        await _eventually(lambda: switch.check("session-a") is not None)

        with pytest.raises(SessionKilled) as caught:
            switch.raise_if_killed("session-a")
        assert caught.value.reason == "session_step_budget"
        assert "over the budget of 25" in str(caught.value)
        assert switch.check("session-b") is None
        assert [c.command_id for c in received] == [command.command_id]


async def test_kill_switch_stops_every_session_of_a_killed_user(
    kafka_bootstrap, create_topics, unique_name
):
    (topic,) = await create_topics([unique_name("killswitch")])
    with KillSwitch(kafka_bootstrap, topic) as switch:
        assert await asyncio.to_thread(switch.wait_ready, HANG_GUARD_SECONDS)
        await _publish(kafka_bootstrap, topic, _command(Scope.USER, "user-7"))
        await _eventually(lambda: switch.check("any", user_id="user-7") is not None)

        with pytest.raises(SessionKilled, match="user 'user-7'"):
            switch.raise_if_killed("session-x", user_id="user-7")
        assert switch.check("session-x", user_id="user-8") is None


async def test_async_kill_switch_cancels_the_registered_task(
    kafka_bootstrap, create_topics, unique_name
):
    (topic,) = await create_topics([unique_name("killswitch")])
    async with AsyncKillSwitch(kafka_bootstrap, topic) as switch:
        assert await switch.wait_ready(HANG_GUARD_SECONDS)
        agent = asyncio.create_task(asyncio.sleep(HANG_GUARD_SECONDS))
        switch.register("session-c", agent)

        await _publish(kafka_bootstrap, topic, _command(Scope.SESSION, "session-c"))
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(agent, HANG_GUARD_SECONDS)

        with pytest.raises(SessionKilled, match="session_step_budget"):
            await switch.raise_if_killed("session-c")


def test_redis_flag_is_seen_by_check(redis_url, unique_name):
    prefix = unique_name("tripwire-test-kill")
    client = redis.Redis.from_url(redis_url)
    command = _command(Scope.SESSION, "session-r")
    key = redis_kill_key(Scope.SESSION, "session-r", prefix)
    client.set(key, command.to_json(), ex=60)
    try:
        switch = KillSwitch(
            redis_url=redis_url, redis_key_prefix=prefix, subscribe_redis=False
        )
        with switch:
            assert switch.check("session-other") is None
            seen = switch.check("session-r")
            assert seen is not None
            assert seen.command_id == command.command_id
            client.delete(key)
            # Once seen, the kill is remembered in-process.
            assert switch.check("session-r") is not None
    finally:
        client.delete(key)
        client.close()


def test_redis_user_flag_is_read_in_the_same_check(redis_url, unique_name):
    prefix = unique_name("tripwire-test-kill")
    client = redis.Redis.from_url(redis_url)
    key = redis_kill_key(Scope.USER, "user-r", prefix)
    client.set(key, _command(Scope.USER, "user-r").to_json(), ex=60)
    try:
        switch = KillSwitch(
            redis_url=redis_url, redis_key_prefix=prefix, subscribe_redis=False
        )
        with switch, pytest.raises(SessionKilled) as caught:
            switch.raise_if_killed("session-r2", user_id="user-r")
        assert caught.value.session_id == "session-r2"
    finally:
        client.delete(key)
        client.close()


async def test_async_kill_switch_reads_the_redis_flag(redis_url, unique_name):
    prefix = unique_name("tripwire-test-kill")
    client = redis.Redis.from_url(redis_url)
    key = redis_kill_key(Scope.SESSION, "session-ar", prefix)
    client.set(key, _command(Scope.SESSION, "session-ar").to_json(), ex=60)
    try:
        switch = AsyncKillSwitch(
            redis_url=redis_url, redis_key_prefix=prefix, subscribe_redis=False
        )
        async with switch:
            assert await switch.check("session-none") is None
            with pytest.raises(SessionKilled):
                await switch.raise_if_killed("session-ar")
    finally:
        client.delete(key)
        client.close()


async def test_kill_switch_hears_the_redis_channel(redis_url, unique_name):
    channel = unique_name("tripwire-test-channel")
    received: list[KillCommand] = []
    switch = KillSwitch(
        redis_url=redis_url, redis_channel=channel, on_kill=received.append
    )
    client = redis.Redis.from_url(redis_url)
    try:
        with switch:
            assert await asyncio.to_thread(switch.wait_ready, HANG_GUARD_SECONDS)
            command = _command(Scope.SESSION, "session-p")
            client.publish(channel, command.to_json())
            await _eventually(lambda: received)

            assert received[0].command_id == command.command_id
            assert switch.check("session-p") is not None
    finally:
        client.close()


async def test_kafka_and_redis_deliveries_of_one_command_call_the_handler_once(
    kafka_bootstrap, redis_url, create_topics, unique_name
):
    (topic,) = await create_topics([unique_name("killswitch")])
    channel = unique_name("tripwire-test-channel")
    received: list[KillCommand] = []
    switch = KillSwitch(
        kafka_bootstrap,
        topic,
        redis_url=redis_url,
        redis_channel=channel,
        on_kill=received.append,
    )
    client = redis.Redis.from_url(redis_url)
    try:
        with switch:
            assert await asyncio.to_thread(switch.wait_ready, HANG_GUARD_SECONDS)
            command = _command(Scope.SESSION, "session-d")
            client.publish(channel, command.to_json())
            await _publish(kafka_bootstrap, topic, command)
            marker = _command(Scope.SESSION, "session-marker")
            await _publish(kafka_bootstrap, topic, marker)
            await _eventually(lambda: switch.check("session-marker") is not None)

            assert [c.command_id for c in received] == [
                command.command_id,
                marker.command_id,
            ]
    finally:
        client.close()
