"""Loop signals: similar LLM outputs, repeated tool calls, short tool-call cycles."""

from __future__ import annotations

import hashlib
import logging
import struct

from tripwire.schemas.textcode import OUTPUT_VECTOR_BYTES, SKETCH_SIZE
from tripwire.streams.embedder import bit_cosines, int8_cosines
from tripwire.streams.policy import MAX_OUTPUT_WINDOW, MAX_TOOL_WINDOW, Policy
from tripwire.streams.rules import Trip
from tripwire.streams.state import (
    OUTPUT_KIND_BITS,
    OUTPUT_KIND_TEXT,
    OUTPUT_SLOT_BYTES,
    SessionState,
)

logger = logging.getLogger(__name__)

NO_IDENTITY = 0
_SKETCH_START = 2
_VECTOR_START = 2 + 2 * SKETCH_SIZE
_SKETCH = struct.Struct(f"<{SKETCH_SIZE}H")
# Per sketch length: its packing, and the zeros that fill the slot's sketch.
_SKETCHES = [struct.Struct(f"<{size}H") for size in range(SKETCH_SIZE + 1)]
_SKETCH_PADDING = [bytes(2 * (SKETCH_SIZE - size)) for size in range(SKETCH_SIZE + 1)]
_KIND_NAMES = {OUTPUT_KIND_TEXT: "text", OUTPUT_KIND_BITS: "span_embedding"}


def tool_identity(tool_name: str | None, args_hash: str | None) -> int:
    """Return the 64-bit identity of a tool call: its tool and its arguments.

    Calls without an argument hash get ``NO_IDENTITY``, which never matches:
    without the arguments, ``search`` called four times is ordinary work.
    """
    if not args_hash:
        return NO_IDENTITY
    raw = f"{tool_name or ''}\x1f{args_hash}".encode()
    identity = int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")
    return identity or 1


def add_tool_call(state: SessionState, identity: int) -> None:
    """Append a tool call's identity to the session's bounded tool window."""
    tools = state.tools
    if len(tools) >= MAX_TOOL_WINDOW:
        del tools[0]
    tools.append(identity)


def repeated_tool_call(
    state: SessionState, policy: Policy, tool_name: str | None
) -> Trip | None:
    """Trip when the newest tool call repeats one of the recent ones too often.

    The newest call's identity (tool and argument hash) must appear at least
    ``loop_repeat_min`` times among the last ``loop_repeat_window`` calls,
    itself included.
    """
    tools = state.tools
    if not tools or tools[-1] == NO_IDENTITY:
        return None
    window = tools[-policy.loop_repeat_window :]
    newest = tools[-1]
    count = window.count(newest)
    if count < policy.loop_repeat_min:
        return None

    return Trip(
        "loop_repeat_tool",
        f"tool {tool_name!r} called {count} times with the same arguments in the "
        f"last {len(window)} tool calls",
        {
            "tool": tool_name,
            "identity": f"{newest:016x}",
            "count": count,
            "window": len(window),
            "threshold": policy.loop_repeat_min,
        },
    )


def tool_cycle(state: SessionState, policy: Policy) -> Trip | None:
    """Trip when the latest tool calls are a short cycle repeated.

    A cycle is a block of 2 to ``loop_cycle_max_period`` calls with at least
    two different identities (A,B or A,B,C...), repeated
    ``loop_cycle_repeats`` times in a row at the end of the tool window. The
    shortest such period is reported.
    """
    tools = state.tools
    repeats = policy.loop_cycle_repeats
    for period in range(2, policy.loop_cycle_max_period + 1):
        need = period * repeats
        if len(tools) < need:
            break
        tail = tools[-need:]
        # Periodic: every call equals the one ``period`` calls later.
        if tail[period:] != tail[:-period] or NO_IDENTITY in tail:
            continue
        block = tail[:period]
        if len(set(block)) < 2:
            continue
        return Trip(
            "loop_tool_cycle",
            f"the last {need} tool calls repeat a cycle of {period} calls "
            f"{repeats} times",
            {
                "period": period,
                "repeats": repeats,
                "cycle": [f"{identity:016x}" for identity in block],
                "threshold_repeats": repeats,
            },
        )
    return None


