"""Tests for the embedded runtime: the detection core driven in-process."""

from __future__ import annotations

import dataclasses

import orjson
import pytest

from tripwire.errors import ConfigError, SpanValidationError
from tripwire.schemas.events import Alert, KillCommand, Scope, SpanEvent, SpanKind
from tripwire.streams.core import Detector
from tripwire.streams.embedded import EmbeddedRuntime, decision_to_json
from tripwire.streams.policy import Policy
from tripwire.streams.pricing import PriceBook
from tripwire.streams.simulate import HEALTHY, RECURSION, simulate_fleet
from tripwire.streams.state import SessionState, UserDayState

T0 = 1_748_854_800.0
TEXTS = (
    "Refund approved for the damaged blender; courier label emailed.",
    "Quarterly revenue grew in Lisbon while Oslo churn doubled.",
    "The migration script drops an index before rebuilding partitions.",
    "Flights to Tokyo in April are cheapest on Tuesdays via Helsinki.",
)


def _detector(**overrides: object) -> Detector:
    policy = Policy.from_env({})
    if overrides:
        policy = policy.with_overrides(**overrides)
    return Detector(policy, PriceBook.load())


def _llm(
    session: str, index: int, *, at: float = T0, user: str = "user-1", **fields: object
) -> SpanEvent:
    span = SpanEvent(
        span_id=f"{session}-{index}",
        trace_id="t" * 32,
        session_id=session,
        kind=SpanKind.LLM,
        start_time=at + index,
        end_time=at + index + 0.5,
        user_id=user,
        agent_name="support-triage",
        model="gpt-4o-mini",
        input_tokens=1_000,
        output_tokens=100,
        output_text=TEXTS[index % len(TEXTS)],
    )
    return dataclasses.replace(span, **fields)


def test_feed_gives_the_decisions_of_chaining_the_detector_by_hand() -> None:
    fleet = simulate_fleet(12, 4)
    runtime = EmbeddedRuntime(_detector())
    by_hand = _detector()
    sessions: dict[str, SessionState] = {}
    days: dict[str, UserDayState] = {}

    fed: list[bytes] = []
    expected: list[bytes] = []
    for span in fleet.spans():
        fed += [decision_to_json(d) for d in runtime.feed(span)]
        state, outcome = by_hand.observe_span(sessions.get(span.session_id), span)
        sessions[span.session_id] = state
        expected += [decision_to_json(d) for d in outcome.decisions]
        if outcome.usage is not None:
            key = f"{outcome.usage.user_id}/{outcome.usage.day}"
            day, more = by_hand.observe_usage(days.get(key), outcome.usage)
            days[key] = day
            expected += [decision_to_json(d) for d in more]

    assert fed
    assert fed == expected


def test_duplicate_spans_are_counted_once() -> None:
    runtime = EmbeddedRuntime(_detector())
    span = _llm("s1", 1)

    runtime.feed(span)
    runtime.feed(span)

    row = runtime.session("s1")
    assert row is not None
    assert runtime.counters.spans == 2
    assert runtime.counters.duplicates == 1
    assert row.llm_calls == 1
    assert row.tokens == 1_100


def test_summary_rows_add_up_steps_tokens_and_cost() -> None:
    runtime = EmbeddedRuntime(_detector())
    for index in range(3):
        runtime.feed(_llm("s1", index))
    tool = dataclasses.replace(
        _llm("s1", 9), kind=SpanKind.TOOL, model=None, tool_name="grep",
        input_tokens=0, output_tokens=0, output_text=None,
    )  # fmt: skip
    runtime.feed(tool)
    runtime.feed(_llm("s2", 1))

    rows = runtime.sessions()
    first = rows[0]
    assert [row.session_id for row in rows] == ["s1", "s2"]
    assert (first.llm_calls, first.tool_calls, first.steps) == (3, 1, 4)
    assert first.tokens == 3 * 1_100
    # gpt-4o-mini: $0.15 in, $0.60 out per million tokens.
    assert first.cost_usd == pytest.approx(3 * (1_000 * 0.15 + 100 * 0.6) / 1e6)
    assert first.verdict() == "ok"


