"""``tripwire demo``: simulated agents, some runaway, and what Tripwire does."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import shutil
import statistics
import sys
import textwrap
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import orjson

from tripwire.cli.replay import build_detector
from tripwire.config import load_settings
from tripwire.errors import ConfigError, TripwireError
from tripwire.schemas.events import Alert, KillCommand, Scope, SpanEvent
from tripwire.schemas.native import encode_native
from tripwire.streams.core import Detector
from tripwire.streams.embedded import EmbeddedRuntime
from tripwire.streams.embedder import TextEmbedder
from tripwire.streams.policy import Policy
from tripwire.streams.simulate import (
    DEFAULT_SESSIONS,
    HEALTHY,
    RUNAWAY_KINDS,
    USER_CAP,
    Fleet,
    Scoreboard,
    ScoreReport,
    SessionScore,
    simulate_fleet,
)

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

logger = logging.getLogger(__name__)

Decision = KillCommand | Alert

# The live view fits the whole simulated run into about this many seconds.
_LIVE_SECONDS = 4.0
# With --broker, the run is fitted into about this many seconds by default.
_BROKER_SECONDS = 15.0
# How long the decision topics may take to be assigned, in seconds.
_ASSIGN_TIMEOUT_S = 15.0
# The live view is redrawn at most this often, in seconds.
_REDRAW_INTERVAL_S = 0.1

_EPILOG = """\
examples:
  tripwire demo
  tripwire demo --sessions 200 --seed 3 --no-live
  tripwire demo --set loop_tool_cycle_action=kill --set max_depth=3
  tripwire demo --broker kafka://127.0.0.1:9092

Exit code 0 when every runaway session was caught and no healthy session was
killed, 1 otherwise.
"""


def register(subparsers: Any) -> None:
    """Add the ``demo`` subcommand to the ``tripwire`` parser."""
    parser = subparsers.add_parser(
        "demo",
        help="simulate a fleet of agents, some runaway, and watch Tripwire stop them",
        description=textwrap.fill(
            "Simulate a fleet of LLM agents in event time: most are healthy, some "
            "loop (repeating a tool call, rewording one thought, or cycling through "
            "tool calls), burn budget, fight failing tools or recurse, and one "
            "user may go over the daily token cap. Run their spans through the "
            "detector (in-process, or through a Tripwire worker with --broker), "
            "stop each "
            "session the moment a kill command names it, and compare what "
            "Tripwire caught with the simulated ground truth.",
            width=78,
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--sessions",
        type=int,
        default=DEFAULT_SESSIONS,
        metavar="N",
        help=f"simulated sessions, at least 6 (default: {DEFAULT_SESSIONS})",
    )
    parser.add_argument(
        "--seed", type=int, default=7, metavar="S", help="random seed (default: 7)"
    )
    parser.add_argument(
        "--speed",
        type=float,
        default=None,
        metavar="X",
        help="play event time X times faster than real time (default: fit the "
        f"run into about {_LIVE_SECONDS:.0f} s when live, no pacing otherwise)",
    )
    parser.add_argument(
        "--no-live",
        action="store_true",
        help="print plain event lines instead of the refreshing view",
    )
    parser.add_argument(
        "--broker",
        metavar="URL",
        help="run through a Tripwire worker on this Kafka broker instead of "
        "in-process, for example kafka://127.0.0.1:9092",
    )
    parser.add_argument(
        "--wait",
        type=float,
        default=15.0,
        metavar="SECONDS",
        help="with --broker: how long to wait for the worker's last decisions "
        "(default: 15)",
    )
    parser.add_argument(
        "--record",
        metavar="PATH",
        help="also write the fleet's full, unstopped run as native JSON lines "
        "(for tripwire replay)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="RULE=VALUE",
        help="override one policy threshold (repeatable); see tripwire replay "
        "--list-settings",
    )
    parser.add_argument("--policy", metavar="TOML", help="policy file")
    parser.add_argument("--prices", metavar="JSON", help="price override file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo described by ``args``; return 0 when Tripwire got it right.

    Raises:
        ConfigError: a flag, the policy or the price file is invalid.
        TripwireError: the record file cannot be written, or the broker fails.
    """
    try:
        return _run(args)
    except BrokenPipeError:
        # The reader left (``tripwire demo | head``): stop without a traceback,
        # and keep the interpreter's final flush from failing again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _run(args: argparse.Namespace) -> int:
    if args.speed is not None and args.speed <= 0:
        raise ConfigError(
            f"--speed must be > 0, got {args.speed}: 10 plays ten times faster "
            "than real time"
        )
    detector = build_detector(args.policy, args.prices, args.overrides)
    fleet = simulate_fleet(
        args.sessions,
        args.seed,
        session_token_budget=detector.policy.token_budget,
        user_daily_tokens=detector.policy.user_daily_tokens,
    )
    if args.record:
        record_fleet(fleet, Path(args.record))
    if args.broker:
        # The worker keeps session and user-day state across runs.
        fleet = fleet.with_run_id(uuid.uuid4().hex[:8])
    board = Scoreboard(fleet, lambda span: span_cost(detector, span))

    live = not args.no_live and sys.stdout.isatty()
    speed = args.speed
    if speed is None and live:
        speed = max(played_duration(fleet) / _LIVE_SECONDS, 1.0)
    note = describe_policy(detector.policy, broker=bool(args.broker))
    view: View = (LiveView if live else EventLog)(board, sys.stdout, note)
    view.start()
    try:
        if args.broker:
            asyncio.run(
                play_on_broker(fleet, board, view, args.broker, speed, args.wait)
            )
        else:
            play(fleet, EmbeddedRuntime(detector), board, view, speed)
    finally:
        view.stop()

    report = board.report()
    sys.stdout.write(format_report(board, report))
    return 0 if report.passed else 1


