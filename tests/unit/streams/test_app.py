"""Worker helpers that need no broker: usage records, keys, session views."""

from __future__ import annotations

from pathlib import Path

import pytest

from tripwire.config import WorkerSettings
from tripwire.errors import ConfigError
from tripwire.schemas.events import KillCommand, Scope, SpanEvent, SpanKind
from tripwire.streams.app import (
    _check_copartitioned,
    _kills_session,
    decode_usage,
    decode_usages,
    encode_usage,
    session_summary,
    usage_records,
    user_day_key,
)
from tripwire.streams.core import Detector, Usage
from tripwire.streams.policy import Policy
from tripwire.streams.pricing import PriceBook


def _usage(**extra: object) -> Usage:
    fields: dict[str, object] = {
        "user_id": "user-1",
        "day": "2025-06-02",
        "session_id": "sess-1",
        "agent_name": "researcher",
        "tokens": 1500,
        "cost_usd": 0.25,
        "at": 1_748_854_800.0,
        "span_id": "span-1",
    }
    fields.update(extra)
    return Usage(**fields)  # type: ignore[arg-type]


def test_usage_round_trips_through_the_usage_topic_encoding() -> None:
    usage = _usage()

    assert decode_usage(encode_usage(usage)) == usage


@pytest.mark.parametrize("data", [b"[1, 2]", b'{"user_id": "u"}', b"{not json"])
def test_malformed_usage_records_raise_value_or_type_errors(data: bytes) -> None:
    with pytest.raises((ValueError, TypeError)):
        decode_usage(data)


def test_usages_of_one_user_share_a_record_in_their_order() -> None:
    usages = [_usage(span_id=f"span-{n}", tokens=n) for n in range(5)]

    records = usage_records(usages)

    assert len(records) == 1
    assert decode_usages(records[0]) == usages


def test_usage_records_stay_under_the_byte_limit_and_keep_every_usage() -> None:
    usages = [_usage(span_id=f"span-{n}") for n in range(50)]
    one = len(encode_usage(usages[0]))

    records = usage_records(usages, limit=10 * one)

    assert len(records) > 1
    assert all(len(record) <= 10 * one for record in records)
    assert [u for record in records for u in decode_usages(record)] == usages


def test_a_single_usage_object_decodes_as_a_list_of_one() -> None:
    usage = _usage(agent_name=None, span_id=None)

    assert decode_usages(encode_usage(usage)) == [usage]


@pytest.mark.parametrize(
    "data", [b"[]", b"[1, 2]", b'[{"user_id": "u"}]', b"7", b"{not json"]
)
def test_malformed_usage_arrays_raise_value_or_type_errors(data: bytes) -> None:
    with pytest.raises((ValueError, TypeError)):
        decode_usages(data)


def test_user_day_key_separates_users_and_days() -> None:
    keys = {
        user_day_key(_usage()),
        user_day_key(_usage(day="2025-06-03")),
        user_day_key(_usage(user_id="user-2")),
    }

    assert len(keys) == 3
    assert user_day_key(_usage()) == b"user-1\x1f2025-06-02"


def test_session_summary_shows_totals_and_fired_rules_only() -> None:
    detector = Detector(Policy().with_overrides(step_budget="2"), PriceBook.load())
    state = None
    for index in range(3):
        span = SpanEvent(
            span_id=f"s{index}",
            trace_id="t",
            session_id="sess-1",
            kind=SpanKind.LLM,
            start_time=100.0 + index,
            end_time=101.0 + index,
            user_id="user-1",
            agent_name="researcher",
            model="gpt-4o",
            input_tokens=100,
            output_tokens=10,
            cost_usd=0.5,
            output_text=f"secret answer {index}",
        )
        state, _ = detector.observe_span(state, span)
    assert state is not None

    summary = session_summary(state)

    assert summary["llm_calls"] == 3
    assert summary["steps"] == 3
    assert summary["cost_usd"] == pytest.approx(1.5)
    assert summary["tokens"] == 330
    assert summary["last_at"] == 103.0
    assert "step_budget" in summary["killed"]
    assert "secret" not in str(summary)


def test_kills_session_matches_only_its_own_session_kill() -> None:
    own = KillCommand.create(Scope.SESSION, "sess-1", "step_budget", "", 1.0)
    user = KillCommand.create(Scope.USER, "user-1", "user_daily_cost", "", 1.0)

    assert _kills_session(own, "sess-1")
    assert not _kills_session(own, "sess-2")
    assert not _kills_session(user, "sess-1")


def test_copartitioning_check_names_the_setting() -> None:
    settings = WorkerSettings(partitions=4)

    _check_copartitioned(settings, {settings.topics.spans: 4, "other": 1})
    with pytest.raises(ConfigError, match="TRIPWIRE_PARTITIONS=1"):
        _check_copartitioned(settings, {settings.topics.spans: 1})


class _FaultyDetector(Detector):
    """A detector that fails on one span id, as a detector bug would."""

    def observe_span(self, state, span):  # type: ignore[no-untyped-def]
        if span.span_id == "bad":
            raise RuntimeError("boom")
        return super().observe_span(state, span)


class _Message:
    def __init__(self, key: bytes, value: bytes, offset: int) -> None:
        self.key = key
        self.value = value
        self.topic = "tripwire.spans"
        self.partition = 0
        self.offset = offset


class _Event:
    def __init__(self, message: _Message) -> None:
        self.message = message


async def test_a_span_the_detector_fails_on_is_dead_lettered_not_lost(
    tmp_path: Path,
) -> None:
    from tripwire.config import load_settings
    from tripwire.schemas.native import encode_native
    from tripwire.streams.app import TripwireApp

    settings = load_settings({"TRIPWIRE_DATA_DIR": str(tmp_path)})
    detector = _FaultyDetector(Policy(), PriceBook.load())
    worker = TripwireApp(settings, detector)
    dead: list[tuple[int, str]] = []

    async def dead_letter(event: _Event, reason: str, field_name: str | None) -> None:
        dead.append((event.message.offset, reason))

    worker.dead_letter = dead_letter  # type: ignore[method-assign]
    span = SpanEvent("bad", "trace-1", "sess-9", SpanKind.TOOL, 1.0, 2.0)
    record = encode_native(span)

    await worker.handle_span_batch([_Event(_Message(b"sess-9", record, 41))])  # type: ignore[list-item]

    assert dead == [(41, "detector failed: RuntimeError('boom')")]
    assert worker.sessions.get(b"sess-9") is None
