"""Map OpenTelemetry GenAI, OpenLLMetry and OpenInference span attributes to spans."""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import orjson
from opentelemetry.trace import StatusCode

from tripwire.errors import ConfigError, SpanValidationError
from tripwire.schemas.events import SpanEvent, SpanKind
from tripwire.schemas.native import (
    MAX_ID_CHARS,
    MAX_NAME_CHARS,
    MAX_OUTPUT_TEXT_CHARS,
    MAX_TOKENS_PER_SPAN,
    span_from_mapping,
)

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan

logger = logging.getLogger(__name__)

SKIP_NOT_GENAI = "not_genai"
"""Skip reason: the span carries no GenAI attribute at all (an HTTP call, say)."""

SKIP_UNTRACKED_KIND = "untracked_kind"
"""Skip reason: a GenAI span of a kind Tripwire does not track (chain, retriever)."""

DEFAULT_SESSION_ATTRIBUTES: tuple[str, ...] = (
    "tripwire.session.id",
    "session.id",
    "gen_ai.conversation.id",
    "traceloop.association.properties.session_id",
    "traceloop.association.properties.conversation_id",
    "traceloop.association.properties.thread_id",
)
"""Attributes naming the session, first present wins; else the trace id is used."""

DEFAULT_USER_ATTRIBUTES: tuple[str, ...] = (
    "tripwire.user.id",
    "user.id",
    "traceloop.association.properties.user_id",
    "enduser.id",
)
"""Attributes naming the end user, first present wins."""

# Candidate attributes of each field, first present wins (docs/conventions.md).
INPUT_TOKEN_ATTRIBUTES = (
    "gen_ai.usage.input_tokens",
    "gen_ai.usage.prompt_tokens",
    "llm.token_count.prompt",
)
OUTPUT_TOKEN_ATTRIBUTES = (
    "gen_ai.usage.output_tokens",
    "gen_ai.usage.completion_tokens",
    "llm.token_count.completion",
)
CACHE_READ_ATTRIBUTES = (
    "gen_ai.usage.cache_read.input_tokens",
    "gen_ai.usage.cache_read_input_tokens",
    "llm.token_count.prompt_details.cache_read",
)
CACHE_CREATION_ATTRIBUTES = (
    "gen_ai.usage.cache_creation.input_tokens",
    "gen_ai.usage.cache_creation_input_tokens",
    "gen_ai.usage.cache_write_input_tokens",
    "llm.token_count.prompt_details.cache_write",
)
TOTAL_TOKEN_ATTRIBUTES = (
    "gen_ai.usage.total_tokens",
    "llm.usage.total_tokens",
    "llm.token_count.total",
)
MODEL_ATTRIBUTES = (
    "gen_ai.response.model",
    "gen_ai.request.model",
    "llm.model_name",
    "embedding.model_name",
)
PROVIDER_ATTRIBUTES = (
    "gen_ai.provider.name",
    "gen_ai.system",
    "llm.provider",
    "llm.system",
)
COST_ATTRIBUTES = ("gen_ai.usage.cost", "llm.cost.total")
TOOL_NAME_ATTRIBUTES = ("gen_ai.tool.name", "tool.name")
TOOL_ARGS_ATTRIBUTES = (
    "gen_ai.tool.call.arguments",
    "traceloop.entity.input",
    "input.value",
    "tool.parameters",
)
AGENT_NAME_ATTRIBUTES = ("gen_ai.agent.name", "agent.name")

