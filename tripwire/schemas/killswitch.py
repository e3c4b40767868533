"""Where kill commands live outside Kafka: the Redis key and channel names."""

from tripwire.schemas.events import Scope

# One key per killed session or user, holding the kill command's JSON, with a
# TTL; agents read it before each LLM call. The channel carries the same JSON
# for subscribers that want a push instead of a poll.
REDIS_KEY_PREFIX = "tripwire:kill"
REDIS_CHANNEL = "tripwire:killswitch"


def redis_kill_key(
    scope: Scope | str, target: str, prefix: str = REDIS_KEY_PREFIX
) -> str:
    """Return the Redis key that flags ``target`` (a session or user id) as killed."""
    return f"{prefix}:{Scope(scope).value}:{target}"
