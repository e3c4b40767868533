"""Kill commands inside an agent process: Kafka subscription, Redis fast path."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import orjson
import redis
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from redis.backoff import NoBackoff
from redis.retry import Retry

from tripwire.errors import ConfigError, SessionKilled
from tripwire.schemas.events import KillCommand, Scope
from tripwire.schemas.killswitch import REDIS_CHANNEL, REDIS_KEY_PREFIX, redis_kill_key

logger = logging.getLogger(__name__)

KILLSWITCH_TOPIC = "tripwire.killswitch"

# A kill handler gets every new command once; it may return an awaitable when
# the kill switch runs on asyncio.
KillHandler = Callable[[KillCommand], object]

# How long a Redis outage silences the fast path before the next attempt, so
# a dead Redis costs one failed round trip every few seconds, not one per call.
_REDIS_RETRY_SECONDS = 5.0
# How long the Kafka and Redis subscriptions wait before reconnecting.
_RECONNECT_SECONDS = 2.0
# How many commands the in-process set keeps; the oldest go first.
_MAX_REMEMBERED = 100_000
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")


def valid_topic_name(name: str) -> bool:
    """Say whether ``name`` follows Kafka's rule for topic names.

    Args:
        name: the topic name to check.

    Returns:
        True for 1 to 249 ASCII letters, digits, dots, underscores or dashes,
        other than "." and "..".
    """
    return bool(_TOPIC_NAME.fullmatch(name)) and name not in (".", "..")


@dataclass(frozen=True, slots=True)
class _Settings:
    """The validated settings shared by the sync and asyncio kill switches."""

    bootstrap_servers: str | None
    topic: str
    group_id: str
    from_beginning: bool
    redis_url: str | None
    subscribe_redis: bool
    redis_key_prefix: str
    redis_channel: str
    redis_timeout: float
    max_remembered: int


def _settings(
    bootstrap_servers: str | Sequence[str] | None,
    topic: str,
    group_id: str | None,
    from_beginning: bool,
    redis_url: str | None,
    subscribe_redis: bool,
    redis_key_prefix: str,
    redis_channel: str,
    redis_timeout: float,
    max_remembered: int,
) -> _Settings:
    """Validate the kill-switch settings once, at construction."""
    if isinstance(bootstrap_servers, Sequence) and not isinstance(
        bootstrap_servers, str
    ):
        bootstrap_servers = ",".join(bootstrap_servers)
    if not bootstrap_servers and not redis_url:
        raise ConfigError(
            "a kill switch needs a source of kill commands, got neither "
            "bootstrap_servers nor redis_url; pass the Kafka bootstrap servers, "
            "a Redis URL, or both"
        )

    if not valid_topic_name(topic):
        raise ConfigError(
            f"kill-switch topic must be a Kafka topic name (1 to 249 letters, "
            f"digits, '.', '_' or '-'), got {topic!r}; the worker publishes on "
            f"{KILLSWITCH_TOPIC!r}"
        )

    if redis_timeout <= 0:
        raise ConfigError(
            f"redis_timeout must be > 0 seconds, got {redis_timeout!r}; "
            "0.05 suits a Redis on the same network"
        )

    if max_remembered < 1:
        raise ConfigError(
            f"max_remembered must be >= 1, got {max_remembered!r}; "
            f"the default is {_MAX_REMEMBERED}"
        )

    if group_id is None:
        group_id = (
            f"tripwire-killswitch-{socket.gethostname()}-{os.getpid()}-"
            f"{uuid.uuid4().hex[:8]}"
        )
    return _Settings(
        bootstrap_servers=bootstrap_servers or None,
        topic=topic,
        group_id=group_id,
        from_beginning=from_beginning,
        redis_url=redis_url,
        subscribe_redis=subscribe_redis,
        redis_key_prefix=redis_key_prefix,
        redis_channel=redis_channel,
        redis_timeout=redis_timeout,
        max_remembered=max_remembered,
    )


def decode_kill_command(data: bytes | str) -> KillCommand:
    """Decode a kill command from its JSON form, as the worker publishes it.

    Args:
        data: the command's JSON (a Kafka record value, a Redis value or a
            Redis channel message).

    Returns:
        The kill command.

    Raises:
        ValueError: the data is not JSON, or a required field is missing or
            of the wrong type.
    """
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"kill command is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ValueError(
            f"kill command must be a JSON object, got {type(obj).__name__}"
        )

    for name in ("command_id", "scope", "target", "reason", "issued_at"):
        if obj.get(name) in (None, ""):
            raise ValueError(f"kill command has no {name!r}")
    evidence = obj.get("evidence") or {}
    if not isinstance(evidence, dict):
        raise ValueError(
            f"kill command 'evidence' must be an object, got {type(evidence).__name__}"
        )

    def optional(name: str) -> str | None:
        value = obj.get(name)
        return None if value is None else str(value)

    try:
        return KillCommand(
            command_id=str(obj["command_id"]),
            scope=Scope(obj["scope"]),
            target=str(obj["target"]),
            reason=str(obj["reason"]),
            detail=str(obj.get("detail") or ""),
            issued_at=float(obj["issued_at"]),
            session_id=optional("session_id"),
            user_id=optional("user_id"),
            agent_name=optional("agent_name"),
            ttl_seconds=int(obj.get("ttl_seconds", 3600)),
            evidence=evidence,
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"kill command has a malformed field: {exc}") from exc


def _lookup_keys(session_id: str, user_id: str | None) -> list[tuple[Scope, str]]:
    """Return the (scope, target) pairs that would stop this session."""
    keys = [(Scope.SESSION, session_id)]
    if user_id:
        keys.append((Scope.USER, user_id))
    return keys


def session_killed(session_id: str, command: KillCommand) -> SessionKilled:
    """Build the exception an agent sees when ``command`` stops its session.

    Args:
        session_id: the session being stopped.
        command: the kill command naming the session or its user.

    Returns:
        The exception, carrying the command's reason and detail.
    """
    detail = command.detail
    if command.scope is Scope.USER:
        detail = f"every session of user {command.target!r} was stopped; {detail}"
    return SessionKilled(session_id, command.reason, detail.rstrip("; "))


class _KillBook:
    """The commands this process has seen, and the tasks a kill must cancel.

    Thread-safe: the subscription thread adds commands while agent threads
    check them.
    """

    def __init__(self, on_kill: KillHandler | None, max_remembered: int) -> None:
        self._on_kill = on_kill
        self._max_remembered = max_remembered
        self._lock = threading.Lock()
        self._killed: OrderedDict[tuple[Scope, str], tuple[KillCommand, float]] = (
            OrderedDict()
        )
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._tasks: dict[str, set[asyncio.Task[Any]]] = {}
        self._task_users: dict[str, str] = {}

    def lookup(self, session_id: str, user_id: str | None) -> KillCommand | None:
        """Return the command stopping this session or its user, if any."""
        now = time.monotonic()
        with self._lock:
            for key in _lookup_keys(session_id, user_id):
                entry = self._killed.get(key)
                if entry is None:
                    continue
                command, expires_at = entry
                if expires_at > now:
                    return command
                del self._killed[key]
        return None

    def accept(self, command: KillCommand) -> bool:
        """Record a command, cancel its tasks and call the handler once.

        Returns:
            True if the command was new, False for a repeat.
        """
        with self._lock:
            if command.command_id in self._seen:
                return False
            self._remember(command)
            tasks = self._tasks_for(command)

        logger.info(
            "kill command %s received: scope=%s reason=%s",
            command.command_id,
            command.scope.value,
            command.reason,
        )
        for task in tasks:
            message = f"tripwire kill: {command.reason}"
            task.get_loop().call_soon_threadsafe(task.cancel, message)
        self._call_handler(command)
        return True

    def register(
        self, session_id: str, task: asyncio.Task[Any], user_id: str | None
    ) -> Callable[[], None]:
        """Cancel ``task`` when a command stops this session or its user."""
        with self._lock:
            self._tasks.setdefault(session_id, set()).add(task)
            if user_id:
                self._task_users[session_id] = user_id

        def unregister(_: object = None) -> None:
            with self._lock:
                tasks = self._tasks.get(session_id)
                if tasks is None:
                    return
                tasks.discard(task)
                if not tasks:
                    del self._tasks[session_id]
                    self._task_users.pop(session_id, None)

        task.add_done_callback(unregister)
        return unregister

    def _remember(self, command: KillCommand) -> None:
        """Store the command under its target; call with the lock held."""
        self._seen[command.command_id] = None
        if len(self._seen) > self._max_remembered:
            self._seen.popitem(last=False)
        if command.scope is Scope.FLEET:
            return

        expires_at = time.monotonic() + max(command.ttl_seconds, 1)
        self._killed[(command.scope, command.target)] = (command, expires_at)
        self._killed.move_to_end((command.scope, command.target))
        if len(self._killed) > self._max_remembered:
            self._killed.popitem(last=False)

    def _tasks_for(self, command: KillCommand) -> list[asyncio.Task[Any]]:
        """Return the registered tasks the command stops; call with the lock held."""
        if command.scope is Scope.SESSION:
            return list(self._tasks.get(command.target, ()))
        if command.scope is Scope.USER:
            return [
                task
                for session_id, user_id in self._task_users.items()
                if user_id == command.target
                for task in self._tasks.get(session_id, ())
            ]
        return []

    def _call_handler(self, command: KillCommand) -> None:
        """Call the user's handler; its failure never reaches the subscription."""
        if self._on_kill is None:
            return
        try:
            result = self._on_kill(command)
            if inspect.isawaitable(result):
                _schedule(result, command)
        except Exception:
            logger.exception("kill handler failed on command %s", command.command_id)


