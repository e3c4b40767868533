"""Decode, validate and encode native span records, the JSON agents publish."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import fields
from datetime import datetime
from typing import IO, Any

import orjson

from tripwire.errors import SpanValidationError
from tripwire.schemas.events import SpanEvent, SpanKind, ToolStatus
from tripwire.schemas.textcode import TextCode, TextCodeError

logger = logging.getLogger(__name__)

MAX_RECORD_BYTES = 1 << 20
"""Default size limit of one encoded span record (1 MiB)."""

MAX_TOKENS_PER_SPAN = 10_000_000
"""A token count above this in one span is rejected as absurd."""

MAX_COST_USD_PER_SPAN = 100_000.0
"""A reported cost above this in one span is rejected as absurd."""

MAX_OUTPUT_TEXT_CHARS = 16_384
"""Output text is truncated to this many characters (it only feeds loop detection)."""

MAX_EMBEDDING_DIMS = 4096
"""An embedding with more numbers than this is rejected."""

MAX_ID_CHARS = 256
"""Longest accepted span, trace, session, parent or user id."""

MAX_NAME_CHARS = 256
"""Longest accepted model, provider, agent, tool, finish reason or outcome."""

MAX_DEPTH = 10_000
"""Deepest accepted agent nesting depth."""

MAX_ATTRIBUTES = 32
"""Attributes beyond this count are dropped."""

MAX_ATTRIBUTE_KEY_CHARS = 128
"""Attributes with a longer key are dropped."""

MAX_ATTRIBUTE_VALUE_CHARS = 256
"""String attribute values are truncated to this many characters."""

MAX_UNIX_SECONDS = 4_102_444_800.0
"""Latest accepted time, 2100-01-01T00:00:00Z, in Unix seconds."""

MIN_UNIX_NANOS = 10**17
"""A number above this is read as Unix nanoseconds rather than seconds."""

_MAX_UNIX_NANOS = MAX_UNIX_SECONDS * 1e9
_MAX_TIME_TEXT_CHARS = 64
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:[Zz]|[+-]\d{2}:\d{2})"
)

_KINDS: dict[str, SpanKind] = {kind.value: kind for kind in SpanKind}
_TOOL_STATUSES: dict[str, ToolStatus] = {status.value: status for status in ToolStatus}
_FIELD_NAMES: tuple[str, ...] = tuple(spec.name for spec in fields(SpanEvent))
_SCALARS = (str, int, float, bool)


def decode_native(
    data: bytes | bytearray | memoryview | str | Mapping[str, Any],
    *,
    max_bytes: int = MAX_RECORD_BYTES,
) -> SpanEvent:
    """Decode one native span record and check it against the span contract.

    Unknown top-level fields are ignored, so older detectors accept newer
    agents. A missing ``session_id`` defaults to the ``trace_id``.

    Args:
        data: the JSON record as bytes or text, or an already decoded object.
        max_bytes: largest accepted encoded record; not applied to a mapping.

    Returns:
        The normalised span.

    Raises:
        SpanValidationError: the record is oversized, not JSON, not an object,
            or breaks a field rule; ``field`` names the offending field.
    """
    if type(data) is dict or (
        type(data) is not bytes and type(data) is not str and isinstance(data, Mapping)
    ):
        return span_from_mapping(data)

    if len(data) > max_bytes:
        raise SpanValidationError(
            f"span record is {len(data)} bytes, over the {max_bytes}-byte limit; "
            "trim output_text, embedding and attributes",
        )

    try:
        record = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise SpanValidationError(f"span record is not valid JSON: {exc}") from exc
    if type(record) is not dict:
        raise SpanValidationError(
            f"span record must be a JSON object, got {type(record).__name__}"
        )

    return span_from_mapping(record)


def span_from_mapping(record: Mapping[str, Any]) -> SpanEvent:
    """Check a decoded native record and build its span.

    Args:
        record: field name to JSON value, as in the native span schema.

    Returns:
        The normalised span.

    Raises:
        SpanValidationError: a field breaks its rule; ``field`` names it.
    """
    get = record.get
    span_id = _required_id(get("span_id"), "span_id")
    trace_id = _required_id(get("trace_id"), "trace_id")
    session_id = _optional_id(get("session_id"), "session_id") or trace_id
    start_time = _time(get("start_time"), "start_time")
    end_time = _time(get("end_time"), "end_time")
    if end_time < start_time:
        raise SpanValidationError(
            f"end_time {end_time!r} is before start_time {start_time!r}; "
            "send the span's end after its start",
            "end_time",
        )

    input_tokens = _tokens(get("input_tokens"), "input_tokens")
    cache_read = get("cache_read_tokens")
    cache_read = 0 if cache_read is None else _tokens(cache_read, "cache_read_tokens")
    cache_creation = get("cache_creation_tokens")
    cache_creation = (
        0
        if cache_creation is None
        else _tokens(cache_creation, "cache_creation_tokens")
    )
    if cache_read + cache_creation > input_tokens:
        raise SpanValidationError(
            f"cache_read_tokens ({cache_read}) + cache_creation_tokens "
            f"({cache_creation}) exceed input_tokens ({input_tokens}); input_tokens "
            "must include cached input",
            "input_tokens",
        )

    # Absent fields (most of them) skip their checks: the None tests below
    # give what each check gives for None.
    parent_span_id = get("parent_span_id")
    user_id = get("user_id")
    agent_name = get("agent_name")
    model = get("model")
    provider = get("provider")
    output_tokens = get("output_tokens")
    cost_usd = get("cost_usd")
    tool_name = get("tool_name")
    tool_args_hash = get("tool_args_hash")
    tool_status = get("tool_status")
    finish_reason = get("finish_reason")
    depth = get("depth")
    output_text = get("output_text")
    output_code = get("output_code")
    embedding = get("embedding")
    outcome = get("outcome")
    attributes = get("attributes")

    # Positional in SpanEvent's field order: keywords cost a microsecond a span.
    return SpanEvent(
        span_id,
        trace_id,
        session_id,
        _kind(get("kind")),
        start_time,
        end_time,
        None
        if parent_span_id is None
        else _optional_id(parent_span_id, "parent_span_id"),
        None if user_id is None else _optional_id(user_id, "user_id"),
        None if agent_name is None else _name(agent_name, "agent_name"),
        None if model is None else _name(model, "model"),
        None if provider is None else _name(provider, "provider"),
        input_tokens,
        0 if output_tokens is None else _tokens(output_tokens, "output_tokens"),
        cache_read,
        cache_creation,
        None if cost_usd is None else _cost(cost_usd),
        None if tool_name is None else _name(tool_name, "tool_name"),
        None if tool_args_hash is None else _name(tool_args_hash, "tool_args_hash"),
        None if tool_status is None else _tool_status(tool_status),
        None if finish_reason is None else _name(finish_reason, "finish_reason"),
        None if depth is None else _depth(depth),
        None if output_text is None else _output_text(output_text),
        None if output_code is None else _output_code(output_code),
        None if embedding is None else _embedding(embedding),
        None if outcome is None else _name(outcome, "outcome"),
        _attributes(attributes) if attributes else {},
    )


def encode_native(span: SpanEvent, *, include_text: bool = False) -> bytes:
    """Encode a span as a compact native JSON record.

    Fields that are ``None`` and empty attributes are left out. The output
    text is left out unless asked for: it must never be stored or exported.

    Args:
        span: the span to encode.
        include_text: keep ``output_text`` (only for an in-process hand-off).

    Returns:
        The UTF-8 JSON record, which :func:`decode_native` reads back.
    """
    record = {
        name: value
        for name in _FIELD_NAMES
        if (value := getattr(span, name)) is not None
    }
    if not include_text:
        record.pop("output_text", None)
    if not span.attributes:
        del record["attributes"]

    return orjson.dumps(record)


def iter_native_lines(
    stream: IO[bytes] | IO[str] | Iterable[bytes] | Iterable[str],
    *,
    max_bytes: int = MAX_RECORD_BYTES,
) -> Iterator[SpanEvent | SpanValidationError]:
    """Decode a JSON-lines stream of native span records, one per line.

    Blank lines are skipped. A bad line yields its error, naming the line
    number, and decoding goes on with the next line. When the stream has a
    ``readline`` method, an oversized line is never read whole into memory.

    Args:
        stream: a file opened in binary or text mode, or any iterable of lines.
        max_bytes: largest accepted line.

    Yields:
        A span per good line, a :class:`SpanValidationError` per bad line.
    """
    for number, line in _bounded_lines(stream, max_bytes):
        if line is None:
            yield SpanValidationError(
                f"line {number}: span record is over the {max_bytes}-byte limit; "
                "trim output_text, embedding and attributes",
            )
            continue
        record = line.strip()
        if not record:
            continue
        try:
            yield decode_native(record, max_bytes=max_bytes)
        except SpanValidationError as err:
            yield SpanValidationError(f"line {number}: {err.reason}", err.field)


def _bounded_lines(
    stream: IO[bytes] | IO[str] | Iterable[bytes] | Iterable[str], limit: int
) -> Iterator[tuple[int, bytes | str | None]]:
    """Yield (line number, line), or (line number, None) for an oversized line."""
    readline = getattr(stream, "readline", None)
    if readline is None:
        lines: Iterable[bytes | str] = stream
        for number, line in enumerate(lines, start=1):
            yield number, (None if len(line) > limit + 2 else line)
        return

    number = 0
    while True:
        line = readline(limit + 2)
        if not line:
            return
        number += 1
        newline = b"\n" if isinstance(line, bytes) else "\n"
        if len(line) < limit + 2 or line.endswith(newline):
            yield number, line
            continue
        yield number, None
        while line and not line.endswith(newline):
            line = readline(limit + 2)


def _show(value: object) -> str:
    """Return a short repr of a bad value for an error message."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _required_id(value: object, field: str) -> str:
    if type(value) is str and 0 < len(value) <= MAX_ID_CHARS:
        return value
    if value is None or value == "":
        raise SpanValidationError(f"{field} is missing; every span needs one", field)
    raise SpanValidationError(
        f"{field} must be a string of 1 to {MAX_ID_CHARS} characters, "
        f"got {_show(value)}",
        field,
    )


