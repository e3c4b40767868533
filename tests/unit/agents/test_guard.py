"""The session guard's step budget, loop check, kill-switch checks and wrappers."""

import asyncio
import socket
import time

import pytest

from tripwire.agents.guard import SessionGuard
from tripwire.agents.killswitch import AsyncKillSwitch, KillSwitch
from tripwire.errors import ConfigError, SessionKilled
from tripwire.schemas.events import KillCommand, Scope

LOOPING = [
    "I could not find the invoice for ACME, let me search the billing records again.",
    "I still could not find the invoice for ACME; searching the billing records.",
    "Let me search the billing records again for the ACME invoice I could not find.",
    "I could not find the ACME invoice, so I will search the billing records again.",
]
PROGRESSING = [
    "The customer asked for a refund of order 1182 placed in March.",
    "Order 1182 shipped on 4 March and was delivered two days later.",
    "Our policy allows refunds within 30 days of delivery for unopened items.",
    "I have drafted the refund confirmation email with the tracking reference.",
]


def _dead_redis() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"redis://127.0.0.1:{sock.getsockname()[1]}"


def _command(scope: Scope, target: str) -> KillCommand:
    return KillCommand.create(
        scope, target, "session_cost_budget", "$2.41 spent, over $2.00", time.time()
    )


def test_step_budget_allows_max_steps_calls_then_stops():
    guard = SessionGuard("s1", max_steps=3)

    for _ in range(3):
        guard.before_llm_call()

    with pytest.raises(SessionKilled) as caught:
        guard.before_llm_call()
    assert caught.value.reason == "step_budget"
    assert "LLM call 4 would exceed the local step budget of 3" in str(caught.value)
    assert guard.steps == 3


def test_a_stopped_guard_stays_stopped():
    guard = SessionGuard("s1", max_steps=1)
    guard.before_llm_call()
    with pytest.raises(SessionKilled):
        guard.before_llm_call()

    with pytest.raises(SessionKilled, match="step_budget"):
        guard.after_llm_call("anything")
    assert guard.killed is not None
    assert guard.killed.reason == "step_budget"


def test_no_step_budget_when_max_steps_is_none():
    guard = SessionGuard("s1", max_steps=None)

    for _ in range(200):
        guard.before_llm_call()

    assert guard.steps == 200


def test_repeated_outputs_stop_the_session():
    guard = SessionGuard("s1")

    with pytest.raises(SessionKilled) as caught:
        for text in LOOPING:
            guard.before_llm_call()
            guard.after_llm_call(text)

    assert caught.value.reason == "loop_similarity"
    assert "matches 3 of the previous 3" in caught.value.detail
    assert "after 4 LLM calls" in caught.value.detail


def test_progressing_outputs_go_on():
    guard = SessionGuard("s1")

    for text in PROGRESSING:
        guard.before_llm_call()
        guard.after_llm_call(text)

    assert guard.killed is None
    assert guard.steps == 4


def test_loop_check_can_be_turned_off():
    guard = SessionGuard("s1", loop_threshold=None)

    for text in LOOPING * 2:
        guard.before_llm_call()
        guard.after_llm_call(text)

    assert guard.killed is None


def test_empty_outputs_are_not_compared():
    guard = SessionGuard("s1")

    for _ in range(6):
        guard.before_llm_call()
        guard.after_llm_call(None)
        guard.after_llm_call("")

    assert guard.killed is None


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"max_steps": 0}, "max_steps must be >= 1"),
        ({"loop_threshold": 1.5}, r"loop_threshold must be in \(0, 1\]"),
        ({"loop_min_matches": 6, "loop_window": 5}, "loop_min_matches <= loop_window"),
        ({"loop_window": 99}, "loop_window <= 8"),
    ],
)
def test_bad_settings_are_rejected(options, problem):
    with pytest.raises(ConfigError, match=problem):
        SessionGuard("s1", **options)