def _schedule(awaitable: Any, command: KillCommand) -> None:
    """Run an async kill handler's awaitable on the running loop."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        logger.error(
            "kill handler returned an awaitable outside an event loop on command "
            "%s; use a plain function with KillSwitch, or use AsyncKillSwitch",
            command.command_id,
        )
        if inspect.iscoroutine(awaitable):
            awaitable.close()
        return

    async def run() -> None:
        try:
            await awaitable
        except Exception:
            logger.exception("kill handler failed on command %s", command.command_id)

    task = loop.create_task(run())
    _PENDING_HANDLERS.add(task)
    task.add_done_callback(_PENDING_HANDLERS.discard)


# Strong references to running async handlers, so they are not collected early.
_PENDING_HANDLERS: set[asyncio.Task[None]] = set()


class _RedisHealth:
    """Tracks Redis outages: one warning per outage, a retry every few seconds."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._retry_at = 0.0
        self._down = False

    def usable(self) -> bool:
        """Say whether the fast path should try Redis now."""
        return not self._down or time.monotonic() >= self._retry_at

    def failed(self, exc: BaseException) -> None:
        """Note a failed round trip; warn once for the outage."""
        self._retry_at = time.monotonic() + _REDIS_RETRY_SECONDS
        if self._down:
            return
        self._down = True
        logger.warning(
            "Redis at %s is unreachable (%s); kill checks use the commands this "
            "process has received until it is back",
            _redact(self._url),
            exc,
        )

    def succeeded(self) -> None:
        """Note a good round trip; say so once after an outage."""
        if not self._down:
            return
        self._down = False
        logger.info("Redis at %s is reachable again", _redact(self._url))


