"""An instrumented agent against the real broker, Redis and `tripwire worker`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

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

START_SECONDS = 120.0
STEP_BUDGET = 8
# The local guard is only a backstop here: the worker must stop the agent.
LOCAL_BACKSTOP = 60
# Spans travel every 100 ms and a call takes 100 ms: the kill lands a few
# calls after the budget is crossed. The bound is generous, a hang guard.
STEPS_AFTER_BUDGET = 15


@dataclass
class Worker:
    """A running worker and the topics it was given."""

    process: subprocess.Popen[bytes]
    log: Path
    web: str
    bootstrap: str
    redis_url: str
    spans_topic: str
    killswitch_topic: str

    def log_tail(self, lines: int = 40) -> str:
        text = self.log.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ready(web: str) -> bool:
    try:
        with urllib.request.urlopen(f"{web}/ready", timeout=5) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


async def _delete_topics(bootstrap: str, prefix: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        names = [name for name in await admin.list_topics() if name.startswith(prefix)]
        if names:
            await admin.delete_topics(names)
    finally:
        await admin.close()


@pytest.fixture(scope="module")
def worker(
    kafka_bootstrap: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Worker]:
    """Run `tripwire worker` on fresh topics, with a step budget of 8 LLM calls."""
    prefix = f"tripwire-test-agents-{uuid.uuid4().hex[:10]}"
    topics = {
        name: f"{prefix}.{name}"
        for name in ("spans", "otlp", "killswitch", "alerts", "dlq")
    }
    port = _free_port()
    data = tmp_path_factory.mktemp("agent-worker")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TRIPWIRE_")},
        "TRIPWIRE_APP_ID": prefix,
        "TRIPWIRE_BROKER": kafka_bootstrap,
        "TRIPWIRE_REDIS_URL": redis_url,
        "TRIPWIRE_WEB_PORT": str(port),
        "TRIPWIRE_DATA_DIR": str(data),
        "TRIPWIRE_PARTITIONS": "2",
        "TRIPWIRE_BATCH_WITHIN_SECONDS": "0.05",
        "TRIPWIRE_STEP_BUDGET": str(STEP_BUDGET),
        **{f"TRIPWIRE_TOPIC_{name.upper()}": topic for name, topic in topics.items()},
    }
    log = data / "worker.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "tripwire", "worker"],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    running = Worker(
        process,
        log,
        f"http://127.0.0.1:{port}",
        kafka_bootstrap,
        redis_url,
        topics["spans"],
        topics["killswitch"],
    )
    try:
        deadline = time.monotonic() + START_SECONDS
        while not _ready(running.web):
            if process.poll() is not None:
                pytest.fail(f"worker exited early:\n{running.log_tail()}")
            if time.monotonic() > deadline:
                pytest.fail(
                    f"worker not ready in {START_SECONDS}s:\n{running.log_tail()}"
                )
            time.sleep(0.5)
        yield running
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        asyncio.run(_delete_topics(kafka_bootstrap, prefix))


def _tracing(worker: Worker) -> tuple[TracerProvider, KafkaSpanExporter]:
    exporter = KafkaSpanExporter(worker.bootstrap, worker.spans_topic)
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=100))
    return provider, exporter


def _assert_stopped_by_the_worker(killed: SessionKilled, calls: int) -> None:
    assert killed.reason == "step_budget"
    assert f"over the step budget of {STEP_BUDGET}" in str(killed)
    assert STEP_BUDGET < calls <= STEP_BUDGET + STEPS_AFTER_BUDGET


def _run_runaway(worker: Worker, switch: KillSwitch) -> tuple[SessionKilled, int]:
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
    switch = KillSwitch(worker.bootstrap, worker.killswitch_topic)
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
        worker.bootstrap, worker.killswitch_topic, redis_url=worker.redis_url
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
            f"--spans-topic={worker.spans_topic}",
            f"--killswitch-topic={worker.killswitch_topic}",
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
