"""``tripwire replay``: run recorded spans through the detector, offline."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import IO, Any

import orjson

from tripwire.errors import ConfigError, SpanValidationError, TripwireError
from tripwire.schemas.events import SpanEvent
from tripwire.schemas.native import iter_native_lines
from tripwire.schemas.otlp import iter_file_spans, sniff_encoding
from tripwire.streams.core import Detector
from tripwire.streams.embedded import (
    EmbeddedRuntime,
    SessionSummary,
    decision_to_json,
)
from tripwire.streams.policy import Policy, describe_settings
from tripwire.streams.pricing import PriceBook

logger = logging.getLogger(__name__)

# Progress lines are written at most this often, in seconds.
_PROGRESS_INTERVAL_S = 2.0
# The clock is read once per this many spans, to keep it off the hot path.
_PROGRESS_EVERY_SPANS = 2048
# Bytes read to tell native JSON lines from OTLP JSON or protobuf.
_SNIFF_BYTES = 4096

_EPILOG = """\
examples:
  tripwire replay spans.jsonl
  tripwire replay day1.jsonl day2.jsonl -o decisions.jsonl --summary json
  cat spans.jsonl | tripwire replay - --quiet
  tripwire replay spans.jsonl --set session_budget_usd=0.5 --set step_budget=40

Decisions (kill commands and alerts) are written as JSON lines to stdout or
--output; the summary, progress and warnings go to stderr. Run with
--list-settings to see every threshold --set accepts.
"""


def register(subparsers: Any) -> None:
    """Add the ``replay`` subcommand to the ``tripwire`` parser."""
    parser = subparsers.add_parser(
        "replay",
        help="run recorded spans through the detector and print its decisions",
        description=textwrap.fill(
            "Run spans recorded in files (native JSON lines, OTLP JSON or OTLP "
            "protobuf) through the same detection core as the worker, in event "
            "time, and print the kill commands and alerts it would have issued. "
            "Use it to backtest a policy on yesterday's traffic.",
            width=78,
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "files",
        nargs="*",
        metavar="FILE",
        help="span files to replay in order; '-' reads native JSON lines from stdin",
    )
    parser.add_argument(
        "-o",
        "--output",
        metavar="PATH",
        help="write decisions to this file instead of stdout",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="RULE=VALUE",
        help="override one policy threshold (repeatable); see --list-settings",
    )
    parser.add_argument(
        "--policy", metavar="TOML", help="policy file (as the worker's --policy)"
    )
    parser.add_argument(
        "--prices", metavar="JSON", help="price override file merged over the book"
    )
    parser.add_argument(
        "--summary",
        choices=("table", "json", "none"),
        default="table",
        help="session summary written to stderr at the end (default: table)",
    )
    parser.add_argument(
        "--limit",
        type=_non_negative_int,
        default=15,
        metavar="N",
        help="sessions shown in the summary, most expensive first; 0 = all "
        "(default: 15)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="drop a session's state once it has been idle this long in event "
        "time, to bound memory on long replays (default: keep every session)",
    )
    parser.add_argument(
        "--progress",
        action="store_true",
        help="report progress to stderr even when it is not a terminal",
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no summary, progress or invalid-span report: decisions only",
    )
    parser.add_argument(
        "--list-settings",
        action="store_true",
        help="list the policy thresholds --set accepts, with their values, and exit",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Replay the files named in ``args``; return the exit code.

    Raises:
        ConfigError: a flag, the policy or the price file is invalid.
        TripwireError: a file cannot be read or the output cannot be written.
    """
    detector = build_detector(args.policy, args.prices, args.overrides)
    if args.list_settings:
        sys.stdout.write(format_settings(detector.policy))
        return 0
    if not args.files:
        raise ConfigError(
            "no span file given: name one or more files, or '-' to read stdin"
        )

    runtime = EmbeddedRuntime(detector, idle_timeout_s=args.idle_timeout)
    show_progress = not args.quiet and (args.progress or sys.stderr.isatty())
    progress = Progress(sys.stderr, _total_bytes(args.files), enabled=show_progress)
    with _open_output(args.output) as out:
        replay(args.files, runtime, out, progress)
    progress.finish()

    if not args.quiet:
        report_invalid(runtime, sys.stderr)
        if args.summary == "table":
            sys.stderr.write(format_table(runtime, args.limit))
        elif args.summary == "json":
            sys.stderr.write(format_json(runtime, args.limit).decode() + "\n")
    return 0


