"""The embedded runtime: the detection core driven in-process, for replay and demo."""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

import orjson

from tripwire.errors import ConfigError, SpanValidationError
from tripwire.schemas.events import (
    Alert,
    KillCommand,
    Scope,
    SpanEvent,
    SpanKind,
    ToolStatus,
)
from tripwire.streams.core import Detector
from tripwire.streams.state import SessionState, UserDayState

logger = logging.getLogger(__name__)

Decision = KillCommand | Alert

# How many invalid-span reasons are kept for the report; the rest are counted.
_KEPT_INVALID = 5
_DAY_SECONDS = 86_400


@dataclass(slots=True)
class SessionSummary:
    """What one session did and what Tripwire decided about it.

    Attributes:
        session_id: the session.
        agent_name: the agent of its first span that named one.
        user_id: the user of its first span that named one.
        cost_usd: priced cost of its distinct spans.
        llm_calls: distinct LLM spans.
        tool_calls: distinct tool spans.
        tool_errors: distinct tool spans that ended in error.
        input_tokens: input tokens of its LLM spans, cached input included.
        output_tokens: output tokens of its LLM spans.
        first_seen: event time of its earliest span end.
        last_seen: event time of its latest span end.
        kill_reasons: reasons of the session kill commands its spans
            triggered, in order.
        user_kill_reasons: reasons of the user kill commands its spans
            triggered (its user went over a daily cap), in order.
        alert_rules: rules of the alerts its spans triggered, in order.
        evicted: its state was dropped once it went idle (see
            ``EmbeddedRuntime``); if it came back, its budgets restarted.
    """

    session_id: str
    agent_name: str | None = None
    user_id: str | None = None
    cost_usd: float = 0.0
    llm_calls: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    first_seen: float = 0.0
    last_seen: float = 0.0
    kill_reasons: list[str] = field(default_factory=list)
    user_kill_reasons: list[str] = field(default_factory=list)
    alert_rules: list[str] = field(default_factory=list)
    evicted: bool = False

    @property
    def steps(self) -> int:
        """LLM calls plus tool calls."""
        return self.llm_calls + self.tool_calls

    @property
    def tokens(self) -> int:
        """Input plus output tokens."""
        return self.input_tokens + self.output_tokens

    @property
    def killed(self) -> bool:
        """Whether a kill command, of the session or of its user, named it."""
        return bool(self.kill_reasons or self.user_kill_reasons)

    def verdict(self, most: int | None = None) -> str:
        """Return ``killed: <reasons>``, ``alerted: <rules>`` or ``ok``.

        User kills read ``user killed: <reasons>``.

        Args:
            most: list at most this many reasons, then ``(+N more)``.
        """
        parts = []
        for label, names in (
            ("killed", self.kill_reasons),
            ("user killed", self.user_kill_reasons),
        ):
            if names:
                parts.append(f"{label}: {_listed(names, most)}")
        if parts:
            return "; ".join(parts)
        if self.alert_rules:
            return "alerted: " + _listed(self.alert_rules, most)
        return "ok"


@dataclass(slots=True)
class RuntimeCounters:
    """Running totals of what the runtime has seen.

    Attributes:
        spans: spans fed, duplicates included.
        duplicates: spans dropped as repeats of a span id already seen.
        invalid: records that could not be decoded into a span.
        kills: kill commands issued.
        alerts: alerts issued.
        evicted_sessions: session states dropped after going idle.
        invalid_reasons: the first few invalid records, as
            ``(where, reason)`` pairs.
    """

    spans: int = 0
    duplicates: int = 0
    invalid: int = 0
    kills: int = 0
    alerts: int = 0
    evicted_sessions: int = 0
    invalid_reasons: list[tuple[str, str]] = field(default_factory=list)


