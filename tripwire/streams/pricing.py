"""The price book: model list prices and the cost of one span."""

from __future__ import annotations

import json
import logging
import math
import re
import tomllib
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from tripwire.errors import PricingError
from tripwire.schemas.events import SpanEvent, SpanKind

logger = logging.getLogger(__name__)

PRICE_FIELDS = ("input", "output", "cache_read", "cache_creation")
_ENTRY_FIELDS = frozenset({*PRICE_FIELDS, "context_window", "provider", "aliases"})
_TOP_LEVEL_FIELDS = frozenset({"as_of", "source", "unit", "models"})

# A family key matches a model name only when the name continues, after the
# key, with one of these characters (or ends): "gpt-4" must not price "gpt-4o".
_BOUNDARY = frozenset("-@:_")

# Bedrock model ids: an optional inference-profile region, then the vendor.
_VENDOR_PREFIX = re.compile(
    r"^(?:(?:us|eu|apac|global|us-gov|ca|jp|au)\.)?"
    r"(?:anthropic|openai|google|meta|amazon|cohere|mistral|ai21|deepseek)\."
)

_RESOLVE_CACHE_SIZE = 4096
_UNKNOWN_NAMES_MAX = 1000
_MISSING_MODEL = "<missing>"
_UNRESOLVED = "\x00unresolved"
_OTHER_MODELS = "<other>"


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """List prices of one model family, in USD per million tokens."""

    input: float
    output: float
    cache_read: float
    cache_creation: float
    context_window: int


@dataclass(frozen=True, slots=True)
class CostBreakdown:
    """What one span cost, and how that figure was obtained.

    ``priced`` is False only when an LLM span names no known model and carries
    no explicit cost: its cost is then 0 and the span is counted as unknown.
    ``source`` is ``"explicit"`` (the span's own ``cost_usd``), ``"price_book"``
    (token counts times list prices; tool and agent spans without a cost are
    free by this rule) or ``"unknown"``.
    """

    cost_usd: float
    model_key: str | None
    priced: bool
    source: str


# The cost of a tool or agent span that names no model and reports none.
_FREE = CostBreakdown(0.0, None, True, "price_book")