def substituted(older: tuple[int, ...], newer: tuple[int, ...]) -> int:
    """Return how many content words two outputs swapped for others; 0 if none.

    Both sketches hold the smallest content-word hashes of their text, so
    they are compared below the smaller of their largest kept hashes (when a
    sketch is full; otherwise it is complete). A swap needs a word only in
    the older output *and* a word only in the newer one ("deploy to
    staging" then "deploy to production"); words only added or only dropped
    are read as rewording.
    """
    if not older or not newer:
        return 0
    limit = min(
        older[-1] if len(older) >= SKETCH_SIZE else 0xFFFF,
        newer[-1] if len(newer) >= SKETCH_SIZE else 0xFFFF,
    )
    old_words = {word for word in older if word <= limit}
    new_words = {word for word in newer if word <= limit}
    only_old = len(old_words - new_words)
    only_new = len(new_words - old_words)
    return min(only_old, only_new)


def similar_outputs(
    state: SessionState,
    policy: Policy,
    kind: int,
    vector: bytes,
    sketch: tuple[int, ...],
) -> Trip | None:
    """Trip when the newest LLM output is too like several recent ones.

    Compares the newest output with the previous ``loop_similar_window``
    outputs of the same kind (text vectors with text vectors, span
    embeddings with span embeddings). A previous output counts as a match
    when its cosine is at or above the kind's threshold and the two did not
    swap content words (see :func:`substituted`). At least
    ``loop_similar_min`` matches trip the rule.

    Args:
        state: the session state, holding the previous outputs.
        policy: thresholds.
        kind: ``OUTPUT_KIND_TEXT`` or ``OUTPUT_KIND_BITS``.
        vector: the newest output's code.
        sketch: the newest output's content-word sketch, maybe empty.

    Returns:
        The trip with the scores as evidence, or None.
    """
    outputs = state.outputs
    first = max(0, len(outputs) // OUTPUT_SLOT_BYTES - policy.loop_similar_window)
    first *= OUTPUT_SLOT_BYTES
    kinds = outputs[first::OUTPUT_SLOT_BYTES]
    compared = kinds.count(kind)
    if compared < policy.loop_similar_min:
        return None

    starts: range | list[int]
    if compared == len(kinds):
        # One kind only, as in nearly every session: compare the slots as
        # they lie, each vector at the end of its slot.
        starts = range(first, len(outputs), OUTPUT_SLOT_BYTES)
        stored = outputs[first:]
        row: int | None = OUTPUT_SLOT_BYTES
    else:
        starts = [
            start
            for start in range(first, len(outputs), OUTPUT_SLOT_BYTES)
            if outputs[start] == kind
        ]
        stored = bytearray().join(
            [
                outputs[start + _VECTOR_START : start + OUTPUT_SLOT_BYTES]
                for start in starts
            ]
        )
        row = None
    if kind == OUTPUT_KIND_TEXT:
        threshold = policy.loop_similarity_text
        scores = int8_cosines(stored, vector, row)
    else:
        threshold = policy.loop_similarity_vector
        scores = bit_cosines(stored, vector, row)

    matches = 0
    swapped = 0
    for start, score in zip(starts, scores, strict=True):
        if score < threshold:
            continue
        if substituted(_sketch(outputs, start), sketch):
            swapped += 1
            continue
        matches += 1
    if matches < policy.loop_similar_min:
        return None

    return Trip(
        "loop_similarity",
        f"the newest LLM output matches {matches} of the previous {len(starts)} "
        f"(cosine >= {threshold:g})",
        {
            "matches": matches,
            "compared": len(starts),
            "scores": [round(score, 4) for score in scores],
            "threshold": threshold,
            "min_matches": policy.loop_similar_min,
            "swapped_words": swapped,
            "source": _KIND_NAMES[kind],
        },
    )


def add_output(
    state: SessionState,
    kind: int,
    vector: bytes,
    sketch: tuple[int, ...],
    capacity: int = MAX_OUTPUT_WINDOW,
) -> None:
    """Append an output's code to the session's output window of ``capacity``."""
    if len(vector) != OUTPUT_VECTOR_BYTES:
        raise ValueError(
            f"output vector must be {OUTPUT_VECTOR_BYTES} bytes, got {len(vector)}"
        )
    size = min(len(sketch), SKETCH_SIZE)
    slot = b"".join(
        (
            bytes((kind, size)),
            _SKETCHES[size].pack(*sketch[:size]),
            _SKETCH_PADDING[size],
            vector,
        )
    )
    # Exact-size copies: a live state carries no allocator slack.
    outputs = state.outputs
    excess = len(outputs) + OUTPUT_SLOT_BYTES - capacity * OUTPUT_SLOT_BYTES
    state.outputs = (outputs[excess:] if excess > 0 else outputs) + slot


def _sketch(outputs: bytearray, start: int) -> tuple[int, ...]:
    words: tuple[int, ...] = _SKETCH.unpack_from(outputs, start + _SKETCH_START)
    return words[: outputs[start + 1]]
