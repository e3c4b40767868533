"""Publish decisions: kill commands to Kafka and Redis, alerts to Kafka."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from tripwire.errors import ConfigError
from tripwire.schemas.events import Alert, KillCommand
from tripwire.schemas.killswitch import REDIS_CHANNEL, REDIS_KEY_PREFIX, redis_kill_key
from tripwire.streams.metrics import WorkerMetrics

logger = logging.getLogger(__name__)

Decision = KillCommand | Alert

# Sends one record (key, value) to a Kafka topic and returns once the broker
# acknowledged it.
Send = Callable[[bytes, bytes], Awaitable[None]]

# How long the "already mirrored" marker of a command id outlives the command:
# a worker that replays older input than this re-mirrors the kill.
MARKER_TTL_SECONDS = 7 * 86_400

# One round trip, applied atomically: when the command id was not mirrored yet,
# set the kill flag with its TTL and announce it on the channel. A replay that
# re-emits the same command finds the marker and changes nothing.
_MIRROR_SCRIPT = """
if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[3]) then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  redis.call('PUBLISH', ARGV[4], ARGV[1])
  return 1
end
return 0
"""


def marker_key(command_id: str, prefix: str = REDIS_KEY_PREFIX) -> str:
    """Return the Redis key remembering that ``command_id`` was mirrored."""
    return f"{prefix}:sent:{command_id}"


class RedisMirror:
    """Mirror kill commands to Redis: a flag with a TTL, and a pub/sub message.

    Kafka is the source of truth; the mirror is the agents' fast path. When
    Redis is unreachable the mirror logs a warning, counts the failure and
    lets the worker go on.

    Args:
        url: a ``redis://`` URL.
        metrics: where failures are counted.
        timeout_seconds: connect and command timeout.
        channel: the pub/sub channel.
        key_prefix: prefix of the flag and marker keys.
    """

    def __init__(
        self,
        url: str,
        metrics: WorkerMetrics,
        timeout_seconds: float = 1.0,
        channel: str = REDIS_CHANNEL,
        key_prefix: str = REDIS_KEY_PREFIX,
    ) -> None:
        try:
            self._client: aioredis.Redis = aioredis.Redis.from_url(
                url,
                socket_timeout=timeout_seconds,
                socket_connect_timeout=timeout_seconds,
            )
        except ValueError as exc:
            raise ConfigError(
                f"Redis URL is malformed: {exc} (TRIPWIRE_REDIS_URL): "
                "use redis://host:port/db"
            ) from exc
        self._script = self._client.register_script(_MIRROR_SCRIPT)
        self.metrics = metrics
        self.channel = channel
        self.key_prefix = key_prefix

    async def mirror(self, command: KillCommand) -> bool | None:
        """Set the kill flag and announce the command, once per command id.

        Args:
            command: the kill command.

        Returns:
            ``True`` when mirrored now, ``False`` when it had been mirrored
            before, ``None`` when Redis failed (logged and counted).
        """
        flag = redis_kill_key(command.scope, command.target, self.key_prefix)
        marker = marker_key(command.command_id, self.key_prefix)
        ttl = max(1, int(command.ttl_seconds))
        marker_ttl = max(ttl, MARKER_TTL_SECONDS)
        args: list[Any] = [command.to_json(), ttl, marker_ttl, self.channel]

        try:
            result = await self._script(keys=[flag, marker], args=args)
        except (RedisError, OSError) as exc:
            self.metrics.redis_errors.inc()
            logger.warning(
                "Redis mirror of kill command %s for %s %s failed (%s); the command "
                "is on Kafka, agents polling Redis will not see it",
                command.command_id,
                command.scope,
                command.target,
                exc,
            )
            return None

        return bool(result)

    async def ping(self) -> bool:
        """Return whether Redis answers, logging a warning when it does not."""
        try:
            return bool(await self._client.ping())
        except (RedisError, OSError) as exc:
            logger.warning(
                "Redis does not answer (%s); kill flags will not be set", exc
            )
            return False

    async def close(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()


class DecisionPublisher:
    """Publish what the detector decided.

    Kill commands go to the kill-switch topic, keyed by their target (a
    session id, or a user id for user-scoped kills), then to the Redis mirror;
    alerts go to the alerts topic keyed by their target.

    Args:
        send_kill: sends one record to the kill-switch topic.
        send_alert: sends one record to the alerts topic.
        metrics: counts kills and alerts.
        mirror: the Redis mirror, or ``None`` when it is disabled.
    """

    def __init__(
        self,
        send_kill: Send,
        send_alert: Send,
        metrics: WorkerMetrics,
        mirror: RedisMirror | None,
    ) -> None:
        self._send_kill = send_kill
        self._send_alert = send_alert
        self.metrics = metrics
        self.mirror = mirror

    async def publish(self, decisions: Sequence[Decision]) -> None:
        """Publish each decision in order.

        Args:
            decisions: kill commands and alerts, as the detector returned them.
        """
        for decision in decisions:
            if isinstance(decision, KillCommand):
                await self.publish_kill(decision)
            else:
                await self.publish_alert(decision)

    async def publish_kill(self, command: KillCommand) -> None:
        """Send a kill command to Kafka, then mirror it to Redis."""
        await self._send_kill(command.target.encode(), command.to_json())
        self.metrics.observe_kill(command.reason)
        logger.info(
            "kill-switch sent: %s %s, reason %s (command %s)",
            command.scope,
            command.target,
            command.reason,
            command.command_id,
        )

        if self.mirror is not None:
            mirrored = await self.mirror.mirror(command)
            if mirrored is False:
                logger.debug("kill command %s was mirrored before", command.command_id)

    async def publish_alert(self, alert: Alert) -> None:
        """Send an alert to Kafka."""
        await self._send_alert(alert.target.encode(), alert.to_json())
        self.metrics.observe_alert(alert.rule)
        logger.info(
            "alert sent: rule %s on %s %s (%s)",
            alert.rule,
            alert.scope,
            alert.target,
            alert.severity,
        )
