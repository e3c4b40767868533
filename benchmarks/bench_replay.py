"""Spans per second of ``tripwire replay``'s pipeline, against a parse-only baseline.

Run it with ``python benchmarks/bench_replay.py [--spans N] [--runs R]``. It
writes two native JSON-lines files from the fleet simulator, one without
output text and one with a 500-character text on every LLM span, and times,
on one core, for each file:

- ``parse``: ``orjson.loads`` of every line, the baseline;
- ``decode``: the native decoder, line to validated ``SpanEvent``;
- ``replay``: what ``tripwire replay`` does: decode, the detector (pricing,
  session and user-day state, every rule, loop similarity on the text), the
  runtime's bookkeeping and the decisions written as JSON lines.

It prints the median spans/s of each over the runs, and the replay's cost as a
multiple of the baseline.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import orjson

from tripwire.cli.replay import read_spans, replay
from tripwire.schemas.events import SpanKind
from tripwire.schemas.native import encode_native
from tripwire.streams.core import Detector
from tripwire.streams.embedded import EmbeddedRuntime
from tripwire.streams.policy import Policy
from tripwire.streams.pricing import PriceBook
from tripwire.streams.simulate import simulate_fleet

TEXT_CHARS = 500


def write_spans(path: Path, spans: int, *, text: bool) -> int:
    """Write at least ``spans`` simulated spans to ``path``; return how many."""
    written = 0
    seed = 0
    with path.open("wb") as handle:
        while written < spans:
            fleet = simulate_fleet(200, seed).with_run_id(f"r{seed}")
            for span in fleet.spans():
                if text and span.kind is SpanKind.LLM and span.output_text:
                    repeated = (span.output_text + " ") * (
                        TEXT_CHARS // len(span.output_text) + 1
                    )
                    span.output_text = repeated[:TEXT_CHARS]
                handle.write(encode_native(span, include_text=text) + b"\n")
                written += 1
            seed += 1
    return written


def parse_only(path: Path) -> int:
    """Baseline: parse every line as JSON, build nothing."""
    count = 0
    loads = orjson.loads
    with path.open("rb") as handle:
        for line in handle:
            loads(line)
            count += 1
    return count


def decode_only(path: Path) -> int:
    """Decode every line into a validated span."""
    return sum(1 for _ in read_spans(str(path)))


def full_replay(path: Path) -> int:
    """Decode, detect and write the decisions, as ``tripwire replay`` does."""
    detector = Detector(Policy.from_env({}), PriceBook.load())
    runtime = EmbeddedRuntime(detector)
    replay([str(path)], runtime, io.BytesIO())
    return runtime.counters.spans


def median_rate(step: Callable[[Path], int], path: Path, runs: int) -> float:
    """Return the median spans/s of ``step`` over ``runs`` runs."""
    rates = []
    for _ in range(runs):
        started = time.perf_counter()
        count = step(path)
        rates.append(count / (time.perf_counter() - started))
    return statistics.median(rates)


def main() -> int:
    """Run the benchmark and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spans", type=int, default=60_000, help="spans per file")
    parser.add_argument("--runs", type=int, default=5, help="runs per measurement")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for label, text in (("no text", False), (f"{TEXT_CHARS}-char text", True)):
            path = Path(folder) / f"spans-{int(text)}.jsonl"
            count = write_spans(path, args.spans, text=text)
            size = path.stat().st_size
            baseline = median_rate(parse_only, path, args.runs)
            for step_name, step in (
                ("parse (baseline)", parse_only),
                ("decode", decode_only),
                ("replay", full_replay),
            ):
                rate = (
                    baseline
                    if step is parse_only
                    else median_rate(step, path, args.runs)
                )
                rows.append((label, step_name, count, size, rate, baseline / rate))

    print(
        f"{'SPANS':<14} {'STEP':<17} {'COUNT':>8} {'MIB':>6} {'SPANS/S':>10} "
        f"{'x BASELINE':>10}"
    )
    for label, step_name, count, size, rate, slower in rows:
        print(
            f"{label:<14} {step_name:<17} {count:>8,} {size / 1_048_576:>6.1f} "
            f"{rate:>10,.0f} {slower:>10.1f}"
        )
    print(f"median of {args.runs} runs each, one core, Python {sys.version.split()[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