def build_detector(
    policy_path: str | None, prices_path: str | None, overrides: Sequence[str]
) -> Detector:
    """Build the detector from a policy file, a price override and ``--set`` flags.

    Args:
        policy_path: a policy TOML file, or ``None`` for the environment's policy.
        prices_path: a price override JSON file, or ``None``.
        overrides: ``RULE=VALUE`` strings, applied over the policy.

    Returns:
        The detector, as the worker would build it with these settings.

    Raises:
        ConfigError: an override is malformed or names no threshold, or the
            policy or the price file is invalid.
    """
    prices = PriceBook.load(override=prices_path)
    policy = Policy.from_env(os.environ, toml_path=policy_path)
    if overrides:
        policy = policy.with_overrides(**parse_overrides(overrides))
    return Detector(policy, prices)


def parse_overrides(items: Sequence[str]) -> dict[str, str]:
    """Split ``RULE=VALUE`` flags into a dict; the policy parses the values.

    Raises:
        ConfigError: an item has no ``=`` or an empty rule name.
    """
    overrides: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise ConfigError(
                f"--set {item!r} is not RULE=VALUE: write it as, for example, "
                "--set session_budget_usd=5; --list-settings shows the rules"
            )
        overrides[name] = value.strip()
    return overrides


def format_settings(policy: Policy) -> str:
    """Return every setting ``--set`` accepts, with its value and meaning."""
    described = describe_settings()
    values = policy.settings()
    width = max(len(name) for name in described)
    lines = [
        f"{name:<{width}}  {_show_value(values.get(name)):>10}  {text}"
        for name, text in described.items()
    ]
    header = f"{'SETTING':<{width}}  {'VALUE':>10}  MEANING"
    return "\n".join([header, *lines]) + "\n"


def _show_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int):
        return f"{value:_}"
    return str(value)


def replay(
    files: Sequence[str],
    runtime: EmbeddedRuntime,
    out: IO[bytes],
    progress: Progress | None = None,
) -> None:
    """Feed every span of ``files`` to ``runtime``; write decisions to ``out``.

    Invalid records are counted on the runtime, never raised.

    Args:
        files: paths, or ``-`` for stdin, read in order.
        runtime: the embedded runtime to feed.
        out: binary stream the decisions are written to, one JSON line each.
        progress: progress reporter, or ``None``.

    Raises:
        TripwireError: a file cannot be opened or read.
    """
    feed = runtime.feed
    write = out.write
    for name in files:
        where = "<stdin>" if name == "-" else name
        for item in read_spans(name, progress):
            if isinstance(item, SpanValidationError):
                runtime.record_invalid(item, where)
            else:
                for decision in feed(item):
                    write(decision_to_json(decision))
            if progress is not None:
                progress.tick(runtime.counters.spans)


class Progress:
    """Report bytes read and spans per second, at most every two seconds.

    Args:
        stream: where progress lines go (stderr).
        total_bytes: size of the input, or 0 when unknown (stdin).
        enabled: whether to report at all.
    """

    def __init__(self, stream: IO[str], total_bytes: int, *, enabled: bool) -> None:
        self.stream = stream
        self.total_bytes = total_bytes
        self.enabled = enabled
        self.bytes_read = 0
        self.started = time.monotonic()
        self._last_report = self.started
        self._next_check = _PROGRESS_EVERY_SPANS
        self._spans = 0
        self._reported = False

    def tick(self, spans: int) -> None:
        """Note that ``spans`` spans have been fed; report if it is time."""
        if not self.enabled or spans < self._next_check:
            return

        self._next_check = spans + _PROGRESS_EVERY_SPANS
        self._spans = spans
        now = time.monotonic()
        if now - self._last_report >= _PROGRESS_INTERVAL_S:
            self._last_report = now
            self._write(now, end="\r" if self.stream.isatty() else "\n")

    def finish(self) -> None:
        """End the progress line, if one was written."""
        if self._reported and self.stream.isatty():
            self.stream.write("\n")
            self.stream.flush()

    def _write(self, now: float, end: str) -> None:
        elapsed = max(now - self.started, 1e-9)
        read = _mib(self.bytes_read)
        if self.total_bytes:
            share = 100.0 * self.bytes_read / self.total_bytes
            where = f"{read} / {_mib(self.total_bytes)} ({share:.0f}%)"
        else:
            where = read
        rate = self._spans / elapsed
        self.stream.write(
            f"replay: {where}, {self._spans:,} spans, {rate:,.0f} spans/s{end}"
        )
        self.stream.flush()
        self._reported = True