def test_session_kill_and_user_kill_show_in_the_verdict() -> None:
    runtime = EmbeddedRuntime(_detector(step_budget=2, user_daily_tokens=3_000))

    decisions = [d for i in range(4) for d in runtime.feed(_llm("s1", i))]

    kills = [d for d in decisions if isinstance(d, KillCommand)]
    assert {(k.scope, k.reason) for k in kills} == {
        (Scope.SESSION, "step_budget"),
        (Scope.USER, "user_daily_tokens"),
    }
    row = runtime.session("s1")
    assert row is not None
    assert row.killed
    assert row.verdict() == "killed: step_budget; user killed: user_daily_tokens"
    assert runtime.counters.kills == 2


def test_alert_shows_in_the_verdict_when_nothing_killed() -> None:
    runtime = EmbeddedRuntime(_detector(step_budget_action="alert", step_budget=1))

    decisions = [d for i in range(3) for d in runtime.feed(_llm("s1", i))]

    assert [type(d) for d in decisions] == [Alert]
    row = runtime.session("s1")
    assert row is not None
    assert row.verdict() == "alerted: step_budget"


def test_invalid_records_are_counted_and_the_first_reasons_kept() -> None:
    runtime = EmbeddedRuntime(_detector())

    for line in range(1, 9):
        runtime.record_invalid(SpanValidationError(f"line {line}: bad"), "f.jsonl")

    assert runtime.counters.invalid == 8
    assert runtime.counters.invalid_reasons[0] == ("f.jsonl", "line 1: bad")
    assert len(runtime.counters.invalid_reasons) == 5


def test_idle_sessions_are_evicted_by_event_time() -> None:
    runtime = EmbeddedRuntime(_detector(), idle_timeout_s=60.0)

    runtime.feed(_llm("old", 1, at=T0))
    runtime.feed(_llm("busy", 1, at=T0 + 30))
    runtime.feed(_llm("busy", 2, at=T0 + 100))

    old = runtime.session("old")
    assert old is not None and old.evicted
    assert runtime.live_sessions == 1
    assert runtime.counters.evicted_sessions == 1
    busy = runtime.session("busy")
    assert busy is not None and not busy.evicted


def test_eviction_keeps_the_decisions_of_a_fleet() -> None:
    fleet = simulate_fleet(20, 2)
    kept = EmbeddedRuntime(_detector())
    evicting = EmbeddedRuntime(_detector(), idle_timeout_s=3_600.0)

    spans = list(fleet.spans())
    with_all = [decision_to_json(d) for span in spans for d in kept.feed(span)]
    with_eviction = [decision_to_json(d) for span in spans for d in evicting.feed(span)]

    assert with_eviction == with_all


def test_idle_timeout_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="idle session timeout"):
        EmbeddedRuntime(_detector(), idle_timeout_s=0)


def test_decision_json_is_tagged_and_stable() -> None:
    fleet = simulate_fleet(10, 3)
    runtime = EmbeddedRuntime(_detector())
    truth = fleet.ground_truth()

    lines = [decision_to_json(d) for s in fleet.spans() for d in runtime.feed(s)]
    records = [orjson.loads(line) for line in lines]

    assert all(line.endswith(b"\n") for line in lines)
    assert {record["type"] for record in records} <= {"kill", "alert"}
    recursion = next(sid for sid, kind in truth.items() if kind == RECURSION)
    assert {
        "type": "kill",
        "target": recursion,
        "reason": "recursion_depth",
    }.items() <= (
        next(r for r in records if r.get("reason") == "recursion_depth").items()
    )
    healthy = {sid for sid, kind in truth.items() if kind == HEALTHY}
    assert not [
        r for r in records if r["type"] == "kill" and r["scope"] == "session"
        and r["target"] in healthy
    ]  # fmt: skip
