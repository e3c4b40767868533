"""The kill switch's in-process behaviour, with no broker and a dead Redis."""

import asyncio
import logging
import socket
import time

import pytest

from tripwire.agents.killswitch import (
    AsyncKillSwitch,
    KillSwitch,
    decode_kill_command,
)
from tripwire.errors import ConfigError, SessionKilled
from tripwire.schemas.events import KillCommand, Scope


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _command(scope: Scope, target: str, reason: str = "loop_detected") -> KillCommand:
    return KillCommand.create(
        scope, target, reason, "similarity 0.97 over 4 outputs", time.time()
    )


def test_decode_round_trips_the_worker_json():
    command = _command(Scope.USER, "user-1")
    command.evidence = {"steps": 30}

    decoded = decode_kill_command(command.to_json())

    assert decoded == command


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"scope": "session", "target": "s"}', "no 'command_id'"),
        (
            b'{"command_id": "c", "scope": "galaxy", "target": "s", '
            b'"reason": "r", "issued_at": 1}',
            "malformed field",
        ),
    ],
)
def test_decode_rejects_malformed_commands(data, problem):
    with pytest.raises(ValueError, match=problem):
        decode_kill_command(data)


def test_a_kill_switch_needs_a_source():
    with pytest.raises(ConfigError, match="bootstrap_servers nor redis_url"):
        KillSwitch()


def test_redis_timeout_must_be_positive():
    with pytest.raises(ConfigError, match="redis_timeout must be > 0"):
        KillSwitch(redis_url="redis://127.0.0.1:1", redis_timeout=0)


def test_applied_command_kills_its_session_only():
    switch = KillSwitch(redis_url=f"redis://127.0.0.1:{_closed_port()}")

    switch.apply(_command(Scope.SESSION, "s1"))

    with pytest.raises(SessionKilled) as caught:
        switch.raise_if_killed("s1")
    assert caught.value.reason == "loop_detected"
    assert "similarity 0.97" in str(caught.value)
    assert switch.check("s2") is None


def test_user_command_kills_every_session_of_the_user():
    switch = KillSwitch(redis_url=f"redis://127.0.0.1:{_closed_port()}")

    switch.apply(_command(Scope.USER, "u1"))

    assert switch.check("s1", user_id="u1") is not None
    assert switch.check("s2", user_id="u1") is not None
    assert switch.check("s1") is None
    assert switch.check("s1", user_id="u2") is None


def test_fleet_command_reaches_the_handler_but_kills_no_session():
    received: list[KillCommand] = []
    switch = KillSwitch(
        redis_url=f"redis://127.0.0.1:{_closed_port()}", on_kill=received.append
    )

    switch.apply(_command(Scope.FLEET, "*"))

    assert len(received) == 1
    assert switch.check("s1") is None


def test_repeated_command_calls_the_handler_once():
    received: list[KillCommand] = []
    switch = KillSwitch(
        redis_url=f"redis://127.0.0.1:{_closed_port()}", on_kill=received.append
    )
    command = _command(Scope.SESSION, "s1")

    assert switch.apply(command) is True
    assert switch.apply(command) is False

    assert received == [command]


def test_failing_handler_does_not_stop_the_kill(caplog):
    def handler(command: KillCommand) -> None:
        raise RuntimeError("handler bug")

    switch = KillSwitch(
        redis_url=f"redis://127.0.0.1:{_closed_port()}", on_kill=handler
    )

    switch.apply(_command(Scope.SESSION, "s1"))

    assert switch.check("s1") is not None
    assert "kill handler failed" in caplog.text


def test_dead_redis_degrades_to_the_in_process_set_and_warns_once(caplog):
    switch = KillSwitch(redis_url=f"redis://127.0.0.1:{_closed_port()}")
    caplog.set_level(logging.WARNING, logger="tripwire.agents.killswitch")

    results = [switch.check("s1", user_id="u1") for _ in range(5)]

    assert results == [None] * 5
    warnings = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(warnings) == 1

    switch.apply(_command(Scope.SESSION, "s1"))
    with pytest.raises(SessionKilled):
        switch.raise_if_killed("s1")


def test_unreachable_broker_does_not_break_the_kill_switch(caplog):
    caplog.set_level(logging.WARNING, logger="tripwire.agents.killswitch")
    switch = KillSwitch(f"127.0.0.1:{_closed_port()}")

    with switch:
        assert switch.wait_ready(0.5) is False
        switch.apply(_command(Scope.SESSION, "s1"))
        assert switch.check("s1") is not None
        deadline = time.monotonic() + 30
        while "cannot reach Kafka" not in caplog.text:
            assert time.monotonic() < deadline
            time.sleep(0.05)

    assert switch.check("s2") is None


async def test_async_kill_switch_cancels_registered_tasks_of_a_killed_user():
    switch = AsyncKillSwitch(redis_url=f"redis://127.0.0.1:{_closed_port()}")
    first = asyncio.create_task(asyncio.sleep(60))
    second = asyncio.create_task(asyncio.sleep(60))
    other = asyncio.create_task(asyncio.sleep(60))
    switch.register("s1", first, user_id="u1")
    switch.register("s2", second, user_id="u1")
    switch.register("s3", other, user_id="u2")

    switch.apply(_command(Scope.USER, "u1"))

    for task in (first, second):
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 30)
    assert not other.done()
    other.cancel()
    assert switch.check_local("s9", user_id="u1") is not None


async def test_async_check_with_dead_redis_returns_none():
    switch = AsyncKillSwitch(redis_url=f"redis://127.0.0.1:{_closed_port()}")
    async with switch:
        assert await switch.check("s1", user_id="u1") is None
        switch.apply(_command(Scope.SESSION, "s1"))
        with pytest.raises(SessionKilled):
            await switch.raise_if_killed("s1")


async def test_async_handler_is_awaited():
    received: list[str] = []

    async def handler(command: KillCommand) -> None:
        await asyncio.sleep(0)
        received.append(command.target)

    switch = AsyncKillSwitch(
        redis_url=f"redis://127.0.0.1:{_closed_port()}", on_kill=handler
    )

    switch.apply(_command(Scope.SESSION, "s1"))
    for _ in range(10):
        await asyncio.sleep(0)

    assert received == ["s1"]


async def test_register_without_a_task_uses_the_current_one():
    switch = AsyncKillSwitch(redis_url=f"redis://127.0.0.1:{_closed_port()}")

    async def agent() -> str:
        switch.register("s1")
        await asyncio.sleep(60)
        return "finished"

    task = asyncio.create_task(agent())
    await asyncio.sleep(0)
    switch.apply(_command(Scope.SESSION, "s1"))

    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 30)


@pytest.mark.parametrize("topic", ["", "kill switch", "..", "x" * 250])
def test_topic_must_be_a_kafka_topic_name(topic):
    with pytest.raises(ConfigError, match="must be a Kafka topic name"):
        KillSwitch("127.0.0.1:9092", topic)
