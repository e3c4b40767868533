"""Run `tripwire worker` as a subprocess on fresh topics, for integration tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client.parser import text_string_to_metric_families

START_SECONDS = 120.0
TOPIC_NAMES = ("spans", "otlp", "killswitch", "alerts", "dlq")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass
class WorkerProcess:
    """A running `tripwire worker` subprocess and what it was configured with."""

    process: subprocess.Popen[bytes]
    log: Path
    web: str
    bootstrap: str
    redis_url: str
    topics: dict[str, str]
    app_id: str
    env: dict[str, str]

    def log_tail(self, lines: int = 60) -> str:
        text = self.log.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.web + path, timeout=5) as response:
                return int(response.status), bytes(response.read())
        except urllib.error.HTTPError as exc:
            return int(exc.code), bytes(exc.read())

    def metrics(self) -> Samples:
        status, body = self.get("/metrics")
        assert status == 200, body
        samples: Samples = {}
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
        return samples

    def session(self, session_id: str) -> dict[str, Any] | None:
        status, body = self.get(f"/sessions/{session_id}")
        if status == 404:
            return None
        assert status == 200, body
        document: dict[str, Any] = json.loads(body)
        return document

    def stop(self) -> None:
        """Stop the worker with SIGTERM, then SIGKILL if it hangs."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


def free_port() -> int:
    """Return a loopback TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def worker_topics(prefix: str) -> dict[str, str]:
    """Return the worker's topic names, each under ``prefix``."""
    return {name: f"{prefix}.{name}" for name in TOPIC_NAMES}


def launch_worker(
    bootstrap: str,
    redis_url: str,
    prefix: str,
    data: Path,
    **extra_env: str,
) -> WorkerProcess:
    """Start `tripwire worker` with app id and topics named by ``prefix``.

    Waits until its ``/ready`` view answers; fails the test with the log's
    tail when it exits or does not become ready in time.
    """
    topics = worker_topics(prefix)
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TRIPWIRE_")},
        "TRIPWIRE_APP_ID": prefix,
        "TRIPWIRE_BROKER": bootstrap,
        "TRIPWIRE_REDIS_URL": redis_url,
        "TRIPWIRE_WEB_PORT": str(port),
        "TRIPWIRE_DATA_DIR": str(data),
        "TRIPWIRE_PARTITIONS": "2",
        "TRIPWIRE_BATCH_WITHIN_SECONDS": "0.05",
        "TRIPWIRE_COMMIT_INTERVAL_SECONDS": "0.5",
        "TRIPWIRE_SESSION_TIMEOUT_SECONDS": "10",
        "TRIPWIRE_HEARTBEAT_INTERVAL_SECONDS": "1",
        **{f"TRIPWIRE_TOPIC_{name.upper()}": topic for name, topic in topics.items()},
        **extra_env,
    }
    data.mkdir(parents=True, exist_ok=True)
    log = data / f"worker-{port}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "tripwire", "worker"],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    worker = WorkerProcess(
        process,
        log,
        f"http://127.0.0.1:{port}",
        bootstrap,
        redis_url,
        topics,
        prefix,
        env,
    )
    try:
        _wait_until_ready(worker)
    except BaseException:
        worker.stop()
        raise
    return worker


def _wait_until_ready(worker: WorkerProcess) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if worker.process.poll() is not None:
            pytest.fail(
                f"worker exited with {worker.process.returncode}:\n{worker.log_tail()}"
            )
        try:
            status, _ = worker.get("/ready")
        except OSError:
            status = 0
        if status == 200:
            return
        time.sleep(0.5)
    pytest.fail(f"worker was not ready within {START_SECONDS}s:\n{worker.log_tail()}")


async def delete_topics(bootstrap: str, prefix: str) -> None:
    """Delete every topic whose name starts with ``prefix``."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        names = [name for name in await admin.list_topics() if name.startswith(prefix)]
        if names:
            await admin.delete_topics(names)
    finally:
        await admin.close()
