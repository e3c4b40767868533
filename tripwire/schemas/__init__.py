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
from tripwire.schemas.native import decode_native, encode_native, iter_native_lines

__all__ = [
    "Action",
    "Alert",
    "KillCommand",
    "Scope",
    "SpanEvent",
    "SpanKind",
    "ToolStatus",
    "decision_id",
    "decode_native",
    "encode_native",
    "iter_native_lines",
]
