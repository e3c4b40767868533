"""Session and user-day state: compact codec, dedupe rings, version byte."""

from __future__ import annotations

import pytest

from tripwire.schemas.events import SpanEvent, SpanKind, ToolStatus
from tripwire.streams.core import Detector
from tripwire.streams.policy import Policy
from tripwire.streams.pricing import PriceBook
from tripwire.streams.state import (
    ID_BYTES,
    SESSION_SEEN_CAPACITY,
    STATE_VERSION,
    USER_SEEN_CAPACITY,
    SessionState,
    StateDecodeError,
    UserDayState,
    from_nano,
    span_key,
    to_nano,
)


def _busy_state() -> SessionState:
    detector = Detector(Policy(), PriceBook.load())
    state: SessionState | None = None
    for index in range(30):
        kind = SpanKind.TOOL if index % 3 else SpanKind.LLM
        span = SpanEvent(
            span_id=f"{index + 1:016x}",
            trace_id="t",
            session_id="s",
            kind=kind,
            start_time=100.0 + index,
            end_time=101.0 + index,
            parent_span_id=f"{index:016x}" if index else None,
            user_id="user-é",
            agent_name="agent",
            model="gpt-4o" if kind is SpanKind.LLM else None,
            input_tokens=1000 if kind is SpanKind.LLM else 0,
            output_tokens=100 if kind is SpanKind.LLM else 0,
            output_text=f"step {index}: reading part {index % 4} of the report"
            if kind is SpanKind.LLM
            else None,
            tool_name="search" if kind is SpanKind.TOOL else None,
            tool_args_hash=f"args-{index % 2}" if kind is SpanKind.TOOL else None,
            tool_status=ToolStatus.ERROR if index % 5 == 0 else ToolStatus.OK,
        )
        state, _ = detector.observe_span(state, span)
    assert state is not None
    return state


def test_empty_session_state_round_trips() -> None:
    state = SessionState()

    data = state.encode()

    assert data[0] == STATE_VERSION
    assert SessionState.decode(data) == state


def test_busy_session_state_round_trips_every_field() -> None:
    state = _busy_state()

    decoded = SessionState.decode(state.encode())

    assert decoded == state
    assert decoded.encode() == state.encode()
    assert decoded.user_id == "user-é"
    assert (decoded.llm_calls, decoded.tool_calls) == (10, 20)
    assert decoded.cost_usd == state.cost_usd > 0
    assert len(decoded.outputs) > 0
    assert len(decoded.tools) > 0


def test_encoded_session_state_is_compact() -> None:
    assert len(_busy_state().encode()) < 2048


def test_other_version_is_refused() -> None:
    data = bytearray(SessionState().encode())
    data[0] = STATE_VERSION + 1

    with pytest.raises(StateDecodeError, match="format version"):
        SessionState.decode(bytes(data))


@pytest.mark.parametrize("cut", [0, 1, 10, 60, -1])
def test_truncated_state_is_refused(cut: int) -> None:
    data = _busy_state().encode()

    with pytest.raises(StateDecodeError):
        SessionState.decode(data[:cut])


def test_span_keys_are_deterministic_and_sized() -> None:
    hex_key = span_key("00f067aa0ba902b7")
    other_key = span_key("span-from-a-custom-source")

    assert hex_key == span_key("00f067aa0ba902b7")
    assert hex_key == (0xF067AA0BA902B7 & ((1 << 48) - 1)).to_bytes(6, "little")
    assert len(other_key) == ID_BYTES
    assert other_key == span_key("span-from-a-custom-source")
    assert other_key != span_key("span-from-a-custom-sourcE")


def test_seen_ring_is_bounded_and_forgets_the_oldest() -> None:
    state = SessionState()
    keys = [span_key(f"{index:016x}") for index in range(SESSION_SEEN_CAPACITY + 10)]

    for key in keys:
        state.remember(key)

    assert len(state.seen) == SESSION_SEEN_CAPACITY * ID_BYTES
    assert not state.has_seen(keys[0])
    assert state.has_seen(keys[10])
    assert state.has_seen(keys[-1])


def test_seen_ring_ignores_misaligned_matches() -> None:
    state = SessionState()
    state.remember(b"\x01\x02\x03\x04\x05\x06")
    state.remember(b"\x07\x08\x09\x0a\x0b\x0c")

    assert not state.has_seen(b"\x04\x05\x06\x07\x08\x09")


def test_user_day_state_round_trips() -> None:
    state = UserDayState("2025-06-02")
    state.tokens = 1234
    state.cost_nano = to_nano(0.123456789)
    state.killed = 0b100
    for index in range(USER_SEEN_CAPACITY + 3):
        state.remember(span_key(f"{index:016x}"))

    decoded = UserDayState.decode(state.encode())

    assert decoded == state
    assert decoded.day == "2025-06-02"
    assert decoded.cost_usd == pytest.approx(0.123456789, abs=1e-12)
    assert len(decoded.seen) == USER_SEEN_CAPACITY * ID_BYTES


def test_user_day_state_refuses_garbage() -> None:
    with pytest.raises(StateDecodeError):
        UserDayState.decode(b"")
    with pytest.raises(StateDecodeError):
        UserDayState.decode(bytes([STATE_VERSION, 1, 2]))


def test_nano_dollars_round_trip() -> None:
    assert from_nano(to_nano(1.999999999)) == pytest.approx(1.999999999, abs=1e-15)
    assert to_nano(0.1) + to_nano(0.2) == to_nano(0.3)
