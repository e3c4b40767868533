"""What an agent process imports: span export, kill switch, session guard."""

from tripwire.agents.exporter import ExporterStats, KafkaSpanExporter
from tripwire.agents.guard import SessionGuard
from tripwire.agents.killswitch import (
    AsyncKillSwitch,
    KillSwitch,
    decode_kill_command,
    session_killed,
)
from tripwire.errors import SessionKilled

__all__ = [
    "AsyncKillSwitch",
    "ExporterStats",
    "KafkaSpanExporter",
    "KillSwitch",
    "SessionGuard",
    "SessionKilled",
    "decode_kill_command",
    "session_killed",
]
