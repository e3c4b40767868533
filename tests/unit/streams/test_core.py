"""Detector: duplicates, idempotent decisions, usage, user days, depth, round trips."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from tripwire.schemas.events import (
    Alert,
    KillCommand,
    Scope,
    SpanEvent,
    SpanKind,
    ToolStatus,
    decision_id,
)
from tripwire.streams.core import Decision, Detector, Usage
from tripwire.streams.embedder import TextEmbedder
from tripwire.streams.policy import Policy
from tripwire.streams.pricing import PriceBook
from tripwire.streams.state import SessionState, UserDayState

START = 1_750_000_000.0  # 2025-06-15T15:06:40Z
PAIRS = Path(__file__).parent / "data" / "loop_pairs.jsonl"


def span(index: int, kind: SpanKind = SpanKind.LLM, **fields: Any) -> SpanEvent:
    values: dict[str, Any] = {
        "span_id": f"{index:016x}",
        "trace_id": "trace-1",
        "session_id": "sess-1",
        "kind": kind,
        "start_time": START + index - 0.5,
        "end_time": START + index,
        "user_id": "user-1",
        "agent_name": "researcher",
    }
    if kind is SpanKind.LLM:
        values |= {"model": "gpt-4o", "input_tokens": 1000, "output_tokens": 100}
    values |= fields
    return SpanEvent(**values)


def detector(**settings: Any) -> Detector:
    return Detector(Policy().with_overrides(**settings), PriceBook.load())


def feed(
    detector: Detector, spans: list[SpanEvent], state: SessionState | None = None
) -> tuple[SessionState, list[Decision]]:
    decisions: list[Decision] = []
    for item in spans:
        state, outcome = detector.observe_span(state, item)
        decisions.extend(outcome.decisions)
    assert state is not None
    return state, decisions


def _runaway(count: int = 60) -> list[SpanEvent]:
    """A session that loops, fails tools, recurses and overspends."""
    spans = []
    for index in range(1, count + 1):
        if index % 3 == 0:
            spans.append(
                span(
                    index,
                    SpanKind.TOOL,
                    tool_name="search",
                    tool_args_hash="same" if index > 30 else f"q{index}",
                    tool_status=ToolStatus.ERROR if index % 2 else ToolStatus.OK,
                )
            )
        elif index % 7 == 0:
            spans.append(span(index, SpanKind.AGENT, depth=index // 7))
        else:
            text = (
                "Searching the quarterly report again for the Q3 revenue figure."
                if index > 20
                else f"Step {index}: reading section {index} of the {index}th file."
            )
            spans.append(span(index, input_tokens=20_000 * index, output_text=text))
    return spans


def test_duplicate_span_changes_nothing() -> None:
    core = detector()
    state, _ = feed(core, [span(1), span(2, SpanKind.TOOL, tool_name="t")])
    before = state.encode()

    state, outcome = core.observe_span(state, span(1, input_tokens=999_999))

    assert outcome.duplicate
    assert (outcome.decisions, outcome.usage, outcome.cost) == ([], None, None)
    assert state.encode() == before


def test_kill_is_issued_once_per_session_and_reason() -> None:
    core = detector(step_budget=2, session_budget_usd=0.01)
    spans = [span(index) for index in range(1, 11)]

    state, decisions = feed(core, spans)

    kills = [d for d in decisions if isinstance(d, KillCommand)]
    # Both trip on the third call, in rule order.
    assert [k.reason for k in kills] == ["step_budget", "session_cost_budget"]
    assert (
        kills[0].command_id
        == KillCommand.create(
            Scope.SESSION, "sess-1", "step_budget", "", 0.0
        ).command_id
    )
    assert kills[1].command_id == decision_id(
        "kill", Scope.SESSION, "sess-1", "session_cost_budget"
    )
    assert kills[0].issued_at == START + 3
    assert kills[0].session_id == "sess-1"
    assert kills[0].user_id == "user-1"
    assert kills[0].agent_name == "researcher"
    # The killed session is still tracked: all ten calls are counted.
    assert state.llm_calls == 10
    assert state.cost_usd == pytest.approx(10 * (1000 * 2.5 + 100 * 10) / 1e6)


def test_alerts_fire_once_per_session_and_rule() -> None:
    core = detector(step_budget=1, step_budget_action="alert")

    _, decisions = feed(core, [span(index) for index in range(1, 6)])

    assert len(decisions) == 1
    alert = decisions[0]
    assert isinstance(alert, Alert)
    assert alert.rule == "step_budget"
    assert alert.severity == "critical"
    assert alert.alert_id == decision_id(
        "alert", Scope.SESSION, "sess-1", "step_budget/"
    )


def test_decisions_survive_a_restart_without_repeating() -> None:
    core = detector(step_budget=2)
    state, first = feed(core, [span(index) for index in range(1, 5)])

    restored = SessionState.decode(state.encode())
    _, again = feed(detector(step_budget=2), [span(5), span(6)], restored)

    assert [d.reason for d in first if isinstance(d, KillCommand)] == ["step_budget"]
    assert again == []


def test_round_trip_mid_stream_preserves_behaviour() -> None:
    spans = _runaway()
    _, straight = feed(detector(), spans)

    for cut in (1, 7, 21, 33, 45, 59):
        core = detector()
        state, before = feed(core, spans[:cut])
        restored = SessionState.decode(state.encode())
        after_state, after = feed(core, spans[cut:], restored)
        assert [d.to_json() for d in before + after] == [
            d.to_json() for d in straight
        ], cut
        assert after_state.encode() == feed(detector(), spans)[0].encode()


def test_runaway_session_trips_many_rules_deterministically() -> None:
    spans = _runaway()

    _, first = feed(detector(), spans)
    _, second = feed(detector(), spans)

    reasons = {d.reason if isinstance(d, KillCommand) else d.rule for d in first}
    assert {
        "session_cost_budget",
        "burn_rate",
        "loop_similarity",
        "loop_repeat_tool",
        "recursion_depth",
        "tool_error_rate",
    } <= reasons
    assert [d.to_json() for d in first] == [d.to_json() for d in second]


def test_unknown_model_is_priced_zero_counted_and_alerted_once() -> None:
    core = detector()

    _, decisions = feed(core, [span(i, model="mystery-70b") for i in range(1, 4)])

    assert core.prices.unknown_models == {"mystery-70b": 3}
    assert len(decisions) == 1
    alert = decisions[0]
    assert isinstance(alert, Alert)
    assert (alert.rule, alert.severity) == ("unknown_model", "info")
    assert alert.evidence["model"] == "mystery-70b"


def test_span_outcome_reports_cost_and_usage() -> None:
    core = detector()

    _, outcome = core.observe_span(None, span(1, cache_read_tokens=400))

    assert outcome.cost is not None
    # 600 * 2.5 + 400 * 1.25 + 100 * 10 = 3000 per million.
    assert outcome.cost.cost_usd == pytest.approx(0.003)
    assert outcome.usage == Usage(
        user_id="user-1",
        day="2025-06-15",
        session_id="sess-1",
        agent_name="researcher",
        tokens=1100,
        cost_usd=pytest.approx(0.003),
        at=START + 1,
        span_id=f"{1:016x}",
    )


@pytest.mark.parametrize(
    "item",
    [
        span(1, user_id=None),
        span(2, SpanKind.TOOL, tool_name="search"),
        span(3, input_tokens=0, output_tokens=0),
    ],
)
def test_no_usage_without_a_user_or_anything_used(item: SpanEvent) -> None:
    _, outcome = detector().observe_span(None, item)

    assert outcome.usage is None


def test_usage_day_is_the_utc_date_of_the_end_time() -> None:
    core = detector()
    late = span(1, end_time=1_749_945_599.5)  # 2025-06-14T23:59:59.5Z
    early = span(2, end_time=1_749_945_600.0)  # 2025-06-15T00:00:00Z

    _, first = core.observe_span(None, late)
    _, second = core.observe_span(None, early)

    assert first.usage is not None
    assert second.usage is not None
    assert (first.usage.day, second.usage.day) == ("2025-06-14", "2025-06-15")


def _usage(day: str, tokens: int, span_id: str | None, at: float = START) -> Usage:
    return Usage("user-1", day, "sess-1", "researcher", tokens, 0.0, at, span_id)


def test_user_day_rolls_over_and_ignores_late_and_repeated_records() -> None:
    core = detector(user_daily_tokens=100)

    state, first = core.observe_usage(None, _usage("2025-06-15", 80, "a"))
    state, repeated = core.observe_usage(state, _usage("2025-06-15", 80, "a"))
    state, over = core.observe_usage(state, _usage("2025-06-15", 30, "b"))
    state, again = core.observe_usage(state, _usage("2025-06-15", 30, "c"))
    state, late = core.observe_usage(state, _usage("2025-06-14", 500, "d"))
    assert state.tokens == 140
    next_day, next_over = core.observe_usage(
        state, _usage("2025-06-16", 101, "e", at=START + 86_400)
    )

    assert (first, repeated, again, late) == ([], [], [], [])
    assert next_day.day == "2025-06-16"
    assert next_day.tokens == 101
    kill = over[0]
    assert isinstance(kill, KillCommand)
    assert (kill.scope, kill.target, kill.reason) == (
        Scope.USER,
        "user-1",
        "user_daily_tokens",
    )
    assert kill.command_id == decision_id(
        "kill", Scope.USER, "user-1", "user_daily_tokens/2025-06-15"
    )
    next_kill = next_over[0]
    assert isinstance(next_kill, KillCommand)
    assert next_kill.command_id != kill.command_id
    # The user stays stopped until the end of the UTC day: 08:53:20 left.
    assert kill.ttl_seconds == 86_400 - (START % 86_400)


def test_user_day_state_round_trip_keeps_decisions_idempotent() -> None:
    core = detector(user_daily_tokens=100)
    state, over = core.observe_usage(None, _usage("2025-06-15", 150, "a"))

    restored = UserDayState.decode(state.encode())
    _, again = core.observe_usage(restored, _usage("2025-06-15", 50, "b"))

    assert len(over) == 1
    assert again == []


def test_per_agent_policy_applies_to_that_agent_only(tmp_path: Any) -> None:
    path = tmp_path / "policy.toml"
    path.write_text("[agents.triage]\nstep_budget = 2\n")
    core = Detector(Policy.from_env({}, toml_path=path), PriceBook.load())
    triage = [span(i, agent_name="triage", session_id="t") for i in range(1, 4)]
    research = [span(i, session_id="r") for i in range(1, 4)]

    _, triage_decisions = feed(core, triage)
    _, research_decisions = feed(core, research)

    assert [d.reason for d in triage_decisions if isinstance(d, KillCommand)] == [
        "step_budget"
    ]
    assert research_decisions == []


def _agent(index: int, parent: int | None) -> SpanEvent:
    return span(
        index,
        SpanKind.AGENT,
        parent_span_id=f"{parent:016x}" if parent else None,
    )


def test_depth_from_parent_chains_children_first() -> None:
    # Agents 1 > 2 > 3 > 4 > 5 > 6 > 7 end (and arrive) deepest first.
    chain = [_agent(index, index - 1 if index > 1 else None) for index in range(1, 8)]

    state, decisions = feed(detector(max_depth=5), list(reversed(chain)))

    assert state.depth == 6
    kills = [d for d in decisions if isinstance(d, KillCommand)]
    assert [k.reason for k in kills] == ["recursion_depth"]
    assert kills[0].evidence == {"depth": 6, "threshold": 5}


def test_depth_from_parent_chains_parents_first() -> None:
    chain = [_agent(index, index - 1 if index > 1 else None) for index in range(1, 5)]

    state, _ = feed(detector(), chain)

    assert state.depth == 3


def test_depth_chain_bridges_a_tool_call_that_invokes_an_agent() -> None:
    # Agent 1 calls tool 2, which runs agent 3; agent 3 calls agent 4.
    spans = [
        _agent(4, 3),
        _agent(3, 2),
        span(2, SpanKind.TOOL, tool_name="delegate", parent_span_id=f"{1:016x}"),
        _agent(1, None),
    ]

    state, _ = feed(detector(), spans)

    assert state.depth == 2


def test_given_depth_wins_over_chains() -> None:
    state, _ = feed(detector(), [span(1, SpanKind.AGENT, depth=4)])

    assert state.depth == 4
    assert state.links == bytearray()


def test_burn_rate_window_slides_in_event_time() -> None:
    core = detector(session_budget_usd=100.0, burn_rate_usd=0.5)
    # 0.2 every 30 s: at most 0.4 within any 60 s window.
    slow = [span(i, end_time=START + 30 * i, cost_usd=0.2) for i in range(1, 9)]

    state, decisions = feed(core, slow)

    assert decisions == []
    assert state.cost_usd == pytest.approx(1.6)
    assert len(state.burn) <= 2 * 6


def test_late_span_outside_the_window_counts_in_the_total_only() -> None:
    core = detector(session_budget_usd=100.0, burn_rate_usd=0.5)
    spans = [
        span(1, end_time=START + 300, cost_usd=0.3),
        span(2, end_time=START, cost_usd=0.3),
    ]

    state, decisions = feed(core, spans)

    assert decisions == []
    assert state.cost_usd == pytest.approx(0.6)
    assert state.first_at == START + 0.5
    assert state.last_at == START + 300


def test_embeddings_carried_on_spans_feed_the_loop_signal() -> None:
    rng = np.random.default_rng(5)
    base = rng.normal(size=1536)
    core = detector()
    spans = []
    for index in range(1, 6):
        noise = rng.normal(size=1536) * 0.15
        spans.append(span(index, embedding=(base + noise).tolist()))

    _, decisions = feed(core, spans)

    loop = [d for d in decisions if isinstance(d, KillCommand)]
    assert [k.reason for k in loop] == ["loop_similarity"]
    assert loop[0].evidence["source"] == "span_embedding"
    assert all(score > 0.92 for score in loop[0].evidence["scores"])


def test_unrelated_carried_embeddings_do_not_loop() -> None:
    rng = np.random.default_rng(6)
    spans = [span(i, embedding=rng.normal(size=768).tolist()) for i in range(1, 9)]

    _, decisions = feed(detector(), spans)

    assert decisions == []


def _run_sessions(spans: list[SpanEvent]) -> tuple[list[bytes], list[bytes]]:
    """Feed spans of many sessions; return the decisions and final states."""
    core = detector()
    states: dict[str, SessionState] = {}
    users: dict[tuple[str, str], UserDayState] = {}
    decisions: list[bytes] = []
    for item in spans:
        state, outcome = core.observe_span(states.get(item.session_id), item)
        states[item.session_id] = state
        decisions.extend(d.to_json() for d in outcome.decisions)
        if outcome.usage is not None:
            key = (outcome.usage.user_id, outcome.usage.day)
            users[key], more = core.observe_usage(users.get(key), outcome.usage)
            decisions.extend(d.to_json() for d in more)
    return decisions, [states[key].encode() for key in sorted(states)]


def _pair_sessions() -> list[SpanEvent]:
    """One session per labelled pair: its two outputs in turn, between tool calls."""
    sessions = []
    for number, line in enumerate(PAIRS.read_bytes().splitlines()):
        pair = orjson.loads(line)
        sessions.append(
            [
                span(
                    100 * number + step,
                    SpanKind.LLM if step % 2 else SpanKind.TOOL,
                    session_id=f"pair-{number}",
                    tool_name="search",
                    output_text=pair["ab"[step // 2 % 2]] if step % 2 else None,
                )
                for step in range(1, 13)
            ]
        )
    # Interleave the sessions, as a topic partition would.
    return [item for group in zip(*sessions, strict=True) for item in group]


def test_output_codes_give_the_decisions_their_texts_give() -> None:
    spans = _pair_sessions() + _runaway()
    embedder = TextEmbedder()
    coded = [
        replace(
            item, output_text=None, output_code=embedder.wire_code(item.output_text)
        )
        if item.output_text
        else item
        for item in spans
    ]
    assert sum(item.output_code is not None for item in coded) > 300

    with_text, text_states = _run_sessions(spans)
    with_codes, code_states = _run_sessions(coded)

    assert with_codes == with_text
    assert code_states == text_states
    assert sum(b'"loop_similarity"' in decision for decision in with_text) >= 3


def test_output_text_wins_over_a_carried_code() -> None:
    embedder = TextEmbedder()
    other = embedder.wire_code("An unrelated answer about invoices and their totals.")
    text = "Searching the quarterly report again for the Q3 revenue figure."
    spans = [span(i, output_text=text, output_code=other) for i in range(1, 5)]

    _, decisions = feed(detector(), spans)

    assert [d.reason for d in decisions if isinstance(d, KillCommand)] == [
        "loop_similarity"
    ]


def test_malformed_code_on_an_in_process_span_is_ignored() -> None:
    spans = [span(i, output_code="t1:broken") for i in range(1, 6)]

    state, decisions = feed(detector(), spans)

    assert decisions == []
    assert state.outputs == bytearray()
    assert state.llm_calls == 5


def test_state_is_updated_in_place_and_returned() -> None:
    core = detector()
    state = SessionState()

    returned, _ = core.observe_span(state, span(1))

    assert returned is state
    assert state.llm_calls == 1


def test_spans_of_another_user_keep_the_first_user() -> None:
    core = detector()
    state, _ = feed(core, [span(1), replace(span(2), user_id="user-2")])

    assert state.user_id == "user-1"