def test_empty_session_id_is_rejected():
    with pytest.raises(ConfigError, match="session_id must be a non-empty id"):
        SessionGuard("")


def test_kill_switch_command_stops_the_next_call():
    switch = KillSwitch(redis_url=_dead_redis())
    guard = SessionGuard("s1", user_id="u1", kill_switch=switch)
    guard.before_llm_call()

    switch.apply(_command(Scope.USER, "u1"))

    with pytest.raises(SessionKilled) as caught:
        guard.before_llm_call()
    assert caught.value.reason == "session_cost_budget"
    assert "every session of user 'u1' was stopped" in str(caught.value)
    assert "$2.41 spent" in str(caught.value)
    assert guard.steps == 1


def test_decorated_function_is_checked_before_and_after():
    guard = SessionGuard("s1", max_steps=10)
    calls: list[str] = []

    @guard
    def llm(prompt: str) -> str:
        calls.append(prompt)
        return LOOPING[len(calls) - 1]

    with pytest.raises(SessionKilled, match="loop_similarity"):
        for step in range(4):
            llm(f"step {step}")

    assert len(calls) == 4
    with pytest.raises(SessionKilled):
        llm("step 5")
    assert len(calls) == 4


def test_decorator_reads_text_out_of_a_result_object():
    guard = SessionGuard("s1")

    @guard(output_text=lambda reply: reply["content"])
    def llm() -> dict[str, str]:
        return {"content": LOOPING[0]}

    with pytest.raises(SessionKilled, match="loop_similarity"):
        for _ in range(4):
            llm()


async def test_async_decorated_function_uses_the_async_check():
    switch = AsyncKillSwitch(redis_url=_dead_redis())
    guard = SessionGuard("s1", kill_switch=switch)

    @guard
    async def llm() -> str:
        return "a fresh answer"

    async with switch:
        assert await llm() == "a fresh answer"
        switch.apply(_command(Scope.SESSION, "s1"))
        with pytest.raises(SessionKilled, match="session_cost_budget"):
            await llm()
    assert guard.steps == 1


def test_sync_check_with_an_async_kill_switch_sees_received_commands():
    switch = AsyncKillSwitch(redis_url=_dead_redis())
    guard = SessionGuard("s1", kill_switch=switch)
    switch.apply(_command(Scope.SESSION, "s1"))

    with pytest.raises(SessionKilled):
        guard.before_llm_call()


async def test_kill_during_a_call_raises_session_killed_from_the_block():
    switch = AsyncKillSwitch(redis_url=_dead_redis())
    guard = SessionGuard("s1", kill_switch=switch)
    started = asyncio.Event()

    async def agent() -> None:
        async with guard:
            await guard.abefore_llm_call()
            started.set()
            await asyncio.sleep(60)

    task = asyncio.create_task(agent())
    await asyncio.wait_for(started.wait(), 30)
    switch.apply(_command(Scope.SESSION, "s1"))

    with pytest.raises(SessionKilled, match="session_cost_budget"):
        await asyncio.wait_for(task, 30)
    assert not task.cancelled()


async def test_other_cancellations_pass_through_the_block():
    switch = AsyncKillSwitch(redis_url=_dead_redis())
    guard = SessionGuard("s1", kill_switch=switch)
    started = asyncio.Event()

    async def agent() -> None:
        async with guard:
            started.set()
            await asyncio.sleep(60)

    task = asyncio.create_task(agent())
    await asyncio.wait_for(started.wait(), 30)
    task.cancel()

    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 30)
    assert guard.killed is None


def test_sync_block_refuses_a_stopped_session():
    guard = SessionGuard("s1", max_steps=1)
    with guard:
        guard.before_llm_call()

    with pytest.raises(SessionKilled):
        guard.before_llm_call()
    with pytest.raises(SessionKilled), guard:
        pytest.fail("a stopped session must not enter the block")
