"""An agent loop that publishes its spans to Tripwire and obeys its kill commands.

Start the services and a worker, then run a scenario:

    scripts/services up
    tripwire worker &
    python examples/agent_loop.py --scenario runaway

``healthy`` answers in three LLM calls. ``runaway`` never finishes: the
worker's step budget (25 LLM calls by default) kills it, the kill command
reaches this process through Kafka and Redis, and the next
``guard.before_llm_call()`` raises ``SessionKilled``. ``loop`` repeats itself:
the local guard stops it after four calls, before the worker needs to.
The LLM is a canned fake (``fake_llm.py``); the spans, the exporter, the kill
switch and the guard are the real ones.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import uuid

from fake_llm import SCENARIOS, FakeLLM, run_tool
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind

from tripwire.agents import KafkaSpanExporter, KillSwitch, SessionGuard, SessionKilled

AGENT_NAME = "researcher"
EXIT_KILLED = 3


def run_agent(
    tracer: trace.Tracer,
    llm: FakeLLM,
    guard: SessionGuard,
    task: str,
    compare_outputs: bool = False,
) -> str:
    """Run the agent loop until the model answers; return the answer."""
    session = {"session.id": guard.session_id, "user.id": guard.user_id or ""}
    messages = [{"role": "user", "content": task}]
    with tracer.start_as_current_span(f"invoke_agent {AGENT_NAME}") as run:
        run.set_attributes(
            {
                "gen_ai.operation.name": "invoke_agent",
                "gen_ai.agent.name": AGENT_NAME,
                **session,
            }
        )
        while True:
            # The last line of defence: a kill command from the worker, the
            # local step budget or a local loop stops the session here.
            guard.before_llm_call()
            with tracer.start_as_current_span(
                f"chat {llm.model}", kind=SpanKind.CLIENT
            ) as span:
                span.set_attributes(
                    {
                        "gen_ai.operation.name": "chat",
                        "gen_ai.provider.name": "openai",
                        "gen_ai.request.model": llm.model,
                        "gen_ai.agent.name": AGENT_NAME,
                        **session,
                    }
                )
                reply = llm.complete(messages)
                span.set_attributes(
                    {
                        "gen_ai.response.model": llm.model,
                        "gen_ai.usage.input_tokens": reply.input_tokens,
                        "gen_ai.usage.output_tokens": reply.output_tokens,
                        "gen_ai.response.finish_reasons": [reply.finish_reason],
                    }
                )
                if compare_outputs:
                    # The exporter turns the text into its code; only the
                    # code leaves the process.
                    span.set_attribute("gen_ai.completion.0.content", reply.text)
            guard.after_llm_call(reply.text)
            messages.append({"role": "assistant", "content": reply.text})

            if reply.tool_call is None:
                return reply.text
            call = reply.tool_call
            with tracer.start_as_current_span(f"execute_tool {call.name}") as tool:
                tool.set_attributes(
                    {
                        "gen_ai.operation.name": "execute_tool",
                        "gen_ai.tool.name": call.name,
                        "gen_ai.tool.call.arguments": call.arguments,
                        **session,
                    }
                )
                result = run_tool(call)
            messages.append({"role": "tool", "content": result})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=SCENARIOS, default="runaway")
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--spans-topic", default="tripwire.spans")
    parser.add_argument("--killswitch-topic", default="tripwire.killswitch")
    parser.add_argument("--session", default=None, help="session id (default: new)")
    parser.add_argument("--user", default="user-example")
    parser.add_argument(
        "--max-steps",
        type=int,
        default=40,
        help="local step budget, a backstop above the worker's (default 40)",
    )
    parser.add_argument("--latency", type=float, default=0.2, help="seconds a call")
    parser.add_argument(
        "--compare-outputs",
        action="store_true",
        help="publish completion text codes so the worker can compare outputs too",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON summary")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    session_id = args.session or f"example-{uuid.uuid4().hex[:12]}"

    exporter = KafkaSpanExporter(args.bootstrap, args.spans_topic)
    provider = TracerProvider(resource=Resource.create({"service.name": AGENT_NAME}))
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=100))
    tracer = provider.get_tracer("tripwire.examples.agent_loop")
    switch = KillSwitch(args.bootstrap, args.killswitch_topic, redis_url=args.redis)
    guard = SessionGuard(
        session_id,
        user_id=args.user,
        max_steps=args.max_steps,
        kill_switch=switch,
        agent_name=AGENT_NAME,
    )
    llm = FakeLLM(args.scenario, latency=args.latency)

    summary: dict[str, object] = {"session_id": session_id, "scenario": args.scenario}
    with switch:
        switch.wait_ready(timeout=30)
        try:
            answer = run_agent(
                tracer,
                llm,
                guard,
                "Find the cheapest supplier.",
                args.compare_outputs,
            )
            summary.update(outcome="finished", answer=answer)
        except SessionKilled as killed:
            summary.update(outcome="killed", reason=killed.reason, why=str(killed))
        finally:
            provider.shutdown()
    stats = exporter.stats()
    summary.update(
        llm_calls=llm.calls,
        spans_exported=stats.exported,
        spans_dropped=stats.dropped,
    )

    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            print(f"{key:>15}: {value}")
    return EXIT_KILLED if summary["outcome"] == "killed" else 0


if __name__ == "__main__":
    sys.exit(main())
