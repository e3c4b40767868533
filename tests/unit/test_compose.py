"""docker-compose.yml agrees with scripts/services and points at files that exist."""

import base64
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
SERVICES_SCRIPT = ROOT / "scripts" / "services"
SERVICES_ENV = ROOT / "deploy" / "services.env"
KAFKA_ENV = ROOT / "deploy" / "kafka.env"

_DEFAULT = re.compile(r"\$\{(\w+):-([^}]*)\}")


def read_env_file(path: Path) -> dict[str, str]:
    """Return the KEY=VALUE lines of an env file, comments skipped."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, _, value = line.partition("=")
        values[key.strip()] = value.strip()
    return values


def with_defaults(text: str) -> str:
    """Replace compose's ``${NAME:-default}`` with its default."""
    return _DEFAULT.sub(lambda match: match.group(2), text)


def published(service: dict[str, Any]) -> dict[int, int]:
    """Return container port -> host port for the service's short-form ports."""
    mapping: dict[int, int] = {}
    for entry in service.get("ports", []):
        parts = with_defaults(str(entry)).split(":")
        mapping[int(parts[-1])] = int(parts[-2])
    return mapping


def listener_ports(listeners: str) -> dict[str, int]:
    """Return listener name -> port of a Kafka ``listeners`` value."""
    ports: dict[str, int] = {}
    for listener in with_defaults(listeners).split(","):
        name, _, address = listener.partition("://")
        ports[name] = int(address.rsplit(":", 1)[1])
    return ports


def run_config(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``scripts/services config`` with only the given TRIPWIRE_* settings."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TRIPWIRE_")}
    return subprocess.run(
        ["bash", str(SERVICES_SCRIPT), "config"],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        env={**clean, "TRIPWIRE_SERVICES_DIR": str(tmp_path), **env},
    )


def script_properties(tmp_path: Path, **env: str) -> dict[str, str]:
    """Return the server.properties scripts/services would write, started nowhere."""
    result = run_config(tmp_path, **env)
    assert result.returncode == 0, result.stderr
    properties: dict[str, str] = {}
    for line in result.stdout.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            properties[key] = value
    return properties


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="module")
def defaults() -> dict[str, str]:
    return read_env_file(SERVICES_ENV)


def test_compose_defines_the_stack(compose: dict[str, Any]) -> None:
    services = set(compose["services"])

    assert {"kafka", "redis", "prometheus", "grafana", "tripwire-worker"} <= services


def test_kafka_image_runs_the_version_the_script_runs(
    compose: dict[str, Any], defaults: dict[str, str]
) -> None:
    image = compose["services"]["kafka"]["image"]

    assert image == f"apache/kafka:{defaults['TRIPWIRE_KAFKA_VERSION']}"


