"""Tests for the fleet simulator and its scoreboard."""

from __future__ import annotations

from collections import Counter

import pytest

from tripwire.errors import ConfigError
from tripwire.schemas.events import Alert, KillCommand, Scope, SpanKind, ToolStatus
from tripwire.schemas.native import decode_native, encode_native
from tripwire.streams.simulate import (
    BUDGET,
    DEFAULT_SESSIONS,
    HEALTHY,
    LOOP,
    LOOP_CYCLE,
    LOOP_TEXT,
    RECURSION,
    RUNAWAY_KINDS,
    TOOL_FAILURES,
    USER_CAP,
    Scoreboard,
    SimulatedSession,
    simulate_fleet,
)


def _kill(session_id: str, at: float = 0.0) -> KillCommand:
    return KillCommand.create(
        Scope.SESSION, session_id, "step_budget", "test", at, session_id=session_id
    )


def test_same_seed_gives_the_same_spans() -> None:
    first = [encode_native(s, include_text=True) for s in simulate_fleet(20, 5).spans()]
    again = [encode_native(s, include_text=True) for s in simulate_fleet(20, 5).spans()]

    assert first == again


def test_other_seed_gives_other_spans() -> None:
    first = [span.span_id for span in simulate_fleet(20, 5).spans()]
    other = [span.span_id for span in simulate_fleet(20, 6).spans()]

    assert first != other


@pytest.mark.parametrize("seed", [1, 7, 13])
def test_default_fleet_deals_every_runaway_kind_and_is_mostly_healthy(
    seed: int,
) -> None:
    fleet = simulate_fleet(seed=seed)
    kinds = Counter(session.expected for session in fleet.sessions)

    assert len(fleet.sessions) == DEFAULT_SESSIONS
    assert set(RUNAWAY_KINDS) <= set(kinds)
    assert kinds[RECURSION] == 1
    assert kinds[HEALTHY] >= 0.6 * len(fleet.sessions)


@pytest.mark.parametrize("sessions", [10, 20, 40, 59, 60, 100, 200])
def test_healthy_sessions_are_the_majority_at_every_size(sessions: int) -> None:
    kinds = Counter(s.expected for s in simulate_fleet(sessions, 2).sessions)

    assert kinds[HEALTHY] >= 0.6 * sessions


def test_loops_are_dealt_in_turn_among_their_kinds() -> None:
    one = Counter(s.expected for s in simulate_fleet(8, 1).sessions)
    two = Counter(s.expected for s in simulate_fleet(20, 1).sessions)
    eight = Counter(s.expected for s in simulate_fleet(80, 1).sessions)

    assert (one[LOOP], one[LOOP_TEXT], one[LOOP_CYCLE]) == (1, 0, 0)
    assert (two[LOOP], two[LOOP_TEXT], two[LOOP_CYCLE]) == (1, 1, 0)
    assert (eight[LOOP], eight[LOOP_TEXT], eight[LOOP_CYCLE]) == (3, 3, 2)


def test_smaller_fleet_leaves_out_the_batch_user() -> None:
    kinds = {session.expected for session in simulate_fleet(40, 1).sessions}

    assert USER_CAP not in kinds
    assert {LOOP, BUDGET, TOOL_FAILURES, RECURSION} <= kinds


def test_spans_come_in_event_time_order() -> None:
    ends = [span.end_time for span in simulate_fleet(30, 2).spans()]

    assert ends == sorted(ends)


def test_every_span_survives_the_native_codec() -> None:
    for span in simulate_fleet(20, 3).spans():
        decoded = decode_native(encode_native(span, include_text=True))
        assert decoded == span


def test_spans_carry_realistic_models_and_cached_input() -> None:
    llm = [s for s in simulate_fleet(40, 4).spans() if s.kind is SpanKind.LLM]
    models = {span.model for span in llm}

    assert "claude-sonnet-4-5-20250929" in models or "gpt-4o-mini" in models
    assert any(span.cache_read_tokens > 0 for span in llm)
    assert all(
        span.cache_read_tokens + span.cache_creation_tokens <= span.input_tokens
        for span in llm
    )
    assert all(span.output_text for span in llm)


def test_healthy_sessions_stay_small_and_runaways_run_long() -> None:
    fleet = simulate_fleet(40, 9)
    healthy = [s for s in fleet.sessions if s.expected == HEALTHY]
    looping = [s for s in fleet.sessions if s.expected == LOOP]

    assert max(session.steps for session in healthy) <= 15
    assert min(session.steps for session in looping) >= 60


def test_recursive_session_nests_deep_within_the_step_budget() -> None:
    fleet = simulate_fleet(10, 2)
    session = next(s for s in fleet.sessions if s.expected == RECURSION)
    llm_calls = sum(span.kind is SpanKind.LLM for span in session.spans)

    assert max(span.depth or 0 for span in session.spans) >= 10
    assert llm_calls <= 18


def _tool_calls(session: SimulatedSession) -> list[tuple[str | None, str | None]]:
    return [
        (span.tool_name, span.tool_args_hash)
        for span in session.spans
        if span.kind is SpanKind.TOOL
    ]


def test_text_loop_never_repeats_a_tool_call_but_rewords_one_thought() -> None:
    fleet = simulate_fleet(80, 4)
    looping = [s for s in fleet.sessions if s.expected == LOOP_TEXT]

    assert looping
    for session in looping:
        calls = _tool_calls(session)
        texts = [s.output_text for s in session.spans if s.kind is SpanKind.LLM]
        assert len(calls) >= 40
        assert len(set(calls)) == len(calls)
        # The last 40 answers before the final one: a handful of rewordings.
        stuck = texts[-41:-1]
        assert len(set(stuck)) <= 6
        assert all(text and "search" in text.lower() for text in stuck)


