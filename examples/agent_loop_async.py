"""The asyncio form: a guarded LLM call, a kill switch that cancels the call.

    scripts/services up
    tripwire worker &
    python examples/agent_loop_async.py --scenario runaway

Same scenarios as ``agent_loop.py``. Here the LLM call is a decorated
coroutine (``@guard`` checks before and after each call) and the loop runs
inside ``async with guard:``, which registers the task with the
``AsyncKillSwitch``: a kill command that arrives during a slow LLM call
cancels it at once, and the block raises ``SessionKilled`` instead of
``CancelledError``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import uuid

from fake_llm import SCENARIOS, Completion, FakeLLM, run_tool
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind

from tripwire.agents import (
    AsyncKillSwitch,
    KafkaSpanExporter,
    SessionGuard,
    SessionKilled,
)

AGENT_NAME = "researcher"
EXIT_KILLED = 3


async def main(args: argparse.Namespace) -> int:
    session_id = args.session or f"example-{uuid.uuid4().hex[:12]}"
    exporter = KafkaSpanExporter(args.bootstrap, args.spans_topic)
    provider = TracerProvider(resource=Resource.create({"service.name": AGENT_NAME}))
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=100))
    tracer = provider.get_tracer("tripwire.examples.agent_loop_async")
    llm = FakeLLM(args.scenario, latency=args.latency)
    switch = AsyncKillSwitch(
        args.bootstrap, args.killswitch_topic, redis_url=args.redis
    )
    guard = SessionGuard(
        session_id,
        user_id=args.user,
        max_steps=args.max_steps,
        kill_switch=switch,
        agent_name=AGENT_NAME,
    )
    attributes = {"session.id": session_id, "user.id": args.user}

    @guard(output_text=lambda reply: reply.text)
    async def chat(messages: list[dict[str, str]]) -> Completion:
        with tracer.start_as_current_span(
            f"chat {llm.model}", kind=SpanKind.CLIENT
        ) as span:
            span.set_attributes(
                {
                    "gen_ai.operation.name": "chat",
                    "gen_ai.provider.name": "openai",
                    "gen_ai.request.model": llm.model,
                    **attributes,
                }
            )
            reply = await llm.acomplete(messages)
            span.set_attributes(
                {
                    "gen_ai.usage.input_tokens": reply.input_tokens,
                    "gen_ai.usage.output_tokens": reply.output_tokens,
                    "gen_ai.response.finish_reasons": [reply.finish_reason],
                }
            )
            return reply

    summary: dict[str, object] = {"session_id": session_id, "scenario": args.scenario}
    messages = [{"role": "user", "content": "Find the cheapest supplier."}]
    async with switch:
        await switch.wait_ready(timeout=30)
        try:
            async with guard:
                while True:
                    reply = await chat(messages)
                    messages.append({"role": "assistant", "content": reply.text})
                    if reply.tool_call is None:
                        summary.update(outcome="finished", answer=reply.text)
                        break
                    with tracer.start_as_current_span(
                        f"execute_tool {reply.tool_call.name}"
                    ) as tool:
                        tool.set_attributes(
                            {
                                "gen_ai.operation.name": "execute_tool",
                                "gen_ai.tool.name": reply.tool_call.name,
                                "gen_ai.tool.call.arguments": reply.tool_call.arguments,
                                **attributes,
                            }
                        )
                        result = await asyncio.to_thread(run_tool, reply.tool_call)
                    messages.append({"role": "tool", "content": result})
        except SessionKilled as killed:
            summary.update(outcome="killed", reason=killed.reason, why=str(killed))
        finally:
            await asyncio.to_thread(provider.shutdown)
    summary.update(llm_calls=llm.calls, spans_exported=exporter.exported)

    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            print(f"{key:>15}: {value}")
    return EXIT_KILLED if summary["outcome"] == "killed" else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", choices=SCENARIOS, default="runaway")
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--spans-topic", default="tripwire.spans")
    parser.add_argument("--killswitch-topic", default="tripwire.killswitch")
    parser.add_argument("--session", default=None, help="session id (default: new)")
    parser.add_argument("--user", default="user-example")
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--latency", type=float, default=0.2, help="seconds a call")
    parser.add_argument("--json", action="store_true", help="print a JSON summary")
    return parser.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(asyncio.run(main(parse_args())))
