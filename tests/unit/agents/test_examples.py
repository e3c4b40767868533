"""The agent-loop examples run their scenarios, and the Collector config fits."""

import sys
from pathlib import Path

import pytest
import yaml
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)

from tripwire.agents import SessionGuard, SessionKilled
from tripwire.config import WorkerSettings
from tripwire.schemas.conventions import Skipped, span_from_readable
from tripwire.schemas.events import SpanKind

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
sys.path.insert(0, str(EXAMPLES))

import agent_loop  # noqa: E402
from fake_llm import FakeLLM  # noqa: E402


@pytest.fixture
def traced():
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    yield provider.get_tracer("example"), memory
    provider.shutdown()


def test_healthy_agent_finishes_and_its_spans_normalise(traced):
    tracer, memory = traced
    guard = SessionGuard("s-healthy", user_id="u1")

    answer = agent_loop.run_agent(
        tracer, FakeLLM("healthy", latency=0), guard, "refund order 1182"
    )

    assert "refund" in answer
    events = [span_from_readable(span) for span in memory.get_finished_spans()]
    assert not any(isinstance(event, Skipped) for event in events)
    kinds = sorted(event.kind.value for event in events)
    assert kinds == ["agent", "llm", "llm", "llm", "tool", "tool"]
    assert {event.session_id for event in events} == {"s-healthy"}
    assert {event.user_id for event in events} == {"u1"}
    llm = [event for event in events if event.kind is SpanKind.LLM]
    assert all(event.input_tokens > 0 and event.model for event in llm)


def test_looping_agent_is_stopped_by_the_local_guard(traced):
    tracer, _ = traced
    guard = SessionGuard("s-loop")
    llm = FakeLLM("loop", latency=0)

    with pytest.raises(SessionKilled) as caught:
        agent_loop.run_agent(tracer, llm, guard, "find the ACME invoice")

    assert caught.value.reason == "loop_similarity"
    assert llm.calls == 4


def test_runaway_agent_runs_until_a_budget_stops_it(traced):
    tracer, _ = traced
    guard = SessionGuard("s-runaway", max_steps=30)
    llm = FakeLLM("runaway", latency=0)

    with pytest.raises(SessionKilled) as caught:
        agent_loop.run_agent(tracer, llm, guard, "find the cheapest supplier")

    assert caught.value.reason == "step_budget"
    assert llm.calls == 30


def test_collector_config_publishes_where_the_worker_reads():
    config = yaml.safe_load(
        (EXAMPLES / "collector" / "otel-collector.yaml").read_text()
    )
    defaults = WorkerSettings()

    traces = config["exporters"]["kafka/tripwire"]["traces"]
    assert traces["topic"] == defaults.topics.otlp
    assert traces["encoding"] == defaults.otlp_encoding
    pipeline = config["service"]["pipelines"]["traces"]
    assert pipeline["exporters"] == ["kafka/tripwire"]
    assert set(pipeline["processors"]) <= set(config["processors"])
