"""Benchmark the detection core: cost per span and state size per session.

Run with ``python benchmarks/bench_core.py`` (``--help`` for options). Times
are medians of per-span timings, compared with a baseline measured in the
same run: decoding the span's dict into a ``SpanEvent``, the least any
runtime does per span. State size is measured over many live sessions with
``tracemalloc`` (in-memory objects) and as encoded bytes (what the worker's
table stores).
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

from tripwire.schemas.events import SpanEvent, SpanKind, ToolStatus
from tripwire.streams.core import Detector
from tripwire.streams.policy import Policy
from tripwire.streams.pricing import PriceBook
from tripwire.streams.state import SessionState

TEXT_CHARS = 500
_SYLLABLES = ("ka", "lo", "mi", "re", "su", "ta", "ven", "dor", "pli", "stra", "qu",
              "ex", "an", "ol", "ir", "um")  # fmt: skip
_FUNCTION = ("the", "a", "to", "of", "and", "for", "with", "on", "in", "is", "it",
             "that", "this", "I", "will", "we")  # fmt: skip


def _vocabulary(size: int, rng: random.Random) -> tuple[list[str], list[float]]:
    """Return made-up words and Zipf cumulative weights, function words first."""
    words = list(_FUNCTION)
    while len(words) < size:
        count = rng.randint(2, 4)
        words.append("".join(rng.choice(_SYLLABLES) for _ in range(count)))
    total = 0.0
    cumulative = []
    for rank in range(1, len(words) + 1):
        total += rank**-1.07
        cumulative.append(total)
    return words, cumulative


def _text(rng: random.Random, vocabulary: tuple[list[str], list[float]]) -> str:
    words, cumulative = vocabulary
    chosen = rng.choices(words, cum_weights=cumulative, k=TEXT_CHARS // 4)
    return " ".join(chosen)[:TEXT_CHARS]


def span_dicts(
    count: int, *, sessions: int, text: bool, seed: int = 7
) -> Iterator[dict[str, Any]]:
    """Yield span dicts of a mixed workload: LLM and tool calls, many sessions."""
    rng = random.Random(seed)
    vocabulary = _vocabulary(5000, random.Random(seed + 1))
    last_agent: dict[int, str] = {}
    for index in range(count):
        session = index % sessions
        at = 1_700_000_000.0 + index * 0.01
        base: dict[str, Any] = {
            "span_id": f"{rng.getrandbits(64):016x}",
            "trace_id": f"{session:032x}",
            "session_id": f"session-{session}",
            "start_time": at - 0.5,
            "end_time": at,
            "user_id": f"user-{session % 97}",
            "agent_name": "researcher",
        }
        if index % 20 == 1:
            # Nested agent invocations, depth known only from parent links.
            base |= {"kind": "agent", "parent_span_id": last_agent.get(session)}
            last_agent[session] = base["span_id"]
        elif index % 2:
            base |= {
                "kind": "tool",
                "tool_name": rng.choice(("search", "fetch", "read")),
                "tool_args_hash": f"{rng.getrandbits(32):08x}",
                "tool_status": "error" if rng.random() < 0.05 else "ok",
            }
        else:
            base |= {
                "kind": "llm",
                "model": "claude-sonnet-4-5-20250929",
                "input_tokens": rng.randint(500, 4000),
                "output_tokens": rng.randint(50, 400),
                "cache_read_tokens": rng.randint(0, 400),
            }
            if text:
                base["output_text"] = _text(rng, vocabulary)
        yield base


def decode(record: dict[str, Any]) -> SpanEvent:
    """Build a span from its dict, as the cheapest decoder would."""
    fields = dict(record)
    fields["kind"] = SpanKind(fields["kind"])
    status = fields.get("tool_status")
    if status is not None:
        fields["tool_status"] = ToolStatus(status)
    return SpanEvent(**fields)


def _timings_ns(step: Callable[[Any], object], items: list[Any]) -> list[int]:
    clock = time.perf_counter_ns
    timings = []
    for item in items:
        start = clock()
        step(item)
        timings.append(clock() - start)
    return timings


def per_span(
    spans: int, sessions: int, *, text: bool
) -> dict[str, tuple[float, float]]:
    """Return the median baseline and core cost per span kind, in microseconds."""
    records = list(span_dicts(spans, sessions=sessions, text=text))
    baseline = _timings_ns(decode, records)

    detector = Detector(Policy(), PriceBook.load())
    states: dict[str, SessionState] = {}
    decoded = [decode(record) for record in records]

    def observe(span: SpanEvent) -> None:
        state, outcome = detector.observe_span(states.get(span.session_id), span)
        states[span.session_id] = state
        if outcome.usage is not None:
            detector.observe_usage(None, outcome.usage)

    # Warm up caches (word stems, day strings) on a first pass of other spans.
    warm = len(decoded) // 10
    for span in decoded[:warm]:
        observe(span)
    core = _timings_ns(observe, decoded[warm:])

    medians: dict[str, tuple[float, float]] = {}
    for kind in (SpanKind.LLM, SpanKind.TOOL):
        spans = decoded[warm:]
        base = [
            t for t, s in zip(baseline[warm:], spans, strict=True) if s.kind is kind
        ]
        spent = [t for t, s in zip(core, spans, strict=True) if s.kind is kind]
        medians[kind.value] = (
            statistics.median(base) / 1000,
            statistics.median(spent) / 1000,
        )
    return medians


def deep_size(state: SessionState) -> int:
    """Return the bytes a state object owns.

    Small ints (-5 to 256) are interpreter-wide singletons and the agent name
    is one string shared by all of that agent's sessions; neither is counted.
    """
    size = sys.getsizeof(state)
    for name in SessionState.__slots__:
        value = getattr(state, name)
        if name == "agent_name" or (isinstance(value, int) and -5 <= value <= 256):
            continue
        size += sys.getsizeof(value)
    return size


def session_size(sessions: int, spans_per_session: int) -> tuple[float, float, float]:
    """Return bytes per session: live object, decoded objects, encoded bytes.

    The live figure is one state built by feeding spans (its buffers carry
    growth slack); the decoded figure is the ``tracemalloc`` total over
    ``sessions`` states decoded from its bytes, divided by their number, as
    a worker holds them; the encoded figure is what a table stores.
    """
    detector = Detector(Policy(), PriceBook.load())
    template: SessionState | None = None
    records = span_dicts(spans_per_session, sessions=1, text=True, seed=11)
    for record in records:
        template, _ = detector.observe_span(template, decode(record))
    assert template is not None
    encoded = template.encode()

    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    live = [SessionState.decode(encoded) for _ in range(sessions)]
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    decoded = (after - before) / len(live)
    return float(deep_size(template)), decoded, float(len(encoded))


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spans", type=int, default=20_000)
    parser.add_argument("--sessions", type=int, default=100_000)
    args = parser.parse_args(argv)

    print(f"per-span cost, median over {args.spans} spans of 500 sessions (us)")
    header = f"{'span':<28} {'baseline':>9} {'core':>9} {'core/base':>10} {'target':>7}"
    print(header)
    plain = per_span(args.spans, 500, text=False)
    with_text = per_span(args.spans, 500, text=True)
    rows = (
        ("tool call", plain["tool"], 20),
        ("LLM call, no text", plain["llm"], 20),
        (f"LLM call, {TEXT_CHARS}-char text", with_text["llm"], 60),
    )
    for label, (baseline, core), target in rows:
        print(
            f"{label:<28} {baseline:>9.2f} {core:>9.2f} {core / baseline:>10.1f} "
            f"{target:>7}"
        )

    print()
    print(f"state per session, {args.sessions} decoded sessions (bytes)")
    print(f"{'session':<28} {'live':>9} {'decoded':>9} {'encoded':>9} {'target':>7}")
    for label, spans in (("40 spans", 40), ("400 spans (windows full)", 400)):
        live, decoded, encoded = session_size(args.sessions, spans)
        print(f"{label:<28} {live:>9.0f} {decoded:>9.0f} {encoded:>9.0f} {4096:>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
