"""The normalised span event, the kill command and the alert."""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

import orjson

# Namespace for deterministic ids: the same (scope, key, reason) always yields
# the same command id, so a replay or a restart never issues a second kill.
_ID_NAMESPACE = uuid.UUID("6f1c3b9e-5f7a-4e1b-9a53-7f0d2c8e4b11")


class SpanKind(StrEnum):
    """What a span measured."""

    LLM = "llm"
    TOOL = "tool"
    AGENT = "agent"


class ToolStatus(StrEnum):
    """How a tool call ended."""

    OK = "ok"
    ERROR = "error"


class Scope(StrEnum):
    """What a kill command or an alert applies to."""

    SESSION = "session"
    USER = "user"
    FLEET = "fleet"


class Action(StrEnum):
    """What a rule does when it fires."""

    ALERT = "alert"
    KILL = "kill"


@dataclass(slots=True)
class SpanEvent:
    """One LLM call, tool call or agent invocation, normalised.

    Times are Unix seconds (float). ``input_tokens`` includes cached input, as
    the OpenTelemetry GenAI conventions count it; ``cache_read_tokens`` and
    ``cache_creation_tokens`` are the parts of it priced at their own rates.
    ``output_text`` is transient: it feeds the loop detector and is never
    stored, logged or re-published. ``output_code`` is what the loop detector
    keeps of a text, computed where the text is (``TextEmbedder.wire_code``),
    so the text itself need not travel: a versioned ASCII string, ``t1:`` and
    base64 (see ``tripwire.schemas.textcode.TextCode``).
    """

    span_id: str
    trace_id: str
    session_id: str
    kind: SpanKind
    start_time: float
    end_time: float
    parent_span_id: str | None = None
    user_id: str | None = None
    agent_name: str | None = None
    model: str | None = None
    provider: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_creation_tokens: int = 0
    cost_usd: float | None = None
    tool_name: str | None = None
    tool_args_hash: str | None = None
    tool_status: ToolStatus | None = None
    finish_reason: str | None = None
    depth: int | None = None
    output_text: str | None = None
    output_code: str | None = None
    embedding: list[float] | None = None
    outcome: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, *, include_text: bool = False) -> dict[str, Any]:
        """Return the span as a JSON-ready dict, without text unless asked."""
        data = asdict(self)
        if not include_text:
            data.pop("output_text", None)
        return {key: value for key, value in data.items() if value not in (None, {})}


@dataclass(slots=True)
class KillCommand:
    """An order to stop a session, or every session of a user.

    ``command_id`` is deterministic in (scope, target, reason): publishing the
    same decision twice yields the same id, so subscribers can drop repeats.
    """

    command_id: str
    scope: Scope
    target: str
    reason: str
    detail: str
    issued_at: float
    session_id: str | None = None
    user_id: str | None = None
    agent_name: str | None = None
    ttl_seconds: int = 3600
    evidence: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(
        cls,
        scope: Scope,
        target: str,
        reason: str,
        detail: str,
        issued_at: float,
        *,
        dedupe_key: str = "",
        **extra: Any,
    ) -> KillCommand:
        """Build a kill command with its deterministic id.

        Args:
            dedupe_key: distinguishes kills of one reason on one target that
                must not collapse into one (a user's daily cap on two days).
        """
        key = f"{reason}/{dedupe_key}" if dedupe_key else reason
        command_id = decision_id("kill", scope, target, key)
        return cls(command_id, scope, target, reason, detail, issued_at, **extra)

    def to_json(self) -> bytes:
        """Encode as compact JSON."""
        return orjson.dumps(self)


@dataclass(slots=True)
class Alert:
    """A rule fired: a warning to operators, with its evidence."""

    alert_id: str
    scope: Scope
    target: str
    rule: str
    severity: str
    message: str
    at: float
    session_id: str | None = None
    user_id: str | None = None
    agent_name: str | None = None
    evidence: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(
        cls,
        scope: Scope,
        target: str,
        rule: str,
        severity: str,
        message: str,
        at: float,
        *,
        dedupe_key: str = "",
        **extra: Any,
    ) -> Alert:
        """Build an alert with its deterministic id.

        Args:
            dedupe_key: distinguishes alerts of one rule on one target that
                must not collapse into one (a fleet window's start, say).
        """
        alert_id = decision_id("alert", scope, target, f"{rule}/{dedupe_key}")
        return cls(alert_id, scope, target, rule, severity, message, at, **extra)

    def to_json(self) -> bytes:
        """Encode as compact JSON."""
        return orjson.dumps(self)


def decision_id(kind: str, scope: Scope, target: str, reason: str) -> str:
    """Return the deterministic id of a decision, a UUID5 string."""
    return str(uuid.uuid5(_ID_NAMESPACE, f"{kind}\x1f{scope}\x1f{target}\x1f{reason}"))
