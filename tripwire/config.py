"""Runtime settings of the Tripwire worker, read from TRIPWIRE_* and a TOML file."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from tripwire.errors import ConfigError
from tripwire.schemas.killswitch import REDIS_KEY_PREFIX

logger = logging.getLogger(__name__)

ENV_PREFIX = "TRIPWIRE_"
CONFIG_FILE_ENV = "TRIPWIRE_CONFIG"
OTLP_ENCODINGS = ("otlp_proto", "otlp_json")
STORES = ("memory", "rocksdb")

# Kafka's own rule for topic names: letters, digits, ".", "_" and "-", at most
# 249 characters. Faust adds a suffix to the app id for changelog topics, so
# the app id gets the same rule.
_TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class TopicNames:
    """The Kafka topics the worker reads and writes."""

    spans: str = "tripwire.spans"
    otlp: str = "otlp_spans"
    killswitch: str = "tripwire.killswitch"
    alerts: str = "tripwire.alerts"
    dlq: str = "tripwire.spans.dlq"


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """Everything the worker needs to start, validated.

    Build it with :func:`load_settings`, which reads the environment and an
    optional TOML file and checks every value once; the constructor itself does
    no checking.
    """

    app_id: str = "tripwire"
    brokers: tuple[str, ...] = ("127.0.0.1:9092",)
    redis_url: str | None = "redis://127.0.0.1:6379/0"
    store: str = "memory://"
    data_dir: Path = Path("tripwire-data")
    web_host: str = "127.0.0.1"
    web_port: int = 6066
    partitions: int = 4
    replication_factor: int = 1
    topics: TopicNames = field(default_factory=TopicNames)
    otlp_enabled: bool = True
    otlp_encoding: str = "otlp_proto"
    batch_size: int = 500
    batch_within_seconds: float = 0.2
    commit_interval_seconds: float = 1.0
    session_timeout_seconds: float = 30.0
    heartbeat_interval_seconds: float = 3.0
    redis_timeout_seconds: float = 1.0
    redis_key_prefix: str = REDIS_KEY_PREFIX
    session_idle_seconds: float = 21_600.0
    sweep_interval_seconds: float = 60.0
    prices_file: Path | None = None
    policy_file: Path | None = None

    @property
    def broker_url(self) -> str:
        """Return the broker list as Faust wants it: ``kafka://h1:p1;h2:p2``."""
        return "kafka://" + ";".join(self.brokers)

    @property
    def bootstrap_servers(self) -> str:
        """Return the broker list as Kafka clients want it: ``h1:p1,h2:p2``."""
        return ",".join(self.brokers)

    @property
    def store_kind(self) -> str:
        """Return ``memory`` or ``rocksdb``."""
        return self.store.split("://", 1)[0]

    @property
    def usage_topic(self) -> str:
        """Return the internal topic that re-keys usage records by user id."""
        return f"{self.app_id}-usage-by-user"

    def describe(self) -> dict[str, Any]:
        """Return the settings for a start-up log line, without secrets."""
        return {
            "app_id": self.app_id,
            "broker": self.broker_url,
            "store": self.store,
            "redis": _redact(self.redis_url) if self.redis_url else "disabled",
            "web": f"http://{self.web_host}:{self.web_port}",
            "partitions": self.partitions,
            "topics": {
                "spans": self.topics.spans,
                "otlp": self.topics.otlp if self.otlp_enabled else "disabled",
                "killswitch": self.topics.killswitch,
                "alerts": self.topics.alerts,
                "dlq": self.topics.dlq,
                "usage": self.usage_topic,
            },
        }


# Setting name (as in the TOML file, and the env name without the prefix,
# upper-cased) -> parser. Each parser raises ConfigError naming the setting.
def _settings_table() -> dict[str, Callable[[str, Any], Any]]:
    return {
        "app_id": _parse_name,
        "broker": _parse_brokers,
        "redis_url": _parse_redis_url,
        "store": _parse_store,
        "data_dir": _parse_path,
        "web_host": _parse_host,
        "web_port": _parse_port,
        "partitions": _int_parser(1, 10_000),
        "replication_factor": _int_parser(1, 32),
        "topic_spans": _parse_name,
        "topic_otlp": _parse_name,
        "topic_killswitch": _parse_name,
        "topic_alerts": _parse_name,
        "topic_dlq": _parse_name,
        "otlp_enabled": _parse_bool,
        "otlp_encoding": _parse_otlp_encoding,
        "batch_size": _int_parser(1, 100_000),
        "batch_within_seconds": _float_parser(0.001, 60.0),
        "commit_interval_seconds": _float_parser(0.01, 600.0),
        "session_timeout_seconds": _float_parser(1.0, 3600.0),
        "heartbeat_interval_seconds": _float_parser(0.1, 600.0),
        "redis_timeout_seconds": _float_parser(0.01, 60.0),
        "redis_key_prefix": _parse_key_prefix,
        "session_idle_seconds": _float_parser(0.0, 90 * 86_400.0),
        "sweep_interval_seconds": _float_parser(0.1, 86_400.0),
        "prices_file": _parse_existing_file,
        "policy_file": _parse_existing_file,
    }


