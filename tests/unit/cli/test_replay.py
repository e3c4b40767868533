"""Tests for ``tripwire replay``."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import orjson
import pytest

from tripwire.cli import main
from tripwire.streams.simulate import HEALTHY, RECURSION

DATA = Path(__file__).parents[1] / "data"
FLEET = DATA / "fleet_seed3.jsonl"
TRUTH: dict[str, str] = orjson.loads((DATA / "fleet_seed3.truth.json").read_bytes())


def _replay(tmp_path: Path, *args: str, name: str = "out.jsonl") -> list[dict]:
    out = tmp_path / name
    code = main(["replay", *args, "-o", str(out)])
    assert code == 0
    return [orjson.loads(line) for line in out.read_bytes().splitlines()]


def _summary(capsys: pytest.CaptureFixture[str]) -> dict:
    err = capsys.readouterr().err
    return orjson.loads(err.strip().splitlines()[-1])


def _killed_sessions(decisions: list[dict]) -> dict[str, list[str]]:
    killed: dict[str, list[str]] = {}
    for record in decisions:
        if record["type"] == "kill" and record["scope"] == "session":
            killed.setdefault(record["target"], []).append(record["reason"])
    return killed


def test_two_replays_of_one_file_write_identical_bytes(tmp_path: Path) -> None:
    _replay(tmp_path, str(FLEET), "--quiet", name="a.jsonl")
    _replay(tmp_path, str(FLEET), "--quiet", name="b.jsonl")

    first = (tmp_path / "a.jsonl").read_bytes()
    assert first
    assert first == (tmp_path / "b.jsonl").read_bytes()


def test_recorded_fleet_kills_every_runaway_and_no_healthy_session(
    tmp_path: Path,
) -> None:
    decisions = _replay(tmp_path, str(FLEET), "--quiet")

    killed = _killed_sessions(decisions)
    runaways = {sid for sid, kind in TRUTH.items() if kind != HEALTHY}
    assert set(killed) == runaways
    recursive = next(sid for sid, kind in TRUTH.items() if kind == RECURSION)
    assert killed[recursive][0] == "recursion_depth"
    assert {record["type"] for record in decisions} == {"kill", "alert"}


def test_set_changes_the_verdicts(tmp_path: Path) -> None:
    recursive = next(sid for sid, kind in TRUTH.items() if kind == RECURSION)

    relaxed = _killed_sessions(
        _replay(tmp_path, str(FLEET), "--quiet", "--set", "max_depth=100")
    )
    strict = _killed_sessions(
        _replay(tmp_path, str(FLEET), "--quiet", "--set", "step_budget=4")
    )

    assert recursive not in relaxed
    healthy = {sid for sid, kind in TRUTH.items() if kind == HEALTHY}
    assert healthy & set(strict)
    assert all(strict[sid] == ["step_budget"] for sid in healthy & set(strict))


def test_invalid_lines_are_counted_with_their_line_numbers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = FLEET.read_bytes().splitlines()[:50]
    lines[3] = b"{not json"
    lines[7] = b'{"span_id": "x", "kind": "llm"}'
    spans = tmp_path / "spans.jsonl"
    spans.write_bytes(b"\n".join(lines) + b"\n")

    _replay(tmp_path, str(spans), "--summary", "json")
    summary = _summary(capsys)

    assert summary["invalid"] == 2
    assert summary["spans"] == 48
    reasons = [example["reason"] for example in summary["invalid_examples"]]
    assert reasons[0].startswith("line 4:")
    assert reasons[1].startswith("line 8:")
    assert {e["where"] for e in summary["invalid_examples"]} == {str(spans)}


def test_table_summary_lists_sessions_by_cost_with_totals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _replay(tmp_path, str(FLEET), "--limit", "3")
    err = capsys.readouterr().err.splitlines()

    assert err[0].split()[:4] == ["SESSION", "AGENT", "USER", "COST"]
    assert len(err) == 5
    costs = [float(line.split()[3].replace(",", "")) for line in err[1:4]]
    assert costs == sorted(costs, reverse=True)
    assert err[-1].startswith("total: 10 sessions (top 3 shown), 463 spans")


def test_json_summary_counts_kills_and_sessions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    decisions = _replay(tmp_path, str(FLEET), "--summary", "json", "--limit", "0")
    summary = _summary(capsys)

    assert summary["sessions_total"] == len(TRUTH)
    assert len(summary["sessions"]) == len(TRUTH)
    assert summary["kill_commands"] == sum(r["type"] == "kill" for r in decisions)
    assert summary["alerts"] == sum(r["type"] == "alert" for r in decisions)
    assert summary["unknown_models"] == {}


def test_stdin_is_read_with_a_dash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stdin = io.TextIOWrapper(io.BytesIO(FLEET.read_bytes()))
    monkeypatch.setattr(sys, "stdin", stdin)

    from_stdin = _replay(tmp_path, "-", "--quiet", name="stdin.jsonl")
    from_file = _replay(tmp_path, str(FLEET), "--quiet", name="file.jsonl")

    assert from_stdin == from_file


def test_progress_goes_to_stderr_when_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tripwire.cli.replay._PROGRESS_INTERVAL_S", 0.0)
    monkeypatch.setattr("tripwire.cli.replay._PROGRESS_EVERY_SPANS", 100)

    _replay(tmp_path, str(FLEET), "--progress", "--summary", "none")
    err = capsys.readouterr().err

    assert "replay:" in err
    assert "spans/s" in err
    assert "MiB" in err


def test_list_settings_shows_the_thresholds(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["replay", "--list-settings"]) == 0

    out = capsys.readouterr().out
    assert "step_budget" in out
    assert "session_budget_usd" in out
    assert "loop_similarity_action" in out


def test_unknown_setting_is_an_error_naming_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["replay", str(FLEET), "--set", "max_stepz=3"]) == 1

    assert "max_stepz" in capsys.readouterr().err


def test_set_without_a_value_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", str(FLEET), "--set", "max_depth"]) == 1

    assert "RULE=VALUE" in capsys.readouterr().err


def test_missing_file_is_an_error_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.jsonl"

    assert main(["replay", str(missing), "-o", str(tmp_path / "o")]) == 1

    assert "nope.jsonl" in capsys.readouterr().err


def test_no_file_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay"]) == 1

    assert "no span file" in capsys.readouterr().err


def test_otlp_protobuf_file_is_replayed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
        InMemorySpanExporter,
    )

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("tripwire.tests")
    for _ in range(5):
        attributes = {
            "gen_ai.conversation.id": "otlp-session",
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": "openai",
            "gen_ai.request.model": "gpt-4o-mini",
            "gen_ai.usage.input_tokens": 900,
            "gen_ai.usage.output_tokens": 60,
        }
        with tracer.start_as_current_span("chat gpt-4o-mini", attributes=attributes):
            pass
    path = tmp_path / "export.pb"
    path.write_bytes(encode_spans(exporter.get_finished_spans()).SerializeToString())

    decisions = _replay(
        tmp_path, str(path), "--set", "step_budget=3", "--summary", "json"
    )
    summary = _summary(capsys)

    assert summary["spans"] == 5
    assert summary["sessions"][0]["session_id"] == "otlp-session"
    assert summary["sessions"][0]["llm_calls"] == 5
    assert [(r["target"], r["reason"]) for r in decisions] == [
        ("otlp-session", "step_budget")
    ]
