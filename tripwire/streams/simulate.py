"""A deterministic fleet of simulated agents: realistic spans with ground truth."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Final

import orjson

from tripwire.errors import ConfigError
from tripwire.schemas.events import (
    Alert,
    KillCommand,
    Scope,
    SpanEvent,
    SpanKind,
    ToolStatus,
)

logger = logging.getLogger(__name__)

HEALTHY: Final = "healthy"
LOOP: Final = "loop"
LOOP_TEXT: Final = "loop_text"
LOOP_CYCLE: Final = "loop_cycle"
BUDGET: Final = "budget"
TOOL_FAILURES: Final = "tool_failures"
RECURSION: Final = "recursion"
USER_CAP: Final = "user_cap"

#: Every runaway kind the simulator can produce, in the order they are dealt.
RUNAWAY_KINDS: Final = (
    LOOP,
    LOOP_TEXT,
    LOOP_CYCLE,
    BUDGET,
    TOOL_FAILURES,
    RECURSION,
    USER_CAP,
)
#: The ways a session loops, dealt in turn: the same tool call again and again,
#: the same thought reworded between varied calls, a cycle of tool calls.
LOOP_KINDS: Final = (LOOP, LOOP_TEXT, LOOP_CYCLE)

#: Sessions in a default fleet: enough for the batch user to join (about 60 are
#: needed at the default policy) with about two sessions in three healthy.
DEFAULT_SESSIONS: Final = 80

#: Event time of the first session start: 2025-06-02 09:00:00 UTC. Fixed, so
#: the same seed gives the same spans whatever the wall clock says.
DEFAULT_START_TIME: Final = 1_748_854_800.0

# Sessions arrive over this many event-time seconds.
_ARRIVAL_WINDOW_S: Final = 240.0
# Each of the batch user's sessions reads between these shares of the session
# token budget: few, heavy sessions, just enough of them to pass the daily cap.
_BATCH_SHARE: Final = (0.94, 0.98)
# The batch user joins only when healthy sessions still number at least this
# many times the runaway ones (three in five sessions healthy).
_HEALTHY_RATIO: Final = 1.5


@dataclass(frozen=True, slots=True)
class _Model:
    name: str
    provider: str
    # Anthropic bills cache writes apart; OpenAI and Gemini cache implicitly.
    explicit_cache: bool
    # Output tokens per second, for realistic call durations.
    speed: float


_MODELS: Final = {
    "sonnet": _Model("claude-sonnet-4-5-20250929", "anthropic", True, 70.0),
    "haiku": _Model("claude-haiku-4-5-20251001", "anthropic", True, 140.0),
    "opus": _Model("claude-opus-4-1-20250805", "anthropic", True, 40.0),
    "gpt-4o-mini": _Model("gpt-4o-mini", "openai", False, 110.0),
    "gpt-4o": _Model("gpt-4o", "openai", False, 80.0),
    "gpt-4.1": _Model("gpt-4.1", "openai", False, 75.0),
    "flash": _Model("gemini-2.5-flash", "gcp.gemini", False, 160.0),
    "pro": _Model("gemini-2.5-pro", "gcp.gemini", False, 60.0),
}


@dataclass(frozen=True, slots=True)
class _Profile:
    """An agent type: its name, its models, its tools and its vocabulary."""

    name: str
    models: tuple[str, ...]
    tools: tuple[str, ...]
    subjects: tuple[str, ...]
    system_tokens: int
    # What a stuck agent of this type keeps looking for, and where; its
    # first tool is the one it looks with.
    facts: tuple[str, ...]
    place: str


_PROFILES: Final = (
    _Profile(
        "support-triage",
        ("haiku", "gpt-4o-mini"),
        ("search_kb", "get_ticket", "update_ticket", "lookup_order"),
        ("refund request", "login failure", "missing invoice", "shipping delay"),
        1_800,
        ("order number", "account email", "refund amount"),
        "knowledge base",
    ),
    _Profile(
        "research-assistant",
        ("sonnet", "flash"),
        ("web_search", "fetch_url", "extract_tables", "cite_source"),
        ("battery recycling", "EU AI Act", "GLP-1 market", "solid-state cells"),
        3_200,
        ("publication date", "market share figure", "enforcement date"),
        "sources",
    ),
    _Profile(
        "code-reviewer",
        ("sonnet", "gpt-4.1"),
        ("grep", "read_file", "run_tests", "git_diff"),
        ("auth middleware", "retry policy", "cache eviction", "schema migration"),
        4_500,
        ("failing test", "config default", "migration version"),
        "repository",
    ),
    _Profile(
        "data-analyst",
        ("gpt-4o", "pro"),
        ("run_sql", "describe_table", "plot_chart"),
        ("churn by cohort", "weekly revenue", "funnel drop-off", "ad spend ROI"),
        2_600,
        ("join key", "revenue column", "cohort definition"),
        "warehouse tables",
    ),
    _Profile(
        "travel-planner",
        ("gpt-4o-mini", "flash"),
        ("search_flights", "search_hotels", "get_weather", "convert_currency"),
        ("Lisbon weekend", "Tokyo in April", "Andes trek", "Oslo conference"),
        1_500,
        ("return flight", "visa rule", "hotel price"),
        "search results",
    ),
)

_NAMES: Final = (
    "Acme", "Borealis", "Cobalt", "Delta", "Ember", "Fjord", "Granite", "Helix",
    "Ionic", "Juniper", "Kestrel", "Lumen", "Meridian", "Nimbus", "Orchid",
)  # fmt: skip
_VERBS: Final = (
    "compare", "check", "summarise", "rank", "cross-reference", "validate",
    "group", "estimate", "extract", "reconcile",
)  # fmt: skip
_NOUNS: Final = (
    "sources", "records", "entries", "options", "results", "candidates",
    "rows", "documents", "matches", "quotes",
)  # fmt: skip
_ADJECTIVES: Final = (
    "recent", "relevant", "cheapest", "conflicting", "verified", "outdated",
    "primary", "regional", "duplicate", "flagged",
)  # fmt: skip
_ERRORS: Final = (
    "HTTP 503 Service Unavailable", "timeout after 30s", "HTTP 429 rate limited",
    "connection reset by peer", "HTTP 500 upstream error", "invalid JSON in reply",
)  # fmt: skip
# How an agent stuck on one missing fact rewords the same report after each
# new search. Every rewording uses the same content words, or some of them,
# and swaps none for another: the way real stuck agents reword (see
# tests/unit/streams/data/loop_pairs.jsonl).
_STUCK: Final = (
    "I still have not found the {fact} for the {subject}. Let me search the "
    "{place} again.",
    "The {fact} for the {subject} is still not in the {place}; I'll search the "
    "{place} once more.",
    "Searching the {place} again for the {subject} {fact}, which I have not found.",
    "No {fact} for the {subject} in the {place}. Let me search again.",
    "I will search the {place} one more time for the {fact} of the {subject}.",
    "Still no {fact} for the {subject}, so I am searching the {place} again.",
)


@dataclass(slots=True)
class SimulatedSession:
    """One simulated agent session: its spans and what it really is.

    Attributes:
        session_id: the session id carried by every span.
        user_id: the user the session runs for.
        agent_name: the agent type.
        expected: the ground truth, ``"healthy"`` or a runaway kind from
            ``RUNAWAY_KINDS``.
        spans: the full run, as it would go if nobody stopped it, in event-time
            order.
    """

    session_id: str
    user_id: str
    agent_name: str
    expected: str
    spans: list[SpanEvent] = field(default_factory=list)

    @property
    def runaway(self) -> bool:
        """Whether the ground truth says this session should be stopped."""
        return self.expected != HEALTHY

    @property
    def steps(self) -> int:
        """LLM calls and tool calls in the full run."""
        return sum(1 for span in self.spans if span.kind is not SpanKind.AGENT)


@dataclass(slots=True)
class Fleet:
    """A simulated fleet: its sessions and their spans merged in event time."""

    seed: int
    sessions: list[SimulatedSession]

    def spans(self) -> Iterator[SpanEvent]:
        """Yield every span of every session, ordered by end time.

        Ties keep session order, then the order within the session, so the
        stream is the same on every run.
        """
        keyed = [
            (span.end_time, index, position, span)
            for index, session in enumerate(self.sessions)
            for position, span in enumerate(session.spans)
        ]
        keyed.sort(key=lambda item: item[:3])
        for *_, span in keyed:
            yield span

    def ground_truth(self) -> dict[str, str]:
        """Return each session id's ground truth, ``"healthy"`` or a kind."""
        return {session.session_id: session.expected for session in self.sessions}

    def with_run_id(self, run_id: str) -> Fleet:
        """Return a copy whose session and user ids end with ``-<run_id>``.

        A detector keeps session and user-day state across runs, so a second
        run of the same seed against the same worker would look like a
        replay; distinct ids make each run start fresh.
        """
        sessions = []
        for session in self.sessions:
            session_id = f"{session.session_id}-{run_id}"
            user_id = f"{session.user_id}-{run_id}"
            spans = [
                dataclasses.replace(span, session_id=session_id, user_id=user_id)
                for span in session.spans
            ]
            sessions.append(
                dataclasses.replace(
                    session, session_id=session_id, user_id=user_id, spans=spans
                )
            )
        return Fleet(seed=self.seed, sessions=sessions)

    def session(self, session_id: str) -> SimulatedSession:
        """Return the session with this id.

        Raises:
            KeyError: no simulated session has this id.
        """
        for session in self.sessions:
            if session.session_id == session_id:
                return session
        raise KeyError(session_id)

    @property
    def span_count(self) -> int:
        """Spans in the fleet's full run."""
        return sum(len(session.spans) for session in self.sessions)

    @property
    def duration_s(self) -> float:
        """Event-time seconds from the first span start to the last span end."""
        spans = [span for session in self.sessions for span in session.spans]
        if not spans:
            return 0.0
        return max(s.end_time for s in spans) - min(s.start_time for s in spans)