def env_name(setting: str) -> str:
    """Return the environment variable of a setting, ``TRIPWIRE_<NAME>``."""
    return ENV_PREFIX + setting.upper()


def load_settings(
    environ: Mapping[str, str] | None = None,
    config_file: Path | str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> WorkerSettings:
    """Read and validate the worker settings.

    Precedence, lowest first: defaults, the ``[worker]`` table of the TOML file
    (``config_file``, else ``TRIPWIRE_CONFIG``), ``TRIPWIRE_*`` variables, then
    ``overrides`` (command-line flags; ``None`` values are ignored).

    Args:
        environ: the environment to read; ``os.environ`` when omitted.
        config_file: a TOML file with a ``[worker]`` table.
        overrides: setting name -> raw value, applied last.

    Returns:
        The validated settings.

    Raises:
        ConfigError: a value is malformed or out of range, a file is missing,
            or an unknown setting appears in the TOML file; the message names
            the setting and how to fix it.
    """
    env = os.environ if environ is None else environ
    table = _settings_table()
    raw: dict[str, tuple[Any, str]] = {}

    path = config_file if config_file is not None else env.get(CONFIG_FILE_ENV)
    if path:
        for name, value in _read_toml(Path(path), table).items():
            raw[name] = (value, f"{name} in {path}")

    for name in table:
        value = env.get(env_name(name))
        if value is not None and value.strip() != "":
            raw[name] = (value, env_name(name))
    # An empty TRIPWIRE_REDIS_URL is meaningful: it turns the mirror off.
    if env.get(env_name("redis_url"), None) == "":
        raw["redis_url"] = ("", env_name("redis_url"))

    for name, value in (overrides or {}).items():
        if name not in table:
            raise ConfigError(f"unknown setting {name!r}; known: {sorted(table)}")
        if value is not None:
            raw[name] = (value, f"--{name.replace('_', '-')}")

    parsed = {name: table[name](origin, value) for name, (value, origin) in raw.items()}
    settings = _build(parsed)
    _check_consistency(settings, raw)
    return settings


def _build(parsed: dict[str, Any]) -> WorkerSettings:
    topic_values = {
        key.removeprefix("topic_"): value
        for key, value in parsed.items()
        if key.startswith("topic_")
    }
    direct = {
        key: value
        for key, value in parsed.items()
        if not key.startswith("topic_") and key != "broker"
    }
    if "broker" in parsed:
        direct["brokers"] = parsed["broker"]
    settings = WorkerSettings(**direct)
    if topic_values:
        settings = replace(settings, topics=replace(settings.topics, **topic_values))
    return settings


def _check_consistency(
    settings: WorkerSettings, raw: Mapping[str, tuple[Any, str]]
) -> None:
    topics = [getattr(settings.topics, f.name) for f in fields(TopicNames)]
    if len(set(topics)) != len(topics):
        raise ConfigError(
            f"topic names must differ from one another, got {topics} "
            "(TRIPWIRE_TOPIC_*): give each topic its own name"
        )

    origin = raw.get(
        "heartbeat_interval_seconds", (None, env_name("heartbeat_interval_seconds"))
    )[1]
    if settings.heartbeat_interval_seconds >= settings.session_timeout_seconds:
        raise ConfigError(
            "heartbeat interval must be shorter than the session timeout, got "
            f"{settings.heartbeat_interval_seconds} >= "
            f"{settings.session_timeout_seconds} ({origin}): lower the heartbeat "
            "interval to a third of the session timeout"
        )

    if (
        settings.store_kind == "rocksdb"
        and importlib.util.find_spec("rocksdict") is None
    ):
        store_origin = raw.get("store", (None, env_name("store")))[1]
        raise ConfigError(
            f"store {settings.store!r} needs the rocksdict package, which is not "
            f"installed ({store_origin}): install tripwire[rocksdb] or use memory://"
        )


def _read_toml(path: Path, table: Mapping[str, Any]) -> dict[str, Any]:
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(
            f"config file {str(path)!r} does not exist ({CONFIG_FILE_ENV}): "
            "point it at a TOML file or unset it"
        ) from exc
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(
            f"config file {str(path)!r} is not readable TOML: {exc} "
            f"({CONFIG_FILE_ENV}): fix the file"
        ) from exc

    worker = document.get("worker", {})
    if not isinstance(worker, dict):
        raise ConfigError(
            f"[worker] in {str(path)!r} must be a table, got {type(worker).__name__}"
        )
    unknown = sorted(set(worker) - set(table))
    if unknown:
        raise ConfigError(
            f"unknown setting(s) {unknown} in [worker] of {str(path)!r}: "
            f"known settings are {sorted(table)}"
        )
    return dict(worker)


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return parts._replace(netloc=netloc).geturl()


def _parse_name(origin: str, value: Any) -> str:
    text = str(value).strip()
    if not _TOPIC_NAME.match(text):
        raise ConfigError(
            f"{text!r} is not a valid Kafka name ({origin}): use 1-249 letters, "
            "digits, '.', '_' or '-'"
        )
    return text


def _parse_brokers(origin: str, value: Any) -> tuple[str, ...]:
    items = value if isinstance(value, list) else re.split(r"[,;]", str(value))
    brokers: list[str] = []
    for item in items:
        text = str(item).strip()
        if not text:
            continue
        if "://" in text:
            scheme, text = text.split("://", 1)
            if scheme != "kafka":
                raise ConfigError(
                    f"broker {item!r} has scheme {scheme!r} ({origin}): "
                    "use kafka://host:port or host:port"
                )
        host, sep, port = text.rstrip("/").rpartition(":")
        if not sep or not host:
            raise ConfigError(
                f"broker {item!r} has no port ({origin}): write it as host:port, "
                "for example 127.0.0.1:9092"
            )
        brokers.append(f"{host}:{_parse_port(origin, port)}")
    if not brokers:
        raise ConfigError(
            f"no broker given ({origin}): set host:port, for example 127.0.0.1:9092"
        )
    return tuple(brokers)


def _parse_redis_url(origin: str, value: Any) -> str | None:
    text = str(value).strip()
    if text.lower() in ("", "none", "off", "disabled"):
        return None
    parts = urlsplit(text)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(
            f"Redis URL {_redact(text)!r} has scheme {parts.scheme!r} ({origin}): "
            "use redis://host:port/db, rediss:// or unix://, or '' to disable"
        )
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigError(
            f"Redis URL {_redact(text)!r} names no host ({origin}): "
            "use redis://host:port/db"
        )
    return text


def _parse_key_prefix(origin: str, value: Any) -> str:
    text = str(value).strip()
    if not text or any(ch.isspace() for ch in text):
        raise ConfigError(
            f"Redis key prefix {text!r} is empty or has spaces ({origin}): use "
            f"something like {REDIS_KEY_PREFIX!r}, the same the agents read"
        )
    return text


def _parse_store(origin: str, value: Any) -> str:
    text = str(value).strip()
    kind = text.split("://", 1)[0] if "://" in text else text
    if kind not in STORES:
        raise ConfigError(
            f"table store {text!r} is not supported ({origin}): "
            "use memory:// or rocksdb://"
        )
    return f"{kind}://"


def _parse_path(origin: str, value: Any) -> Path:
    text = str(value).strip()
    if not text:
        raise ConfigError(f"empty path ({origin}): give a directory path")
    return Path(text)


def _parse_existing_file(origin: str, value: Any) -> Path:
    path = _parse_path(origin, value)
    if not path.is_file():
        raise ConfigError(
            f"file {str(path)!r} does not exist ({origin}): fix the path or unset it"
        )
    return path


def _parse_host(origin: str, value: Any) -> str:
    text = str(value).strip()
    if not text or any(ch.isspace() for ch in text):
        raise ConfigError(
            f"web host {text!r} is not a host name or address ({origin}): "
            "use 127.0.0.1, or 0.0.0.0 to listen on every interface"
        )
    return text


def _parse_port(origin: str, value: Any) -> int:
    return _int_parser(0, 65535)(origin, value)


def _parse_bool(origin: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{value!r} is not a boolean ({origin}): use true or false")


def _parse_otlp_encoding(origin: str, value: Any) -> str:
    text = str(value).strip()
    if text not in OTLP_ENCODINGS:
        raise ConfigError(
            f"OTLP encoding {text!r} is not supported ({origin}): use one of "
            f"{', '.join(OTLP_ENCODINGS)}, as set in the Collector's kafkaexporter"
        )
    return text


def _int_parser(low: int, high: int) -> Callable[[str, Any], int]:
    def parse(origin: str, value: Any) -> int:
        number = _number(origin, value, int, "an integer")
        if not low <= number <= high:
            raise ConfigError(
                f"{origin} must be between {low} and {high}, got {number}: "
                "pick a value in range"
            )
        return number

    return parse


def _float_parser(low: float, high: float) -> Callable[[str, Any], float]:
    def parse(origin: str, value: Any) -> float:
        number = _number(origin, value, float, "a number")
        if not low <= number <= high:
            raise ConfigError(
                f"{origin} must be between {low} and {high} seconds, got {number}: "
                "pick a value in range"
            )
        return number

    return parse


def _number(origin: str, value: Any, kind: Callable[[Any], _T], what: str) -> _T:
    if isinstance(value, bool):
        raise ConfigError(f"{origin} must be {what}, got {value!r}")
    try:
        return kind(str(value).strip())
    except ValueError as exc:
        raise ConfigError(f"{origin} must be {what}, got {value!r}") from exc