def played_duration(fleet: Fleet) -> float:
    """Return the event-time seconds a demo run is expected to last.

    Runaway sessions are stopped long before their full run would end, so the
    run lasts until the sessions that should run to the end have ended: the
    healthy ones and the batch user's. Pacing by this, rather than by the
    full run, fits what is actually played into the wanted wall time.
    """
    spans = [span for session in fleet.sessions for span in session.spans]
    if not spans:
        return 0.0
    ordinary = [
        span.end_time
        for session in fleet.sessions
        if session.expected in (HEALTHY, USER_CAP)
        for span in session.spans
    ]
    end = max(ordinary) if ordinary else max(span.end_time for span in spans)
    return end - min(span.start_time for span in spans)


def play(
    fleet: Fleet,
    runtime: EmbeddedRuntime,
    board: Scoreboard,
    view: View | None = None,
    speed: float | None = None,
) -> None:
    """Run the fleet's spans through ``runtime``, stopping killed sessions.

    Args:
        fleet: the simulated fleet.
        runtime: the embedded runtime with the detector.
        board: follows what ran and what was decided.
        view: shows progress and decisions, or ``None``.
        speed: event-time seconds per wall-clock second; ``None`` runs flat out.
    """
    pacer = Pacer(speed, view)
    for span in fleet.spans():
        if not board.runs(span):
            continue
        pacer.wait_for(span.end_time)
        board.ran(span)
        if view is not None:
            view.span(span)
        for decision in runtime.feed(span):
            changed = board.decide(decision)
            if view is not None:
                view.decision(decision, changed)


