"""A canned LLM client and tools for the examples: no model, no network."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

SCENARIOS = ("healthy", "runaway", "loop")

_TOPICS = (
    "supplier pricing", "shipping lanes", "warehouse capacity", "customs tariffs",
    "carrier contracts", "fuel surcharges", "port congestion", "insurance terms",
    "packaging costs", "returns handling", "cold storage", "rail freight",
    "air cargo rates", "inventory turnover", "lead times", "currency hedging",
    "quality audits", "labour availability", "last-mile delivery", "demand forecasts",
)  # fmt: skip
_FINDINGS = (
    "the figures disagree between two sources",
    "one region reports much higher numbers",
    "the latest quarter changed the picture",
    "several vendors quote very different terms",
    "the public data stops two years ago",
    "a regulation change may apply next year",
)


@dataclass(frozen=True)
class ToolCall:
    """A tool the model asks the agent to run, with its JSON arguments."""

    name: str
    arguments: str


@dataclass(frozen=True)
class Completion:
    """What one chat call returned, with its token usage."""

    text: str
    input_tokens: int
    output_tokens: int
    finish_reason: str
    tool_call: ToolCall | None = None


@dataclass
class FakeLLM:
    """Returns canned chat completions for one of the example scenarios.

    ``healthy`` answers in three calls; ``runaway`` researches forever with a
    new sub-topic each call (only a budget stops it); ``loop`` rewords the
    same dead end and repeats the same tool call.
    """

    scenario: str = "runaway"
    latency: float = 0.2
    model: str = "gpt-4o-mini"
    seed: int = 7
    calls: int = 0
    _random: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ValueError(
                f"scenario must be one of {', '.join(SCENARIOS)}, got {self.scenario!r}"
            )
        self._random = random.Random(self.seed)

    def complete(self, messages: list[dict[str, str]]) -> Completion:
        """Answer a chat request after the configured latency."""
        time.sleep(self.latency)
        return self._answer(messages)

    async def acomplete(self, messages: list[dict[str, str]]) -> Completion:
        """Answer a chat request after the configured latency, on asyncio."""
        await asyncio.sleep(self.latency)
        return self._answer(messages)

    def _answer(self, messages: list[dict[str, str]]) -> Completion:
        self.calls += 1
        input_tokens = 600 + sum(len(m["content"]) for m in messages) // 4
        text, tool = getattr(self, f"_{self.scenario}")()
        return Completion(
            text=text,
            input_tokens=input_tokens,
            output_tokens=max(1, len(text) // 4),
            finish_reason="tool_calls" if tool else "stop",
            tool_call=tool,
        )

    def _healthy(self) -> tuple[str, ToolCall | None]:
        if self.calls == 1:
            return "I will look up order 1182 first.", ToolCall(
                "lookup_order", '{"order_id": "1182"}'
            )
        if self.calls == 2:
            return "Order 1182 was delivered on 6 March; checking the policy.", (
                ToolCall("read_policy", '{"topic": "refunds"}')
            )
        return "Order 1182 qualifies for a refund; I have issued it.", None

    def _runaway(self) -> tuple[str, ToolCall | None]:
        first, second, third = self._random.sample(_TOPICS, 3)
        finding = self._random.choice(_FINDINGS)
        text = (
            f"Comparing {first} with {second}: {finding}. "
            f"Before answering I should also examine {third}."
        )
        query = f'{{"query": "{third}", "page": {self.calls}}}'
        return text, ToolCall("web_search", query)

    def _loop(self) -> tuple[str, ToolCall | None]:
        texts = (
            "I could not find the invoice for ACME; let me search the billing "
            "records again.",
            "I still could not find the invoice for ACME, searching the billing "
            "records.",
            "Let me search the billing records again for the ACME invoice I could "
            "not find.",
        )
        text = texts[(self.calls - 1) % len(texts)]
        return text, ToolCall("search_billing", '{"customer": "ACME"}')


def run_tool(call: ToolCall) -> str:
    """Run a canned tool and return its result text."""
    time.sleep(0.01)
    if call.name == "lookup_order":
        return "order 1182: delivered 2025-03-06, unopened"
    if call.name == "read_policy":
        return "refunds within 30 days of delivery for unopened items"
    if call.name == "search_billing":
        return "no invoice found"
    return "12 results, none conclusive"