_OPENINFERENCE_KINDS: dict[str, SpanKind] = {
    "LLM": SpanKind.LLM,
    "EMBEDDING": SpanKind.LLM,
    "TOOL": SpanKind.TOOL,
    "AGENT": SpanKind.AGENT,
}
_GENAI_OPERATIONS: dict[str, SpanKind] = {
    "chat": SpanKind.LLM,
    "text_completion": SpanKind.LLM,
    "generate_content": SpanKind.LLM,
    "embeddings": SpanKind.LLM,
    "execute_tool": SpanKind.TOOL,
    "invoke_agent": SpanKind.AGENT,
    "create_agent": SpanKind.AGENT,
}
_TRACELOOP_KINDS: dict[str, SpanKind | None] = {
    "llm": SpanKind.LLM,
    "tool": SpanKind.TOOL,
    "agent": SpanKind.AGENT,
    "workflow": SpanKind.AGENT,
    "task": None,
}
_LLM_REQUEST_TYPES = frozenset({"chat", "completion", "embedding"})
_GENAI_PREFIXES = ("gen_ai.", "llm.", "openinference.", "traceloop.")
_OUTPUT_EVENTS = frozenset(
    {
        "gen_ai.choice",
        "gen_ai.content.completion",
        "gen_ai.client.inference.operation.details",
    }
)
_EVENT_OUTPUT_ATTRIBUTES = (
    "gen_ai.output.messages",
    "gen_ai.completion",
    "gen_ai.event.content",
    "message",
    "content",
)
_TEXT_KEYS = ("content", "text")
_MAX_INDEXED_MESSAGES = 16
_MAX_JSON_DEPTH = 8
_EMPTY: Mapping[str, object] = MappingProxyType({})
# Instrumentation scopes such as "opentelemetry.instrumentation.openai.v1" or
# "openinference.instrumentation.anthropic" name the provider they wrap.
_SCOPE_PROVIDERS = {
    "openai": "openai",
    "openai_v2": "openai",
    "anthropic": "anthropic",
    "bedrock": "aws.bedrock",
    "botocore": "aws.bedrock",
    "vertexai": "gcp.vertex_ai",
    "google_genai": "gcp.gen_ai",
    "google_generativeai": "gcp.gemini",
    "mistralai": "mistral_ai",
    "groq": "groq",
    "cohere": "cohere",
    "ollama": "ollama",
}


@dataclass(frozen=True, slots=True)
class MappingConfig:
    """How span attributes are read into a span.

    Args:
        session_attributes: attributes naming the session, in order of
            preference; span attributes are searched before resource ones.
            Without a match the trace id is the session.
        user_attributes: attributes naming the end user, in order of preference.
        input_excludes_cache_providers: providers (lower case, as normalised)
            whose instrumentation reports input tokens *without* the cached
            part, so the cached part is added; use it for hand-written
            instrumentation that copies Anthropic's raw ``usage.input_tokens``.
        count_agent_usage: keep token counts and cost on agent spans. Off by
            default because agent spans usually repeat the sum of their LLM
            children, which would count the same tokens twice.
        extract_output_text: read the output text for the loop detector.
    """

    session_attributes: Sequence[str] = DEFAULT_SESSION_ATTRIBUTES
    user_attributes: Sequence[str] = DEFAULT_USER_ATTRIBUTES
    input_excludes_cache_providers: Sequence[str] = ()
    count_agent_usage: bool = False
    extract_output_text: bool = True

    def __post_init__(self) -> None:
        for name in (
            "session_attributes",
            "user_attributes",
            "input_excludes_cache_providers",
        ):
            values = getattr(self, name)
            if isinstance(values, str) or not all(
                isinstance(value, str) and value for value in values
            ):
                raise ConfigError(
                    f"MappingConfig.{name} must be a list of non-empty attribute "
                    f"names, got {values!r}"
                )
            if name == "input_excludes_cache_providers":
                values = [value.lower() for value in values]
            object.__setattr__(self, name, tuple(values))


DEFAULT_MAPPING = MappingConfig()


@dataclass(frozen=True, slots=True)
class OtelEvent:
    """A timestamped event recorded on an OpenTelemetry span."""

    name: str
    attributes: Mapping[str, object] = field(default_factory=dict)


@dataclass(slots=True)
class OtelSpan:
    """An OpenTelemetry span in plain Python values, before mapping.

    Ids are lower-case hex. Attribute values are str, bool, int, float, bytes,
    lists of those, or dicts for OTLP key-value lists.
    """

    trace_id: str
    span_id: str
    name: str
    start_time_ns: int
    end_time_ns: int
    attributes: Mapping[str, object]
    parent_span_id: str | None = None
    events: Sequence[OtelEvent] = ()
    resource: Mapping[str, object] = field(default_factory=dict)
    scope_name: str | None = None
    status_error: bool = False


@dataclass(frozen=True, slots=True)
class Skipped:
    """A span that is not an LLM call, tool call or agent run, and why."""

    reason: str


def normalise_span(
    span: OtelSpan, mapping: MappingConfig = DEFAULT_MAPPING
) -> SpanEvent | Skipped:
    """Map an OpenTelemetry span to a normalised span, or say why it is skipped.

    Args:
        span: the span, its resource and its events as plain values.
        mapping: which attributes name the session and the user.

    Returns:
        The normalised span, or :class:`Skipped` with a low-cardinality reason
        (``SKIP_NOT_GENAI`` or ``SKIP_UNTRACKED_KIND``) the caller can count.

    Raises:
        SpanValidationError: an attribute Tripwire reads breaks its rule; the
            message names the span, the attribute and the rule.
    """
    try:
        return _normalise(span, mapping)
    except SpanValidationError as err:
        raise SpanValidationError(
            f"span {span.span_id or '?'} of trace {span.trace_id or '?'}: {err.reason}",
            err.field,
        ) from None


