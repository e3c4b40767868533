"""Properties of the session step: additive, order-free cost; inert duplicates."""

from __future__ import annotations

import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tripwire.schemas.events import SpanEvent, SpanKind, ToolStatus
from tripwire.streams.core import Decision, Detector
from tripwire.streams.policy import Policy
from tripwire.streams.pricing import PriceBook
from tripwire.streams.state import SessionState, to_nano

START = 1_750_000_000.0
MODELS = ("gpt-4o", "claude-sonnet-4-5-20250929", "gemini-2.5-flash", "mystery-1")
TEXTS = (
    None,
    "Searching the report again for the Q3 figure.",
    "Let me search the report once more for the Q3 figure.",
    "Deploying the build to staging.",
    "The invoice total is 1,240 euros.",
)
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def span_fields(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(list(SpanKind)))
    fields: dict[str, Any] = {
        "kind": kind,
        "end_time": START + draw(st.floats(0, 600, allow_nan=False)),
        "cost_usd": draw(st.none() | st.floats(0, 0.5, allow_nan=False)),
        "depth": draw(st.none() | st.integers(0, 8)),
    }
    if kind is SpanKind.LLM:
        input_tokens = draw(st.integers(0, 60_000))
        fields |= {
            "model": draw(st.sampled_from(MODELS)),
            "input_tokens": input_tokens,
            "output_tokens": draw(st.integers(0, 4_000)),
            "cache_read_tokens": draw(st.integers(0, input_tokens)),
            "cache_creation_tokens": draw(st.integers(0, 2_000)),
            "output_text": draw(st.sampled_from(TEXTS)),
        }
    elif kind is SpanKind.TOOL:
        fields |= {
            "tool_name": draw(st.sampled_from(("search", "read"))),
            "tool_args_hash": draw(st.sampled_from((None, "a", "b"))),
            "tool_status": draw(st.sampled_from(list(ToolStatus))),
        }
    return fields


def build(index: int, fields: dict[str, Any]) -> SpanEvent:
    return SpanEvent(
        span_id=f"{index + 1:016x}",
        trace_id="trace",
        session_id="sess",
        start_time=fields["end_time"] - 1.0,
        user_id="user",
        agent_name="agent",
        **fields,
    )


streams = st.lists(span_fields(), min_size=1, max_size=40).map(
    lambda items: [build(index, fields) for index, fields in enumerate(items)]
)


def feed(spans: list[SpanEvent]) -> tuple[SessionState, list[Decision]]:
    detector = Detector(Policy(), PriceBook.load())
    state: SessionState | None = None
    decisions: list[Decision] = []
    for span in spans:
        state, outcome = detector.observe_span(state, span)
        decisions.extend(outcome.decisions)
    assert state is not None
    return state, decisions


@PROPERTY_SETTINGS
@given(spans=streams, data=st.data())
def test_session_cost_is_additive_and_order_independent(
    spans: list[SpanEvent], data: st.DataObject
) -> None:
    shuffled = data.draw(st.permutations(spans))
    prices = PriceBook.load()
    costs = [prices.cost(span).cost_usd for span in spans]

    state, _ = feed(spans)
    other, _ = feed(shuffled)

    # Sessions add whole nano-dollars: exactly additive in that unit, within
    # half a nano-dollar per span of the float sum.
    assert state.cost_nano == sum(to_nano(cost) for cost in costs)
    assert abs(state.cost_usd - math.fsum(costs)) <= 0.5e-9 * len(costs) + 1e-15
    assert abs(other.cost_usd - state.cost_usd) <= 1e-9
    assert other.tokens == state.tokens
    assert (other.llm_calls, other.tool_calls, other.agent_spans) == (
        state.llm_calls,
        state.tool_calls,
        state.agent_spans,
    )


@PROPERTY_SETTINGS
@given(spans=streams, data=st.data())
def test_refeeding_any_subset_changes_nothing(
    spans: list[SpanEvent], data: st.DataObject
) -> None:
    repeats = data.draw(st.lists(st.integers(0, len(spans) - 1), max_size=20))
    with_duplicates = list(spans)
    for original in repeats:
        # A redelivery comes after the original, anywhere later in the stream.
        first = with_duplicates.index(spans[original]) + 1
        where = data.draw(st.integers(first, len(with_duplicates)))
        with_duplicates.insert(where, spans[original])

    state, decisions = feed(spans)
    again, again_decisions = feed(with_duplicates)

    assert again.encode() == state.encode()
    assert [d.to_json() for d in again_decisions] == [d.to_json() for d in decisions]


@PROPERTY_SETTINGS
@given(spans=streams, data=st.data())
def test_round_trip_at_any_point_gives_the_same_decisions(
    spans: list[SpanEvent], data: st.DataObject
) -> None:
    cut = data.draw(st.integers(0, len(spans)))
    detector = Detector(Policy(), PriceBook.load())
    state: SessionState | None = None
    decisions: list[Decision] = []
    for index, span in enumerate(spans):
        if index == cut and state is not None:
            state = SessionState.decode(state.encode())
        state, outcome = detector.observe_span(state, span)
        decisions.extend(outcome.decisions)

    _, straight = feed(spans)

    assert [d.to_json() for d in decisions] == [d.to_json() for d in straight]