def report_invalid(runtime: EmbeddedRuntime, stream: IO[str]) -> None:
    """Write how many records were invalid, with the first few reasons."""
    counters = runtime.counters
    if counters.invalid:
        stream.write(f"replay: {counters.invalid:,} invalid record(s) skipped\n")
        for where, reason in counters.invalid_reasons:
            stream.write(f"  {where}: {reason}\n")
        if counters.invalid > len(counters.invalid_reasons):
            stream.write(
                f"  ... and {counters.invalid - len(counters.invalid_reasons):,} more\n"
            )
    unknown = runtime.unknown_models
    if unknown:
        names = ", ".join(
            f"{name} ({count:,})" for name, count in unknown.most_common(5)
        )
        stream.write(
            f"replay: {sum(unknown.values()):,} span(s) of unpriced models, "
            f"counted at $0: {names}; add them with --prices\n"
        )


_COLUMNS = ("SESSION", "AGENT", "USER", "COST $", "LLM", "TOOLS", "TOKENS", "VERDICT")


def format_table(runtime: EmbeddedRuntime, limit: int) -> str:
    """Return the session summary as a text table, most expensive first.

    Args:
        runtime: the runtime that replayed the spans.
        limit: sessions shown; 0 shows them all.

    Returns:
        The table, its totals line and a newline.
    """
    rows = runtime.sessions()
    shown = rows if limit == 0 else rows[:limit]
    cells = [_COLUMNS] + [_cells(row) for row in shown]
    widths = [max(len(line[i]) for line in cells) for i in range(len(_COLUMNS))]
    numeric = {3, 4, 5, 6}
    lines = []
    for line in cells:
        parts = [
            cell.rjust(width) if i in numeric else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        lines.append("  ".join(parts).rstrip())
    lines.append(_totals(runtime, rows, len(shown)))
    return "\n".join(lines) + "\n"


def _cells(row: SessionSummary) -> tuple[str, ...]:
    return (
        _clip(row.session_id, 36),
        _clip(row.agent_name or "-", 24),
        _clip(row.user_id or "-", 20),
        f"{row.cost_usd:,.4f}",
        f"{row.llm_calls:,}",
        f"{row.tool_calls:,}",
        f"{row.tokens:,}",
        row.verdict(most=2),
    )


def _totals(runtime: EmbeddedRuntime, rows: list[SessionSummary], shown: int) -> str:
    counters = runtime.counters
    cost = sum(row.cost_usd for row in rows)
    killed = sum(1 for row in rows if row.killed)
    alerted = sum(1 for row in rows if row.alert_rules and not row.killed)
    return (
        f"total: {len(rows):,} sessions (top {shown:,} shown), "
        f"{counters.spans:,} spans ({counters.duplicates:,} duplicate, "
        f"{counters.invalid:,} invalid), ${cost:,.4f}; {killed:,} killed, "
        f"{alerted:,} alerted only; {counters.kills:,} kill commands, "
        f"{counters.alerts:,} alerts"
    )


def format_json(runtime: EmbeddedRuntime, limit: int) -> bytes:
    """Return the session summary and the counters as one JSON document."""
    rows = runtime.sessions()
    counters = runtime.counters
    shown = rows if limit == 0 else rows[:limit]
    document = {
        "spans": counters.spans,
        "duplicates": counters.duplicates,
        "invalid": counters.invalid,
        "invalid_examples": [
            {"where": where, "reason": reason}
            for where, reason in counters.invalid_reasons
        ],
        "unknown_models": dict(sorted(runtime.unknown_models.items())),
        "kill_commands": counters.kills,
        "alerts": counters.alerts,
        "sessions_total": len(rows),
        "cost_usd": round(sum(row.cost_usd for row in rows), 6),
        "killed_sessions": sum(1 for row in rows if row.killed),
        "sessions": [_row_json(row) for row in shown],
    }
    return orjson.dumps(document)


def _row_json(row: SessionSummary) -> dict[str, Any]:
    return {
        "session_id": row.session_id,
        "agent_name": row.agent_name,
        "user_id": row.user_id,
        "cost_usd": round(row.cost_usd, 6),
        "llm_calls": row.llm_calls,
        "tool_calls": row.tool_calls,
        "tool_errors": row.tool_errors,
        "input_tokens": row.input_tokens,
        "output_tokens": row.output_tokens,
        "kill_reasons": row.kill_reasons,
        "user_kill_reasons": row.user_kill_reasons,
        "alert_rules": row.alert_rules,
        "verdict": row.verdict(),
        "evicted": row.evicted,
    }


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _mib(size: int) -> str:
    return f"{size / 1_048_576:,.1f} MiB"


def _total_bytes(files: Sequence[str]) -> int:
    total = 0
    for name in files:
        if name == "-":
            return 0
        try:
            total += os.path.getsize(name)
        except OSError:
            return 0
    return total


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


@contextmanager
def _open_output(path: str | None) -> Iterator[IO[bytes]]:
    if path is None or path == "-":
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
        return
    try:
        handle = open(path, "wb")  # noqa: SIM115 - closed below, after the replay
    except OSError as exc:
        raise TripwireError(
            f"cannot write decisions to {path!r}: {exc.strerror}; "
            "check the directory exists and is writable"
        ) from exc
    with handle:
        yield handle


class _CountingReader:
    """A binary file whose ``readline`` adds the bytes it returns to a progress."""

    def __init__(self, raw: IO[bytes], progress: Progress | None) -> None:
        self._readline = raw.readline
        self._progress = progress

    def readline(self, limit: int = -1) -> bytes:
        line = self._readline(limit)
        if self._progress is not None:
            self._progress.bytes_read += len(line)
        return line

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.readline, b"")