class EmbeddedRuntime:
    """Drive the detection core in-process over a stream of spans.

    The runtime keeps the session states and the user-day states in dicts and
    chains :meth:`Detector.observe_span` and :meth:`Detector.observe_usage` for
    each span, exactly as the worker does with its tables, so the same spans in
    the same order give the same decisions. Its only logic of its own is
    bookkeeping: counters and a summary row per session.

    Memory grows with the number of sessions. For long replays, pass
    ``idle_timeout_s``: a session whose latest span ended more than that many
    event-time seconds before the newest span seen is evicted (its state is
    dropped, its summary row kept), and user-day states are dropped once their
    day is two days behind. Event time, not the wall clock, drives eviction, so
    a replay is as deterministic with it as without.

    Args:
        detector: the detection core, with its policy and price book.
        idle_timeout_s: evict sessions idle this long in event time; ``None``
            keeps every session.

    Raises:
        ConfigError: ``idle_timeout_s`` is not > 0.
    """

    def __init__(
        self, detector: Detector, *, idle_timeout_s: float | None = None
    ) -> None:
        if idle_timeout_s is not None and idle_timeout_s <= 0:
            raise ConfigError(
                f"idle session timeout must be > 0 seconds, got {idle_timeout_s}: "
                "pass a positive number of seconds, or none to keep every session"
            )

        self.detector = detector
        self.idle_timeout_s = idle_timeout_s
        self.counters = RuntimeCounters()
        self._sessions: OrderedDict[str, SessionState] = OrderedDict()
        self._user_days: dict[tuple[str, str], UserDayState] = {}
        self._observe_span = detector.observe_span
        self._observe_usage = detector.observe_usage
        self._summaries: dict[str, SessionSummary] = {}
        self._watermark = float("-inf")
        self._days_checked_at = float("-inf")

    def feed(self, span: SpanEvent) -> list[Decision]:
        """Run one span through the detector; return the decisions it caused.

        Args:
            span: a decoded, validated span.

        Returns:
            The kill commands and alerts this span triggered, in the order the
            detector issued them; empty for most spans.
        """
        counters = self.counters
        counters.spans += 1
        session_id = span.session_id
        sessions = self._sessions
        state, outcome = self._observe_span(sessions.get(session_id), span)
        sessions[session_id] = state
        decisions: list[Decision] = outcome.decisions
        usage = outcome.usage
        if usage is not None:
            # Keyed as the worker keys its user-day table: user id and day.
            key = (usage.user_id, usage.day)
            user_day, more = self._observe_usage(self._user_days.get(key), usage)
            self._user_days[key] = user_day
            if more:
                decisions = [*decisions, *more]

        summary = self._summaries.get(session_id)
        if summary is None:
            summary = self._summaries[session_id] = SessionSummary(
                session_id,
                span.agent_name,
                span.user_id,
                first_seen=span.end_time,
                last_seen=span.end_time,
            )
        cost = outcome.cost
        if outcome.duplicate or cost is None:
            counters.duplicates += 1
        else:
            if summary.agent_name is None:
                summary.agent_name = span.agent_name
            if summary.user_id is None:
                summary.user_id = span.user_id
            kind = span.kind
            if kind is SpanKind.LLM:
                summary.llm_calls += 1
                summary.input_tokens += span.input_tokens
                summary.output_tokens += span.output_tokens
            elif kind is SpanKind.TOOL:
                summary.tool_calls += 1
                if span.tool_status is ToolStatus.ERROR:
                    summary.tool_errors += 1
            summary.cost_usd += cost.cost_usd
            end = span.end_time
            if end > summary.last_seen:
                summary.last_seen = end
            elif end < summary.first_seen:
                summary.first_seen = end
        for decision in decisions:
            self._record(summary, decision)

        if self.idle_timeout_s is not None:
            sessions.move_to_end(session_id)
            if span.end_time > self._watermark:
                self._watermark = span.end_time
                self._evict(self._watermark - self.idle_timeout_s)
        return decisions

    def record_invalid(self, error: SpanValidationError, where: str = "") -> None:
        """Count a record that could not be decoded; keep the first few reasons.

        Args:
            error: why the record was rejected.
            where: where it was, for example ``spans.jsonl:12``.
        """
        counters = self.counters
        counters.invalid += 1
        if len(counters.invalid_reasons) < _KEPT_INVALID:
            counters.invalid_reasons.append((where, error.reason))

    def sessions(self) -> list[SessionSummary]:
        """Return a summary row per session seen, most expensive first.

        Ties are ordered by session id, so the order is the same on every run.
        """
        return sorted(
            self._summaries.values(), key=lambda row: (-row.cost_usd, row.session_id)
        )

    def session(self, session_id: str) -> SessionSummary | None:
        """Return the summary row of one session, or ``None`` if never seen."""
        return self._summaries.get(session_id)

    @property
    def live_sessions(self) -> int:
        """Sessions whose state is held in memory."""
        return len(self._sessions)

    @property
    def unknown_models(self) -> Counter[str]:
        """Spans per model the price book could not price."""
        return self.detector.prices.unknown_models

    # Bookkeeping -------------------------------------------------------------

    def _record(self, summary: SessionSummary, decision: Decision) -> None:
        if isinstance(decision, KillCommand):
            self.counters.kills += 1
            reasons = (
                summary.user_kill_reasons
                if decision.scope is Scope.USER
                else summary.kill_reasons
            )
            if decision.reason not in reasons:
                reasons.append(decision.reason)
        else:
            self.counters.alerts += 1
            if decision.rule not in summary.alert_rules:
                summary.alert_rules.append(decision.rule)

    def _evict(self, horizon: float) -> None:
        sessions = self._sessions
        while sessions:
            session_id = next(iter(sessions))
            summary = self._summaries[session_id]
            if summary.last_seen >= horizon:
                break
            del sessions[session_id]
            summary.evicted = True
            self.counters.evicted_sessions += 1

        # User-day states of days that ended two days before the horizon
        # can no longer change: the detector ignores records of past days.
        if horizon - self._days_checked_at < _DAY_SECONDS:
            return
        self._days_checked_at = horizon
        oldest = datetime.fromtimestamp(horizon - 2 * _DAY_SECONDS, UTC)
        cutoff = oldest.strftime("%Y-%m-%d")
        stale = [key for key in self._user_days if key[1] < cutoff]
        for key in stale:
            del self._user_days[key]


def _listed(names: list[str], most: int | None) -> str:
    if most is None or len(names) <= most:
        return ", ".join(names)
    return ", ".join(names[:most]) + f" (+{len(names) - most} more)"


def decision_to_json(decision: Decision) -> bytes:
    """Encode a decision as one JSON line: ``{"type": "kill"|"alert", ...}``.

    Args:
        decision: a kill command or an alert.

    Returns:
        The compact JSON object and a newline; the same decision always gives
        the same bytes.
    """
    kind = "kill" if isinstance(decision, KillCommand) else "alert"
    return orjson.dumps({"type": kind, **asdict(decision)}) + b"\n"
