"""Loop-signal helpers: tool identities, cycles, word swaps, the output window."""

from __future__ import annotations

import numpy as np
import pytest

from tripwire.streams import loops
from tripwire.streams.embedder import TextEmbedder, bit_code
from tripwire.streams.policy import Policy
from tripwire.streams.state import (
    OUTPUT_KIND_BITS,
    OUTPUT_KIND_TEXT,
    OUTPUT_SLOT_BYTES,
    SKETCH_SIZE,
    SessionState,
)


def _with_tools(*identities: int) -> SessionState:
    state = SessionState()
    for identity in identities:
        loops.add_tool_call(state, identity)
    return state


def test_tool_identity_needs_an_argument_hash() -> None:
    assert loops.tool_identity("search", None) == loops.NO_IDENTITY
    assert loops.tool_identity("search", "") == loops.NO_IDENTITY
    assert loops.tool_identity("search", "abc") == loops.tool_identity("search", "abc")
    assert loops.tool_identity("search", "abc") != loops.tool_identity("read", "abc")
    assert loops.tool_identity(None, "abc") != loops.NO_IDENTITY


def test_tool_window_is_bounded() -> None:
    state = _with_tools(*range(1, 40))

    assert list(state.tools) == list(range(24, 40))


def test_calls_without_arguments_never_repeat() -> None:
    state = _with_tools(*[loops.NO_IDENTITY] * 8)
    policy = Policy()

    assert loops.repeated_tool_call(state, policy, "search") is None
    assert loops.tool_cycle(state, policy) is None


@pytest.mark.parametrize(
    ("sequence", "period"),
    [
        ([1, 2] * 3, 2),
        ([1, 2, 3] * 3, 3),
        ([1, 2, 3, 4] * 3, 4),
        ([9, 9, 1, 2, 1, 2, 1, 2], 2),
        ([1, 2, 1, 2] * 3, 2),
        ([1, 1, 2] * 3, 3),
    ],
)
def test_cycles_of_period_two_to_four(sequence: list[int], period: int) -> None:
    trip = loops.tool_cycle(_with_tools(*sequence), Policy())

    assert trip is not None
    assert trip.evidence["period"] == period
    assert len(trip.evidence["cycle"]) == period


@pytest.mark.parametrize(
    "sequence",
    [
        [1, 2] * 2 + [1],
        [1, 1, 1, 1, 1, 1],
        [1, 2, 3, 4, 5] * 3,
        [1, 2, loops.NO_IDENTITY, 2, 1, 2],
        [1, 2, 1, 3, 1, 2],
    ],
)
def test_no_cycle(sequence: list[int]) -> None:
    assert loops.tool_cycle(_with_tools(*sequence), Policy()) is None


def test_repeat_counts_only_the_newest_call() -> None:
    policy = Policy()

    assert loops.repeated_tool_call(_with_tools(7, 7, 7, 7, 1), policy, "x") is None
    trip = loops.repeated_tool_call(_with_tools(7, 1, 7, 2, 7, 3, 7), policy, "search")
    assert trip is not None
    assert trip.evidence["count"] == 4
    assert trip.evidence["tool"] == "search"


@pytest.mark.parametrize(
    ("older", "newer", "expected"),
    [
        ((), (1, 2), 0),
        ((1, 2, 3), (1, 2, 3), 0),
        ((1, 2, 3), (1, 2, 3, 4), 0),
        ((1, 2, 3), (1, 2), 0),
        ((1, 2, 3), (1, 2, 4), 1),
        ((1, 2, 3, 5), (1, 2, 4, 6), 2),
    ],
)
def test_substituted_counts_swapped_words(
    older: tuple[int, ...], newer: tuple[int, ...], expected: int
) -> None:
    assert loops.substituted(older, newer) == expected


def test_substituted_compares_full_sketches_below_their_common_range() -> None:
    shared = tuple(range(10, 10 + SKETCH_SIZE - 1))
    older = (*shared, 500)
    newer = (*shared, 900)

    # 500 and 900 both lie above the other sketch's largest kept hash: one
    # sketch may simply not have room for the other's word.
    assert loops.substituted(older, newer) == 0
    assert loops.substituted((5, *shared[1:], 500), (6, *shared[1:], 900)) == 1


def _text_code(text: str) -> tuple[bytes, tuple[int, ...]]:
    code = TextEmbedder().encode(text, SKETCH_SIZE)
    assert code is not None
    return code.vector, code.sketch


def test_output_window_keeps_the_last_outputs() -> None:
    state = SessionState()
    vector, sketch = _text_code("reading the report")

    for _ in range(7):
        loops.add_output(state, OUTPUT_KIND_TEXT, vector, sketch, capacity=5)

    assert len(state.outputs) == 5 * OUTPUT_SLOT_BYTES


def test_output_vectors_must_have_the_slot_size() -> None:
    with pytest.raises(ValueError, match="256 bytes"):
        loops.add_output(SessionState(), OUTPUT_KIND_TEXT, b"\x01" * 10, ())


def test_text_and_span_embeddings_are_never_compared() -> None:
    state = SessionState()
    policy = Policy().with_overrides(loop_similar_min=1, loop_similar_window=5)
    vector, sketch = _text_code("the same output again")
    embedding = np.random.default_rng(1).normal(size=384).tolist()
    bits = bit_code(embedding)
    assert bits is not None

    for _ in range(3):
        loops.add_output(state, OUTPUT_KIND_BITS, bits, ())

    assert (
        loops.similar_outputs(state, policy, OUTPUT_KIND_TEXT, vector, sketch) is None
    )
    trip = loops.similar_outputs(state, policy, OUTPUT_KIND_BITS, bits, ())
    assert trip is not None
    assert trip.evidence["source"] == "span_embedding"
    assert trip.evidence["matches"] == 3


def test_swapped_words_veto_a_similar_output() -> None:
    state = SessionState()
    policy = Policy().with_overrides(
        loop_similar_min=1, loop_similar_window=1, loop_similarity_text=0.5
    )
    staging = _text_code("I will now deploy the build to staging after the tests.")
    production = _text_code(
        "I will now deploy the build to production after the tests."
    )
    loops.add_output(state, OUTPUT_KIND_TEXT, *staging)

    assert loops.similar_outputs(state, policy, OUTPUT_KIND_TEXT, *production) is None
    assert loops.similar_outputs(state, policy, OUTPUT_KIND_TEXT, *staging) is not None