def span_from_readable(
    span: ReadableSpan, mapping: MappingConfig = DEFAULT_MAPPING
) -> SpanEvent | Skipped:
    """Map a finished OpenTelemetry SDK span to a normalised span.

    Args:
        span: a span handed to a span exporter or processor.
        mapping: which attributes name the session and the user.

    Returns:
        As :func:`normalise_span`.

    Raises:
        SpanValidationError: as :func:`normalise_span`.
    """
    return normalise_span(otel_span_from_readable(span), mapping)


def otel_span_from_readable(span: ReadableSpan) -> OtelSpan:
    """Convert a finished OpenTelemetry SDK span to plain values.

    Args:
        span: a span handed to a span exporter or processor.

    Returns:
        The span's ids, times, attributes, events, resource and status.
    """
    context = span.context
    parent = span.parent
    scope = span.instrumentation_scope
    return OtelSpan(
        trace_id=f"{context.trace_id:032x}" if context is not None else "",
        span_id=f"{context.span_id:016x}" if context is not None else "",
        name=span.name,
        start_time_ns=span.start_time or 0,
        end_time_ns=span.end_time or 0,
        attributes=_plain(span.attributes),
        parent_span_id=f"{parent.span_id:016x}" if parent is not None else None,
        events=tuple(
            OtelEvent(event.name, _plain(event.attributes)) for event in span.events
        ),
        resource=_plain(span.resource.attributes),
        scope_name=scope.name if scope is not None else None,
        status_error=span.status.status_code is StatusCode.ERROR,
    )


def hash_tool_args(arguments: object) -> str:
    """Return the stable hash of a tool call's arguments.

    JSON text is parsed and re-encoded with sorted keys first, so the same
    arguments hash the same whatever their spacing or key order. The text
    itself is never kept.

    Args:
        arguments: the arguments as JSON text, other text, or decoded values.

    Returns:
        32 hex digits: a BLAKE2b digest of 16 bytes.
    """
    value = arguments
    if isinstance(arguments, str | bytes):
        raw = arguments.encode() if isinstance(arguments, str) else arguments
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return hashlib.blake2b(raw, digest_size=16).hexdigest()
    try:
        canonical = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        canonical = repr(value).encode()
    return hashlib.blake2b(canonical, digest_size=16).hexdigest()


def _normalise(span: OtelSpan, mapping: MappingConfig) -> SpanEvent | Skipped:
    attrs = span.attributes
    kind = _kind(attrs)
    if isinstance(kind, Skipped):
        return kind

    provider = _lower(_first_text(attrs, PROVIDER_ATTRIBUTES))
    if provider is None and kind is SpanKind.LLM:
        provider = _scope_provider(span.scope_name)
    usage = kind is SpanKind.LLM or (
        kind is SpanKind.AGENT and mapping.count_agent_usage
    )
    record: dict[str, object] = {
        "span_id": span.span_id,
        "trace_id": span.trace_id,
        "session_id": _identity(span, mapping.session_attributes),
        "user_id": _identity(span, mapping.user_attributes),
        "parent_span_id": span.parent_span_id,
        "kind": kind.value,
        "start_time": _seconds(span.start_time_ns, "start time"),
        "end_time": _seconds(span.end_time_ns, "end time"),
        "agent_name": _agent_name(span, attrs),
        "model": _first_text(attrs, MODEL_ATTRIBUTES),
        "provider": provider,
        "finish_reason": _finish_reason(span, attrs),
    }
    if usage:
        record.update(_usage(attrs, provider, mapping))
        record["cost_usd"] = _cost(attrs)
    if kind is SpanKind.TOOL:
        record.update(_tool(span, attrs))
    if mapping.extract_output_text:
        record["output_text"] = _output_text(span, attrs)

    return span_from_mapping(record)