def _optional_id(value: object, field: str) -> str | None:
    if value is None or value == "":
        return None
    return _required_id(value, field)


def _name(value: object, field: str) -> str | None:
    if value is None:
        return None
    if type(value) is str and len(value) <= MAX_NAME_CHARS:
        return value or None
    raise SpanValidationError(
        f"{field} must be a string of at most {MAX_NAME_CHARS} characters or null, "
        f"got {_show(value)}",
        field,
    )


def _kind(value: object) -> SpanKind:
    kind = _KINDS.get(value) if type(value) is str else None
    if kind is not None:
        return kind
    if value is None:
        raise SpanValidationError(
            "kind is missing; send one of 'llm', 'tool', 'agent'", "kind"
        )
    raise SpanValidationError(
        f"kind must be one of 'llm', 'tool', 'agent', got {_show(value)}", "kind"
    )


def _tool_status(value: object) -> ToolStatus:
    status = _TOOL_STATUSES.get(value) if type(value) is str else None
    if status is None:
        raise SpanValidationError(
            f"tool_status must be 'ok', 'error' or null, got {_show(value)}",
            "tool_status",
        )
    return status


def _tokens(value: object, field: str) -> int:
    if type(value) is int and 0 <= value <= MAX_TOKENS_PER_SPAN:
        return value
    if value is None:
        return 0
    if type(value) is not int:
        raise SpanValidationError(
            f"{field} must be an integer, got {_show(value)} "
            f"({type(value).__name__}); send a JSON integer",
            field,
        )
    raise SpanValidationError(
        f"{field} must be between 0 and {MAX_TOKENS_PER_SPAN} "
        f"(MAX_TOKENS_PER_SPAN), got {value}",
        field,
    )