class Pacer:
    """Hold each span back until its event time, scaled by ``speed``, is due.

    Args:
        speed: event-time seconds per wall-clock second; ``None`` never waits.
        view: redrawn while waiting, or ``None``.
    """

    def __init__(self, speed: float | None, view: View | None) -> None:
        self.speed = speed
        self.view = view
        self._origin: tuple[float, float] | None = None

    def wait_for(self, event_time: float) -> None:
        """Sleep until ``event_time`` is due on the scaled clock."""
        if self.speed is None:
            return
        if self._origin is None:
            self._origin = (event_time, time.monotonic())
            return

        start_event, start_wall = self._origin
        due = start_wall + (event_time - start_event) / self.speed
        while (delay := due - time.monotonic()) > 0:
            time.sleep(min(delay, _REDRAW_INTERVAL_S))
            if self.view is not None:
                self.view.refresh()

    async def await_for(self, event_time: float) -> None:
        """Like :meth:`wait_for`, without blocking the event loop."""
        if self.speed is None:
            await asyncio.sleep(0)
            return
        if self._origin is None:
            self._origin = (event_time, time.monotonic())
            return

        start_event, start_wall = self._origin
        due = start_wall + (event_time - start_event) / self.speed
        while (delay := due - time.monotonic()) > 0:
            await asyncio.sleep(min(delay, _REDRAW_INTERVAL_S))
            if self.view is not None:
                self.view.refresh()


async def play_on_broker(
    fleet: Fleet,
    board: Scoreboard,
    view: View | None,
    url: str,
    speed: float | None,
    wait_s: float,
) -> None:
    """Run the fleet through a Tripwire worker on a Kafka broker.

    Spans go to the worker's span topic as native JSON keyed by session id;
    kill commands and alerts come back on its kill-switch and alert topics.
    A span of a session already killed is never sent. Give the fleet per-run
    ids (:meth:`Fleet.with_run_id`): the worker keeps state across runs.

    Args:
        fleet: the simulated fleet.
        board: follows what ran and what was decided.
        view: shows progress and decisions, or ``None``.
        url: the broker, ``kafka://host:port`` or ``host:port``.
        speed: event-time seconds per wall-clock second; ``None`` fits the run
            into about 15 seconds, so the worker keeps up.
        wait_s: after the last span, how long to wait for the last decisions.

    Raises:
        TripwireError: the broker cannot be reached or the worker's topics do
            not exist.
    """
    # Kafka clients are only needed here; plain demos do not pay their import.
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.errors import KafkaError

    if not logger.isEnabledFor(logging.DEBUG):
        # The Kafka client's start-up chatter would scroll over the live view.
        logging.getLogger("aiokafka").setLevel(logging.WARNING)
    settings = load_settings(overrides={"broker": url})
    topics = settings.topics
    speed = speed or max(played_duration(fleet) / _BROKER_SECONDS, 1.0)
    servers = settings.bootstrap_servers
    consumer = AIOKafkaConsumer(
        bootstrap_servers=servers,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="latest",
    )
    producer = AIOKafkaProducer(bootstrap_servers=servers, linger_ms=5)
    try:
        await consumer.start()
        await producer.start()
        await _assign_at_end(consumer, (topics.killswitch, topics.alerts))
    except BaseException as exc:
        await _stop(consumer, producer)
        if not isinstance(exc, KafkaError):
            raise
        raise TripwireError(
            f"cannot use the Kafka broker at {servers}: {exc}; start it "
            "(scripts/services start) and a worker (tripwire worker), or drop --broker"
        ) from exc

    embedder = TextEmbedder()
    listener = asyncio.create_task(_listen(consumer, topics.killswitch, board, view))
    try:
        pacer = Pacer(speed, view)
        for span in fleet.spans():
            if not board.runs(span):
                continue
            await pacer.await_for(span.end_time)
            board.ran(span)
            if view is not None:
                view.span(span)
            await producer.send(
                topics.spans, _wire_value(span, embedder), key=span.session_id.encode()
            )
        await producer.flush()
        await _settle(board, wait_s)
    finally:
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
        await _stop(consumer, producer)


