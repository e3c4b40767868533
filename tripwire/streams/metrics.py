"""Prometheus metrics of the worker, on a registry of their own."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from tripwire.schemas.events import SpanEvent, SpanKind, ToolStatus

logger = logging.getLogger(__name__)

# The classic text format: every name here is plain ASCII, so it is exact.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
SPAN_OUTCOMES = ("processed", "duplicate", "dead_lettered", "skipped")
TOKEN_TYPES = ("input", "output", "cache_read", "cache_creation")
OTHER = "other"
UNKNOWN = "unknown"

# Token counts per call, in powers of four, as the OpenTelemetry GenAI
# conventions advise for gen_ai.client.token.usage.
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)
STEP_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)
COST_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 25, 50, 100, 500)
LAG_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)


class LabelGuard:
    """Keep one label's distinct values below a cap, folding the rest into "other".

    Model, agent and tool names come from the spans, so a misbehaving client
    could invent a new one per span; the cap keeps the series count bounded.

    Args:
        name: the label's name, for the one warning logged when the cap is hit.
        limit: how many distinct values are kept.
    """

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit
        self._seen: set[str] = set()
        self._warned = False

    def __call__(self, value: str | None) -> str:
        """Return ``value`` as a label value: itself, "unknown" or "other"."""
        if not value:
            return UNKNOWN
        if value in self._seen:
            return value
        if len(self._seen) >= self.limit:
            if not self._warned:
                self._warned = True
                logger.warning(
                    "label %s has %d distinct values; further ones are counted as %r",
                    self.name,
                    self.limit,
                    OTHER,
                )
            return OTHER
        self._seen.add(value)
        return value


class LabelChildren:
    """The children of one labelled metric, each made on its first use and kept.

    ``metric.labels(...)`` validates and looks up its labels on every call;
    the worker counts several series per span, so it keeps the children.
    Label values come through a :class:`LabelGuard`, which bounds how many
    there are.

    Args:
        metric: a metric declared with label names.
    """

    def __init__(self, metric: Any) -> None:
        self._labels = metric.labels
        self._made: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        """Return the child for label ``values``, in the metric's label order."""
        child = self._made.get(values)
        if child is None:
            child = self._made[values] = self._labels(*values)
        return child