def _time(value: object, field: str) -> float:
    if type(value) is float:
        if 0.0 <= value <= MAX_UNIX_SECONDS:
            return value
        if MIN_UNIX_NANOS < value <= _MAX_UNIX_NANOS:
            return value / 1e9
    elif type(value) is int:
        if 0 <= value <= MAX_UNIX_SECONDS:
            return float(value)
        if MIN_UNIX_NANOS < value <= _MAX_UNIX_NANOS:
            return value / 1e9
    elif type(value) is str:
        return _rfc3339(value, field)
    elif value is None:
        raise SpanValidationError(f"{field} is missing; every span needs one", field)
    else:
        raise SpanValidationError(
            f"{field} must be a number of Unix seconds or nanoseconds, or an RFC "
            f"3339 string, got {_show(value)} ({type(value).__name__})",
            field,
        )

    raise SpanValidationError(
        f"{field} must be Unix seconds in [0, {MAX_UNIX_SECONDS:.0f}] or Unix "
        f"nanoseconds above {MIN_UNIX_NANOS}, got {_show(value)}; milliseconds "
        "and microseconds are not accepted",
        field,
    )


def _rfc3339(text: str, field: str) -> float:
    if len(text) > _MAX_TIME_TEXT_CHARS or not _RFC3339.fullmatch(text):
        raise SpanValidationError(
            f"{field} must be an RFC 3339 time with an offset, such as "
            f"'2025-01-31T12:00:00.5Z', got {_show(text)}",
            field,
        )

    head, dot, tail = text.upper().partition(".")
    if dot:
        digits = len(tail) - len(tail.lstrip("0123456789"))
        tail = tail[: min(digits, 6)] + tail[digits:]
    try:
        seconds = datetime.fromisoformat(head + dot + tail).timestamp()
    except ValueError as exc:
        raise SpanValidationError(
            f"{field} {_show(text)} is not a valid date or time: {exc}", field
        ) from exc

    if not 0.0 <= seconds <= MAX_UNIX_SECONDS:
        raise SpanValidationError(
            f"{field} {_show(text)} is outside 1970-01-01 .. 2100-01-01", field
        )
    return seconds