def _kind(attrs: Mapping[str, object]) -> SpanKind | Skipped:
    """Decide what the span measured; explicit kind attributes win."""
    openinference = attrs.get("openinference.span.kind")
    if isinstance(openinference, str):
        kind = _OPENINFERENCE_KINDS.get(openinference.upper())
        return kind if kind is not None else Skipped(SKIP_UNTRACKED_KIND)

    operation = attrs.get("gen_ai.operation.name")
    if isinstance(operation, str) and operation in _GENAI_OPERATIONS:
        return _GENAI_OPERATIONS[operation]

    traceloop = attrs.get("traceloop.span.kind")
    if isinstance(traceloop, str) and traceloop in _TRACELOOP_KINDS:
        kind = _TRACELOOP_KINDS[traceloop]
        return kind if kind is not None else Skipped(SKIP_UNTRACKED_KIND)

    request_type = attrs.get("llm.request.type")
    if isinstance(request_type, str) and request_type in _LLM_REQUEST_TYPES:
        return SpanKind.LLM
    if any(name in attrs for name in INPUT_TOKEN_ATTRIBUTES + OUTPUT_TOKEN_ATTRIBUTES):
        return SpanKind.LLM
    if any(name in attrs for name in TOOL_NAME_ATTRIBUTES):
        return SpanKind.TOOL

    if any(name.startswith(_GENAI_PREFIXES) for name in attrs):
        return Skipped(SKIP_UNTRACKED_KIND)
    return Skipped(SKIP_NOT_GENAI)


def _usage(
    attrs: Mapping[str, object], provider: str | None, mapping: MappingConfig
) -> dict[str, object]:
    """Read token counts, making input_tokens include the cached input."""
    input_tokens = _first_count(attrs, INPUT_TOKEN_ATTRIBUTES)
    output_tokens = _first_count(attrs, OUTPUT_TOKEN_ATTRIBUTES) or 0
    cache_read = _first_count(attrs, CACHE_READ_ATTRIBUTES) or 0
    cache_creation = _first_count(attrs, CACHE_CREATION_ATTRIBUTES) or 0
    total = _first_count(attrs, TOTAL_TOKEN_ATTRIBUTES)
    cached = cache_read + cache_creation

    if input_tokens is None:
        input_tokens = cached
    elif cached and _input_excludes_cache(
        input_tokens, output_tokens, cached, total, provider, mapping
    ):
        input_tokens += cached

    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cache_read_tokens": cache_read,
        "cache_creation_tokens": cache_creation,
    }


def _input_excludes_cache(
    input_tokens: int,
    output_tokens: int,
    cached: int,
    total: int | None,
    provider: str | None,
    mapping: MappingConfig,
) -> bool:
    """Tell whether a reported input count leaves out the cached input."""
    if total is not None:
        if total == input_tokens + output_tokens:
            return False
        if total == input_tokens + output_tokens + cached:
            return True
    if cached > input_tokens:
        return True
    return provider is not None and provider in mapping.input_excludes_cache_providers


def _cost(attrs: Mapping[str, object]) -> float | None:
    for name in COST_ATTRIBUTES:
        value = attrs.get(name)
        if value is None:
            continue
        if (type(value) is int or type(value) is float) and (
            math.isfinite(value) and value >= 0
        ):
            return float(value)
        raise SpanValidationError(
            f"{name} must be a finite number of US dollars >= 0, got {_show(value)}",
            name,
        )
    return None


def _tool(span: OtelSpan, attrs: Mapping[str, object]) -> dict[str, object]:
    """Read the tool name, a hash of its arguments and how the call ended."""
    name = _first_text(attrs, TOOL_NAME_ATTRIBUTES)
    if name is None and attrs.get("traceloop.span.kind") == "tool":
        name = _first_text(attrs, ("traceloop.entity.name",))
    if name is None and span.name.startswith("execute_tool "):
        name = span.name.removeprefix("execute_tool ").strip()[:MAX_NAME_CHARS] or None

    arguments = next(
        (attrs[key] for key in TOOL_ARGS_ATTRIBUTES if attrs.get(key) is not None),
        None,
    )
    failed = span.status_error or bool(attrs.get("error.type"))
    call_id = attrs.get("gen_ai.tool.call.id")
    return {
        "tool_name": name,
        "tool_args_hash": None if arguments is None else hash_tool_args(arguments),
        "tool_status": "error" if failed else "ok",
        "attributes": {"tool_call_id": call_id} if isinstance(call_id, str) else None,
    }


def _identity(span: OtelSpan, names: Sequence[str]) -> str | None:
    """Return the first session or user id found in the span, then the resource."""
    for source in (span.attributes, span.resource):
        for name in names:
            value = source.get(name)
            if value is None or value == "":
                continue
            if type(value) is int:
                return str(value)
            if type(value) is str and len(value) <= MAX_ID_CHARS:
                return value
            raise SpanValidationError(
                f"{name} must be a string of at most {MAX_ID_CHARS} characters, "
                f"got {_show(value)}",
                name,
            )
    return None


