"""The contract between agents and the detector: spans, kill commands, alerts."""

from tripwire.schemas.events import (
    Action,
    Alert,
    KillCommand,
    Scope,
    SpanEvent,
    SpanKind,
    ToolStatus,
    decision_id,
)

__all__ = [
    "Action",
    "Alert",
    "KillCommand",
    "Scope",
    "SpanEvent",
    "SpanKind",
    "ToolStatus",
    "decision_id",
]