async def _assign_at_end(consumer: AIOKafkaConsumer, names: Iterable[str]) -> None:
    """Read ``names`` from their current ends, once the positions are known."""
    wanted = set(names)
    missing = sorted(wanted - await consumer.topics())
    if missing:
        raise TripwireError(
            f"topic(s) {missing} do not exist on the broker: start a worker "
            "(tripwire worker), which creates its topics, then run the demo"
        )
    consumer.subscribe(topics=sorted(wanted))
    deadline = time.monotonic() + _ASSIGN_TIMEOUT_S
    while {tp.topic for tp in consumer.assignment()} != wanted:
        if time.monotonic() > deadline:
            raise TripwireError(
                f"no partitions of {sorted(wanted)} were assigned within "
                f"{_ASSIGN_TIMEOUT_S:.0f} s; check the broker is healthy"
            )
        await asyncio.sleep(0.05)
    # Resolve every position now (to the end: auto_offset_reset is latest),
    # so that no decision of this run comes before it and is missed.
    for partition in consumer.assignment():
        await consumer.position(partition)


async def _listen(
    consumer: AIOKafkaConsumer, kill_topic: str, board: Scoreboard, view: View | None
) -> None:
    from tripwire.agents.killswitch import decode_kill_command

    async for message in consumer:
        try:
            decision: Decision = (
                decode_kill_command(message.value)
                if message.topic == kill_topic
                else decode_alert(message.value)
            )
        except ValueError as exc:
            logger.warning("undecodable record on %s skipped: %s", message.topic, exc)
            continue
        changed = board.decide(decision)
        if view is not None and (changed or _names_fleet(board, decision)):
            view.decision(decision, changed)


async def _settle(board: Scoreboard, wait_s: float) -> None:
    """Wait for the worker's last decisions, or until every runaway is caught."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        runaways = [s for s in board.scores.values() if s.session.runaway]
        if all(score.killed or score.finished for score in runaways):
            return
        await asyncio.sleep(0.2)


async def _stop(consumer: AIOKafkaConsumer, producer: AIOKafkaProducer) -> None:
    await asyncio.gather(consumer.stop(), producer.stop(), return_exceptions=True)


def _names_fleet(board: Scoreboard, decision: Decision) -> bool:
    if decision.session_id in board.scores:
        return True
    users = {score.session.user_id for score in board.scores.values()}
    return decision.user_id in users


def decode_alert(data: bytes | None) -> Alert:
    """Decode an alert from its JSON form, as the worker publishes it.

    Raises:
        ValueError: the data is not a JSON object with an alert's fields.
    """
    try:
        record = orjson.loads(data or b"")
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"alert is not valid JSON: {exc}") from exc
    if not isinstance(record, dict):
        raise ValueError(f"alert must be a JSON object, got {type(record).__name__}")
    try:
        record["scope"] = Scope(record["scope"])
        return Alert(**record)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"alert has a missing or malformed field: {exc}") from exc


def span_cost(detector: Detector, span: SpanEvent) -> float:
    """Return the cost of one span in USD, with the detector's price book."""
    return detector.prices.cost(span).cost_usd


def _wire_value(span: SpanEvent, embedder: TextEmbedder) -> bytes:
    """Encode a span for the broker as an agent's exporter would: code, no text."""
    if span.output_text:
        code = embedder.wire_code(span.output_text)
        span = dataclasses.replace(span, output_text=None, output_code=code)
    return encode_native(span)


def record_fleet(fleet: Fleet, path: Path) -> None:
    """Write the fleet's full run as native JSON lines, in event-time order.

    The output text is kept: it is synthetic, and the loop detector needs it
    when the file is replayed.

    Raises:
        TripwireError: the file cannot be written.
    """
    try:
        with path.open("wb") as handle:
            for span in fleet.spans():
                handle.write(encode_native(span, include_text=True) + b"\n")
    except OSError as exc:
        raise TripwireError(
            f"cannot write the simulated spans to {str(path)!r}: {exc.strerror}; "
            "check the directory exists and is writable"
        ) from exc
    logger.info("wrote %d simulated spans to %s", fleet.span_count, path)