def _agent_name(span: OtelSpan, attrs: Mapping[str, object]) -> str | None:
    name = _first_text(attrs, AGENT_NAME_ATTRIBUTES)
    if name is None and attrs.get("traceloop.span.kind") in ("agent", "workflow"):
        name = _first_text(attrs, ("traceloop.entity.name",))
    if name is None:
        name = _first_text(attrs, ("traceloop.workflow.name",))
    if name is None:
        service = span.resource.get("service.name")
        if isinstance(service, str) and not service.startswith("unknown_service"):
            name = service[:MAX_NAME_CHARS] or None
    return name


def _seconds(nanos: int, what: str) -> float:
    if type(nanos) is int and nanos > 0:
        return nanos / 1e9
    raise SpanValidationError(
        f"span {what} must be a positive count of Unix nanoseconds, got "
        f"{_show(nanos)}; the exporter sent a span that never started or ended",
        what.replace(" ", "_"),
    )


def _finish_reason(span: OtelSpan, attrs: Mapping[str, object]) -> str | None:
    reasons = attrs.get("gen_ai.response.finish_reasons")
    if isinstance(reasons, list | tuple) and reasons:
        reasons = reasons[0]
    if isinstance(reasons, str) and reasons:
        return reasons[:MAX_NAME_CHARS]

    reason = attrs.get("gen_ai.completion.0.finish_reason")
    if isinstance(reason, str) and reason:
        return reason[:MAX_NAME_CHARS]
    return _outputs(span, attrs, want_text=False)[1]


def _output_text(span: OtelSpan, attrs: Mapping[str, object]) -> str | None:
    return _outputs(span, attrs, want_text=True)[0]


def _outputs(
    span: OtelSpan, attrs: Mapping[str, object], *, want_text: bool
) -> tuple[str | None, str | None]:
    """Collect the output text and finish reason from the first source present.

    Sources, in order: the ``gen_ai.output.messages`` attribute, the indexed
    ``gen_ai.completion.N`` and ``llm.output_messages.N`` attributes, output
    events, then ``output.value`` or ``traceloop.entity.output``.
    """
    sink = _TextSink()
    messages = attrs.get("gen_ai.output.messages")
    if messages is not None:
        sink.walk(_maybe_json(messages), 0)
    if not sink.parts:
        _indexed(attrs, "gen_ai.completion.{}.content", sink)
    if not sink.parts:
        _indexed(attrs, "llm.output_messages.{}.message.content", sink)
    if not sink.parts:
        for index in range(_MAX_INDEXED_MESSAGES):
            prefix = f"llm.output_messages.{index}.message.contents."
            before = len(sink.parts)
            _indexed(attrs, prefix + "{}.message_content.text", sink)
            if len(sink.parts) == before:
                break
    if not sink.parts or sink.finish_reason is None:
        for event in span.events:
            if event.name in _OUTPUT_EVENTS:
                sink.event(event.attributes)
    if want_text and not sink.parts:
        for name in ("output.value", "traceloop.entity.output"):
            value = attrs.get(name)
            if isinstance(value, str) and value:
                sink.add(value)
                break

    text = "\n".join(sink.parts)[:MAX_OUTPUT_TEXT_CHARS] if sink.parts else None
    return text, sink.finish_reason


def _indexed(attrs: Mapping[str, object], template: str, sink: _TextSink) -> None:
    for index in range(_MAX_INDEXED_MESSAGES):
        value = attrs.get(template.format(index))
        if value is None:
            return
        if isinstance(value, str):
            sink.add(value)


