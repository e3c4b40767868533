"""`tripwire demo --broker` against a real `tripwire worker` on the test broker."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient

START_SECONDS = 120.0
DEMO_SECONDS = 180.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status) == 200
    except OSError:
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


@pytest.fixture
def worker_env(kafka_bootstrap: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    """Run a worker on fresh topics; yield the environment that names them."""
    prefix = f"tripwire-test-demo-{uuid.uuid4().hex[:10]}"
    port = _free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TRIPWIRE_")},
        "TRIPWIRE_APP_ID": prefix,
        "TRIPWIRE_BROKER": kafka_bootstrap,
        "TRIPWIRE_REDIS_URL": "",
        "TRIPWIRE_WEB_PORT": str(port),
        "TRIPWIRE_DATA_DIR": str(tmp_path / "data"),
        "TRIPWIRE_PARTITIONS": "2",
        "TRIPWIRE_BATCH_WITHIN_SECONDS": "0.05",
        **{
            f"TRIPWIRE_TOPIC_{name.upper()}": f"{prefix}.{name}"
            for name in ("spans", "otlp", "killswitch", "alerts", "dlq")
        },
    }
    log = tmp_path / "worker.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "tripwire", "worker"],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + START_SECONDS
        while not _ready(f"http://127.0.0.1:{port}/ready"):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"worker did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield env
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        asyncio.run(_delete_topics(kafka_bootstrap, prefix))


@pytest.mark.parametrize(
    "fleet", [["--sessions", "20", "--seed", "3"], []], ids=["small", "default"]
)
def test_demo_through_the_worker_catches_every_runaway(
    worker_env: dict[str, str], kafka_bootstrap: str, fleet: list[str]
) -> None:
    command = [sys.executable, "-m", "tripwire", "demo", "--broker", kafka_bootstrap]
    demo = subprocess.run(
        [*command, "--no-live", *fleet],
        env=worker_env,
        capture_output=True,
        text=True,
        timeout=DEMO_SECONDS,
        check=False,
    )

    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "KILL" in demo.stdout
    assert "Policy: the worker's own" in demo.stdout
    assert "PASS: every runaway session caught" in demo.stdout
    if not fleet:
        assert "loop_similarity" in demo.stdout
        assert "killed by user_daily_tokens" in demo.stdout


def test_demo_without_the_worker_topics_names_the_fix(kafka_bootstrap: str) -> None:
    prefix = f"tripwire-test-missing-{uuid.uuid4().hex[:10]}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TRIPWIRE_")},
        "TRIPWIRE_TOPIC_KILLSWITCH": f"{prefix}.killswitch",
        "TRIPWIRE_TOPIC_ALERTS": f"{prefix}.alerts",
    }

    command = [sys.executable, "-m", "tripwire", "demo", "--broker", kafka_bootstrap]
    demo = subprocess.run(
        [*command, "--no-live", "--sessions", "8"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert demo.returncode == 1
    assert "start a worker (tripwire worker)" in demo.stderr
