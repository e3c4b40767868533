"""Worker settings: defaults, precedence, and errors that name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from tripwire.config import WorkerSettings, env_name, load_settings
from tripwire.errors import ConfigError


def test_defaults_without_environment() -> None:
    settings = load_settings(environ={})

    assert settings == WorkerSettings()
    assert settings.broker_url == "kafka://127.0.0.1:9092"
    assert settings.topics.spans == "tripwire.spans"
    assert settings.topics.otlp == "otlp_spans"
    assert settings.topics.dlq == "tripwire.spans.dlq"
    assert settings.web_port == 6066
    assert settings.store == "memory://"


def test_environment_sets_every_kind_of_value() -> None:
    settings = load_settings(
        environ={
            "TRIPWIRE_APP_ID": "tw-test",
            "TRIPWIRE_BROKER": "kafka://k1:9092, k2:9093",
            "TRIPWIRE_REDIS_URL": "redis://cache:6380/2",
            "TRIPWIRE_WEB_PORT": "7000",
            "TRIPWIRE_PARTITIONS": "3",
            "TRIPWIRE_TOPIC_SPANS": "my.spans",
            "TRIPWIRE_OTLP_ENCODING": "otlp_json",
            "TRIPWIRE_OTLP_ENABLED": "no",
            "TRIPWIRE_BATCH_WITHIN_SECONDS": "0.05",
        }
    )

    assert settings.app_id == "tw-test"
    assert settings.brokers == ("k1:9092", "k2:9093")
    assert settings.broker_url == "kafka://k1:9092;k2:9093"
    assert settings.bootstrap_servers == "k1:9092,k2:9093"
    assert settings.redis_url == "redis://cache:6380/2"
    assert settings.web_port == 7000
    assert settings.partitions == 3
    assert settings.topics.spans == "my.spans"
    assert settings.topics.alerts == "tripwire.alerts"
    assert settings.otlp_encoding == "otlp_json"
    assert settings.otlp_enabled is False
    assert settings.batch_within_seconds == 0.05
    assert settings.usage_topic == "tw-test-usage-by-user"


def test_empty_redis_url_disables_the_mirror() -> None:
    settings = load_settings(environ={"TRIPWIRE_REDIS_URL": ""})

    assert settings.redis_url is None
    assert settings.describe()["redis"] == "disabled"


def test_toml_file_then_environment_then_overrides(tmp_path: Path) -> None:
    config = tmp_path / "tripwire.toml"
    config.write_text(
        '[worker]\napp_id = "from-file"\nweb_port = 7001\npartitions = 2\n'
        'broker = ["a:1", "b:2"]\n',
        encoding="utf-8",
    )

    settings = load_settings(
        environ={"TRIPWIRE_CONFIG": str(config), "TRIPWIRE_WEB_PORT": "7002"},
        overrides={"partitions": 6, "store": None},
    )

    assert settings.app_id == "from-file"
    assert settings.brokers == ("a:1", "b:2")
    assert settings.web_port == 7002
    assert settings.partitions == 6
    assert settings.store == "memory://"


def test_describe_hides_the_redis_password() -> None:
    settings = load_settings(environ={"TRIPWIRE_REDIS_URL": "redis://u:s3cret@h:1/0"})

    assert "s3cret" not in str(settings.describe())
    assert settings.redis_url == "redis://u:s3cret@h:1/0"


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("web_port", "http", "TRIPWIRE_WEB_PORT must be an integer"),
        ("web_port", "70000", "between 0 and 65535"),
        ("partitions", "0", "TRIPWIRE_PARTITIONS must be between 1"),
        ("broker", "localhost", "has no port"),
        ("broker", "http://h:1", "has scheme 'http'"),
        ("redis_url", "http://h:1", "use redis://"),
        ("store", "postgres://", "use memory:// or rocksdb://"),
        ("topic_spans", "bad topic", "not a valid Kafka name"),
        ("app_id", "a/b", "not a valid Kafka name"),
        ("otlp_encoding", "zipkin", "otlp_proto, otlp_json"),
        ("otlp_enabled", "maybe", "not a boolean"),
        ("batch_within_seconds", "-1", "TRIPWIRE_BATCH_WITHIN_SECONDS must be"),
        ("prices_file", "/does/not/exist.json", "does not exist"),
        ("redis_key_prefix", "a b", "empty or has spaces"),
        ("session_idle_seconds", "-5", "TRIPWIRE_SESSION_IDLE_SECONDS must be"),
    ],
)
def test_bad_values_name_the_setting(name: str, value: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={env_name(name): value})

    assert fragment in str(caught.value)
    assert env_name(name) in str(caught.value)


def test_topic_names_must_differ() -> None:
    with pytest.raises(ConfigError, match="must differ"):
        load_settings(
            environ={
                "TRIPWIRE_TOPIC_ALERTS": "same",
                "TRIPWIRE_TOPIC_KILLSWITCH": "same",
            }
        )


def test_heartbeat_must_be_shorter_than_session_timeout() -> None:
    with pytest.raises(ConfigError, match="TRIPWIRE_HEARTBEAT_INTERVAL_SECONDS"):
        load_settings(
            environ={
                "TRIPWIRE_SESSION_TIMEOUT_SECONDS": "5",
                "TRIPWIRE_HEARTBEAT_INTERVAL_SECONDS": "5",
            }
        )


def test_unknown_setting_in_toml_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "tripwire.toml"
    config.write_text("[worker]\nwebport = 1\n", encoding="utf-8")

    with pytest.raises(ConfigError, match="unknown setting"):
        load_settings(environ={}, config_file=config)


def test_missing_and_broken_toml_files(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("[worker\n", encoding="utf-8")

    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(environ={}, config_file=tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="not readable TOML"):
        load_settings(environ={}, config_file=broken)


def test_unknown_override_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown setting 'colour'"):
        load_settings(environ={}, overrides={"colour": "red"})


def test_rocksdb_store_is_accepted_when_rocksdict_is_installed() -> None:
    pytest.importorskip("rocksdict")

    settings = load_settings(environ={"TRIPWIRE_STORE": "rocksdb"})

    assert settings.store == "rocksdb://"
    assert settings.store_kind == "rocksdb"
