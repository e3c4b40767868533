"""The price book: name resolution, cost arithmetic, override files, bad data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tripwire.errors import PricingError
from tripwire.schemas.events import SpanEvent, SpanKind
from tripwire.streams.pricing import PriceBook


def _span(kind: SpanKind = SpanKind.LLM, **fields: object) -> SpanEvent:
    return SpanEvent(
        span_id="00000000000000a1",
        trace_id="t",
        session_id="s",
        kind=kind,
        start_time=1.0,
        end_time=2.0,
        **fields,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def book() -> PriceBook:
    return PriceBook.load()


@pytest.mark.parametrize(
    ("model", "provider", "family"),
    [
        ("claude-sonnet-4-5-20250929", None, "claude-sonnet-4-5"),
        ("claude-sonnet-4-20250514", None, "claude-sonnet-4"),
        ("claude-opus-4-1-20250805", None, "claude-opus-4-1"),
        ("claude-3-5-haiku-20241022", None, "claude-3-5-haiku"),
        ("claude-3-7-sonnet-latest", None, "claude-3-7-sonnet"),
        ("claude-haiku-4-5", None, "claude-haiku-4-5"),
        ("anthropic/claude-3.5-sonnet", None, "claude-3-5-sonnet"),
        ("claude-sonnet-4.5", None, "claude-sonnet-4-5"),
        ("claude-4-opus", None, "claude-opus-4"),
        ("anthropic.claude-3-5-sonnet-20241022-v2:0", None, "claude-3-5-sonnet"),
        ("us.anthropic.claude-sonnet-4-20250514-v1:0", None, "claude-sonnet-4"),
        ("claude-3-5-sonnet-v2@20241022", None, "claude-3-5-sonnet"),
        ("gpt-4o-2024-08-06", None, "gpt-4o"),
        ("gpt-4o-2024-05-13", None, "gpt-4o-2024-05-13"),
        ("gpt-4o-mini-2024-07-18", None, "gpt-4o-mini"),
        ("openai/gpt-4.1-mini-2025-04-14", None, "gpt-4.1-mini"),
        ("gpt-4.1-nano", "openai", "gpt-4.1-nano"),
        ("o3-mini-2025-01-31", None, "o3-mini"),
        ("o4-mini", None, "o4-mini"),
        ("gpt-5-2025-08-07", None, "gpt-5"),
        ("gpt-5-chat-latest", None, "gpt-5"),
        ("GPT-5-Mini", None, "gpt-5-mini"),
        ("gpt-5-nano-2025-08-07", None, "gpt-5-nano"),
        ("models/gemini-2.5-pro", None, "gemini-2.5-pro"),
        ("gemini-2.5-flash-preview-05-20", None, "gemini-2.5-flash"),
        ("gemini-2.5-flash-lite-preview-06-17", None, "gemini-2.5-flash-lite"),
        ("google/gemini-2.0-flash-001", None, "gemini-2.0-flash"),
        ("publishers/google/models/gemini-1.5-pro-002", None, "gemini-1.5-pro"),
    ],
)
def test_resolve_maps_names_to_families(
    book: PriceBook, model: str, provider: str | None, family: str
) -> None:
    assert book.resolve(model, provider) == family


@pytest.mark.parametrize("model", ["llama-3-70b", "gpt-4x", "gpt-4.7", "", "///"])
def test_resolve_returns_none_for_unknown_names(book: PriceBook, model: str) -> None:
    assert book.resolve(model) is None


def test_shipped_book_covers_the_required_families(book: PriceBook) -> None:
    required = [
        "claude-3-haiku", "claude-3-5-haiku", "claude-3-5-sonnet", "claude-3-7-sonnet",
        "claude-sonnet-4", "claude-opus-4", "claude-opus-4-1", "claude-sonnet-4-5",
        "claude-haiku-4-5", "claude-opus-4-5", "gpt-4o", "gpt-4o-mini", "gpt-4.1",
        "gpt-4.1-mini", "gpt-4.1-nano", "o1", "o3", "o3-mini", "o4-mini", "gpt-5",
        "gpt-5-mini", "gpt-5-nano", "gemini-1.5-pro", "gemini-1.5-flash",
        "gemini-2.0-flash", "gemini-2.5-pro", "gemini-2.5-flash",
        "gemini-2.5-flash-lite",
    ]  # fmt: skip
    missing = [family for family in required if book.get(family) is None]

    assert missing == []
    assert book.as_of
    assert "list prices" in book.source


def test_shipped_prices_are_consistent(book: PriceBook) -> None:
    for family, price in book.prices.items():
        assert price.context_window > 0, family
        assert price.cache_read <= price.input, family
        assert price.output >= price.input or family.startswith("o"), family


def test_cached_input_priced_at_its_own_rates(book: PriceBook) -> None:
    # claude-sonnet-4-5: input 3, cache read 0.30, cache write 3.75, output 15.
    span = _span(
        model="claude-sonnet-4-5-20250929",
        input_tokens=10_000,
        cache_read_tokens=6_000,
        cache_creation_tokens=2_000,
        output_tokens=1_000,
    )

    cost = book.cost(span)

    # 2000 * 3 + 6000 * 0.30 + 2000 * 3.75 + 1000 * 15 = 30_300 per million.
    assert cost.cost_usd == pytest.approx(0.0303, abs=1e-12)
    assert cost.model_key == "claude-sonnet-4-5"
    assert cost.priced
    assert cost.source == "price_book"


def test_openai_cached_input_figures(book: PriceBook) -> None:
    # gpt-4o: input 2.50, cached 1.25, output 10.
    span = _span(
        model="gpt-4o-2024-08-06",
        input_tokens=5_000,
        cache_read_tokens=1_000,
        output_tokens=500,
    )

    # 4000 * 2.5 + 1000 * 1.25 + 500 * 10 = 16_250 per million.
    assert book.cost(span).cost_usd == pytest.approx(0.01625, abs=1e-12)


def test_uncached_part_is_clamped_at_zero(book: PriceBook) -> None:
    # A provider reporting more cached than total input tokens.
    span = _span(model="gpt-4o", input_tokens=100, cache_read_tokens=1_000)

    # Only the 1000 cache reads at 1.25 per million count.
    assert book.cost(span).cost_usd == pytest.approx(0.00125, abs=1e-12)


def test_explicit_cost_takes_precedence(book: PriceBook) -> None:
    span = _span(model="gpt-4o", input_tokens=1_000_000, cost_usd=0.5)

    cost = book.cost(span)

    assert cost.cost_usd == 0.5
    assert cost.source == "explicit"
    assert cost.model_key == "gpt-4o"


def test_explicit_cost_prices_an_unknown_model_without_counting_it() -> None:
    book = PriceBook.load()

    cost = book.cost(_span(model="in-house-llm", cost_usd=0.02))

    assert (cost.cost_usd, cost.priced, cost.source) == (0.02, True, "explicit")
    assert book.unknown_models == {}


@pytest.mark.parametrize("bad", [math.nan, -1.0, math.inf])
def test_invalid_explicit_cost_falls_back_to_the_price_book(
    book: PriceBook, bad: float
) -> None:
    span = _span(model="gpt-4o", input_tokens=1_000, cost_usd=bad)

    assert book.cost(span).cost_usd == pytest.approx(0.0025)
    assert book.cost(span).source == "price_book"


def test_tool_and_agent_spans_are_free_unless_they_carry_a_cost(
    book: PriceBook,
) -> None:
    tool = _span(SpanKind.TOOL, tool_name="search", input_tokens=500)
    agent = _span(SpanKind.AGENT)
    paid_tool = _span(SpanKind.TOOL, tool_name="search", cost_usd=0.01)

    assert book.cost(tool).cost_usd == 0.0
    assert book.cost(tool).priced
    assert book.cost(agent).cost_usd == 0.0
    assert book.cost(paid_tool).cost_usd == 0.01
    assert book.cost(paid_tool).source == "explicit"


def test_unknown_models_are_counted_never_silent() -> None:
    book = PriceBook.load()

    first = book.cost(_span(model="mystery-7b", input_tokens=100))
    book.cost(_span(model="mystery-7b", input_tokens=100))
    book.cost(_span(input_tokens=100))

    assert (first.cost_usd, first.priced, first.source) == (0.0, False, "unknown")
    assert first.model_key is None
    assert book.unknown_models == {"mystery-7b": 2, "<missing>": 1}


def test_json_override_merges_field_by_field(tmp_path: Path) -> None:
    override = tmp_path / "prices.json"
    override.write_text(
        json.dumps(
            {
                "as_of": "2026-01-01",
                "models": {
                    "gpt-4o": {"input": 2.0},
                    "in-house-llm": {"input": 0.5, "output": 1.0},
                    "azure/gpt-4o": {"input": 2.75, "output": 11.0},
                },
            }
        )
    )

    book = PriceBook.load(override)

    gpt4o = book.get("gpt-4o")
    assert gpt4o is not None
    assert (gpt4o.input, gpt4o.output, gpt4o.cache_read) == (2.0, 10.0, 1.25)
    in_house = book.get("in-house-llm")
    assert in_house is not None
    assert (in_house.cache_read, in_house.cache_creation) == (0.5, 0.5)
    assert book.resolve("in-house-llm-v3") == "in-house-llm"
    assert book.resolve("gpt-4o", "azure") == "azure/gpt-4o"
    assert book.resolve("azure/gpt-4o-2024-11-20") == "azure/gpt-4o"
    assert book.resolve("gpt-4o", "openai") == "gpt-4o"
    assert book.as_of == "2026-01-01"
    assert book.get("claude-sonnet-4-5") is not None


def test_toml_override_is_read_by_suffix(tmp_path: Path) -> None:
    override = tmp_path / "prices.toml"
    override.write_text(
        '[models."claude-sonnet-4-5"]\noutput = 12.0\n'
        "[models.local-model]\ninput = 0.0\noutput = 0.0\n"
        'aliases = ["llama-local"]\n'
    )

    book = PriceBook.load(override)

    sonnet = book.get("claude-sonnet-4-5")
    assert sonnet is not None
    assert (sonnet.input, sonnet.output) == (3.0, 12.0)
    assert book.resolve("llama-local:8b") == "local-model"
    cost = book.cost(_span(model="llama-local", input_tokens=10_000))
    assert (cost.cost_usd, cost.priced) == (0.0, True)


@pytest.mark.parametrize(
    ("content", "suffix", "expected"),
    [
        (
            '{"models": {"gpt-4o": {"input": -1}}}',
            "json",
            "model 'gpt-4o': field 'input'",
        ),
        ('{"models": {"gpt-4o": {"input": "x"}}}', "json", "field 'input' must be"),
        ('{"models": {"gpt-4o": {"inptu": 1}}}', "json", "unknown field 'inptu'"),
        (
            '{"models": {"new-model": {"input": 1}}}',
            "json",
            "field 'output' is missing",
        ),
        ('{"models": {"gpt-4o": {"context_window": 1.5}}}', "json", "'context_window'"),
        ('{"models": {"gpt-4o": {"aliases": "gpt"}}}', "json", "'aliases'"),
        ('{"models": []}', "json", "field 'models' must be a table"),
        ('{"prices": {}}', "json", "unknown top-level field 'prices'"),
        ('{"models": {"a/b/c": {"input": 1, "output": 1}}}', "json", "model key"),
        ("{not json", "json", "not valid JSON"),
        ("[models.x\ninput = 1", "toml", "not valid TOML"),
    ],
)
def test_bad_override_names_file_model_and_field(
    tmp_path: Path, content: str, suffix: str, expected: str
) -> None:
    override = tmp_path / f"override.{suffix}"
    override.write_text(content)

    with pytest.raises(PricingError) as raised:
        PriceBook.load(override)

    assert expected in str(raised.value)
    assert "override" in str(raised.value)


def test_missing_override_file_is_a_pricing_error(tmp_path: Path) -> None:
    with pytest.raises(PricingError, match="cannot read price override file"):
        PriceBook.load(tmp_path / "absent.json")