class _TextSink:
    """Gathers output text and the first finish reason from message shapes."""

    __slots__ = ("chars", "finish_reason", "parts")

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.chars = 0
        self.finish_reason: str | None = None

    def add(self, text: str) -> None:
        if text and self.chars < MAX_OUTPUT_TEXT_CHARS:
            self.parts.append(text)
            self.chars += len(text)

    def reason(self, value: object) -> None:
        if self.finish_reason is None and isinstance(value, str) and value:
            self.finish_reason = value[:MAX_NAME_CHARS]

    def event(self, attributes: Mapping[str, object]) -> None:
        self.reason(attributes.get("finish_reason"))
        for name in _EVENT_OUTPUT_ATTRIBUTES:
            value = attributes.get(name)
            if value is None:
                continue
            parsed = _maybe_json(value)
            if isinstance(parsed, str):
                self.add(parsed)
            else:
                self.walk(parsed, 0)
        self.walk(_maybe_json(attributes.get("message.content")), 0)

    def walk(self, value: object, depth: int) -> None:
        """Collect text under ``content``/``text`` keys, skipping non-text parts."""
        if depth > _MAX_JSON_DEPTH or self.chars >= MAX_OUTPUT_TEXT_CHARS:
            return
        if isinstance(value, list | tuple):
            for item in value:
                self.walk(item, depth + 1)
        elif isinstance(value, dict):
            self.reason(value.get("finish_reason"))
            if value.get("type") not in (None, "text", "output_text"):
                return
            for key in _TEXT_KEYS:
                item = value.get(key)
                if isinstance(item, str):
                    self.add(item)
                elif item is not None:
                    self.walk(item, depth + 1)
            for key in ("message", "parts", "choices"):
                item = value.get(key)
                if item is not None:
                    self.walk(item, depth + 1)
        elif isinstance(value, str) and depth > 0:
            self.add(value)


def _maybe_json(value: object) -> object:
    """Parse a string that holds a JSON array or object; else return it as is."""
    if isinstance(value, str) and value[:1] in ("[", "{"):
        try:
            parsed: object = orjson.loads(value)
        except orjson.JSONDecodeError:
            return value
        return parsed
    return value


def _first_text(attrs: Mapping[str, object], names: Sequence[str]) -> str | None:
    for name in names:
        value = attrs.get(name)
        if value is None or value == "":
            continue
        if type(value) is str and len(value) <= MAX_NAME_CHARS:
            return value
        raise SpanValidationError(
            f"{name} must be a string of at most {MAX_NAME_CHARS} characters, "
            f"got {_show(value)}",
            name,
        )
    return None


def _first_count(attrs: Mapping[str, object], names: Sequence[str]) -> int | None:
    for name in names:
        value = attrs.get(name)
        if value is not None:
            return _count(value, name)
    return None


def _count(value: object, name: str) -> int:
    """Read a token count: an integer, an integral double or decimal digits."""
    count: int | None = None
    if type(value) is int:
        count = value
    elif type(value) is float:
        count = int(value) if value.is_integer() else None
    elif type(value) is str and value.isascii() and value.isdigit():
        count = int(value) if len(value) < 19 else MAX_TOKENS_PER_SPAN + 1

    if count is None:
        raise SpanValidationError(
            f"{name} must be a whole number of tokens, got {_show(value)} "
            f"({type(value).__name__})",
            name,
        )
    if not 0 <= count <= MAX_TOKENS_PER_SPAN:
        raise SpanValidationError(
            f"{name} must be between 0 and {MAX_TOKENS_PER_SPAN} "
            f"(MAX_TOKENS_PER_SPAN), got {count}",
            name,
        )
    return count


def _scope_provider(scope_name: str | None) -> str | None:
    """Return the provider an instrumentation scope wraps, if it names one."""
    if not scope_name:
        return None
    _, marker, rest = scope_name.partition("instrumentation.")
    return _SCOPE_PROVIDERS.get(rest.split(".", 1)[0]) if marker else None


def _lower(value: str | None) -> str | None:
    return value.lower() if value is not None else None


def _plain(attributes: Mapping[str, Any] | None) -> Mapping[str, object]:
    return dict(attributes) if attributes else _EMPTY


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def iter_attribute_names(mapping: MappingConfig = DEFAULT_MAPPING) -> Iterator[str]:
    """Yield every attribute name the mapping reads, for documentation and tests.

    Args:
        mapping: the session and user candidates to include.

    Yields:
        Attribute names, each once.
    """
    seen: set[str] = set()
    groups: tuple[Sequence[str], ...] = (
        mapping.session_attributes,
        mapping.user_attributes,
        INPUT_TOKEN_ATTRIBUTES,
        OUTPUT_TOKEN_ATTRIBUTES,
        CACHE_READ_ATTRIBUTES,
        CACHE_CREATION_ATTRIBUTES,
        TOTAL_TOKEN_ATTRIBUTES,
        MODEL_ATTRIBUTES,
        PROVIDER_ATTRIBUTES,
        COST_ATTRIBUTES,
        TOOL_NAME_ATTRIBUTES,
        TOOL_ARGS_ATTRIBUTES,
        AGENT_NAME_ATTRIBUTES,
    )
    for group in groups:
        for name in group:
            if name not in seen:
                seen.add(name)
                yield name