class WorkerMetrics:
    """Every metric the worker exports, and the code that feeds them.

    Labels are model, provider, agent, tool, rule, reason, type and outcome
    only: never a session id, a user id or any text from a span.

    Args:
        registry: where to register; a new private registry when omitted, so
            that several workers (or tests) in one process do not collide.
        label_limit: distinct values kept per free-text label.
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, label_limit: int = 200
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._model = LabelGuard("model", label_limit)
        self._provider = LabelGuard("provider", label_limit)
        self._agent = LabelGuard("agent", label_limit)
        self._tool = LabelGuard("tool", label_limit)
        self._rule = LabelGuard("rule", label_limit)
        r = self.registry

        self.llm_cost = Counter(
            "llm_cost_usd",
            "Cost of LLM calls in US dollars, priced by the worker's price book.",
            ["model", "provider", "agent"],
            registry=r,
        )
        self.llm_calls = Counter(
            "llm_calls", "LLM calls seen.", ["model", "provider", "agent"], registry=r
        )
        self.llm_tokens = Counter(
            "llm_tokens",
            "Tokens of LLM calls by type; cache_read and cache_creation are parts "
            "of input.",
            ["type", "model", "provider"],
            registry=r,
        )
        self.input_tokens = Histogram(
            "gen_ai_usage_input_tokens",
            "Input tokens per LLM call.",
            ["model", "provider"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.tool_calls = Counter(
            "agent_tool_calls", "Tool calls seen.", ["tool", "agent"], registry=r
        )
        self.tool_errors = Counter(
            "agent_tool_errors",
            "Tool calls that ended in an error.",
            ["tool", "agent"],
            registry=r,
        )
        self.session_steps = Histogram(
            "agent_session_steps",
            "Steps (LLM and tool calls) of a session, observed when the session "
            "is killed or evicted as idle.",
            ["agent"],
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self.session_cost = Histogram(
            "agent_session_cost_usd",
            "Cost of a session in US dollars, observed when the session is killed "
            "or evicted as idle.",
            ["agent"],
            buckets=COST_BUCKETS,
            registry=r,
        )
        self.kills = Counter(
            "tripwire_kills",
            "Kill commands published, by the rule that fired.",
            ["reason"],
            registry=r,
        )
        self.alerts = Counter(
            "tripwire_alerts", "Alerts published, by rule.", ["rule"], registry=r
        )
        self.spans = Counter(
            "tripwire_spans",
            "Span records read, by what became of them.",
            ["outcome"],
            registry=r,
        )
        self.unknown_model_spans = Counter(
            "tripwire_unknown_model_spans",
            "LLM spans whose model is missing from the price book (cost counted as 0).",
            registry=r,
        )
        self.redis_errors = Counter(
            "tripwire_redis_errors",
            "Failed writes of kill commands to the Redis mirror.",
            registry=r,
        )
        self.processing_lag = Histogram(
            "tripwire_processing_lag_seconds",
            "Wall-clock time between a span's end and its processing.",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.event_time_lag = Gauge(
            "tripwire_event_time_lag_seconds",
            "Wall clock minus the newest span end time of the last batch.",
            registry=r,
        )
        self.last_batch = Gauge(
            "tripwire_last_batch_timestamp_seconds",
            "Unix time when the worker last finished a batch of spans.",
            registry=r,
        )
        self.sessions_in_table = Gauge(
            "tripwire_sessions",
            "Sessions held in this worker's session table.",
            registry=r,
        )

        for outcome in SPAN_OUTCOMES:
            self.spans.labels(outcome=outcome)
        self._processed = self.spans.labels(outcome="processed")
        self._llm_calls = LabelChildren(self.llm_calls)
        self._llm_cost = LabelChildren(self.llm_cost)
        self._llm_tokens = LabelChildren(self.llm_tokens)
        self._input_tokens = LabelChildren(self.input_tokens)
        self._tool_calls = LabelChildren(self.tool_calls)
        self._tool_errors = LabelChildren(self.tool_errors)

    def observe_span(
        self, span: SpanEvent, cost_usd: float, priced: bool, now: float | None = None
    ) -> None:
        """Count one new (not duplicate) span.

        Args:
            span: the decoded span.
            cost_usd: its cost as the detector priced it.
            priced: whether the price book knew the model (LLM spans only).
            now: wall-clock time for the lag, ``time.time()`` when omitted.
        """
        agent = self._agent(span.agent_name)
        if span.kind is SpanKind.LLM:
            self._observe_llm(span, agent, cost_usd, priced)
        elif span.kind is SpanKind.TOOL:
            tool = self._tool(span.tool_name)
            self._tool_calls(tool, agent).inc()
            if span.tool_status is ToolStatus.ERROR:
                self._tool_errors(tool, agent).inc()

        self._processed.inc()
        wall = time.time() if now is None else now
        self.processing_lag.observe(max(0.0, wall - span.end_time))

    def _observe_llm(
        self, span: SpanEvent, agent: str, cost_usd: float, priced: bool
    ) -> None:
        model = self._model(span.model)
        provider = self._provider(span.provider)
        self._llm_calls(model, provider, agent).inc()
        if cost_usd > 0:
            self._llm_cost(model, provider, agent).inc(cost_usd)
        if not priced:
            self.unknown_model_spans.inc()

        tokens = (
            ("input", span.input_tokens),
            ("output", span.output_tokens),
            ("cache_read", span.cache_read_tokens),
            ("cache_creation", span.cache_creation_tokens),
        )
        for token_type, count in tokens:
            if count > 0:
                self._llm_tokens(token_type, model, provider).inc(count)
        self._input_tokens(model, provider).observe(span.input_tokens)

    def count_spans(self, outcome: str, amount: int = 1) -> None:
        """Count span records that were not processed as new spans.

        Args:
            outcome: one of ``duplicate``, ``dead_lettered``, ``skipped``.
            amount: how many.
        """
        if amount > 0:
            self.spans.labels(outcome=outcome).inc(amount)

    def observe_kill(self, reason: str) -> None:
        """Count one published kill command."""
        self.kills.labels(reason=self._rule(reason)).inc()

    def observe_alert(self, rule: str) -> None:
        """Count one published alert."""
        self.alerts.labels(rule=self._rule(rule)).inc()

    def observe_session_end(
        self, agent: str | None, steps: int, cost_usd: float
    ) -> None:
        """Record a finished session's size: on a kill, or when evicted as idle."""
        label = self._agent(agent)
        self.session_steps.labels(agent=label).observe(steps)
        self.session_cost.labels(agent=label).observe(cost_usd)

    def observe_batch(
        self, end_times: Iterable[float], now: float | None = None
    ) -> None:
        """Record that a batch finished, and how far behind the newest span was."""
        wall = time.time() if now is None else now
        newest = max(end_times, default=None)
        if newest is not None:
            self.event_time_lag.set(max(0.0, wall - newest))
        self.last_batch.set(wall)

    def render(self) -> bytes:
        """Return every metric in the Prometheus text exposition format."""
        return generate_latest(self.registry)
