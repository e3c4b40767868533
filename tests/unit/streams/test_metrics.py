"""Worker metrics: names, labels, and the cap on label values."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from tripwire.schemas.events import SpanEvent, SpanKind, ToolStatus
from tripwire.streams.metrics import OTHER, LabelChildren, LabelGuard, WorkerMetrics


def _llm_span(**extra: object) -> SpanEvent:
    fields: dict[str, object] = {
        "span_id": "s1",
        "trace_id": "t1",
        "session_id": "sess-1",
        "kind": SpanKind.LLM,
        "start_time": 100.0,
        "end_time": 101.0,
        "user_id": "user-1",
        "agent_name": "researcher",
        "model": "gpt-4o",
        "provider": "openai",
        "input_tokens": 1000,
        "output_tokens": 200,
        "cache_read_tokens": 300,
    }
    fields.update(extra)
    return SpanEvent(**fields)  # type: ignore[arg-type]


def _value(metrics: WorkerMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_llm_span_feeds_cost_calls_tokens_and_lag() -> None:
    metrics = WorkerMetrics()

    metrics.observe_span(_llm_span(), cost_usd=0.25, priced=True, now=103.0)

    labels = {"model": "gpt-4o", "provider": "openai", "agent": "researcher"}
    assert _value(metrics, "llm_cost_usd_total", **labels) == 0.25
    assert _value(metrics, "llm_calls_total", **labels) == 1
    token_labels = {"model": "gpt-4o", "provider": "openai"}
    assert _value(metrics, "llm_tokens_total", type="input", **token_labels) == 1000
    assert _value(metrics, "llm_tokens_total", type="output", **token_labels) == 200
    assert _value(metrics, "llm_tokens_total", type="cache_read", **token_labels) == 300
    assert _value(metrics, "gen_ai_usage_input_tokens_sum", **token_labels) == 1000
    assert _value(metrics, "tripwire_spans_total", outcome="processed") == 1
    assert _value(metrics, "tripwire_processing_lag_seconds_sum") == 2.0
    assert _value(metrics, "tripwire_unknown_model_spans_total") == 0


def test_unpriced_model_is_counted() -> None:
    metrics = WorkerMetrics()

    metrics.observe_span(_llm_span(model="mystery"), cost_usd=0.0, priced=False)

    assert _value(metrics, "tripwire_unknown_model_spans_total") == 1


def test_tool_calls_and_errors() -> None:
    metrics = WorkerMetrics()
    tool = {"kind": SpanKind.TOOL, "tool_name": "search", "model": None}

    metrics.observe_span(_llm_span(tool_status=ToolStatus.OK, **tool), 0.0, True)
    metrics.observe_span(_llm_span(tool_status=ToolStatus.ERROR, **tool), 0.0, True)

    labels = {"tool": "search", "agent": "researcher"}
    assert _value(metrics, "agent_tool_calls_total", **labels) == 2
    assert _value(metrics, "agent_tool_errors_total", **labels) == 1
    assert (
        _value(
            metrics,
            "llm_calls_total",
            model="unknown",
            provider="unknown",
            agent="researcher",
        )
        == 0
    )


def test_outcomes_kills_alerts_and_session_histograms() -> None:
    metrics = WorkerMetrics()

    metrics.count_spans("duplicate", 3)
    metrics.count_spans("dead_lettered")
    metrics.count_spans("skipped", 0)
    metrics.observe_kill("session_cost_budget")
    metrics.observe_alert("tool_error_rate")
    metrics.observe_session_end("researcher", steps=12, cost_usd=4.5)
    metrics.observe_batch([10.0, 12.0], now=15.0)

    assert _value(metrics, "tripwire_spans_total", outcome="duplicate") == 3
    assert _value(metrics, "tripwire_spans_total", outcome="dead_lettered") == 1
    assert _value(metrics, "tripwire_spans_total", outcome="skipped") == 0
    assert _value(metrics, "tripwire_kills_total", reason="session_cost_budget") == 1
    assert _value(metrics, "tripwire_alerts_total", rule="tool_error_rate") == 1
    assert _value(metrics, "agent_session_steps_sum", agent="researcher") == 12
    assert _value(metrics, "agent_session_cost_usd_count", agent="researcher") == 1
    assert _value(metrics, "tripwire_event_time_lag_seconds") == 3.0
    assert _value(metrics, "tripwire_last_batch_timestamp_seconds") == 15.0


def test_render_has_no_session_or_user_ids() -> None:
    metrics = WorkerMetrics()
    metrics.observe_span(_llm_span(), cost_usd=0.1, priced=True)

    text = metrics.render().decode()

    assert "llm_cost_usd_total{" in text
    assert "sess-1" not in text
    assert "user-1" not in text


def test_label_guard_folds_values_past_the_cap() -> None:
    guard = LabelGuard("model", limit=2)

    assert [guard("a"), guard("b"), guard("c"), guard("a"), guard(None)] == [
        "a",
        "b",
        OTHER,
        "a",
        "unknown",
    ]


def test_two_workers_in_one_process_do_not_collide() -> None:
    shared = CollectorRegistry()

    first = WorkerMetrics()
    second = WorkerMetrics(registry=shared)
    first.count_spans("duplicate")

    assert second.registry is shared
    assert _value(second, "tripwire_spans_total", outcome="duplicate") == 0


def test_repeated_spans_add_to_the_same_series_and_make_none_unused() -> None:
    metrics = WorkerMetrics()

    for _ in range(3):
        metrics.observe_span(_llm_span(cache_read_tokens=0), 0.5, True, now=103.0)
    metrics.observe_span(_llm_span(model="claude-3-5-haiku"), 0.0, True, now=103.0)
    sample = metrics.registry.get_sample_value

    labels = {"provider": "openai", "agent": "researcher"}
    assert _value(metrics, "llm_calls_total", model="gpt-4o", **labels) == 3
    assert _value(metrics, "llm_cost_usd_total", model="gpt-4o", **labels) == 1.5
    tokens = {"model": "gpt-4o", "provider": "openai"}
    assert _value(metrics, "llm_tokens_total", type="input", **tokens) == 3000
    assert sample("llm_tokens_total", {"type": "cache_read", **tokens}) is None
    assert sample("llm_cost_usd_total", {**labels, "model": "claude-3-5-haiku"}) is None
    assert _value(metrics, "tripwire_spans_total", outcome="processed") == 4


def test_label_children_returns_one_child_per_label_values() -> None:
    metrics = WorkerMetrics()
    children = LabelChildren(metrics.tool_calls)

    children("search", "researcher").inc()
    children("search", "researcher").inc()
    children("fetch", "researcher").inc()

    assert children("search", "researcher") is children("search", "researcher")
    assert (
        _value(metrics, "agent_tool_calls_total", tool="search", agent="researcher")
        == 2
    )
    assert (
        _value(metrics, "agent_tool_calls_total", tool="fetch", agent="researcher") == 1
    )