def simulate_fleet(
    sessions: int = DEFAULT_SESSIONS,
    seed: int = 7,
    *,
    start_time: float = DEFAULT_START_TIME,
    session_token_budget: int = 500_000,
    user_daily_tokens: int = 5_000_000,
) -> Fleet:
    """Simulate a fleet of agent sessions, most healthy, some runaway.

    Roughly one session in ten loops (the loop kinds of ``LOOP_KINDS`` dealt
    in turn), one in twenty burns budget and one in twenty fights failing
    tools, and one recurses into ever deeper sub-agents. When the fleet is
    large enough, one user also runs a batch of a few heavy sessions, each
    under the session token budget, that together read more tokens than the
    user's daily cap; it joins only if three in five sessions stay healthy.
    The same arguments always give the same spans.

    Args:
        sessions: how many sessions to simulate, at least 6.
        seed: seed of the random generator.
        start_time: event time (Unix seconds) from which sessions start.
        session_token_budget: the per-session token budget the batch user's
            sessions each stay under.
        user_daily_tokens: the per-user daily token cap they add up to more
            than.

    Returns:
        The fleet, its sessions in a shuffled but seed-determined order.

    Raises:
        ConfigError: ``sessions`` is below 6, or a token figure is not > 0.
    """
    if sessions < 6:
        raise ConfigError(
            f"simulated sessions must be >= 6, got {sessions}: fewer cannot hold "
            "one session of each runaway kind; pass --sessions 6 or more"
        )
    if session_token_budget <= 0 or user_daily_tokens <= 0:
        raise ConfigError(
            "session token budget and user daily token cap must be > 0, got "
            f"{session_token_budget} and {user_daily_tokens}"
        )

    rng = random.Random(seed)
    users = [f"user-{rng.randrange(1000, 9999)}" for _ in range(max(3, sessions // 4))]
    loops = max(1, round(sessions * 0.10))
    # Dealt in turn: loop, loop_text, loop_cycle, loop, ...
    counts = {
        kind: len(range(index, loops, len(LOOP_KINDS)))
        for index, kind in enumerate(LOOP_KINDS)
    }
    counts |= {
        BUDGET: max(1, round(sessions * 0.05)),
        TOOL_FAILURES: max(1, round(sessions * 0.05)),
        RECURSION: 1,
    }
    room = sessions - sum(counts.values())
    # The most batch sessions that leave healthy ones _HEALTHY_RATIO times
    # as many as the runaways.
    most = int((room - _HEALTHY_RATIO * (sessions - room)) / (1 + _HEALTHY_RATIO))
    batch = _batch_sessions(
        rng, start_time, session_token_budget, user_daily_tokens, most
    )
    counts[HEALTHY] = room - len(batch)

    built = list(batch)
    for kind, count in counts.items():
        for _ in range(count):
            begin = start_time + rng.uniform(0.0, _ARRIVAL_WINDOW_S)
            builder = _SessionBuilder(rng, rng.choice(users), kind, begin)
            built.append(builder.build())
    rng.shuffle(built)
    for index, session in enumerate(built):
        _rename(session, f"sess-{index:03d}-{session.session_id}")

    logger.debug("simulated %d sessions with seed %d", len(built), seed)
    return Fleet(seed=seed, sessions=built)


def _batch_sessions(
    rng: random.Random,
    start_time: float,
    session_tokens: int,
    user_tokens: int,
    most: int,
) -> list[SimulatedSession]:
    """Return one user's batch of heavy sessions that together pass the token cap.

    Each session reads nearly a session token budget, so the batch holds as
    few sessions as the cap allows (11 at the default 500,000 and 5,000,000).
    When that takes more than ``most`` sessions, there is no batch.
    """
    if most < 1:
        return []
    user = f"user-{rng.randrange(10000, 99999)}"
    start = start_time + rng.uniform(20.0, 60.0)
    batch: list[SimulatedSession] = []
    used = 0
    while used <= user_tokens:
        if len(batch) == most:
            return []
        target = int(session_tokens * rng.uniform(*_BATCH_SHARE))
        builder = _SessionBuilder(rng, user, USER_CAP, start + rng.uniform(0.0, 10.0))
        batch.append(builder.build(target))
        used += _tokens(batch[-1])
    return batch


def _rename(session: SimulatedSession, session_id: str) -> None:
    session.session_id = session_id
    for span in session.spans:
        span.session_id = session_id


def _tokens(session: SimulatedSession) -> int:
    return sum(span.input_tokens + span.output_tokens for span in session.spans)


def _hex(rng: random.Random, digits: int) -> str:
    return f"{rng.getrandbits(digits * 4):0{digits}x}"


def _args_hash(tool: str, args: dict[str, object]) -> str:
    """Hash a tool call's arguments as agents do: canonical JSON, SHA-256."""
    canonical = orjson.dumps({"tool": tool, "args": args}, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()[:16]


class _SessionBuilder:
    """Writes one session's spans, keeping its clock, context and nesting."""

    def __init__(
        self,
        rng: random.Random,
        user_id: str,
        expected: str,
        start_time: float,
    ) -> None:
        self.rng = rng
        self.profile = rng.choice(_PROFILES)
        self.model = _MODELS[rng.choice(self.profile.models)]
        self.session = SimulatedSession(
            session_id=_hex(rng, 8),
            user_id=user_id,
            agent_name=self.profile.name,
            expected=expected,
        )
        self.trace_id = _hex(rng, 32)
        self.clock = start_time
        self.context = self.profile.system_tokens + rng.randint(200, 900)
        self.cached = 0
        self.tokens_used = 0
        self.parents: list[str] = []
        self.subject = rng.choice(self.profile.subjects)
        self.loop_plan: tuple[str, str] | None = None

    # Building blocks -----------------------------------------------------

    def _span(self, kind: SpanKind, start: float, end: float, **fields: object) -> None:
        # The root agent and its own steps are at depth 0, a sub-agent it
        # invokes and that sub-agent's steps at depth 1, and so on.
        depth = len(self.parents) - (0 if kind is SpanKind.AGENT else 1)
        span = SpanEvent(
            span_id=_hex(self.rng, 16),
            trace_id=self.trace_id,
            session_id=self.session.session_id,
            kind=kind,
            start_time=round(start, 6),
            end_time=round(end, 6),
            parent_span_id=self.parents[-1] if self.parents else None,
            user_id=self.session.user_id,
            agent_name=self.session.agent_name,
            depth=max(0, depth),
        )
        for name, value in fields.items():
            setattr(span, name, value)
        self.session.spans.append(span)

    def llm(self, text: str, *, model: _Model | None = None, finish: str = "") -> None:
        """Add an LLM call reading the whole context and writing ``text``."""
        model = model or self.model
        output_tokens = max(12, int(len(text) / 3.6) + self.rng.randint(0, 60))
        # The provider caches the prefix it has already seen, in 1024-token
        # blocks for the implicit caches.
        cache_read = self.cached
        if not model.explicit_cache:
            cache_read = (self.cached // 1024) * 1024
        cache_creation = self.context - self.cached if model.explicit_cache else 0
        duration = 0.35 + output_tokens / model.speed + self.context / 60_000
        start = self.clock + self.rng.uniform(0.02, 0.15)
        end = start + duration * self.rng.uniform(0.8, 1.25)
        self._span(
            SpanKind.LLM,
            start,
            end,
            model=model.name,
            provider=model.provider,
            input_tokens=self.context,
            output_tokens=output_tokens,
            cache_read_tokens=cache_read,
            cache_creation_tokens=cache_creation,
            finish_reason=finish
            or ("tool_calls" if self.rng.random() < 0.8 else "stop"),
            output_text=text,
        )
        self.clock = end
        self.cached = self.context
        self.tokens_used += self.context + output_tokens
        self.context += output_tokens

    def tool(
        self,
        name: str,
        args: dict[str, object],
        *,
        ok: bool = True,
        result_tokens: int = 0,
    ) -> None:
        """Add a tool call whose result joins the context."""
        start = self.clock + self.rng.uniform(0.01, 0.05)
        end = start + self.rng.uniform(0.08, 2.5 if ok else 6.0)
        self._span(
            SpanKind.TOOL,
            start,
            end,
            tool_name=name,
            tool_args_hash=_args_hash(name, args),
            tool_status=ToolStatus.OK if ok else ToolStatus.ERROR,
        )
        self.clock = end
        self.context += result_tokens or self.rng.randint(150, 1_800)

    def open_agent(self) -> tuple[str, float]:
        """Open an agent invocation; its span is written when it closes."""
        span_id = _hex(self.rng, 16)
        self.parents.append(span_id)
        return span_id, self.clock

    def close_agent(self, opened: tuple[str, float], outcome: str) -> None:
        """Close the innermost agent invocation and write its span."""
        span_id, start = opened
        self.parents.pop()
        self.clock += self.rng.uniform(0.005, 0.03)
        self._span(SpanKind.AGENT, start, self.clock, outcome=outcome)
        self.session.spans[-1].span_id = span_id

    # Texts ---------------------------------------------------------------

    def _sentence(self) -> str:
        rng = self.rng
        return rng.choice(
            (
                f"{rng.choice(_NAMES)} lists {rng.randint(2, 97)} "
                f"{rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}.",
                f"I will {rng.choice(_VERBS)} the {rng.choice(_ADJECTIVES)} "
                f"{rng.choice(_NOUNS)} from {rng.choice(_NAMES)} next.",
                f"About {rng.randint(3, 88)}% of the {rng.choice(_NOUNS)} are "
                f"{rng.choice(_ADJECTIVES)}, mostly from {rng.choice(_NAMES)}.",
                f"The {rng.choice(_NAMES)} figure of {rng.randint(100, 9999)} "
                f"disagrees with {rng.choice(_NAMES)} by {rng.randint(2, 40)}.",
                f"Step {rng.randint(1, 9)} needs the {rng.choice(_NOUNS)} "
                f"{rng.choice(_VERBS)}d before {rng.choice(_NAMES)} replies.",
            )
        )

    def fresh_text(self, lead: str) -> str:
        """Return a new, unrepeated answer opening with ``lead``."""
        sentences = [lead] + [self._sentence() for _ in range(self.rng.randint(2, 6))]
        return " ".join(sentences)

    def loop_text(self, target: str) -> str:
        """Return one rewording of the same stuck thought about ``target``.

        A stuck agent keeps its plan and rewords only the filler around it:
        the opening, "again" or "once more", a trailing excuse or none.
        """
        rng = self.rng
        if not self.loop_plan:
            verb = rng.choice(("check", "look at", "re-read", "inspect"))
            goal = rng.choice(("confirm", "verify", "double-check"))
            self.loop_plan = (verb, goal)
        verb, goal = self.loop_plan
        opening = rng.choice(("Let me", "I will", "I'll", "I should", "OK, let me"))
        again = rng.choice(("again", "once more", "one more time"))
        excuse = rng.choice((".", ", since the previous result did not settle it."))
        return (
            f"{opening} {verb} {target} {again} to {goal} the {self.subject} "
            f"details before answering{excuse}"
        )

    def stuck_text(self, fact: str) -> str:
        """Return one rewording of "I have not found ``fact``, searching again"."""
        template = self.rng.choice(_STUCK)
        return template.format(
            fact=fact, subject=self.subject, place=self.profile.place
        )

    def tool_args(self, tool: str) -> dict[str, object]:
        """Return plausible, fresh arguments for ``tool``."""
        rng = self.rng
        return {
            "q": f"{self.subject} {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}",
            "page": rng.randint(1, 40),
            "source": rng.choice(_NAMES),
            "tool": tool,
        }

    # Sessions --------------------------------------------------------------

    def build(self, batch_tokens: int = 0) -> SimulatedSession:
        """Write the whole session for its ground truth; return it."""
        root = self.open_agent()
        self.llm(self.fresh_text(f"Plan for the {self.subject} request:"))
        kind = self.session.expected
        if kind == LOOP:
            self._loop()
        elif kind == LOOP_TEXT:
            self._loop_text()
        elif kind == LOOP_CYCLE:
            self._loop_cycle()
        elif kind == BUDGET:
            self._budget()
        elif kind == TOOL_FAILURES:
            self._tool_failures()
        elif kind == RECURSION:
            self._recursion()
        elif kind == USER_CAP:
            self._batch(batch_tokens)
        else:
            self._healthy()
        self.llm(self.fresh_text("Final answer:"), finish="stop")
        ordinary = kind in (HEALTHY, USER_CAP)
        self.close_agent(root, "success" if ordinary else "gave_up")
        return self.session

    def _work_step(self) -> None:
        tool = self.rng.choice(self.profile.tools)
        self.tool(tool, self.tool_args(tool), ok=self.rng.random() > 0.04)
        self.llm(self.fresh_text(f"The {tool} result shows:"))

    def _healthy(self) -> None:
        for _ in range(self.rng.randint(1, 6)):
            self._work_step()

    def _loop(self) -> None:
        # The same tool call with the same arguments again and again, the
        # same thought reworded in between.
        for _ in range(self.rng.randint(1, 3)):
            self._work_step()
        tool = self.rng.choice(self.profile.tools)
        args = self.tool_args(tool)
        target = f"the {tool} output for page {args['page']}"
        for _ in range(self.rng.randint(40, 70)):
            self.tool(tool, args, result_tokens=self.rng.randint(300, 700))
            self.llm(self.loop_text(target))

    def _loop_text(self) -> None:
        # Stuck on one missing fact: every search has new arguments, so no
        # tool call repeats, but every answer says the same in other words.
        for _ in range(self.rng.randint(1, 3)):
            self._work_step()
        tool = self.profile.tools[0]
        fact = self.rng.choice(self.profile.facts)
        for _ in range(self.rng.randint(40, 70)):
            self.tool(
                tool, self.tool_args(tool), result_tokens=self.rng.randint(300, 900)
            )
            self.llm(self.stuck_text(fact))

    def _loop_cycle(self) -> None:
        # Round and round the same three tool calls, each answer reading like
        # progress: a cycle of calls, with no output like the previous ones.
        for _ in range(self.rng.randint(1, 3)):
            self._work_step()
        tools = self.rng.sample(self.profile.tools, 3)
        calls = [(tool, self.tool_args(tool)) for tool in tools]
        for _ in range(self.rng.randint(15, 25)):
            for tool, args in calls:
                self.tool(tool, args)
                self.llm(self.fresh_text(f"The {tool} result shows:"))

    def _budget(self) -> None:
        self.model = _MODELS[self.rng.choice(("opus", "gpt-4.1", "pro"))]
        self.context += self.rng.randint(60_000, 110_000)
        for step in range(self.rng.randint(60, 90)):
            tool = self.rng.choice(self.profile.tools)
            result = self.rng.randint(2_000, 9_000)
            self.tool(tool, self.tool_args(tool), result_tokens=result)
            lead = f"Section {step + 1} of the {self.subject} report:"
            evidence = (self.fresh_text("Evidence:") for _ in range(3))
            self.llm(" ".join((self.fresh_text(lead), *evidence)))
            if self.context > 190_000:
                # The agent drops its oldest turns, which breaks the cached
                # prefix after the system prompt.
                self.context = 120_000
                self.cached = self.profile.system_tokens

    def _tool_failures(self) -> None:
        tool = self.rng.choice(self.profile.tools)
        error = self.rng.choice(_ERRORS)
        for attempt in range(self.rng.randint(30, 45)):
            self.tool(tool, self.tool_args(tool), ok=False, result_tokens=80)
            lead = (
                f"Attempt {attempt + 1}: {tool} failed with {error}; retrying "
                f"with a {self.rng.choice(_ADJECTIVES)} query instead."
            )
            self.llm(self.fresh_text(lead))

    def _recursion(self) -> None:
        # Deep enough for the depth rule, short enough (at most 18 LLM calls)
        # that no budget would stop it in its place.
        opened: list[tuple[str, float]] = []
        for level in range(self.rng.randint(10, 16)):
            opened.append(self.open_agent())
            tool = self.rng.choice(self.profile.tools)
            self.llm(
                self.fresh_text(
                    f"Sub-task at level {level + 1} is too broad; delegating "
                    "its parts to a new sub-agent."
                )
            )
            self.tool(tool, self.tool_args(tool))
        while opened:
            self.close_agent(opened.pop(), "gave_up")

    def _batch(self, token_target: int) -> None:
        # One of the batch user's sessions: a summary per long document,
        # ordinary on its own but reading nearly ``token_target`` tokens; the
        # batch together reads more than the user's daily token cap.
        self.model = _MODELS["flash"]
        base = self.context
        while True:
            # This call reads the document; the final answer only the base.
            room = token_target - self.tokens_used - 2 * base - 1_200
            if room < 15_000:
                break
            doc_tokens = min(self.rng.randint(50_000, 70_000), room)
            doc = f"{self.rng.choice(_NAMES)}-{self.rng.randint(1, 9999)}"
            self.tool("fetch_document", {"doc": doc}, result_tokens=doc_tokens)
            self.llm(self.fresh_text(f"Summary of {doc}:"))
            # The summary is filed; the document leaves the context.
            self.context = base
            self.cached = base


@dataclass(slots=True)
class SessionScore:
    """One simulated session: its ground truth beside what Tripwire did.

    Attributes:
        session: the simulated session.
        full_steps: LLM and tool calls in its full, unstopped run.
        full_cost_usd: cost of its full run.
        steps_run: LLM and tool calls that ran before it was stopped.
        cost_run_usd: cost of the spans that ran.
        kill_reason: the reason of the first kill command that hit it.
        killed_at_step: ``steps_run`` when the kill command arrived.
        alerts: rules of the alerts raised on it, in order.
        alerted_at_step: ``steps_run`` when its first alert arrived.
        spans_run: spans of it that ran, agent spans included.
        finished: its last span ran.
        user_kill_reason: the reason its user was killed, even after it ended.
    """

    session: SimulatedSession
    full_steps: int
    full_cost_usd: float
    steps_run: int = 0
    cost_run_usd: float = 0.0
    kill_reason: str | None = None
    killed_at_step: int | None = None
    alerts: list[str] = field(default_factory=list)
    alerted_at_step: int | None = None
    spans_run: int = 0
    finished: bool = False
    user_kill_reason: str | None = None

    @property
    def killed(self) -> bool:
        """Whether a kill command stopped it."""
        return self.kill_reason is not None

    @property
    def alerted(self) -> bool:
        """Whether any alert named it."""
        return bool(self.alerts)

    @property
    def caught(self) -> bool:
        """Whether it was stopped; a user-cap session also once its user was."""
        if self.killed:
            return True
        return self.session.expected == USER_CAP and self.user_kill_reason is not None

    @property
    def saved_usd(self) -> float:
        """Cost of the part of its run that never happened."""
        return max(0.0, self.full_cost_usd - self.cost_run_usd)

    @property
    def status(self) -> str:
        """``killed``, ``finished``, ``running`` or ``waiting``."""
        if self.killed:
            return "killed"
        if self.finished:
            return "finished"
        return "running" if self.spans_run else "waiting"


@dataclass(slots=True)
class ScoreReport:
    """The confusion summary of a demo run.

    Attributes:
        caught: runaway sessions stopped by a kill command.
        missed: runaway sessions never stopped; an alert alone does not stop
            a session, so an alerted but unstopped runaway is missed.
        false_kills: healthy sessions stopped.
        healthy_ok: healthy sessions left to run, alerted or not.
    """

    caught: list[SessionScore]
    missed: list[SessionScore]
    false_kills: list[SessionScore]
    healthy_ok: list[SessionScore]

    @property
    def passed(self) -> bool:
        """Every runaway caught and no healthy session killed."""
        return not self.missed and not self.false_kills

    @property
    def false_alerts(self) -> list[SessionScore]:
        """Healthy sessions that an alert named, killed or not."""
        healthy = self.false_kills + self.healthy_ok
        return [score for score in healthy if score.alerted]


class Scoreboard:
    """Follow a simulated fleet as its spans run and Tripwire's decisions arrive.

    The simulated agents obey kill commands: once a session, or its user, is
    killed, the rest of its spans never run. That is what makes the dollars
    saved real: they are the cost of the spans that were not run.

    Args:
        fleet: the simulated fleet.
        cost_of: prices one span in USD, with the detector's price book.
    """

    def __init__(self, fleet: Fleet, cost_of: Callable[[SpanEvent], float]) -> None:
        self.fleet = fleet
        self.cost_of = cost_of
        self.scores: dict[str, SessionScore] = {}
        for session in fleet.sessions:
            steps = [span for span in session.spans if span.kind is not SpanKind.AGENT]
            self.scores[session.session_id] = SessionScore(
                session=session,
                full_steps=len(steps),
                full_cost_usd=sum(cost_of(span) for span in session.spans),
            )
        self._killed_users: dict[str, str] = {}
        self._last_span = {s.session_id: s.spans[-1].span_id for s in fleet.sessions}

    def runs(self, span: SpanEvent) -> bool:
        """Return whether ``span`` still runs, its session and user not killed."""
        score = self.scores.get(span.session_id)
        if score is None or score.killed:
            return False
        reason = self._killed_users.get(span.user_id or "")
        if reason is None:
            return True
        # The user was stopped: this session's agent refuses its next step.
        self._kill(score, reason)
        return False

    def ran(self, span: SpanEvent) -> None:
        """Count ``span`` as run: its steps and its cost."""
        score = self.scores.get(span.session_id)
        if score is None:
            return
        score.spans_run += 1
        if span.kind is not SpanKind.AGENT:
            score.steps_run += 1
        score.cost_run_usd += self.cost_of(span)
        if span.span_id == self._last_span[span.session_id]:
            score.finished = True

    def decide(self, decision: KillCommand | Alert) -> list[SessionScore]:
        """Apply one decision; return the sessions it changed.

        Args:
            decision: a kill command or an alert from Tripwire.

        Returns:
            The scores of the sessions the decision stopped or flagged.
        """
        if isinstance(decision, Alert):
            score = self.scores.get(decision.session_id or decision.target)
            if score is None or decision.rule in score.alerts:
                return []
            if not score.alerts:
                score.alerted_at_step = score.steps_run
            score.alerts.append(decision.rule)
            return [score]

        if decision.scope is Scope.SESSION:
            score = self.scores.get(decision.session_id or decision.target)
            if score is None or score.killed:
                return []
            self._kill(score, decision.reason)
            return [score]

        if decision.scope is Scope.USER:
            self._killed_users.setdefault(decision.target, decision.reason)
            changed = []
            for score in self.scores.values():
                if (
                    score.session.user_id == decision.target
                    and score.spans_run
                    and not score.finished
                    and not score.killed
                ):
                    self._kill(score, decision.reason)
                    changed.append(score)
            return changed
        return []

    def report(self) -> ScoreReport:
        """Return the confusion summary: caught, missed, false kills, healthy."""
        self._settle_blocked_users()
        caught: list[SessionScore] = []
        missed: list[SessionScore] = []
        false_kills: list[SessionScore] = []
        healthy_ok: list[SessionScore] = []
        for score in self.scores.values():
            if score.session.runaway:
                (caught if score.caught else missed).append(score)
            else:
                (false_kills if score.killed else healthy_ok).append(score)
        return ScoreReport(caught, missed, false_kills, healthy_ok)

    def _kill(self, score: SessionScore, reason: str) -> None:
        score.kill_reason = reason
        score.killed_at_step = score.steps_run

    def _settle_blocked_users(self) -> None:
        for score in self.scores.values():
            reason = self._killed_users.get(score.session.user_id)
            if reason is None:
                continue
            score.user_kill_reason = reason
            # Sessions of a killed user that had not started yet never ran.
            if not score.spans_run and not score.killed:
                self._kill(score, reason)
