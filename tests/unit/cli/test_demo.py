"""Tests for ``tripwire demo``: the simulated fleet against the detector."""

from __future__ import annotations

from pathlib import Path

import pytest

from tripwire.cli import main
from tripwire.cli.demo import EventLog, LiveView, play
from tripwire.schemas.native import iter_native_lines
from tripwire.streams.core import Detector
from tripwire.streams.embedded import EmbeddedRuntime
from tripwire.streams.policy import Policy
from tripwire.streams.pricing import PriceBook
from tripwire.streams.simulate import Scoreboard, simulate_fleet


def _play(sessions: int, seed: int) -> Scoreboard:
    policy = Policy.from_env({})
    prices = PriceBook.load()
    fleet = simulate_fleet(
        sessions,
        seed,
        session_token_budget=policy.token_budget,
        user_daily_tokens=policy.user_daily_tokens,
    )
    board = Scoreboard(fleet, lambda span: prices.cost(span).cost_usd)
    play(fleet, EmbeddedRuntime(Detector(policy, prices)), board)
    return board


@pytest.mark.parametrize(
    ("sessions", "seed"), [(40, 1), (40, 2), (40, 7), (40, 11), (12, 5), (80, 3)]
)
def test_every_runaway_is_caught_and_no_healthy_session_killed(
    sessions: int, seed: int
) -> None:
    report = _play(sessions, seed).report()

    assert report.caught
    assert not report.missed, [s.session.session_id for s in report.missed]
    assert not report.false_kills, [s.kill_reason for s in report.false_kills]
    assert report.passed


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
    assert "KILL" in out
    assert "Ground truth vs Tripwire" in out
    assert "PASS: every runaway session caught" in out


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


def test_live_view_renders_the_board_within_the_height() -> None:
    board = _play(40, 7)
    view = LiveView(board, open("/dev/null", "w"))  # noqa: SIM115

    lines = view.render(30)

    assert len(lines) <= 30
    assert lines[0].startswith("Tripwire demo: Simulating 40 agent sessions")
    assert any("[caught]" in line for line in lines)
    assert any(line.startswith("healthy sessions:") for line in lines)
    view.stream.close()


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
    assert len(lines) == 1 + view.kills + view.alerts
    assert all(" KILL " in line or " ALERT " in line for line in lines[1:])