class PriceBook:
    """Model prices, name resolution and span costing.

    Build one with :meth:`load`. ``unknown_models`` counts, by raw model name,
    every LLM span that could not be priced.
    """

    def __init__(
        self,
        prices: Mapping[str, ModelPrice],
        aliases: Mapping[str, str] | None = None,
        *,
        as_of: str = "",
        source: str = "",
    ) -> None:
        self.prices: dict[str, ModelPrice] = dict(prices)
        self.as_of = as_of
        self.source = source
        self.unknown_models: Counter[str] = Counter()

        names = {key: key for key in self.prices}
        for alias, key in (aliases or {}).items():
            names[alias] = key
        # Longest first, so that the first match is the longest prefix.
        self._names = sorted(names.items(), key=lambda item: (-len(item[0]), item[0]))
        self._resolved: dict[tuple[str, str | None], str | None] = {}

    @classmethod
    def load(cls, override: str | Path | None = None) -> PriceBook:
        """Load the shipped price book, merged with an optional override file.

        Args:
            override: a JSON or TOML file (by suffix; ``.toml`` is TOML,
                anything else JSON) with a ``models`` table. An entry for a
                known family replaces only the fields it names; a new family
                needs at least ``input`` and ``output``.

        Returns:
            The merged, validated price book.

        Raises:
            PricingError: a file cannot be read or parsed, or an entry has a
                missing, unknown or out-of-range field; the message names the
                file, the model and the field.
        """
        shipped = resources.files("tripwire.streams").joinpath("prices.json")
        base_doc = _parse(shipped.read_text(encoding="utf-8"), "prices.json", "json")
        entries, meta = _validate_document(base_doc, "prices.json", base=None)

        if override is not None:
            path = Path(override)
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as exc:
                raise PricingError(
                    f"cannot read price override file {str(path)!r}: {exc}; "
                    "fix the path or remove the setting to use the shipped prices"
                ) from exc
            kind = "toml" if path.suffix.lower() == ".toml" else "json"
            doc = _parse(text, str(path), kind)
            over, over_meta = _validate_document(doc, str(path), base=entries)
            entries.update(over)
            meta.update({key: value for key, value in over_meta.items() if value})
            logger.info("price override %s merged: %d model families", path, len(over))

        prices = {key: entry.price for key, entry in entries.items()}
        aliases = {
            alias: key for key, entry in entries.items() for alias in entry.aliases
        }
        return cls(prices, aliases, as_of=meta["as_of"], source=meta["source"])

    def get(self, key: str) -> ModelPrice | None:
        """Return the prices of a family key, or None when it is not listed."""
        return self.prices.get(key)

    def resolve(self, model: str, provider: str | None = None) -> str | None:
        """Return the family key a model name is priced under.

        The name is lower-cased, path prefixes (``anthropic/``,
        ``models/``) and Bedrock vendor prefixes (``us.anthropic.``) are
        stripped, dots in Claude version numbers become dashes, and the
        longest family key (or alias) that prefixes the rest at a word
        boundary wins. A provider-qualified key such as ``azure/gpt-4o``
        (from an override file) takes precedence when ``provider``, or the
        name's own first path segment, is that provider.

        Args:
            model: the model name as the span reported it.
            provider: the provider or system reported with it, if any.

        Returns:
            The family key, or None when no key matches.
        """
        cache_key = (model, provider)
        key = self._resolved.get(cache_key, _UNRESOLVED)
        if key is not _UNRESOLVED:
            return key

        key = self._resolve_uncached(model, provider)

        if len(self._resolved) >= _RESOLVE_CACHE_SIZE:
            self._resolved.clear()
        self._resolved[cache_key] = key
        return key

    def cost(self, span: SpanEvent) -> CostBreakdown:
        """Return the cost of one span.

        An explicit, finite, non-negative ``span.cost_usd`` takes precedence.
        Otherwise LLM spans are priced from their token counts; tool and agent
        spans cost 0. Input tokens include cached ones: the uncached rest
        (never below 0) is priced at the input rate, cache reads and cache
        writes at their own rates.

        Args:
            span: the span to price.

        Returns:
            The cost and how it was obtained. An LLM span of an unknown model
            costs 0 with ``priced=False`` and is counted in
            ``unknown_models``.
        """
        explicit = span.cost_usd
        model_key = self.resolve(span.model, span.provider) if span.model else None
        if explicit is not None and math.isfinite(explicit) and explicit >= 0:
            return CostBreakdown(float(explicit), model_key, True, "explicit")

        if span.kind is not SpanKind.LLM:
            if model_key is None:
                return _FREE
            return CostBreakdown(0.0, model_key, True, "price_book")

        price = self.prices.get(model_key) if model_key is not None else None
        if price is None:
            self._count_unknown(span.model or _MISSING_MODEL)
            return CostBreakdown(0.0, None, False, "unknown")

        return CostBreakdown(price_tokens(price, span), model_key, True, "price_book")

    def _resolve_uncached(self, model: str, provider: str | None) -> str | None:
        name = model.strip().lower()
        segments = [segment for segment in name.split("/") if segment]
        if not segments:
            return None

        base = _VENDOR_PREFIX.sub("", segments[-1])
        if base.startswith("claude"):
            base = base.replace(".", "-")
        qualifier = provider.strip().lower() if provider else None
        if qualifier is None and len(segments) > 1:
            qualifier = segments[0]

        if qualifier:
            key = self._longest_prefix(f"{qualifier}/{base}")
            if key is not None:
                return key
        return self._longest_prefix(base)

    def _longest_prefix(self, name: str) -> str | None:
        for prefix, key in self._names:
            if not name.startswith(prefix):
                continue
            if len(name) == len(prefix) or name[len(prefix)] in _BOUNDARY:
                return key
        return None

    def _count_unknown(self, name: str) -> None:
        if name not in self.unknown_models and (
            len(self.unknown_models) >= _UNKNOWN_NAMES_MAX
        ):
            name = _OTHER_MODELS
        if name not in self.unknown_models:
            logger.warning("no price for model %r: its spans cost 0", name)
        self.unknown_models[name] += 1


def price_tokens(price: ModelPrice, span: SpanEvent) -> float:
    """Return the list-price cost of a span's tokens, in USD.

    Args:
        price: the prices of the span's model family.
        span: the span; negative token counts are read as 0.

    Returns:
        The cost in USD.
    """
    # Conditional expressions, not max(): this runs for every LLM span.
    input_tokens = span.input_tokens if span.input_tokens > 0 else 0
    cache_read = span.cache_read_tokens if span.cache_read_tokens > 0 else 0
    cache_creation = span.cache_creation_tokens if span.cache_creation_tokens > 0 else 0
    output_tokens = span.output_tokens if span.output_tokens > 0 else 0
    uncached = input_tokens - cache_read - cache_creation
    uncached = uncached if uncached > 0 else 0

    micro = (
        uncached * price.input
        + cache_read * price.cache_read
        + cache_creation * price.cache_creation
        + output_tokens * price.output
    )
    return micro / 1_000_000