def test_kafka_broker_settings_come_from_the_shared_env_file(
    compose: dict[str, Any],
) -> None:
    kafka = compose["services"]["kafka"]
    env_files = [str(ROOT / entry) for entry in kafka["env_file"]]
    shared = read_env_file(KAFKA_ENV)

    assert str(ROOT / "./deploy/kafka.env") in env_files
    assert not set(kafka["environment"]) & set(shared), "set only in deploy/kafka.env"
    assert shared["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert shared["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    assert shared["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == "1"


def test_script_writes_the_shared_broker_settings(tmp_path: Path) -> None:
    properties = script_properties(tmp_path)
    shared = read_env_file(KAFKA_ENV)

    for key, value in shared.items():
        name = key.removeprefix("KAFKA_").lower().replace("_", ".")
        assert properties[name] == value, name
    assert properties["log.dirs"] == str(tmp_path / "kafka" / "data")


def test_kafka_ports_agree_between_compose_and_script(
    compose: dict[str, Any], defaults: dict[str, str], tmp_path: Path
) -> None:
    kafka = compose["services"]["kafka"]
    environment = kafka["environment"]
    client_port = int(defaults["TRIPWIRE_KAFKA_PORT"])
    controller_port = int(defaults["TRIPWIRE_KAFKA_CONTROLLER_PORT"])
    node_id = read_env_file(KAFKA_ENV)["KAFKA_NODE_ID"]
    properties = script_properties(tmp_path)

    in_container = listener_ports(environment["KAFKA_LISTENERS"])
    advertised = listener_ports(environment["KAFKA_ADVERTISED_LISTENERS"])
    on_host = listener_ports(properties["listeners"])

    assert on_host == {"PLAINTEXT": client_port, "CONTROLLER": controller_port}
    assert properties["controller.quorum.bootstrap.servers"].endswith(
        f":{controller_port}"
    )
    assert in_container["PLAINTEXT"] == client_port
    assert in_container["CONTROLLER"] == controller_port
    assert environment["KAFKA_CONTROLLER_QUORUM_VOTERS"] == (
        f"{node_id}@kafka:{controller_port}"
    )
    assert published(kafka) == {in_container["HOST"]: client_port}
    assert advertised["HOST"] == client_port


def test_script_follows_port_overrides(tmp_path: Path) -> None:
    properties = script_properties(
        tmp_path,
        TRIPWIRE_KAFKA_PORT="19092",
        TRIPWIRE_KAFKA_CONTROLLER_PORT="19093",
        TRIPWIRE_KAFKA_PARTITIONS="3",
    )

    assert listener_ports(properties["listeners"]) == {
        "PLAINTEXT": 19092,
        "CONTROLLER": 19093,
    }
    assert properties["num.partitions"] == "3"


def test_script_rejects_a_bad_port(tmp_path: Path) -> None:
    result = run_config(tmp_path, TRIPWIRE_KAFKA_PORT="90000")

    assert result.returncode == 1
    assert "TRIPWIRE_KAFKA_PORT" in result.stderr
    assert "90000" in result.stderr


def test_compose_cluster_id_is_a_kafka_uuid(compose: dict[str, Any]) -> None:
    cluster_id = compose["services"]["kafka"]["environment"]["CLUSTER_ID"]

    assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16


def test_redis_port_agrees_with_script(
    compose: dict[str, Any], defaults: dict[str, str]
) -> None:
    redis = compose["services"]["redis"]

    assert published(redis) == {6379: int(defaults["TRIPWIRE_REDIS_PORT"])}


def test_worker_talks_to_the_compose_services(compose: dict[str, Any]) -> None:
    worker = compose["services"]["tripwire-worker"]
    environment = worker["environment"]

    assert worker["command"] == ["tripwire", "worker"]
    assert environment["TRIPWIRE_BROKER"] == "kafka://kafka:9092"
    assert environment["TRIPWIRE_REDIS_URL"] == "redis://redis:6379/0"
    assert environment["TRIPWIRE_WEB_PORT"] == "6066"
    assert environment["TRIPWIRE_WEB_HOST"] == "0.0.0.0"


def test_prometheus_scrapes_the_worker_web_port(compose: dict[str, Any]) -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    worker_port = int(
        compose["services"]["tripwire-worker"]["environment"]["TRIPWIRE_WEB_PORT"]
    )

    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    discovery = jobs["tripwire-worker"]["dns_sd_configs"][0]

    assert discovery["names"] == ["tripwire-worker"]
    assert discovery["port"] == worker_port
    assert jobs["tripwire-worker"]["metrics_path"] == "/metrics"


def test_every_mounted_local_file_exists(compose: dict[str, Any]) -> None:
    missing = []
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume
            source = str(source).split(":", 1)[0]
            if source.startswith((".", "/")) and not (ROOT / source).exists():
                missing.append(f"{name}: {source}")
        for env_file in service.get("env_file", []):
            if not (ROOT / env_file).exists():
                missing.append(f"{name}: {env_file}")

    assert missing == []


def test_worker_image_builds_from_files_that_exist(compose: dict[str, Any]) -> None:
    build = compose["services"]["tripwire-worker"]["build"]
    context = ROOT / build["context"]
    dockerfile = context / build["dockerfile"]

    copied = [
        source
        for line in dockerfile.read_text().splitlines()
        if line.startswith("COPY ")
        for source in line.split()[1:-1]
    ]

    assert "FROM python:3.11-slim" in dockerfile.read_text()
    assert copied, "the Dockerfile copies the project in"
    assert [source for source in copied if not (context / source).exists()] == []


def test_grafana_provisioning_points_at_prometheus_and_dashboards() -> None:
    grafana = ROOT / "deploy" / "grafana"
    datasources = yaml.safe_load(
        (grafana / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    dashboards = sorted((grafana / "dashboards").glob("*.json"))
    uid = datasources["datasources"][0]["uid"]

    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"
    assert dashboards
    for path in dashboards:
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            assert panel["datasource"]["uid"] == uid, (path.name, panel["title"])
            assert panel["targets"][0]["expr"], (path.name, panel["title"])


def test_prometheus_rule_files_are_mounted(compose: dict[str, Any]) -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    mounts = {
        target: ROOT / source
        for source, target, *_ in (
            str(volume).split(":")
            for volume in compose["services"]["prometheus"]["volumes"]
        )
    }

    assert config["rule_files"]
    for rule_file in config["rule_files"]:
        assert rule_file in mounts, rule_file
        assert yaml.safe_load(mounts[rule_file].read_text())["groups"]