def describe_policy(policy: Policy, *, broker: bool = False) -> str:
    """Return one line saying which policy decides: every setting off its default.

    Args:
        policy: the policy the demo was built with.
        broker: the decisions come from a worker, which has a policy of its own.
    """
    if broker:
        return (
            "Policy: the worker's own; the settings here only price spans and "
            "size the batch user"
        )
    defaults = Policy().settings()
    changed = [
        f"{name}={_show(value)} (default {_show(defaults[name])})"
        for name, value in policy.settings().items()
        if value != defaults.get(name)
    ]
    if policy.agents:
        changed.append("overrides for agents " + ", ".join(sorted(policy.agents)))
    if not changed:
        return "Policy: the defaults (docs/detection.md)"
    return "Policy: the defaults, except " + "; ".join(changed)


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


class View:
    """Shows the demo as it runs. The base class shows nothing.

    Args:
        board: the scoreboard the view reads.
        stream: where to write.
        policy_note: one line naming the policy, shown under the headline.
    """

    def __init__(
        self, board: Scoreboard, stream: IO[str], policy_note: str = ""
    ) -> None:
        self.board = board
        self.stream = stream
        self.policy_note = policy_note
        spans = [span for s in board.fleet.sessions for span in s.spans]
        self.origin = min(span.start_time for span in spans)
        self.now = self.origin
        self.spans_run = 0
        self.kills = 0
        self.alerts = 0

    def start(self) -> None:
        """Show the opening lines."""

    def stop(self) -> None:
        """Show the final state."""

    def refresh(self) -> None:
        """Redraw, if the view redraws."""

    def span(self, span: SpanEvent) -> None:
        """Note that ``span`` ran."""
        self.spans_run += 1
        self.now = max(self.now, span.end_time)

    def decision(self, decision: Decision, changed: list[SessionScore]) -> None:
        """Show one decision and the sessions it changed."""
        if isinstance(decision, KillCommand):
            self.kills += 1
        else:
            self.alerts += 1

    def headline(self) -> list[str]:
        """Return what is being simulated: the fleet, its ground truth, the policy."""
        fleet = self.board.fleet
        kinds = Counter(session.expected for session in fleet.sessions)
        mix = ", ".join(
            f"{kinds[kind]} {kind}" for kind in (HEALTHY, *RUNAWAY_KINDS) if kinds[kind]
        )
        if kinds[USER_CAP]:
            mix += " (one user's batch)"
        lines = [
            f"Simulating {len(fleet.sessions)} agent sessions (seed {fleet.seed}), "
            f"{fleet.span_count:,} spans over {fleet.duration_s:,.0f} s of event "
            "time.",
            f"Ground truth: {mix}.",
        ]
        if self.policy_note:
            lines.append(self.policy_note)
        return lines

    def clock(self) -> str:
        """Return the event-time clock, ``+SSS.Ss``."""
        return f"+{self.now - self.origin:6.1f}s"

    def describe(self, decision: Decision, changed: list[SessionScore]) -> str:
        """Return one line saying what was decided, beside the ground truth."""
        if isinstance(decision, Alert):
            if not changed:
                truth = "-"
            elif changed[0].session.runaway:
                truth = f"{changed[0].session.expected} [flagged]"
            else:
                truth = f"{HEALTHY} [FALSE ALERT]"
            return (
                f"{self.clock()}  ALERT  {decision.target:<22} {decision.rule:<24} "
                f"step {changed[0].steps_run if changed else '-'}, truth: {truth}"
            )
        if decision.scope is Scope.USER:
            users = [
                score
                for score in self.board.scores.values()
                if score.session.user_id == decision.target
            ]
            return (
                f"{self.clock()}  KILL   user {decision.target:<17} "
                f"{decision.reason:<24} stops {len(changed)} running session(s), "
                f"truth: {_truths(users) or '-'}"
            )
        if not changed:
            return (
                f"{self.clock()}  KILL   {decision.target:<22} {decision.reason:<24} "
                "(already stopped)"
            )
        score = changed[0]
        verdict = "caught" if score.session.runaway else "FALSE KILL"
        return (
            f"{self.clock()}  KILL   {decision.target:<22} {decision.reason:<24} "
            f"step {score.killed_at_step}, ${score.cost_run_usd:,.2f} spent, "
            f"truth: {score.session.expected} [{verdict}]"
        )