def _cost(value: object) -> float | None:
    if value is None:
        return None
    if (type(value) is float or type(value) is int) and (
        0.0 <= value <= MAX_COST_USD_PER_SPAN
    ):
        return float(value)
    raise SpanValidationError(
        f"cost_usd must be a finite number between 0 and {MAX_COST_USD_PER_SPAN:.0f} "
        f"(MAX_COST_USD_PER_SPAN) or null, got {_show(value)}",
        "cost_usd",
    )


def _depth(value: object) -> int | None:
    if value is None:
        return None
    if type(value) is int and 0 <= value <= MAX_DEPTH:
        return value
    raise SpanValidationError(
        f"depth must be an integer between 0 and {MAX_DEPTH} or null, "
        f"got {_show(value)}",
        "depth",
    )


def _output_text(value: object) -> str | None:
    if type(value) is not str:
        raise SpanValidationError(
            f"output_text must be a string or null, got {type(value).__name__}",
            "output_text",
        )
    if len(value) > MAX_OUTPUT_TEXT_CHARS:
        return value[:MAX_OUTPUT_TEXT_CHARS]
    return value or None


def _output_code(value: object) -> str:
    if type(value) is not str:
        raise SpanValidationError(
            f"output_code must be a string or null, got {type(value).__name__}",
            "output_code",
        )
    try:
        TextCode.from_wire(value)
    except TextCodeError as exc:
        raise SpanValidationError(
            f"output_code is malformed: {exc}", "output_code"
        ) from None
    return value


def _embedding(value: object) -> list[float] | None:
    if type(value) is not list:
        raise SpanValidationError(
            f"embedding must be a list of numbers or null, got {type(value).__name__}",
            "embedding",
        )
    if not value:
        return None
    if len(value) > MAX_EMBEDDING_DIMS:
        raise SpanValidationError(
            f"embedding has {len(value)} numbers, over the {MAX_EMBEDDING_DIMS} "
            "limit (MAX_EMBEDDING_DIMS); reduce its dimension",
            "embedding",
        )

    types = set(map(type, value))
    if not types <= {float, int}:
        bad = next(item for item in value if type(item) not in (float, int))
        raise SpanValidationError(
            f"embedding must hold only numbers, found {_show(bad)} "
            f"({type(bad).__name__})",
            "embedding",
        )
    vector: list[float] = value
    if int in types:
        try:
            vector = [float(item) for item in value]
        except OverflowError:
            vector = [math.inf]
    # Summing finite doubles stays finite unless they are absurdly large, so
    # one C-level sum checks the whole vector for NaN and infinity.
    if not math.isfinite(sum(vector)):
        raise SpanValidationError(
            "embedding must hold only finite numbers (no NaN or infinity, "
            "magnitudes below 1e300)",
            "embedding",
        )
    return vector


def _attributes(value: object) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise SpanValidationError(
            f"attributes must be an object of scalars, got {type(value).__name__}",
            "attributes",
        )

    kept: dict[str, Any] = {}
    for key, item in value.items():
        if len(kept) >= MAX_ATTRIBUTES:
            break
        if type(key) is not str or len(key) > MAX_ATTRIBUTE_KEY_CHARS:
            continue
        if type(item) is str:
            kept[key] = item[:MAX_ATTRIBUTE_VALUE_CHARS]
        elif type(item) is float:
            if math.isfinite(item):
                kept[key] = item
        elif type(item) in _SCALARS:
            kept[key] = item
    return kept
