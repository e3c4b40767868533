"""An instrumented agent against the real broker, Redis and `tripwire worker`."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from support.worker_process import WorkerProcess, delete_topics, launch_worker

from tripwire.agents import (
    AsyncKillSwitch,
    KafkaSpanExporter,
    KillSwitch,
    SessionGuard,
    SessionKilled,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

import agent_loop  # noqa: E402
from fake_llm import FakeLLM  # noqa: E402

STEP_BUDGET = 8
# The local guard is only a backstop here: the worker must stop the agent.
LOCAL_BACKSTOP = 60
# Spans travel every 100 ms and a call takes 100 ms: the kill lands a few
# calls after the budget is crossed. The bound is generous, a hang guard.
STEPS_AFTER_BUDGET = 15


@pytest.fixture(scope="module")
def worker(
    kafka_bootstrap: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    """Run `tripwire worker` on fresh topics, with a step budget of 8 LLM calls."""
    prefix = f"tripwire-test-agents-{uuid.uuid4().hex[:10]}"
    data = tmp_path_factory.mktemp("agent-worker")
    running = launch_worker(
        kafka_bootstrap,
        redis_url,
        prefix,
        data,
        TRIPWIRE_STEP_BUDGET=str(STEP_BUDGET),
    )
    try:
        yield running
    finally:
        running.stop()
        asyncio.run(delete_topics(kafka_bootstrap, prefix))


def _tracing(worker: WorkerProcess) -> tuple[TracerProvider, KafkaSpanExporter]:
    exporter = KafkaSpanExporter(worker.bootstrap, worker.topics["spans"])
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=100))
    return provider, exporter


def _assert_stopped_by_the_worker(killed: SessionKilled, calls: int) -> None:
    assert killed.reason == "step_budget"
    assert f"over the step budget of {STEP_BUDGET}" in str(killed)
    assert STEP_BUDGET < calls <= STEP_BUDGET + STEPS_AFTER_BUDGET


def _run_runaway(
    worker: WorkerProcess, switch: KillSwitch
) -> tuple[SessionKilled, int]:
    """Run a runaway agent until it is killed; return the error and its calls."""
    session_id = f"e2e-{uuid.uuid4().hex[:12]}"
    provider, exporter = _tracing(worker)
    llm = FakeLLM("runaway", latency=0.1)
    guard = SessionGuard(
        session_id,
        user_id=f"user-{session_id}",
        max_steps=LOCAL_BACKSTOP,
        kill_switch=switch,
    )
    try:
        with pytest.raises(SessionKilled) as caught:
            agent_loop.run_agent(provider.get_tracer("e2e"), llm, guard, "research")
    finally:
        provider.shutdown()
    assert exporter.dropped == 0
    assert caught.value.session_id == session_id
    return caught.value, llm.calls


def test_runaway_agent_is_stopped_by_a_kill_command_from_kafka(worker):
    switch = KillSwitch(worker.bootstrap, worker.topics["killswitch"])
    with switch:
        assert switch.wait_ready(60), worker.log_tail()
        killed, calls = _run_runaway(worker, switch)

    _assert_stopped_by_the_worker(killed, calls)


def test_runaway_agent_is_stopped_by_the_redis_flag_alone(worker):
    switch = KillSwitch(redis_url=worker.redis_url, subscribe_redis=False)
    with switch:
        killed, calls = _run_runaway(worker, switch)

    _assert_stopped_by_the_worker(killed, calls)


async def test_kill_command_interrupts_a_slow_llm_call(worker):
    session_id = f"e2e-async-{uuid.uuid4().hex[:12]}"
    provider, _ = _tracing(worker)
    tracer = provider.get_tracer("e2e")
    llm = FakeLLM("runaway", latency=0.1)
    switch = AsyncKillSwitch(
        worker.bootstrap, worker.topics["killswitch"], redis_url=worker.redis_url
    )
    guard = SessionGuard(session_id, max_steps=LOCAL_BACKSTOP, kill_switch=switch)
    slow_calls = 0

    async def agent() -> None:
        nonlocal slow_calls
        messages = [{"role": "user", "content": "research"}]
        async with guard:
            while True:
                await guard.abefore_llm_call()
                with tracer.start_as_current_span("chat gpt-4o-mini") as span:
                    span.set_attributes(
                        {
                            "gen_ai.operation.name": "chat",
                            "gen_ai.request.model": "gpt-4o-mini",
                            "gen_ai.usage.input_tokens": 500,
                            "gen_ai.usage.output_tokens": 50,
                            "session.id": session_id,
                        }
                    )
                    if guard.steps > STEP_BUDGET + 1:
                        # The call that crosses the budget ends, so the worker
                        # sees it; the next one is slow: the kill must cancel
                        # it rather than wait for it.
                        llm.latency = 60.0
                        slow_calls += 1
                    await llm.acomplete(messages)

    try:
        async with switch:
            assert await switch.wait_ready(60), worker.log_tail()
            started = time.monotonic()
            with pytest.raises(SessionKilled) as caught:
                await asyncio.wait_for(agent(), 50)
            assert time.monotonic() - started < 50
    finally:
        await asyncio.to_thread(provider.shutdown)

    assert caught.value.reason == "step_budget"
    assert guard.steps == STEP_BUDGET + 2
    assert slow_calls == 1


def test_agent_loop_example_is_stopped_by_the_worker(worker):
    result = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "agent_loop.py"),
            "--scenario=runaway",
            f"--bootstrap={worker.bootstrap}",
            f"--redis={worker.redis_url}",
            f"--spans-topic={worker.topics['spans']}",
            f"--killswitch-topic={worker.topics['killswitch']}",
            f"--max-steps={LOCAL_BACKSTOP}",
            "--latency=0.1",
            "--json",
        ],
        capture_output=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == agent_loop.EXIT_KILLED, result.stderr.decode()
    summary = json.loads(result.stdout.decode().strip().splitlines()[-1])
    assert summary["outcome"] == "killed"
    assert summary["reason"] == "step_budget"
    assert STEP_BUDGET < summary["llm_calls"] <= STEP_BUDGET + STEPS_AFTER_BUDGET
    assert summary["spans_dropped"] == 0
