"""Every rule just below, at and just above its threshold, as kill and as alert."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tripwire.schemas.events import Alert, KillCommand, Scope, SpanEvent, SpanKind
from tripwire.schemas.events import ToolStatus as Status
from tripwire.schemas.textcode import SKETCH_SIZE
from tripwire.streams import rules
from tripwire.streams.core import Decision, Detector
from tripwire.streams.embedder import TextEmbedder, int8_cosines
from tripwire.streams.policy import RULE_BIT, RULES, Policy
from tripwire.streams.pricing import PriceBook
from tripwire.streams.state import SessionState, UserDayState

SESSION = "sess-1"
USER = "user-1"
LOOPING = "I'll search the quarterly report again for the Q3 revenue figure."
DISTINCT = (
    "The invoice from the cloud provider is thirty percent higher this month.",
    "Your meeting with the design team moved to Thursday afternoon.",
    "Recipe: mix flour and butter, then add eggs one at a time.",
    "The outage was caused by an expired TLS certificate on the gateway.",
    "Translation of the user manual into Spanish is complete.",
)


@dataclass
class Stream:
    """Builds the spans of one session, ids and event times in order."""

    spans: list[SpanEvent] = field(default_factory=list)
    clock: float = 1_750_000_000.0

    def add(self, kind: SpanKind, **fields: Any) -> Stream:
        self.clock += fields.pop("gap", 0.1)
        values: dict[str, Any] = {
            "span_id": f"{len(self.spans) + 1:016x}",
            "trace_id": "trace-1",
            "session_id": SESSION,
            "kind": kind,
            "start_time": self.clock - 0.05,
            "end_time": self.clock,
            "user_id": USER,
            "agent_name": "researcher",
        }
        if kind is SpanKind.LLM:
            values |= {"model": "gpt-4o", "cost_usd": 0.0}
        values |= fields
        self.spans.append(SpanEvent(**values))
        return self

    def llm(self, **fields: Any) -> Stream:
        return self.add(SpanKind.LLM, **fields)

    def tool(self, name: str, args: str, status: Status = Status.OK) -> Stream:
        return self.add(
            SpanKind.TOOL, tool_name=name, tool_args_hash=args, tool_status=status
        )


def run(policy: Policy, spans: list[SpanEvent]) -> list[Decision]:
    """Chain the session and user steps as the embedded runtime does."""
    detector = Detector(policy, PriceBook.load())
    session: SessionState | None = None
    user_day: UserDayState | None = None
    decisions: list[Decision] = []
    for span in spans:
        session, outcome = detector.observe_span(session, span)
        decisions.extend(outcome.decisions)
        if outcome.usage is not None:
            user_day, more = detector.observe_usage(user_day, outcome.usage)
            decisions.extend(more)
    return decisions


def _steps(count: int) -> list[SpanEvent]:
    stream = Stream()
    for _ in range(count):
        stream.llm()
    return stream.spans


def _tool_calls(count: int) -> list[SpanEvent]:
    stream = Stream()
    for index in range(count):
        stream.tool("search", f"args-{index}")
    return stream.spans


def _tokens(count: int) -> list[SpanEvent]:
    return Stream().llm(input_tokens=count - 100, output_tokens=100).spans


def _cost(total: float) -> list[SpanEvent]:
    return Stream().llm(cost_usd=0.5).llm(cost_usd=round(total - 0.5, 9)).spans


def _burst(total: float) -> list[SpanEvent]:
    # Both spans end within one 10-second bucket.
    return Stream().llm(cost_usd=0.25).llm(cost_usd=round(total - 0.25, 9)).spans


def _depth(depth: int) -> list[SpanEvent]:
    return Stream().add(SpanKind.AGENT, depth=depth).spans


def _errors(errors: int) -> list[SpanEvent]:
    stream = Stream()
    for index in range(6):
        status = Status.ERROR if index < errors else Status.OK
        stream.tool("fetch", f"page-{index}", status)
    return stream.spans


def _repeats(repeats: int) -> list[SpanEvent]:
    stream = Stream()
    for index in range(8 - repeats):
        stream.tool("read", f"doc-{index}")
    for _ in range(repeats):
        stream.tool("search", "same-args")
    return stream.spans


def _cycles(repeats: int) -> list[SpanEvent]:
    stream = Stream()
    for _ in range(repeats):
        stream.tool("search", "q-1").tool("read", "doc-1")
    return stream.spans


def _similar(matches: int) -> list[SpanEvent]:
    stream = Stream()
    for text in DISTINCT[: 5 - matches]:
        stream.llm(output_text=text)
    for _ in range(matches + 1):
        stream.llm(output_text=LOOPING)
    return stream.spans


def _user_tokens(count: int) -> list[SpanEvent]:
    return Stream().llm(input_tokens=count - 10, output_tokens=10).spans


def _user_cost(total: float) -> list[SpanEvent]:
    return Stream().llm(cost_usd=0.6).llm(cost_usd=round(total - 0.6, 9), gap=30).spans


@dataclass(frozen=True)
class Case:
    rule: str
    settings: dict[str, Any]
    build: Callable[[Any], list[SpanEvent]]
    below: Any
    at: Any
    above: Any
    fires_at_threshold: bool
    scope: Scope = Scope.SESSION


_ROOMY = {"session_budget_usd": 100.0, "burn_rate_usd": 100.0}
CASES = [
    Case("step_budget", {"step_budget": 5}, _steps, 4, 5, 6, False),
    Case("tool_call_budget", {"tool_call_budget": 5}, _tool_calls, 4, 5, 6, False),
    Case("token_budget", {"token_budget": 1000}, _tokens, 999, 1000, 1001, False),
    Case(
        "session_cost_budget",
        {"session_budget_usd": 1.0, "burn_rate_usd": 100.0},
        _cost,
        0.99,
        1.0,
        1.01,
        False,
    ),
    Case(
        "burn_rate",
        {"session_budget_usd": 100.0, "burn_rate_usd": 0.5},
        _burst,
        0.49,
        0.5,
        0.51,
        False,
    ),
    Case("recursion_depth", {"max_depth": 3}, _depth, 2, 3, 4, False),
    Case(
        "tool_error_rate",
        {"tool_error_min_errors": 3, "tool_error_rate": 0.5, "tool_error_window": 6},
        _errors,
        2,
        3,
        4,
        True,
    ),
    Case(
        "loop_repeat_tool",
        {"loop_repeat_min": 4, "loop_repeat_window": 8},
        _repeats,
        3,
        4,
        5,
        True,
    ),
    Case(
        "loop_tool_cycle",
        {
            "loop_cycle_repeats": 3,
            "loop_cycle_max_period": 2,
            "loop_repeat_tool_action": "off",
        },
        _cycles,
        2,
        3,
        4,
        True,
    ),
    Case(
        "loop_similarity",
        {"loop_similar_min": 3, "loop_similar_window": 5},
        _similar,
        2,
        3,
        4,
        True,
    ),
    Case(
        "user_daily_tokens",
        {"user_daily_tokens": 1000},
        _user_tokens,
        999,
        1000,
        1001,
        False,
        Scope.USER,
    ),
    Case(
        "user_daily_cost",
        {**_ROOMY, "user_daily_budget_usd": 1.0},
        _user_cost,
        0.99,
        1.0,
        1.01,
        False,
        Scope.USER,
    ),
]


def _rule_of(decision: Decision) -> str:
    return decision.reason if isinstance(decision, KillCommand) else decision.rule


@pytest.mark.parametrize("action", ["kill", "alert"])
@pytest.mark.parametrize("where", ["below", "at", "above"])
@pytest.mark.parametrize("case", CASES, ids=[case.rule for case in CASES])
def test_rule_fires_only_past_its_threshold(
    case: Case, where: str, action: str
) -> None:
    policy = Policy().with_overrides(**case.settings, **{f"{case.rule}_action": action})
    spans = case.build(getattr(case, where))

    fired = [d for d in run(policy, spans) if _rule_of(d) == case.rule]

    should_fire = where == "above" or (where == "at" and case.fires_at_threshold)
    if not should_fire:
        assert fired == []
        return
    assert len(fired) == 1
    decision = fired[0]
    expected_type = KillCommand if action == "kill" else Alert
    assert isinstance(decision, expected_type)
    assert decision.scope is case.scope
    assert decision.target == (USER if case.scope is Scope.USER else SESSION)
    assert decision.evidence


@pytest.mark.parametrize("case", CASES, ids=[case.rule for case in CASES])
def test_disabled_rule_never_fires(case: Case) -> None:
    policy = Policy().with_overrides(**case.settings, **{f"{case.rule}_action": "off"})

    fired = [d for d in run(policy, case.build(case.above)) if _rule_of(d) == case.rule]

    assert fired == []


def _similarity_of_rewording() -> float:
    embedder = TextEmbedder()
    first = embedder.encode(LOOPING, SKETCH_SIZE)
    second = embedder.encode(REWORDED, SKETCH_SIZE)
    assert first is not None
    assert second is not None
    return int8_cosines(first.vector, second.vector)[0]


REWORDED = "Let me search the quarterly report once more to find the Q3 revenue figure."


@pytest.mark.parametrize(
    ("offset", "fires"), [(-0.01, True), (0.0, True), (0.01, False)]
)
def test_text_similarity_threshold(offset: float, fires: bool) -> None:
    score = _similarity_of_rewording()
    policy = Policy().with_overrides(
        loop_similar_min=1, loop_similar_window=1, loop_similarity_text=score + offset
    )
    spans = Stream().llm(output_text=LOOPING).llm(output_text=REWORDED).spans

    fired = [d for d in run(policy, spans) if _rule_of(d) == "loop_similarity"]

    assert len(fired) == int(fires)
    if fires:
        assert fired[0].evidence["scores"] == [pytest.approx(score, abs=1e-4)]
        assert fired[0].evidence["source"] == "text"


@pytest.mark.parametrize(("rate", "fires"), [(0.5, True), (0.6, True), (0.7, False)])
def test_tool_error_rate_threshold(rate: float, fires: bool) -> None:
    # The sixth failure is the tenth call: 60% of the window, never more.
    policy = Policy().with_overrides(
        tool_error_min_errors=6, tool_error_window=10, tool_error_rate=rate
    )
    stream = Stream()
    for index in range(10):
        status = Status.ERROR if index in (0, 2, 4, 6, 8, 9) else Status.OK
        stream.tool("fetch", f"page-{index}", status)

    fired = [d for d in run(policy, stream.spans) if _rule_of(d) == "tool_error_rate"]

    assert bool(fired) is fires
    if fires:
        assert fired[0].evidence["errors"] == 6
        assert fired[0].evidence["rate"] == 0.6


# The rule groups the core calls: inline thresholds must agree with the rules.

_SESSION_RULES = (
    ("step_budget", rules.step_budget),
    ("tool_call_budget", rules.tool_call_budget),
    ("token_budget", rules.token_budget),
    ("session_cost_budget", rules.session_cost_budget),
    ("burn_rate", rules.burn_rate),
    ("recursion_depth", rules.recursion_depth),
)
_USER_RULES = (
    ("user_daily_tokens", rules.user_daily_tokens),
    ("user_daily_cost", rules.user_daily_cost),
)
_SMALL_POLICY = Policy().with_overrides(
    step_budget="3",
    tool_call_budget="3",
    token_budget="1000",
    session_budget_usd="0.5",
    burn_rate_usd="0.2",
    max_depth="2",
    user_daily_tokens="1000",
    user_daily_budget_usd="0.5",
)


@settings(max_examples=300, deadline=None)
@given(
    llm_calls=st.integers(0, 6),
    tool_calls=st.integers(0, 6),
    tokens=st.integers(0, 2000),
    cost_nano=st.integers(0, 1_000_000_000),
    burn=st.lists(st.integers(0, 150_000_000), max_size=4),
    depth=st.integers(0, 4),
    pending=st.integers(0, (1 << len(RULES)) - 1),
)
def test_session_total_trips_agree_with_each_rule(
    llm_calls: int,
    tool_calls: int,
    tokens: int,
    cost_nano: int,
    burn: list[int],
    depth: int,
    pending: int,
) -> None:
    state = SessionState()
    state.llm_calls, state.tool_calls, state.tokens = llm_calls, tool_calls, tokens
    state.cost_nano, state.depth = cost_nano, depth
    for bucket, nano in enumerate(burn):
        state.burn.extend((bucket, nano))

    expected = [
        trip
        for name, check in _SESSION_RULES
        if pending & RULE_BIT[name] and (trip := check(state, _SMALL_POLICY))
    ]

    assert rules.session_total_trips(state, _SMALL_POLICY, pending) == expected


@settings(max_examples=200, deadline=None)
@given(
    tokens=st.integers(0, 2000),
    cost_nano=st.integers(0, 1_000_000_000),
    pending=st.integers(0, (1 << len(RULES)) - 1),
)
def test_user_day_trips_agree_with_each_rule(
    tokens: int, cost_nano: int, pending: int
) -> None:
    state = UserDayState("2025-06-15")
    state.tokens, state.cost_nano = tokens, cost_nano

    expected = [
        trip
        for name, check in _USER_RULES
        if pending & RULE_BIT[name] and (trip := check(state, _SMALL_POLICY))
    ]

    assert rules.user_day_trips(state, _SMALL_POLICY, pending) == expected