def test_cycle_loop_goes_round_three_tool_calls() -> None:
    fleet = simulate_fleet(80, 4)
    cycling = [s for s in fleet.sessions if s.expected == LOOP_CYCLE]

    assert cycling
    for session in cycling:
        tail = _tool_calls(session)[-30:]
        assert len(set(tail)) == 3
        assert all(tail[i] == tail[i + 3] for i in range(len(tail) - 3))


def test_failing_tools_session_mostly_fails() -> None:
    fleet = simulate_fleet(10, 2)
    session = next(s for s in fleet.sessions if s.expected == TOOL_FAILURES)
    tools = [span for span in session.spans if span.kind is SpanKind.TOOL]

    assert sum(span.tool_status is ToolStatus.ERROR for span in tools) >= 30


def test_batch_user_sessions_each_stay_under_the_token_budget_but_not_together() -> (
    None
):
    fleet = simulate_fleet(
        80, 3, session_token_budget=500_000, user_daily_tokens=5_000_000
    )
    batch = [s for s in fleet.sessions if s.expected == USER_CAP]
    tokens = [sum(x.input_tokens + x.output_tokens for x in s.spans) for s in batch]

    assert len({session.user_id for session in batch}) == 1
    assert max(tokens) < 500_000
    assert sum(tokens) > 5_000_000
    # Few and heavy: 11 sessions is the least that can pass the cap.
    assert len(batch) == 11


def test_batch_follows_a_lower_daily_cap() -> None:
    fleet = simulate_fleet(
        40, 3, session_token_budget=500_000, user_daily_tokens=1_500_000
    )
    batch = [s for s in fleet.sessions if s.expected == USER_CAP]
    tokens = [sum(x.input_tokens + x.output_tokens for x in s.spans) for s in batch]

    assert len(batch) == 4
    assert sum(tokens) > 1_500_000


def test_too_few_sessions_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="--sessions 6"):
        simulate_fleet(3, 1)


def test_scoreboard_stops_a_killed_session_and_counts_the_savings() -> None:
    fleet = simulate_fleet(10, 2)
    loop = next(s for s in fleet.sessions if s.expected == LOOP)
    board = Scoreboard(fleet, lambda span: 0.01 if span.kind is SpanKind.LLM else 0.0)

    for span in loop.spans[:6]:
        assert board.runs(span)
        board.ran(span)
    changed = board.decide(_kill(loop.session_id))

    score = board.scores[loop.session_id]
    assert changed == [score]
    assert not board.runs(loop.spans[6])
    assert score.killed_at_step == 6
    assert score.saved_usd == pytest.approx(score.full_cost_usd - score.cost_run_usd)
    assert score.saved_usd > 0


def test_scoreboard_report_flags_missed_runaways_and_false_kills() -> None:
    fleet = simulate_fleet(10, 2)
    healthy = next(s for s in fleet.sessions if s.expected == HEALTHY)
    board = Scoreboard(fleet, lambda span: 0.0)
    board.ran(healthy.spans[0])

    board.decide(_kill(healthy.session_id))
    report = board.report()

    assert not report.passed
    assert [s.session.session_id for s in report.false_kills] == [healthy.session_id]
    assert {s.session.expected for s in report.missed} == {
        LOOP,
        BUDGET,
        TOOL_FAILURES,
        RECURSION,
    }


def test_scoreboard_user_kill_stops_the_users_running_and_later_sessions() -> None:
    fleet = simulate_fleet(80, 3)
    batch = [s for s in fleet.sessions if s.expected == USER_CAP]
    board = Scoreboard(fleet, lambda span: 0.0)
    running = batch[0]
    board.ran(running.spans[0])
    user = running.user_id

    changed = board.decide(
        KillCommand.create(Scope.USER, user, "user_daily_tokens", "over", 0.0)
    )
    report = board.report()

    assert [s.session.session_id for s in changed] == [running.session_id]
    assert not board.runs(batch[1].spans[0])
    assert {s.session_id for s in batch} <= {
        s.session.session_id for s in report.caught
    }


def test_scoreboard_records_alerts_once() -> None:
    fleet = simulate_fleet(10, 2)
    session = fleet.sessions[0]
    board = Scoreboard(fleet, lambda span: 0.0)
    alert = Alert.create(
        Scope.SESSION, session.session_id, "tool_error_rate", "warning", "m", 0.0
    )

    board.ran(session.spans[0])
    board.decide(alert)
    board.decide(alert)

    score = board.scores[session.session_id]
    assert score.alerts == ["tool_error_rate"]
    assert score.alerted_at_step == score.steps_run


def test_report_lists_alerted_healthy_sessions_as_false_alerts() -> None:
    fleet = simulate_fleet(10, 2)
    healthy = next(s for s in fleet.sessions if s.expected == HEALTHY)
    board = Scoreboard(fleet, lambda span: 0.0)

    board.decide(
        Alert.create(
            Scope.SESSION, healthy.session_id, "loop_tool_cycle", "warning", "m", 0.0
        )
    )
    report = board.report()

    assert [s.session.session_id for s in report.false_alerts] == [healthy.session_id]
    assert not report.false_kills