def _redact(url: str) -> str:
    """Drop credentials from a Redis URL before logging it."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    return f"{scheme}://***@{rest.rpartition('@')[2]}"


def _command_from_flag(
    raw: bytes | str, scope: Scope, target: str, key: str
) -> KillCommand:
    """Read a Redis flag's value; a flag without a valid command still kills."""
    try:
        return decode_kill_command(raw)
    except ValueError as exc:
        logger.warning("Redis kill flag %s holds no valid kill command: %s", key, exc)
        return KillCommand.create(
            scope,
            target,
            "killed",
            f"the Redis kill flag {key} is set",
            time.time(),
        )


def _redis_options(timeout: float) -> dict[str, Any]:
    """Return client options for the fast path: short timeouts, no retries."""
    return {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
    }


class _Subscriptions:
    """The Kafka and Redis subscriptions feeding a kill book, on one event loop."""

    def __init__(
        self,
        settings: _Settings,
        book: _KillBook,
        on_ready: Callable[[], None],
    ) -> None:
        self._settings = settings
        self._book = book
        self._on_ready = on_ready
        self._kafka_ready = settings.bootstrap_servers is None
        self._redis_ready = not (settings.redis_url and settings.subscribe_redis)
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """Ask both subscriptions to end; call on the subscriptions' loop."""
        self._stopping.set()

    async def run(self) -> None:
        """Run the subscriptions until ``stop()`` is called."""
        runners = []
        if self._settings.bootstrap_servers is not None:
            runners.append(self._consume_kafka(self._settings.bootstrap_servers))
        if self._settings.redis_url and self._settings.subscribe_redis:
            runners.append(self._listen_redis(self._settings.redis_url))
        self._check_ready()
        await asyncio.gather(*runners)

    def _deliver(self, data: bytes | str | None, source: str) -> None:
        """Decode one command and hand it to the kill book."""
        if data is None:
            return
        try:
            command = decode_kill_command(data)
        except ValueError as exc:
            logger.warning("dropped a malformed kill command from %s: %s", source, exc)
            return
        self._book.accept(command)

    def _check_ready(self) -> None:
        if self._kafka_ready and self._redis_ready:
            self._on_ready()

    async def _pause(self) -> None:
        """Wait before reconnecting, or until asked to stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), _RECONNECT_SECONDS)

    async def _consume_kafka(self, bootstrap_servers: str) -> None:
        """Read kill commands from Kafka, reconnecting while the broker is away."""
        settings = self._settings
        outage = False
        while not self._stopping.is_set():
            consumer = AIOKafkaConsumer(
                settings.topic,
                bootstrap_servers=bootstrap_servers,
                group_id=settings.group_id,
                client_id=settings.group_id,
                auto_offset_reset="earliest" if settings.from_beginning else "latest",
                enable_auto_commit=False,
            )
            try:
                await consumer.start()
                if outage:
                    logger.info("kill-switch subscription to Kafka restored")
                    outage = False
                await self._read_kafka(consumer)
            except KafkaError as exc:
                if not outage:
                    logger.warning(
                        "kill-switch cannot reach Kafka at %s (%s); retrying every "
                        "%.0f s, Redis flags still apply",
                        bootstrap_servers,
                        exc,
                        _RECONNECT_SECONDS,
                    )
                    outage = True
            finally:
                await consumer.stop()
            await self._pause()

    async def _read_kafka(self, consumer: AIOKafkaConsumer) -> None:
        """Hand every record to the kill book until asked to stop."""
        while not self._stopping.is_set():
            batches = await consumer.getmany(timeout_ms=200)
            for records in batches.values():
                for record in records:
                    self._deliver(record.value, f"topic {record.topic}")
            if not self._kafka_ready and consumer.assignment():
                # With offsets reset to the latest, a command is only certain to
                # be seen once every assigned partition has a position.
                for partition in consumer.assignment():
                    await consumer.position(partition)
                self._kafka_ready = True
                logger.info(
                    "kill-switch subscribed to %s (%d partitions)",
                    self._settings.topic,
                    len(consumer.assignment()),
                )
                self._check_ready()

    async def _listen_redis(self, url: str) -> None:
        """Read kill commands from the Redis channel, resubscribing after outages."""
        channel = self._settings.redis_channel
        client = aioredis.Redis.from_url(url, socket_connect_timeout=2.0)
        outage = False
        try:
            while not self._stopping.is_set():
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                try:
                    await pubsub.subscribe(channel)
                    if outage:
                        logger.info("kill-switch subscription to Redis restored")
                        outage = False
                    if not self._redis_ready:
                        self._redis_ready = True
                        self._check_ready()
                    while not self._stopping.is_set():
                        message = await pubsub.get_message(timeout=0.2)
                        if message is not None and message.get("type") == "message":
                            self._deliver(message.get("data"), f"channel {channel}")
                except (redis.RedisError, OSError) as exc:
                    if not outage:
                        logger.warning(
                            "kill-switch cannot subscribe to Redis channel %s at %s "
                            "(%s); retrying every %.0f s",
                            channel,
                            _redact(url),
                            exc,
                            _RECONNECT_SECONDS,
                        )
                        outage = True
                finally:
                    with contextlib.suppress(redis.RedisError, OSError):
                        await pubsub.aclose()  # type: ignore[no-untyped-call]
                await self._pause()
        finally:
            with contextlib.suppress(redis.RedisError, OSError):
                await client.aclose()


class _KillSwitchBase:
    """What both forms of the kill switch share: settings and the kill book."""

    def __init__(
        self,
        bootstrap_servers: str | Sequence[str] | None = None,
        topic: str = KILLSWITCH_TOPIC,
        *,
        redis_url: str | None = None,
        on_kill: KillHandler | None = None,
        group_id: str | None = None,
        from_beginning: bool = False,
        subscribe_redis: bool = True,
        redis_key_prefix: str = REDIS_KEY_PREFIX,
        redis_channel: str = REDIS_CHANNEL,
        redis_timeout: float = 0.05,
        max_remembered: int = _MAX_REMEMBERED,
    ) -> None:
        self._settings = _settings(
            bootstrap_servers,
            topic,
            group_id,
            from_beginning,
            redis_url,
            subscribe_redis,
            redis_key_prefix,
            redis_channel,
            redis_timeout,
            max_remembered,
        )
        self._book = _KillBook(on_kill, max_remembered)
        self._open(redis_url, redis_timeout)

    def _open(self, redis_url: str | None, redis_timeout: float) -> None:
        """Set up the form's own connections and state."""
        raise NotImplementedError

    @property
    def group_id(self) -> str:
        """The consumer group this kill switch reads the topic in."""
        return self._settings.group_id

    def apply(self, command: KillCommand) -> bool:
        """Apply a kill command received by other means (a local rule, say).

        Args:
            command: the command to record.

        Returns:
            True if the command was new, False for a repeat.
        """
        return self._book.accept(command)