def read_spans(
    name: str, progress: Progress | None = None
) -> Iterator[SpanEvent | SpanValidationError]:
    """Yield the spans of one file, and an error for each bad record.

    Native JSON lines are read line by line; OTLP JSON and protobuf files are
    recognised by their first bytes and decoded whole.

    Args:
        name: a path, or ``-`` for native JSON lines on stdin.
        progress: credited with the bytes read, when given.

    Yields:
        Spans in file order, and a :class:`SpanValidationError` per invalid
        record, its reason naming the line when there is one.

    Raises:
        TripwireError: the file cannot be opened or read.
    """
    if name == "-":
        yield from iter_native_lines(_reader(sys.stdin.buffer, progress))
        return

    try:
        with open(name, "rb") as handle:
            encoding = sniff_encoding(handle.read(_SNIFF_BYTES))
            handle.seek(0)
            if encoding == "native":
                yield from iter_native_lines(_reader(handle, progress))
                return
    except OSError as exc:
        raise TripwireError(
            f"cannot read spans from {name!r}: {exc.strerror}; check the path "
            "and its permissions"
        ) from exc

    # OTLP files are decoded whole, so their progress is counted at the end.
    yield from iter_file_spans(name)
    if progress is not None:
        progress.bytes_read += os.path.getsize(name)


def _reader(raw: IO[bytes], progress: Progress | None) -> IO[bytes] | _CountingReader:
    return (
        raw
        if progress is None or not progress.enabled
        else _CountingReader(raw, progress)
    )
