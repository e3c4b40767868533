"""The detection core: one span or usage record in, state and decisions out."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import UTC, datetime

from tripwire.schemas.events import (
    Action,
    Alert,
    KillCommand,
    Scope,
    SpanEvent,
    SpanKind,
    ToolStatus,
)
from tripwire.schemas.textcode import SKETCH_SIZE, TextCode, TextCodeError
from tripwire.streams import loops, rules
from tripwire.streams.embedder import TextEmbedder, bit_code
from tripwire.streams.policy import RULE_BIT, Policy
from tripwire.streams.pricing import CostBreakdown, PriceBook
from tripwire.streams.rules import Trip
from tripwire.streams.state import (
    NO_PARENT,
    OUTPUT_KIND_BITS,
    OUTPUT_KIND_TEXT,
    SessionState,
    UserDayState,
    from_nano,
    span_key,
    to_nano,
)

logger = logging.getLogger(__name__)

Decision = KillCommand | Alert

_DAY_SECONDS = 86_400
_DAY_CACHE_SIZE = 64
_SEVERITY = {
    "step_budget": "critical",
    "tool_call_budget": "critical",
    "token_budget": "critical",
    "session_cost_budget": "critical",
    "burn_rate": "critical",
    "recursion_depth": "critical",
    "user_daily_tokens": "critical",
    "user_daily_cost": "critical",
    "tool_error_rate": "warning",
    "loop_similarity": "warning",
    "loop_repeat_tool": "warning",
    "loop_tool_cycle": "warning",
    "unknown_model": "info",
}

_TOOL_ERROR_RATE = RULE_BIT["tool_error_rate"]
_LOOP_REPEAT_TOOL = RULE_BIT["loop_repeat_tool"]
_LOOP_TOOL_CYCLE = RULE_BIT["loop_tool_cycle"]
_LOOP_SIMILARITY = RULE_BIT["loop_similarity"]
_UNKNOWN_MODEL = RULE_BIT["unknown_model"]


@dataclass(slots=True)
class Usage:
    """One span's tokens and cost, for the per-user daily caps.

    ``day`` is the UTC date of the span's end time; ``at`` is that end
    time. ``span_id`` lets the user step drop a redelivered record.
    """

    user_id: str
    day: str
    session_id: str
    agent_name: str | None
    tokens: int
    cost_usd: float
    at: float
    span_id: str | None = None


@dataclass(slots=True)
class SpanOutcome:
    """What observing one span produced.

    Attributes:
        decisions: kill commands and alerts, in rule order; empty for most spans.
        usage: the record for the user step, or None (duplicate, no user, or
            nothing used).
        duplicate: the span id was already counted in this session; nothing
            changed.
        cost: how the span was priced, or None for a duplicate.
    """

    decisions: list[Decision]
    usage: Usage | None
    duplicate: bool
    cost: CostBreakdown | None


class Detector:
    """Runaway detection over sessions and users, with no I/O and no wall clock.

    Both steps are deterministic in (state, input): they update the state
    they are given (and return it) and emit each decision at most once per
    session (or user-day) and rule. Event time is the span's end time.

    Args:
        policy: thresholds and actions.
        prices: the price book; its ``unknown_models`` counter is updated.
        embedder: the text embedder for the loop signal, shared.
    """

    def __init__(
        self, policy: Policy, prices: PriceBook, embedder: TextEmbedder | None = None
    ) -> None:
        self.policy = policy
        self.prices = prices
        self.embedder = embedder or TextEmbedder()
        self._days: dict[int, str] = {}

    def observe_span(
        self, state: SessionState | None, span: SpanEvent
    ) -> tuple[SessionState, SpanOutcome]:
        """Count one span in its session and check the session rules.

        Args:
            state: the session's state, or None for a new session. It is
                updated in place.
            span: a validated span of that session.

        Returns:
            The session state (the same object when one was given) and the
            outcome: decisions, the usage record for the user step, whether
            the span was a duplicate, and its cost.
        """
        if state is None:
            state = SessionState()
        key = span_key(span.span_id)
        if state.has_seen(key):
            return state, SpanOutcome([], None, True, None)

        state.remember(key)
        policy = self.policy
        if policy.agents:
            policy = policy.for_agent(span.agent_name or state.agent_name)
        cost = self.prices.cost(span)
        nano = to_nano(cost.cost_usd)
        input_tokens = span.input_tokens
        output_tokens = span.output_tokens
        tokens = (input_tokens if input_tokens > 0 else 0) + (
            output_tokens if output_tokens > 0 else 0
        )
        self._count(state, span, policy, key, nano, tokens, cost)

        trips = self._session_trips(state, span, policy, cost)
        decisions = self._decide(state, span, policy, trips) if trips else []
        usage = self._usage(state, span, tokens, nano)
        return state, SpanOutcome(decisions, usage, False, cost)

    def observe_usage(
        self, state: UserDayState | None, usage: Usage
    ) -> tuple[UserDayState, list[Decision]]:
        """Count one usage record in its user's day and check the daily caps.

        A record of a later day starts a new day; a record of a day before the
        state's is ignored (its day is over). A record whose span id was
        already counted is ignored.

        Args:
            state: the user-day state, or None for the user's first record.
            usage: a record from :meth:`observe_span`.

        Returns:
            The user-day state and the decisions (kill commands scoped to the
            user, or alerts), at most one per rule and day.
        """
        if state is None or state.day < usage.day:
            state = UserDayState(usage.day)
        elif usage.day < state.day:
            return state, []
        if usage.span_id is not None:
            key = span_key(usage.span_id)
            if state.has_seen(key):
                return state, []
            state.remember(key)

        state.tokens += usage.tokens
        state.cost_nano += to_nano(usage.cost_usd)
        policy = self.policy
        if policy.agents:
            policy = policy.for_agent(usage.agent_name)
        pending = policy.pending(state.killed, state.alerted)
        trips = rules.user_day_trips(state, policy, pending)
        if not trips:
            return state, []
        decisions = [self._user_decision(state, usage, policy, t) for t in trips]
        return state, [decision for decision in decisions if decision is not None]

    # Session step ------------------------------------------------------------

    def _count(
        self,
        state: SessionState,
        span: SpanEvent,
        policy: Policy,
        key: bytes,
        nano: int,
        tokens: int,
        cost: CostBreakdown,
    ) -> None:
        start = span.start_time
        end = span.end_time
        if state.llm_calls or state.tool_calls or state.agent_spans:
            first = state.first_at
            last = state.last_at
            state.first_at = start if start < first else first
            state.last_at = end if end > last else last
        else:
            state.first_at = start
            state.last_at = end
        if state.user_id is None:
            state.user_id = span.user_id
        if state.agent_name is None:
            state.agent_name = span.agent_name

        state.tokens += tokens
        state.cost_nano += nano
        if not cost.priced:
            state.unpriced += 1
        rules.add_burn(state, policy, end, nano)

        kind = span.kind
        if kind is SpanKind.LLM:
            state.llm_calls += 1
        elif kind is SpanKind.TOOL:
            state.tool_calls += 1
        else:
            state.agent_spans += 1

        depth = span.depth
        if depth is None and (kind is SpanKind.AGENT or state.links):
            parent = span_key(span.parent_span_id) if span.parent_span_id else NO_PARENT
            depth = rules.link_depth(state, key, parent, kind is SpanKind.AGENT)
        if depth is not None and depth > state.depth:
            state.depth = depth

    def _session_trips(
        self,
        state: SessionState,
        span: SpanEvent,
        policy: Policy,
        cost: CostBreakdown,
    ) -> list[Trip]:
        pending = policy.pending(state.killed, state.alerted)
        trips = rules.session_total_trips(state, policy, pending)

        kind = span.kind
        if kind is SpanKind.TOOL:
            trips.extend(self._tool_trips(state, span, policy, pending))
        elif kind is SpanKind.LLM:
            if not cost.priced and pending & _UNKNOWN_MODEL:
                trips.append(_unknown_model(span, state))
            # Once the rule has fired (or is off) the output window is never
            # read again in this session: skip the embedding altogether.
            if pending & _LOOP_SIMILARITY and (
                span.output_text or span.output_code or span.embedding
            ):
                trip = self._output_trip(state, span, policy)
                if trip is not None:
                    trips.append(trip)
        return trips

    def _tool_trips(
        self, state: SessionState, span: SpanEvent, policy: Policy, pending: int
    ) -> list[Trip]:
        rules.add_tool_status(state, span.tool_status is ToolStatus.ERROR)
        loops.add_tool_call(
            state, loops.tool_identity(span.tool_name, span.tool_args_hash)
        )

        found: list[Trip | None] = []
        if pending & _TOOL_ERROR_RATE:
            found.append(rules.tool_error_rate(state, policy))
        if pending & _LOOP_REPEAT_TOOL:
            found.append(loops.repeated_tool_call(state, policy, span.tool_name))
        if pending & _LOOP_TOOL_CYCLE:
            found.append(loops.tool_cycle(state, policy))
        return [trip for trip in found if trip is not None]

    def _output_trip(
        self, state: SessionState, span: SpanEvent, policy: Policy
    ) -> Trip | None:
        code = self._text_code(span)
        sketch = code.sketch if code is not None else ()
        vector: bytes | None = None
        kind = OUTPUT_KIND_TEXT
        if span.embedding:
            vector = bit_code(span.embedding)
            kind = OUTPUT_KIND_BITS
        if vector is None and code is not None:
            vector = code.vector
            kind = OUTPUT_KIND_TEXT
        if vector is None:
            return None

        trip = loops.similar_outputs(state, policy, kind, vector, sketch)
        loops.add_output(state, kind, vector, sketch, policy.loop_similar_window)
        return trip

    def _text_code(self, span: SpanEvent) -> TextCode | None:
        """Return the code of the span's output: embedded from text, or carried."""
        text = span.output_text
        if text:
            return self.embedder.encode(text, SKETCH_SIZE)
        carried = span.output_code
        if not carried:
            return None
        try:
            return TextCode.from_wire(carried)
        except TextCodeError as exc:
            # Decoders reject such spans; one built in-process may still hold it.
            logger.debug("span %s: output_code ignored: %s", span.span_id, exc)
            return None

    def _decide(
        self, state: SessionState, span: SpanEvent, policy: Policy, trips: list[Trip]
    ) -> list[Decision]:
        decisions: list[Decision] = []
        session_id = span.session_id
        agent_name = span.agent_name or state.agent_name
        for trip in trips:
            rule_policy = policy.rules[trip.rule]
            bit = RULE_BIT[trip.rule]
            if rule_policy.action is Action.KILL:
                if state.killed & bit:
                    continue
                state.killed |= bit
                decisions.append(
                    KillCommand.create(
                        Scope.SESSION,
                        session_id,
                        trip.rule,
                        trip.detail,
                        state.last_at,
                        session_id=session_id,
                        user_id=state.user_id,
                        agent_name=agent_name,
                        evidence=trip.evidence,
                    )
                )
                logger.debug("kill %s: %s", trip.rule, trip.detail)
                continue
            if state.alerted & bit:
                continue
            state.alerted |= bit
            decisions.append(
                Alert.create(
                    Scope.SESSION,
                    session_id,
                    trip.rule,
                    _SEVERITY[trip.rule],
                    trip.detail,
                    state.last_at,
                    session_id=session_id,
                    user_id=state.user_id,
                    agent_name=agent_name,
                    evidence=trip.evidence,
                )
            )
        return decisions

    def _usage(
        self, state: SessionState, span: SpanEvent, tokens: int, nano: int
    ) -> Usage | None:
        user_id = span.user_id or state.user_id
        if user_id is None or (tokens == 0 and nano == 0):
            return None

        end = span.end_time
        # Positional in Usage's field order: keywords cost time on every span.
        return Usage(
            user_id,
            self._day(end),
            span.session_id,
            span.agent_name or state.agent_name,
            tokens,
            from_nano(nano),
            end,
            span.span_id,
        )

    def _day(self, at: float) -> str:
        index = math.floor(at / _DAY_SECONDS)
        day = self._days.get(index)
        if day is None:
            if len(self._days) >= _DAY_CACHE_SIZE:
                self._days.clear()
            day = datetime.fromtimestamp(index * _DAY_SECONDS, UTC).strftime("%Y-%m-%d")
            self._days[index] = day
        return day

    # User step ---------------------------------------------------------------

    def _user_decision(
        self, state: UserDayState, usage: Usage, policy: Policy, trip: Trip
    ) -> Decision | None:
        rule_policy = policy.rules[trip.rule]
        bit = RULE_BIT[trip.rule]
        if rule_policy.action is Action.KILL:
            if state.killed & bit:
                return None
            state.killed |= bit
            # The user stays stopped until the end of the UTC day of the usage.
            day_end = (math.floor(usage.at / _DAY_SECONDS) + 1) * _DAY_SECONDS
            return KillCommand.create(
                Scope.USER,
                usage.user_id,
                trip.rule,
                trip.detail,
                usage.at,
                dedupe_key=state.day,
                session_id=usage.session_id,
                user_id=usage.user_id,
                agent_name=usage.agent_name,
                ttl_seconds=max(1, math.ceil(day_end - usage.at)),
                evidence=trip.evidence,
            )
        if state.alerted & bit:
            return None
        state.alerted |= bit
        return Alert.create(
            Scope.USER,
            usage.user_id,
            trip.rule,
            _SEVERITY[trip.rule],
            trip.detail,
            usage.at,
            dedupe_key=state.day,
            session_id=usage.session_id,
            user_id=usage.user_id,
            agent_name=usage.agent_name,
            evidence=trip.evidence,
        )


def _unknown_model(span: SpanEvent, state: SessionState) -> Trip:
    model = span.model or "<missing>"
    return Trip(
        "unknown_model",
        f"no price for model {model!r}: its spans count as $0, so cost budgets "
        "undercount this session; add it to the price override file",
        {"model": model, "provider": span.provider, "unpriced_spans": state.unpriced},
    )
