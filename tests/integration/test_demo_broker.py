"""`tripwire demo --broker` against a real `tripwire worker` on the test broker."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.worker_process import delete_topics, launch_worker

DEMO_SECONDS = 180.0


@pytest.fixture
def worker_env(kafka_bootstrap: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    """Run a worker on fresh topics; yield the environment that names them."""
    prefix = f"tripwire-test-demo-{uuid.uuid4().hex[:10]}"
    worker = launch_worker(kafka_bootstrap, "", prefix, tmp_path / "data")
    try:
        yield worker.env
    finally:
        worker.stop()
        asyncio.run(delete_topics(kafka_bootstrap, prefix))


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