class KillSwitch(_KillSwitchBase):
    """Stop sessions the detector has killed: the thread-based form.

    Subscribes to the kill-switch topic (its own consumer group, from the
    latest offset unless ``from_beginning``) and, when ``redis_url`` is given,
    to the Redis channel, on a background thread. ``check`` looks in the
    commands received so far, then at the Redis flags in one ``MGET``.

    Args:
        bootstrap_servers: Kafka bootstrap servers, or None for Redis only.
        topic: the kill-switch topic.
        redis_url: Redis URL for the flag check and the channel, or None.
        on_kill: called once per new command, on the subscription thread (or
            on the checking thread for a command found by a Redis check).
        group_id: consumer group; by default one unique to this kill switch,
            since every agent process must see every command.
        from_beginning: replay the topic from its earliest offset.
        subscribe_redis: also listen on the Redis channel.
        redis_key_prefix: prefix of the flag keys, as the worker writes them.
        redis_channel: the Redis channel, as the worker publishes on it.
        redis_timeout: seconds a flag check may wait on Redis.
        max_remembered: how many commands the in-process set keeps.

    Raises:
        ConfigError: a setting is out of range.
    """

    def _open(self, redis_url: str | None, redis_timeout: float) -> None:
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subscriptions: _Subscriptions | None = None
        self._redis: redis.Redis | None = None
        self._redis_health: _RedisHealth | None = None
        if redis_url:
            self._redis = redis.Redis.from_url(
                redis_url, **_redis_options(redis_timeout)
            )
            self._redis_health = _RedisHealth(redis_url)

    def start(self) -> KillSwitch:
        """Start the subscriptions on a background thread; idempotent.

        Returns:
            This kill switch, for chaining.
        """
        if self._thread is not None:
            return self
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._subscriptions = _Subscriptions(
            self._settings, self._book, self._ready.set
        )
        self._thread = threading.Thread(
            target=self._run, args=(loop,), name="tripwire-killswitch", daemon=True
        )
        self._thread.start()
        return self

    def wait_ready(self, timeout: float = 30.0) -> bool:
        """Wait until every subscription is live, so no new command is missed.

        Args:
            timeout: seconds to wait at most.

        Returns:
            True once subscribed, False if ``timeout`` passed first.
        """
        return self._ready.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the subscriptions and release the connections.

        Args:
            timeout: seconds to wait for the background thread to end.
        """
        thread, loop = self._thread, self._loop
        if thread is not None and loop is not None:
            subscriptions = self._subscriptions
            if subscriptions is not None and not loop.is_closed():
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(subscriptions.stop)
            thread.join(timeout)
            if thread.is_alive():
                logger.warning(
                    "kill-switch thread did not stop within %.1f s; leaving it "
                    "to end with the process",
                    timeout,
                )
        self._thread = None
        if self._redis is not None:
            with contextlib.suppress(redis.RedisError, OSError):
                self._redis.close()

    def __enter__(self) -> KillSwitch:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def register(
        self,
        session_id: str,
        task: asyncio.Task[Any],
        *,
        user_id: str | None = None,
    ) -> Callable[[], None]:
        """Cancel an asyncio task when its session, or its user, is killed.

        The task is cancelled on its own loop, with the kill reason as the
        cancellation message; it is forgotten when it finishes.

        Args:
            session_id: the session the task works for.
            task: the task to cancel.
            user_id: the session's user, for user-scoped kills.

        Returns:
            A function that unregisters the task.
        """
        return self._book.register(session_id, task, user_id)

    def check(self, session_id: str, user_id: str | None = None) -> KillCommand | None:
        """Return the command that stopped this session or its user, if any.

        Looks in the commands received so far, then reads the session and user
        flags from Redis in one round trip. Never raises: a Redis failure is
        logged once and the check falls back to the commands received.

        Args:
            session_id: the session about to call an LLM.
            user_id: the session's user, if user-scoped kills apply.

        Returns:
            The kill command, or None if the session may go on.
        """
        command = self._book.lookup(session_id, user_id)
        if command is not None or self._redis is None or self._redis_health is None:
            return command
        if not self._redis_health.usable():
            return None

        scoped = _lookup_keys(session_id, user_id)
        keys = [
            redis_kill_key(scope, target, self._settings.redis_key_prefix)
            for scope, target in scoped
        ]
        try:
            values = self._redis.mget(keys)
        # The check runs before every LLM call of the host agent: whatever goes
        # wrong in the client, the agent must go on, so nothing may escape.
        except Exception as exc:
            self._redis_health.failed(exc)
            return None
        self._redis_health.succeeded()
        return self._first_flag(values, scoped, keys)

    def raise_if_killed(self, session_id: str, user_id: str | None = None) -> None:
        """Raise if this session or its user has been killed.

        Args:
            session_id: the session about to call an LLM.
            user_id: the session's user, if user-scoped kills apply.

        Raises:
            SessionKilled: a kill command names the session or its user.
        """
        command = self.check(session_id, user_id)
        if command is not None:
            raise session_killed(session_id, command)

    def _first_flag(
        self,
        values: Any,
        scoped: list[tuple[Scope, str]],
        keys: list[str],
    ) -> KillCommand | None:
        """Turn the first set flag into a command and remember it."""
        for raw, (scope, target), key in zip(values, scoped, keys, strict=True):
            if raw is None:
                continue
            command = _command_from_flag(raw, scope, target, key)
            self._book.accept(command)
            return command
        return None

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        """Body of the background thread: run the subscriptions to the end."""
        asyncio.set_event_loop(loop)
        subscriptions = self._subscriptions
        try:
            if subscriptions is not None:
                loop.run_until_complete(subscriptions.run())
        except Exception:
            logger.exception("kill-switch subscriptions stopped on an error")
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()


class AsyncKillSwitch(_KillSwitchBase):
    """Stop sessions the detector has killed: the asyncio form.

    Same behaviour and arguments as ``KillSwitch``; the subscriptions run as
    tasks on the caller's event loop and the checks are coroutines. The
    in-process part of the check is also available synchronously as
    ``check_local``.
    """

    def _open(self, redis_url: str | None, redis_timeout: float) -> None:
        self._ready: asyncio.Event | None = None
        self._subscriptions: _Subscriptions | None = None
        self._task: asyncio.Task[None] | None = None
        self._redis: aioredis.Redis | None = None
        self._redis_health = _RedisHealth(redis_url) if redis_url else None

    async def start(self) -> AsyncKillSwitch:
        """Start the subscriptions as a task on the running loop; idempotent.

        Returns:
            This kill switch, for chaining.
        """
        if self._task is not None:
            return self
        ready = asyncio.Event()
        self._ready = ready
        self._subscriptions = _Subscriptions(self._settings, self._book, ready.set)
        self._task = asyncio.get_running_loop().create_task(
            self._subscriptions.run(), name="tripwire-killswitch"
        )
        return self

    async def wait_ready(self, timeout: float = 30.0) -> bool:
        """Wait until every subscription is live, so no new command is missed.

        Args:
            timeout: seconds to wait at most.

        Returns:
            True once subscribed, False if ``timeout`` passed first (or the
            kill switch was never started).
        """
        if self._ready is None:
            return False
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Stop the subscriptions and release the connections."""
        task, subscriptions = self._task, self._subscriptions
        self._task = None
        if task is not None and subscriptions is not None:
            subscriptions.stop()
            try:
                await asyncio.wait_for(task, timeout=10.0)
            except TimeoutError:
                logger.warning("kill-switch subscriptions did not stop in 10 s")
            except Exception:
                logger.exception("kill-switch subscriptions stopped on an error")
        if self._redis is not None:
            with contextlib.suppress(redis.RedisError, OSError):
                await self._redis.aclose()
            self._redis = None

    async def __aenter__(self) -> AsyncKillSwitch:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def register(
        self,
        session_id: str,
        task: asyncio.Task[Any] | None = None,
        *,
        user_id: str | None = None,
    ) -> Callable[[], None]:
        """Cancel an asyncio task when its session, or its user, is killed.

        Args:
            session_id: the session the task works for.
            task: the task to cancel; the current task by default.
            user_id: the session's user, for user-scoped kills.

        Returns:
            A function that unregisters the task.

        Raises:
            ConfigError: no task was given and none is running.
        """
        if task is None:
            task = asyncio.current_task()
        if task is None:
            raise ConfigError(
                "register() needs a task: none was given and none is running; "
                "call it from inside the task to protect, or pass task="
            )
        return self._book.register(session_id, task, user_id)

    def check_local(
        self, session_id: str, user_id: str | None = None
    ) -> KillCommand | None:
        """Return the command stopping this session, from the commands received.

        Args:
            session_id: the session about to call an LLM.
            user_id: the session's user, if user-scoped kills apply.

        Returns:
            The kill command, or None if none was received.
        """
        return self._book.lookup(session_id, user_id)

    async def check(
        self, session_id: str, user_id: str | None = None
    ) -> KillCommand | None:
        """Return the command that stopped this session or its user, if any.

        Looks in the commands received so far, then reads the session and user
        flags from Redis in one round trip. Never raises.

        Args:
            session_id: the session about to call an LLM.
            user_id: the session's user, if user-scoped kills apply.

        Returns:
            The kill command, or None if the session may go on.
        """
        command = self._book.lookup(session_id, user_id)
        health = self._redis_health
        url = self._settings.redis_url
        if command is not None or url is None or health is None:
            return command
        if not health.usable():
            return None
        if self._redis is None:
            # Created on first use, on the loop that will use it.
            self._redis = aioredis.Redis.from_url(
                url, **_redis_options(self._settings.redis_timeout)
            )

        scoped = _lookup_keys(session_id, user_id)
        keys = [
            redis_kill_key(scope, target, self._settings.redis_key_prefix)
            for scope, target in scoped
        ]
        try:
            values = await self._redis.mget(keys)
        # As in KillSwitch.check: nothing but a kill may stop the agent here.
        except Exception as exc:
            health.failed(exc)
            return None
        health.succeeded()
        for raw, (scope, target), key in zip(values, scoped, keys, strict=True):
            if raw is None:
                continue
            command = _command_from_flag(raw, scope, target, key)
            self._book.accept(command)
            return command
        return None

    async def raise_if_killed(
        self, session_id: str, user_id: str | None = None
    ) -> None:
        """Raise if this session or its user has been killed.

        Args:
            session_id: the session about to call an LLM.
            user_id: the session's user, if user-scoped kills apply.

        Raises:
            SessionKilled: a kill command names the session or its user.
        """
        command = await self.check(session_id, user_id)
        if command is not None:
            raise session_killed(session_id, command)