@dataclass(slots=True)
class _Entry:
    price: ModelPrice
    aliases: tuple[str, ...]


def _parse(text: str, origin: str, kind: str) -> Any:
    try:
        if kind == "toml":
            return tomllib.loads(text)
        return json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise PricingError(
            f"{origin}: not valid {kind.upper()}: {exc}; fix the file's syntax"
        ) from exc


def _validate_document(
    doc: Any, origin: str, base: Mapping[str, _Entry] | None
) -> tuple[dict[str, _Entry], dict[str, str]]:
    if not isinstance(doc, dict):
        raise PricingError(
            f"{origin}: top level must be a table with a 'models' table, got "
            f"{type(doc).__name__}; see docs/pricing.md for the format"
        )
    unknown = sorted(set(doc) - _TOP_LEVEL_FIELDS)
    if unknown:
        raise PricingError(
            f"{origin}: unknown top-level field {unknown[0]!r}; allowed are "
            f"{sorted(_TOP_LEVEL_FIELDS)}"
        )
    models = doc.get("models")
    if not isinstance(models, dict):
        raise PricingError(
            f"{origin}: field 'models' must be a table of model families, got "
            f"{type(models).__name__}; see docs/pricing.md for the format"
        )

    meta = {
        "as_of": str(doc.get("as_of", "")),
        "source": str(doc.get("source", "")),
    }
    entries = {
        _check_key(key, origin): _validate_entry(key.strip().lower(), raw, origin, base)
        for key, raw in models.items()
    }
    return entries, meta


def _check_key(key: str, origin: str) -> str:
    name = key.strip().lower()
    if not name or name.count("/") > 1:
        raise PricingError(
            f"{origin}: model key {key!r} must be a family name such as "
            "'gpt-4o', optionally qualified by one provider: 'azure/gpt-4o'"
        )
    return name


def _validate_entry(
    key: str, raw: Any, origin: str, base: Mapping[str, _Entry] | None
) -> _Entry:
    where = f"{origin}: model {key!r}"
    if not isinstance(raw, dict):
        raise PricingError(
            f"{where}: must be a table of prices, got {type(raw).__name__}"
        )
    unknown = sorted(set(raw) - _ENTRY_FIELDS)
    if unknown:
        raise PricingError(
            f"{where}: unknown field {unknown[0]!r}; allowed are "
            f"{sorted(_ENTRY_FIELDS)}"
        )

    previous = base.get(key) if base is not None else None
    values: dict[str, float] = {}
    for name in PRICE_FIELDS:
        if name in raw:
            values[name] = _check_price(raw[name], where, name)
        elif previous is not None:
            values[name] = getattr(previous.price, name)
        elif base is None or name in ("input", "output"):
            raise PricingError(
                f"{where}: field {name!r} is missing; give it in USD per million tokens"
            )
        else:
            # A new family in an override: caches cost what input costs.
            values[name] = values["input"]

    if "context_window" in raw:
        context = _check_context(raw["context_window"], where)
    elif previous is not None:
        context = previous.price.context_window
    elif base is None:
        raise PricingError(f"{where}: field 'context_window' is missing")
    else:
        context = 0

    aliases = _check_aliases(raw.get("aliases", []), where)
    if previous is not None and "aliases" not in raw:
        aliases = previous.aliases
    price = ModelPrice(
        input=values["input"],
        output=values["output"],
        cache_read=values["cache_read"],
        cache_creation=values["cache_creation"],
        context_window=context,
    )
    return _Entry(price, aliases)


def _check_price(value: Any, where: str, name: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise PricingError(
            f"{where}: field {name!r} must be a finite number >= 0 (USD per "
            f"million tokens), got {value!r}"
        )
    return float(value)


def _check_context(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PricingError(
            f"{where}: field 'context_window' must be a whole number of tokens "
            f">= 0, got {value!r}"
        )
    return value


def _check_aliases(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(
        isinstance(alias, str) and alias.strip() for alias in value
    ):
        raise PricingError(
            f"{where}: field 'aliases' must be a list of model names, got {value!r}"
        )
    return tuple(alias.strip().lower() for alias in value)
