"""Benchmark span decoding: microseconds per span for each input encoding.

Run with ``python benchmarks/bench_decode.py`` (``--help`` for options). Each
row is compared with a baseline measured in the same run: parsing the same
bytes with no validation (``orjson.loads``, or protobuf's ``FromString`` for
OTLP protobuf), the least any decoder does. Times are the best of several
rounds, per span.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import orjson
from google.protobuf.json_format import MessageToJson
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)

from tripwire.schemas.native import decode_native, encode_native
from tripwire.schemas.otlp import decode_otlp

NATIVE_RECORD: dict[str, Any] = {
    "span_id": "a1b2c3d4e5f60718",
    "trace_id": "0af7651916cd43dd8448eb211c80319c",
    "session_id": "sess-42",
    "parent_span_id": "b7ad6b7169203331",
    "user_id": "user-7",
    "agent_name": "support-bot",
    "kind": "llm",
    "start_time": 1_714_564_800.123,
    "end_time": 1_714_564_801.5,
    "model": "gpt-4o-mini-2024-07-18",
    "provider": "openai",
    "input_tokens": 1200,
    "output_tokens": 300,
    "cache_read_tokens": 1000,
    "cost_usd": 0.0012,
    "finish_reason": "stop",
}


def per_call_us(action: Callable[[], object], calls: int, rounds: int) -> float:
    """Return the best per-call time over ``rounds`` runs, in microseconds."""
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(calls):
            action()
        best = min(best, (time.perf_counter() - started) / calls)
    return best * 1e6


def recorded_spans(count: int) -> list[ReadableSpan]:
    """Record ``count`` GenAI chat spans with the OpenTelemetry SDK."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "bench"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("bench")
    for index in range(count):
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": "openai",
            "gen_ai.request.model": "gpt-4o-mini",
            "gen_ai.response.model": "gpt-4o-mini-2024-07-18",
            "gen_ai.usage.input_tokens": 1200 + index,
            "gen_ai.usage.output_tokens": 300,
            "gen_ai.usage.cache_read.input_tokens": 1000,
            "gen_ai.response.finish_reasons": ("stop",),
            "gen_ai.conversation.id": f"conv-{index % 10}",
        }
        with tracer.start_as_current_span("chat gpt-4o-mini", attributes=attributes):
            pass
    return list(exporter.get_finished_spans())


def main() -> None:
    """Print one row per encoding: decoder, baseline and ratio, per span."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000, help="calls per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, best kept")
    parser.add_argument("--batch", type=int, default=200, help="spans per OTLP record")
    args = parser.parse_args()

    native = orjson.dumps(NATIVE_RECORD)
    with_vector = orjson.dumps(
        {**NATIVE_RECORD, "embedding": [i / 1536 for i in range(1536)]}
    )
    span = decode_native(native)
    request = encode_spans(recorded_spans(args.batch))
    proto = request.SerializeToString()
    text = MessageToJson(request).encode()
    batch_calls = max(1, args.calls // args.batch)

    def otlp_row(
        data: bytes, encoding: Any, baseline: Callable[[], object]
    ) -> tuple[float, float]:
        ours = per_call_us(
            lambda: decode_otlp(data, encoding), batch_calls, args.rounds
        )
        base = per_call_us(baseline, batch_calls, args.rounds)
        return ours / args.batch, base / args.batch

    rows = [
        (
            "native decode",
            per_call_us(lambda: decode_native(native), args.calls, args.rounds),
            per_call_us(lambda: orjson.loads(native), args.calls, args.rounds),
        ),
        (
            "native decode, 1536-d embedding",
            per_call_us(
                lambda: decode_native(with_vector), args.calls // 20, args.rounds
            ),
            per_call_us(
                lambda: orjson.loads(with_vector), args.calls // 20, args.rounds
            ),
        ),
        (
            "native encode",
            per_call_us(lambda: encode_native(span), args.calls, args.rounds),
            per_call_us(lambda: orjson.dumps(NATIVE_RECORD), args.calls, args.rounds),
        ),
        (
            f"otlp_proto ({args.batch} spans/record)",
            *otlp_row(
                proto, "otlp_proto", lambda: ExportTraceServiceRequest.FromString(proto)
            ),
        ),
        (
            f"otlp_json ({args.batch} spans/record)",
            *otlp_row(text, "otlp_json", lambda: orjson.loads(text)),
        ),
    ]

    print(f"{'decoder':36} {'us/span':>9} {'baseline':>9} {'ratio':>7} {'spans/s':>10}")
    for name, ours, base in rows:
        print(
            f"{name:36} {ours:9.2f} {base:9.2f} {ours / base:6.1f}x {1e6 / ours:10,.0f}"
        )


if __name__ == "__main__":
    main()
