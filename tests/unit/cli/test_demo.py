"""Tests for ``tripwire demo``: the simulated fleet against the detector."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import IO

import pytest

from tripwire.cli import main
from tripwire.cli.demo import EventLog, LiveView, play, played_duration
from tripwire.schemas.native import iter_native_lines
from tripwire.streams.core import Detector
from tripwire.streams.embedded import EmbeddedRuntime
from tripwire.streams.policy import Policy
from tripwire.streams.pricing import PriceBook
from tripwire.streams.simulate import (
    BUDGET,
    HEALTHY,
    LOOP,
    LOOP_CYCLE,
    LOOP_TEXT,
    RECURSION,
    USER_CAP,
    Scoreboard,
    simulate_fleet,
)


def _board(sessions: int, seed: int) -> tuple[Scoreboard, EmbeddedRuntime]:
    policy = Policy.from_env({})
    prices = PriceBook.load()
    fleet = simulate_fleet(
        sessions,
        seed,
        session_token_budget=policy.token_budget,
        user_daily_tokens=policy.user_daily_tokens,
    )
    board = Scoreboard(fleet, lambda span: prices.cost(span).cost_usd)
    return board, EmbeddedRuntime(Detector(policy, prices))


def _play(sessions: int, seed: int) -> Scoreboard:
    board, runtime = _board(sessions, seed)
    play(board.fleet, runtime, board)
    return board


def _play_live(sessions: int, seed: int, stream: IO[str]) -> LiveView:
    board, runtime = _board(sessions, seed)
    view = LiveView(board, stream, "Policy: the defaults")
    play(board.fleet, runtime, board, view)
    return view


@pytest.mark.parametrize(
    ("sessions", "seed"),
    [
        (6, 4),
        (12, 5),
        (33, 11),
        (40, 2),
        (60, 9),
        (80, 1),
        (80, 7),
        (137, 17),
        (200, 3),
    ],
)
def test_every_runaway_is_caught_and_no_healthy_session_killed_or_alerted(
    sessions: int, seed: int
) -> None:
    report = _play(sessions, seed).report()

    assert report.caught
    assert not report.missed, [s.session.session_id for s in report.missed]
    assert not report.false_kills, [s.kill_reason for s in report.false_kills]
    assert not report.false_alerts, [s.alerts for s in report.false_alerts]
    assert report.passed


def _first_kills(board: Scoreboard, kind: str) -> list[str | None]:
    return [s.kill_reason for s in board.scores.values() if s.session.expected == kind]


@pytest.mark.parametrize("seed", [1, 7, 12])
def test_each_runaway_kind_is_caught_by_its_own_rule(seed: int) -> None:
    board = _play(80, seed)

    assert set(_first_kills(board, LOOP)) == {"loop_repeat_tool"}
    assert set(_first_kills(board, LOOP_TEXT)) == {"loop_similarity"}
    assert set(_first_kills(board, RECURSION)) == {"recursion_depth"}
    assert set(_first_kills(board, BUDGET)) <= {
        "token_budget",
        "session_cost_budget",
        "burn_rate",
    }
    board.report()
    batch = [s for s in board.scores.values() if s.session.expected == USER_CAP]
    assert {s.user_kill_reason for s in batch} == {"user_daily_tokens"}


@pytest.mark.parametrize("seed", [1, 7, 12])
def test_tool_cycle_is_alerted_first_and_killed_later_by_a_budget(
    seed: int,
) -> None:
    board = _play(80, seed)
    cycling = [s for s in board.scores.values() if s.session.expected == LOOP_CYCLE]

    assert cycling
    for score in cycling:
        assert score.alerts == ["loop_tool_cycle"]
        # Mostly the step budget; a cycle on an expensive model may burn its
        # token or cost budget first.
        assert score.kill_reason in {
            "step_budget",
            "token_budget",
            "session_cost_budget",
            "burn_rate",
        }
        assert score.alerted_at_step is not None
        assert score.killed_at_step is not None
        assert score.alerted_at_step < score.killed_at_step


def test_killing_on_the_tool_cycle_stops_cycling_sessions_at_the_alert() -> None:
    policy = Policy.from_env({}).with_overrides(loop_tool_cycle_action="kill")
    prices = PriceBook.load()
    fleet = simulate_fleet(80, 7)
    board = Scoreboard(fleet, lambda span: prices.cost(span).cost_usd)
    play(fleet, EmbeddedRuntime(Detector(policy, prices)), board)

    cycling = [s for s in board.scores.values() if s.session.expected == LOOP_CYCLE]
    assert {s.kill_reason for s in cycling} == {"loop_tool_cycle"}
    assert all(s.killed_at_step is not None for s in cycling)
    assert max(s.killed_at_step or 0 for s in cycling) < 30
    assert board.report().passed


def test_killed_runaways_stop_early_and_save_money() -> None:
    board = _play(40, 7)

    killed = [s for s in board.scores.values() if s.session.runaway and s.killed]
    assert killed
    assert all(s.steps_run < s.full_steps for s in killed)
    assert sum(s.saved_usd for s in killed) > 0.5 * sum(s.full_cost_usd for s in killed)


def test_demo_command_passes_and_prints_the_summary(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["demo", "--no-live", "--sessions", "20", "--seed", "4"])

    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("Simulating 20 agent sessions (seed 4)")
    assert "\nGround truth: 15 healthy, 1 loop, 1 loop_text, " in out
    assert "\nPolicy: the defaults" in out
    assert "KILL" in out
    assert "Ground truth vs Tripwire" in out
    assert "PASS: every runaway session caught" in out


def test_demo_default_fleet_is_mostly_healthy_with_one_batch_user(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["demo", "--no-live"])

    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith("Simulating 80 agent sessions (seed 7)")
    assert "Ground truth: 52 healthy, 3 loop, 3 loop_text, 2 loop_cycle" in out
    assert "11 user_cap (one user's batch)" in out
    assert "loop_similarity" in out
    assert "loop_tool_cycle" in out
    assert "healthy sessions: 52; 0 killed, 0 alerted" in out


def test_demo_header_names_every_changed_setting(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["--no-live", "--sessions", "10", "--seed", "3"]
    main(["demo", *args, "--set", "step_budget=30", "--set", "burn_rate_action=alert"])

    out = capsys.readouterr().out.splitlines()
    assert out[2] == (
        "Policy: the defaults, except step_budget=30 (default 25); "
        "burn_rate_action=alert (default kill)"
    )


def test_demo_reports_alerts_on_healthy_sessions(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["--no-live", "--sessions", "20", "--seed", "4"]
    main(["demo", *args, "--set", "step_budget=2", "--set", "step_budget_action=alert"])

    out = capsys.readouterr().out
    false_alerts = [line for line in out.splitlines() if "FALSE ALERT " in line]
    assert false_alerts
    assert all("step_budget at step" in line for line in false_alerts)
    assert f"healthy sessions: 15; 0 killed, {len(false_alerts)} alerted" in out


def test_demo_fails_when_a_rule_is_switched_off(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["--no-live", "--sessions", "10", "--seed", "3"]
    code = main(["demo", *args, "--set", "recursion_depth_action=off"])

    out = capsys.readouterr().out
    assert code == 1
    assert "MISSED" in out
    assert "FAIL: 1 runaway session(s) missed" in out


def test_demo_is_deterministic(capsys: pytest.CaptureFixture[str]) -> None:
    main(["demo", "--no-live", "--sessions", "15", "--seed", "9"])
    first = capsys.readouterr().out
    main(["demo", "--no-live", "--sessions", "15", "--seed", "9"])

    assert capsys.readouterr().out == first


def test_record_writes_the_full_run_for_replay(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "fleet.jsonl"

    main(["demo", "--no-live", "--sessions", "8", "--seed", "2", "--record", str(path)])
    capsys.readouterr()

    with path.open("rb") as handle:
        spans = list(iter_native_lines(handle))
    assert len(spans) == simulate_fleet(8, 2).span_count
    assert all(not isinstance(span, Exception) for span in spans)


def test_too_few_sessions_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--no-live", "--sessions", "2"]) == 1

    assert "--sessions 6" in capsys.readouterr().err


@pytest.mark.parametrize(("height", "width"), [(30, 140), (22, 80), (60, 100)])
def test_live_view_renders_the_board_within_the_terminal(
    height: int, width: int
) -> None:
    with open("/dev/null", "w") as stream:
        view = _play_live(80, 7, stream)

        lines = view.render(height, width)

    assert len(lines) <= height
    assert lines[0].startswith("Tripwire demo. Simulating 80 agent sessions")
    assert all(len(line) < width for line in lines[:4])
    assert any(line.endswith("Policy: the defaults") for line in lines)
    assert any(" caught " in line for line in lines)
    assert ("AGENT" in lines[lines.index("") + 1]) == (width >= 130)
    runaway_rows = [line for line in lines if line.startswith("sess-")]
    if height < 40:
        assert any(line.startswith("... ") for line in lines)
    else:
        assert len(runaway_rows) == 17
    assert any(line.startswith("healthy sessions: 52") for line in lines)


def test_event_log_prints_one_line_per_decision(tmp_path: Path) -> None:
    policy = Policy.from_env({})
    prices = PriceBook.load()
    fleet = simulate_fleet(10, 3)
    board = Scoreboard(fleet, lambda span: prices.cost(span).cost_usd)
    path = tmp_path / "log.txt"

    with path.open("w") as stream:
        view = EventLog(board, stream)
        view.start()
        play(fleet, EmbeddedRuntime(Detector(policy, prices)), board, view)

    lines = path.read_text().splitlines()
    assert len(lines) == 2 + view.kills + view.alerts
    assert lines[1].startswith("Ground truth: ")
    assert all(" KILL " in line or " ALERT " in line for line in lines[2:])


def test_live_pacing_follows_the_sessions_that_run_to_the_end() -> None:
    fleet = simulate_fleet(80, 7)
    origin = min(span.start_time for s in fleet.sessions for span in s.spans)
    healthy_end = max(
        span.end_time
        for session in fleet.sessions
        if session.expected == HEALTHY
        for span in session.spans
    )

    played = played_duration(fleet)

    assert healthy_end - origin <= played < fleet.duration_s / 2


class _ClosedPipe:
    """A stdout whose reader has gone, as ``tripwire demo | head`` leaves it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.fd


def test_a_closed_pipe_ends_the_demo_with_code_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with (tmp_path / "stdout").open("w") as sink:
        monkeypatch.setattr(sys, "stdout", _ClosedPipe(sink.fileno()))

        code = main(["demo", "--no-live", "--sessions", "8"])

    assert code == 1