class EventLog(View):
    """Plain lines, one per decision: for logs, pipes and CI."""

    def start(self) -> None:
        """Print the headline."""
        self.stream.write("\n".join(self.headline()) + "\n")
        self.stream.flush()

    def decision(self, decision: Decision, changed: list[SessionScore]) -> None:
        """Print the decision."""
        super().decision(decision, changed)
        self.stream.write(self.describe(decision, changed) + "\n")
        self.stream.flush()


class LiveView(View):
    """A text view redrawn in place on a terminal, about ten times a second."""

    def __init__(
        self, board: Scoreboard, stream: IO[str], policy_note: str = ""
    ) -> None:
        super().__init__(board, stream, policy_note)
        self.recent: deque[str] = deque(maxlen=6)
        self._drawn = 0.0
        # When each session was last named by a decision, in decisions shown.
        self._touched: dict[str, int] = {}

    def start(self) -> None:
        """Hide the cursor and draw the empty board."""
        self.stream.write("\x1b[?25l")
        self.refresh(force=True)

    def stop(self) -> None:
        """Draw the final board and give the cursor back."""
        self.refresh(force=True)
        self.stream.write("\x1b[?25h\n")
        self.stream.flush()

    def span(self, span: SpanEvent) -> None:
        """Note the span; redraw if it is time."""
        super().span(span)
        self.refresh()

    def decision(self, decision: Decision, changed: list[SessionScore]) -> None:
        """Add the decision to the recent events; redraw."""
        super().decision(decision, changed)
        for score in changed:
            self._touched[score.session.session_id] = self.kills + self.alerts
        self.recent.append(self.describe(decision, changed))
        self.refresh(force=True)

    def refresh(self, force: bool = False) -> None:
        """Redraw the board, at most ten times a second unless forced."""
        now = time.monotonic()
        if not force and now - self._drawn < _REDRAW_INTERVAL_S:
            return
        self._drawn = now
        width, height = shutil.get_terminal_size((100, 30))
        lines = self.render(max(height - 2, 12), width)
        clipped = [line[: width - 1] for line in lines]
        self.stream.write("\x1b[H\x1b[2J" + "\n".join(clipped))
        self.stream.flush()

    def render(self, height: int, width: int = 120) -> list[str]:
        """Return the board's lines, fitted into ``height`` lines.

        The agent column is left out on terminals narrower than 130
        characters. When the runaway sessions do not all fit, the running
        ones and those most recently decided on are shown.
        """
        board = self.board
        scores = list(board.scores.values())
        spent = sum(score.cost_run_usd for score in scores)
        at = datetime.fromtimestamp(self.now, tz=UTC).strftime("%H:%M:%S")
        agents = width >= 130
        headline = self.headline()
        headline[0] = "Tripwire demo. " + headline[0]
        lines = [
            *(part for line in headline for part in textwrap.wrap(line, width - 1)),
            f"event time {at} UTC ({self.clock().strip()})   spans run "
            f"{self.spans_run:,}   kill commands {self.kills}   alerts {self.alerts}"
            f"   spent ${spent:,.2f}",
            "",
            _header_line(agents),
        ]
        batch = [s for s in scores if s.session.expected == USER_CAP]
        shown = [
            s
            for s in scores
            if s.session.expected != USER_CAP
            and (s.session.runaway or s.killed or s.alerts)
        ]
        recent = list(self.recent)[-max(2, min(6, height // 5)) :]
        room = height - len(lines) - 3 - len(recent) - (1 if batch else 0)
        if len(shown) > room:
            picked = set(map(id, sorted(shown, key=self._priority)[: max(room - 1, 0)]))
            hidden = len(shown) - len(picked)
            shown = [score for score in shown if id(score) in picked]
        else:
            hidden = 0
        lines.extend(_score_line(score, agents) for score in shown)
        if hidden:
            lines.append(f"... {hidden} more runaway session(s)")

        if batch:
            states = Counter(score.status for score in batch)
            lines.append(
                f"user {batch[0].session.user_id}, batch of {len(batch)} sessions "
                f"({USER_CAP}): {states['running']} running, {states['finished']} "
                f"finished, {states['killed']} killed"
            )
        healthy = [s for s in scores if not s.session.runaway]
        states = Counter(score.status for score in healthy)
        flagged = sum(1 for score in healthy if score.alerts)
        lines.append(
            f"healthy sessions: {len(healthy)}: {states['finished']} finished, "
            f"{states['running']} running, {states['waiting']} not started, "
            f"{states['killed']} killed, {flagged} alerted"
        )
        lines.append("")
        lines.extend(recent)
        return lines

    def _priority(self, score: SessionScore) -> tuple[int, int]:
        touched = self._touched.get(score.session.session_id, -1)
        return (0 if score.status == "running" else 1, -touched)


def _header_line(agents: bool) -> str:
    agent = f"{'AGENT':<19} " if agents else ""
    return (
        f"{'SESSION':<17} {agent}{'TRUTH':<13} {'STATUS':<8} {'STEPS':>5} "
        f"{'COST $':>7}  {'VERDICT':<11} TRIPWIRE"
    )


def _score_line(score: SessionScore, agents: bool = True) -> str:
    session = score.session
    alerts = ", ".join(score.alerts)
    if score.killed:
        said = f"{score.kill_reason} (alert: {alerts})" if alerts else score.kill_reason
    else:
        said = f"alert: {alerts}" if alerts else "-"
    agent = f"{session.agent_name:<19} " if agents else ""
    return (
        f"{session.session_id:<17} {agent}{session.expected:<13} "
        f"{score.status:<8} {score.steps_run:>5} {score.cost_run_usd:>7.2f}  "
        f"{_verdict(score):<11} {said}"
    )


def _verdict(score: SessionScore) -> str:
    if not score.session.runaway:
        if score.killed:
            return "FALSE KILL"
        return "FALSE ALERT" if score.alerts else "-"
    if score.killed:
        return "caught"
    if score.finished:
        return "MISSED"
    return "flagged" if score.alerts else "-"


def _truths(scores: Iterable[SessionScore]) -> str:
    return ", ".join(sorted({score.session.expected for score in scores}))


def format_report(board: Scoreboard, report: ScoreReport) -> str:
    """Return the confusion summary: ground truth beside Tripwire's decisions."""
    scores = list(board.scores.values())
    lines = [
        "",
        "Ground truth vs Tripwire",
        f"{'KIND':<13} {'KILLED':>7} {'ALERTED':>8} {'ALERT STEP':>11} "
        f"{'KILL STEP':>10} {'SPENT $':>9} {'FULL RUN $':>11} {'SAVED $':>9}",
    ]
    for kind in RUNAWAY_KINDS:
        group = [s for s in scores if s.session.expected == kind]
        if group:
            lines.append(_kind_line(kind, group))
    healthy = [s for s in scores if not s.session.runaway]
    lines.append(_kind_line(HEALTHY, healthy))
    lines.append(
        "  STEPS: median LLM and tool calls run before the first alert, and "
        "before the kill."
    )
    lines.append(
        "  Only a kill stops a session: a runaway that was alerted but never "
        "killed is missed."
    )

    lines.append("")
    runaways = sorted(report.caught + report.missed, key=_by_session)
    for score in runaways:
        if score.session.expected != USER_CAP:
            lines.append(_runaway_line(score))
    lines.extend(_user_lines([s for s in runaways if s.session.expected == USER_CAP]))
    for score in sorted(report.false_kills, key=_by_session):
        lines.append(
            f"  FALSE KILL {score.session.session_id} ({score.session.agent_name}): "
            f"{score.kill_reason} at step {score.killed_at_step} of {score.full_steps}"
        )
    for score in sorted(report.false_alerts, key=_by_session):
        lines.append(
            f"  FALSE ALERT {score.session.session_id} ({score.session.agent_name}): "
            f"{', '.join(score.alerts)} at step {score.alerted_at_step} of "
            f"{score.full_steps}"
        )

    runaway = report.caught + report.missed
    full = sum(s.full_cost_usd for s in runaway)
    saved = sum(s.saved_usd for s in runaway)
    share = 100.0 * saved / full if full else 0.0
    lines.append("")
    lines.append(
        f"runaway sessions: {len(report.caught)}/{len(runaway)} caught; spent "
        f"${full - saved:,.2f} of a ${full:,.2f} full run, ${saved:,.2f} saved "
        f"({share:.0f}%)"
    )
    lines.append(
        f"healthy sessions: {len(healthy)}; {len(report.false_kills)} killed, "
        f"{len(report.false_alerts)} alerted"
    )
    if report.passed:
        lines.append("PASS: every runaway session caught, no healthy session killed")
    else:
        lines.append(
            f"FAIL: {len(report.missed)} runaway session(s) missed, "
            f"{len(report.false_kills)} healthy session(s) killed"
        )
    return "\n".join(lines) + "\n"


def _kind_line(kind: str, group: list[SessionScore]) -> str:
    if kind == HEALTHY:
        stopped = [s for s in group if s.killed]
    else:
        stopped = [s for s in group if s.caught]
    alerted = [s for s in group if s.alerted]
    alert_steps = [s.alerted_at_step for s in alerted if s.alerted_at_step is not None]
    kill_steps = [s.killed_at_step for s in stopped if s.killed_at_step is not None]
    spent = sum(s.cost_run_usd for s in group)
    full = sum(s.full_cost_usd for s in group)
    saved = f"{full - spent:.2f}" if kind != HEALTHY else "-"
    killed = f"{len(stopped)}/{len(group)}"
    flagged = f"{len(alerted)}/{len(group)}"
    return (
        f"{kind:<13} {killed:>7} {flagged:>8} {_median(alert_steps):>11} "
        f"{_median(kill_steps):>10} {spent:>9.2f} {full:>11.2f} {saved:>9}"
    )


def _median(steps: list[int]) -> str:
    return f"{statistics.median(steps):.0f}" if steps else "-"


def _runaway_line(score: SessionScore) -> str:
    session = score.session
    head = f"  {session.expected:<13} {session.session_id} ({session.agent_name}):"
    alert = ""
    if score.alerts:
        alert = (
            f" alerted by {', '.join(score.alerts)} at step {score.alerted_at_step},"
        )
    if not score.caught:
        return (
            f"{head}{alert} MISSED, never killed, ran all {score.full_steps} steps, "
            f"${score.full_cost_usd:,.2f}"
        )
    return (
        f"{head}{alert} killed by {score.kill_reason} at step {score.killed_at_step} "
        f"of {score.full_steps}, ${score.cost_run_usd:,.2f} of "
        f"${score.full_cost_usd:,.2f}"
    )


def _user_lines(batch: list[SessionScore]) -> list[str]:
    lines = []
    for user in sorted({score.session.user_id for score in batch}):
        mine = [score for score in batch if score.session.user_id == user]
        reason = next((s.user_kill_reason for s in mine if s.user_kill_reason), None)
        if reason is None:
            lines.append(
                f"  {USER_CAP:<13} user {user}: MISSED, {len(mine)} sessions ran "
                "to the end"
            )
            continue
        stopped = sum(1 for score in mine if score.killed)
        lines.append(
            f"  {USER_CAP:<13} user {user}: killed by {reason}, {stopped} of its "
            f"{len(mine)} batch sessions stopped mid-run, the others had ended"
        )
    return lines


def _by_session(score: SessionScore) -> str:
    return score.session.session_id
