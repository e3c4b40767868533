"""Decode OTLP trace exports (protobuf and JSON) and span files into spans."""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)

from tripwire.errors import ConfigError, SpanValidationError, TripwireError
from tripwire.schemas.conventions import (
    DEFAULT_MAPPING,
    MappingConfig,
    OtelEvent,
    OtelSpan,
    Skipped,
    normalise_span,
)
from tripwire.schemas.events import SpanEvent
from tripwire.schemas.native import MAX_RECORD_BYTES, iter_native_lines

logger = logging.getLogger(__name__)

OtlpEncoding = Literal["otlp_proto", "otlp_json"]
FileEncoding = Literal["native", "otlp_json", "otlp_proto"]

MAX_OTLP_RECORD_BYTES = 64 << 20
"""Default size limit of one OTLP export record (64 MiB)."""

_STATUS_CODE_ERROR = 2
_SNIFF_BYTES = 4096
_OTLP_JSON_START = re.compile(rb'\s*\{\s*"(?:resourceSpans|resource_spans)"')
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_BINARY_BYTE = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f]")


@dataclass(slots=True)
class OtlpBatch:
    """The spans of one OTLP export record, with what was skipped or rejected.

    Attributes:
        spans: the LLM, tool and agent spans, normalised.
        skipped: how many spans were neither (HTTP calls, chains, ...).
        skip_reasons: ``skipped`` broken down by low-cardinality reason.
        errors: one error per span that broke the span contract.
    """

    spans: list[SpanEvent] = field(default_factory=list)
    skipped: int = 0
    skip_reasons: Counter[str] = field(default_factory=Counter)
    errors: list[SpanValidationError] = field(default_factory=list)

    def add(self, span: OtelSpan, mapping: MappingConfig) -> None:
        """Map one span into the batch, keeping its error instead of raising."""
        try:
            result = normalise_span(span, mapping)
        except SpanValidationError as err:
            self.errors.append(err)
            return
        if isinstance(result, Skipped):
            self.skipped += 1
            self.skip_reasons[result.reason] += 1
        else:
            self.spans.append(result)


def decode_otlp(
    data: bytes | bytearray | memoryview | str,
    encoding: OtlpEncoding,
    mapping: MappingConfig = DEFAULT_MAPPING,
    *,
    max_bytes: int | None = MAX_OTLP_RECORD_BYTES,
) -> OtlpBatch:
    """Decode one OTLP trace export, as the Collector's Kafka exporter writes it.

    One record holds many spans of many sessions. A span that breaks the
    span contract lands in ``errors`` and never costs the good spans of the
    same record.

    Args:
        data: the record's value.
        encoding: ``otlp_proto`` (binary protobuf) or ``otlp_json`` (OTLP/JSON;
            ids in hex or, as protobuf's own JSON printer writes them, base64).
        mapping: which attributes name the session and the user.
        max_bytes: largest accepted record, or None for no limit.

    Returns:
        The batch of spans, skip counts and per-span errors.

    Raises:
        SpanValidationError: the record as a whole is oversized or cannot be
            decoded.
        ConfigError: ``encoding`` is not one of the two OTLP encodings.
    """
    if max_bytes is not None and len(data) > max_bytes:
        raise SpanValidationError(
            f"OTLP record is {len(data)} bytes, over the {max_bytes}-byte limit; "
            "lower the Collector's batch size (send_batch_max_size)"
        )

    batch = OtlpBatch()
    if encoding == "otlp_proto":
        _decode_proto(_as_bytes(data), mapping, batch)
    elif encoding == "otlp_json":
        _decode_json(data, mapping, batch)
    else:
        raise ConfigError(
            f"OTLP encoding must be 'otlp_proto' or 'otlp_json', got {encoding!r}"
        )

    return batch


def sniff_encoding(data: bytes) -> FileEncoding:
    """Guess how span records are encoded from their first bytes.

    JSON text never holds raw control characters other than tab, line feed
    and carriage return, while protobuf tags and lengths are full of them.

    Args:
        data: the start of a file or a record (a few KiB are enough).

    Returns:
        ``otlp_proto`` when the bytes hold a control character, ``otlp_json``
        when a JSON object opens with ``resourceSpans``, ``native`` otherwise
        (text, or empty input).
    """
    head = data[:_SNIFF_BYTES].removeprefix(b"\xef\xbb\xbf")
    if _BINARY_BYTE.search(head):
        return "otlp_proto"
    if _OTLP_JSON_START.match(head):
        return "otlp_json"
    return "native"


def iter_file_spans(
    path: str | os.PathLike[str],
    mapping: MappingConfig = DEFAULT_MAPPING,
    *,
    max_record_bytes: int = MAX_RECORD_BYTES,
    skips: Counter[str] | None = None,
) -> Iterator[SpanEvent | SpanValidationError]:
    """Read the spans of a file, whatever its encoding.

    The encoding is sniffed from the content: native JSON lines, OTLP/JSON
    (one ExportTraceServiceRequest document, or one per line as the
    Collector's file exporter writes), or binary protobuf (one
    ExportTraceServiceRequest, or a sequence of varint length-prefixed ones).

    Args:
        path: the file to read.
        mapping: which attributes name the session and the user.
        max_record_bytes: largest accepted native line.
        skips: when given, counts skipped spans by reason.

    Yields:
        Spans in file order, and a :class:`SpanValidationError` for each bad
        span, line or undecodable file; reading goes on after an error.

    Raises:
        TripwireError: the file cannot be read.
    """
    try:
        with open(path, "rb") as stream:
            encoding = sniff_encoding(stream.read(_SNIFF_BYTES))
            stream.seek(0)
            if encoding == "native":
                yield from iter_native_lines(stream, max_bytes=max_record_bytes)
                return
            if encoding == "otlp_json":
                yield from _iter_json_file(stream.read(), mapping, skips)
                return
            yield from _iter_proto_file(stream.read(), mapping, skips)
    except OSError as exc:
        raise TripwireError(
            f"cannot read span file {os.fspath(path)!r}: {exc.strerror or exc}; "
            "check the path and its permissions"
        ) from exc


def _iter_json_file(
    data: bytes, mapping: MappingConfig, skips: Counter[str] | None
) -> Iterator[SpanEvent | SpanValidationError]:
    lines = data.splitlines()
    first = next((line for line in lines if line.strip()), b"")
    try:
        one_per_line = isinstance(orjson.loads(first), dict)
    except orjson.JSONDecodeError:
        one_per_line = False

    if not one_per_line:
        yield from _batch_items(data, "otlp_json", mapping, skips, where="")
        return
    for number, line in enumerate(lines, start=1):
        if line.strip():
            yield from _batch_items(
                line, "otlp_json", mapping, skips, where=f"line {number}: "
            )


def _iter_proto_file(
    data: bytes, mapping: MappingConfig, skips: Counter[str] | None
) -> Iterator[SpanEvent | SpanValidationError]:
    records = _proto_records(data)
    if records is None:
        yield SpanValidationError(
            "file is neither one OTLP protobuf ExportTraceServiceRequest nor a "
            "sequence of length-prefixed ones; export it again as otlp_proto"
        )
        return

    for number, record in enumerate(records, start=1):
        where = f"record {number}: " if len(records) > 1 else ""
        yield from _batch_items(record, "otlp_proto", mapping, skips, where=where)


def _proto_records(data: bytes) -> list[bytes] | None:
    """Split a protobuf file into requests: one whole, or length-prefixed ones.

    Protobuf skips unknown fields, so either reading can parse by accident;
    the one that finds more spans is the file's real framing.
    """
    try:
        single = _span_count(ExportTraceServiceRequest.FromString(data))
    except DecodeError:
        single = None
    delimited = _split_delimited(data)

    if delimited is None:
        return None if single is None else [data]
    if single is None or delimited[1] > single:
        return delimited[0]
    return [data]


def _span_count(request: Any) -> int:
    return sum(
        len(scope_spans.spans)
        for resource_spans in request.resource_spans
        for scope_spans in resource_spans.scope_spans
    )


def _batch_items(
    data: bytes,
    encoding: OtlpEncoding,
    mapping: MappingConfig,
    skips: Counter[str] | None,
    *,
    where: str,
) -> Iterator[SpanEvent | SpanValidationError]:
    try:
        batch = decode_otlp(data, encoding, mapping, max_bytes=None)
    except SpanValidationError as err:
        yield SpanValidationError(f"{where}{err.reason}", err.field)
        return

    if skips is not None:
        skips.update(batch.skip_reasons)
    yield from batch.spans
    for error in batch.errors:
        yield SpanValidationError(f"{where}{error.reason}", error.field)


def _split_delimited(data: bytes) -> tuple[list[bytes], int] | None:
    """Split varint length-prefixed requests and count their spans.

    Returns None unless the whole of ``data`` splits into parseable requests.
    """
    records: list[bytes] = []
    spans = 0
    position = 0
    while position < len(data):
        length, position = _read_varint(data, position)
        if length is None or position + length > len(data):
            return None
        record = data[position : position + length]
        try:
            spans += _span_count(ExportTraceServiceRequest.FromString(record))
        except DecodeError:
            return None
        records.append(record)
        position += length
    return (records, spans) if records else None


def _read_varint(data: bytes, position: int) -> tuple[int | None, int]:
    value = 0
    for shift in range(0, 64, 7):
        if position >= len(data):
            return None, position
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
    return None, position


def _as_bytes(data: bytes | bytearray | memoryview | str) -> bytes:
    if isinstance(data, str):
        raise SpanValidationError(
            "an otlp_proto record must be bytes, got text; read the record as "
            "binary or use the otlp_json encoding"
        )
    return bytes(data)


# --- protobuf -------------------------------------------------------------


def _decode_proto(data: bytes, mapping: MappingConfig, batch: OtlpBatch) -> None:
    try:
        request = ExportTraceServiceRequest.FromString(data)
    except DecodeError as exc:
        raise SpanValidationError(
            f"OTLP record is not a protobuf ExportTraceServiceRequest ({exc}); "
            "check the Collector's kafka exporter encoding (otlp_proto or otlp_json)"
        ) from exc

    for resource_spans in request.resource_spans:
        resource = _proto_attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            scope_name = scope_spans.scope.name or None
            for span in scope_spans.spans:
                try:
                    otel_span = _proto_span(span, resource, scope_name)
                except SpanValidationError as err:
                    label = bytes(span.span_id).hex() or "?"
                    batch.errors.append(_span_error(err, label, span.name))
                    continue
                batch.add(otel_span, mapping)


def _span_error(
    err: SpanValidationError, span_id: str, name: str
) -> SpanValidationError:
    return SpanValidationError(f"span {span_id} ({name!r}): {err.reason}", err.field)


def _proto_span(
    span: Any, resource: Mapping[str, object], scope_name: str | None
) -> OtelSpan:
    trace_id = _proto_id(span.trace_id, 16, "trace_id")
    span_id = _proto_id(span.span_id, 8, "span_id")
    parent = bytes(span.parent_span_id)
    return OtelSpan(
        trace_id=trace_id,
        span_id=span_id,
        name=span.name,
        start_time_ns=span.start_time_unix_nano,
        end_time_ns=span.end_time_unix_nano,
        attributes=_proto_attributes(span.attributes),
        parent_span_id=parent.hex() if parent.strip(b"\0") else None,
        events=[
            OtelEvent(event.name, _proto_attributes(event.attributes))
            for event in span.events
        ],
        resource=resource,
        scope_name=scope_name,
        status_error=span.status.code == _STATUS_CODE_ERROR,
    )


def _proto_id(raw: bytes, size: int, name: str) -> str:
    if len(raw) == size and raw.strip(b"\0"):
        return bytes(raw).hex()
    raise SpanValidationError(
        f"{name} must be {size} bytes, not all zero, "
        f"got {len(raw)} bytes ({bytes(raw).hex() or 'empty'})",
        name,
    )


def _proto_attributes(key_values: Any) -> dict[str, object]:
    return {kv.key: _proto_value(kv.value) for kv in key_values}


def _proto_value(value: Any) -> object:
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_proto_value(item) for item in value.array_value.values]
    if which == "kvlist_value":
        return _proto_attributes(value.kvlist_value.values)
    if which == "bytes_value":
        return bytes(value.bytes_value)
    scalar: object = getattr(value, which)
    return scalar


# --- OTLP/JSON ------------------------------------------------------------


def _decode_json(
    data: bytes | bytearray | memoryview | str, mapping: MappingConfig, batch: OtlpBatch
) -> None:
    try:
        request = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise SpanValidationError(
            f"OTLP record is not valid JSON: {exc}; check the Collector's kafka "
            "exporter encoding (otlp_proto or otlp_json)"
        ) from exc
    if type(request) is not dict:
        raise SpanValidationError(
            "OTLP/JSON record must be an ExportTraceServiceRequest object, got "
            f"{type(request).__name__}"
        )
    resource_spans_list = _json_list(request, "resourceSpans", "resource_spans")
    if resource_spans_list is None:
        raise SpanValidationError(
            "OTLP/JSON record has no resourceSpans list; is it a trace export?",
            "resourceSpans",
        )

    for resource_spans in resource_spans_list:
        try:
            resource, scopes = _json_resource_spans(resource_spans)
        except SpanValidationError as err:
            batch.errors.append(err)
            continue
        for scope_spans in scopes:
            try:
                scope_name, spans = _json_scope_spans(scope_spans)
            except SpanValidationError as err:
                batch.errors.append(err)
                continue
            for span in spans:
                try:
                    otel_span = _json_span(span, resource, scope_name)
                except SpanValidationError as err:
                    label = name = "?"
                    if isinstance(span, dict):
                        label = str(_json_get(span, "spanId", "span_id") or "?")[:40]
                        name = str(span.get("name", "?"))[:80]
                    batch.errors.append(_span_error(err, label, name))
                    continue
                batch.add(otel_span, mapping)


def _json_resource_spans(
    value: object,
) -> tuple[dict[str, object], list[object]]:
    obj = _json_object(value, "resourceSpans entry")
    resource = _json_get(obj, "resource")
    attributes: dict[str, object] = {}
    if resource is not None:
        resource_obj = _json_object(resource, "resource")
        attributes = _json_attributes(_json_get(resource_obj, "attributes"))
    return attributes, _json_list(obj, "scopeSpans", "scope_spans") or []


def _json_scope_spans(value: object) -> tuple[str | None, list[object]]:
    obj = _json_object(value, "scopeSpans entry")
    scope = _json_get(obj, "scope")
    name = None
    if scope is not None:
        scope_name = _json_object(scope, "scope").get("name")
        name = scope_name if isinstance(scope_name, str) and scope_name else None
    return name, _json_list(obj, "spans", "spans") or []


def _json_span(
    value: object, resource: Mapping[str, object], scope_name: str | None
) -> OtelSpan:
    span = _json_object(value, "span")
    name = span.get("name", "")
    if not isinstance(name, str):
        name = ""
    trace_id = _json_id(_json_get(span, "traceId", "trace_id"), 16, "traceId")
    span_id = _json_id(_json_get(span, "spanId", "span_id"), 8, "spanId")
    parent = _json_get(span, "parentSpanId", "parent_span_id")
    status = _json_get(span, "status")
    code = status.get("code") if isinstance(status, dict) else None
    events = _json_get(span, "events")
    return OtelSpan(
        trace_id=trace_id,
        span_id=span_id,
        name=name,
        start_time_ns=_json_uint(
            _json_get(span, "startTimeUnixNano", "start_time_unix_nano"),
            "startTimeUnixNano",
        ),
        end_time_ns=_json_uint(
            _json_get(span, "endTimeUnixNano", "end_time_unix_nano"),
            "endTimeUnixNano",
        ),
        attributes=_json_attributes(_json_get(span, "attributes")),
        parent_span_id=_json_parent_id(parent),
        events=[_json_event(event) for event in events]
        if isinstance(events, list)
        else [],
        resource=resource,
        scope_name=scope_name,
        status_error=code in (_STATUS_CODE_ERROR, "STATUS_CODE_ERROR"),
    )


def _json_event(value: object) -> OtelEvent:
    event = _json_object(value, "span event")
    name = event.get("name")
    return OtelEvent(
        name if isinstance(name, str) else "",
        _json_attributes(_json_get(event, "attributes")),
    )


def _json_id(value: object, size: int, name: str) -> str:
    """Read a hex id (OTLP/JSON) or a base64 one (protobuf's JSON mapping)."""
    raw = _json_id_bytes(value, size)
    if raw is not None and raw.strip(b"\0"):
        return raw.hex()
    raise SpanValidationError(
        f"{name} must be {size} bytes in hex ({2 * size} digits) or base64, "
        f"not all zero, got {_short(value)}",
        name,
    )


def _json_parent_id(value: object) -> str | None:
    if value is None or value == "":
        return None
    raw = _json_id_bytes(value, 8)
    if raw is None:
        raise SpanValidationError(
            f"parentSpanId must be 8 bytes in hex (16 digits) or base64, "
            f"got {_short(value)}",
            "parentSpanId",
        )
    return raw.hex() if raw.strip(b"\0") else None


def _json_id_bytes(value: object, size: int) -> bytes | None:
    if not isinstance(value, str):
        return None
    if len(value) == 2 * size and set(value) <= _HEX_DIGITS:
        return bytes.fromhex(value)
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == size else None


def _json_uint(value: object, name: str) -> int:
    """Read an OTLP/JSON 64-bit unsigned integer: a decimal string or a number."""
    if type(value) is int and value >= 0:
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    if value is None:
        return 0
    raise SpanValidationError(
        f"{name} must be a decimal string or integer of nanoseconds, "
        f"got {_short(value)}",
        name,
    )


def _json_attributes(value: object) -> dict[str, object]:
    if value is None:
        return {}
    if not isinstance(value, list):
        raise SpanValidationError(
            f"attributes must be a list of key-value objects, got {_short(value)}",
            "attributes",
        )
    attributes: dict[str, object] = {}
    for item in value:
        entry = _json_object(item, "attribute")
        key = entry.get("key")
        if not isinstance(key, str):
            raise SpanValidationError(
                f"attribute key must be a string, got {_short(key)}", "attributes"
            )
        attributes[key] = _json_value(entry.get("value"), key)
    return attributes


def _json_value(value: object, key: str) -> object:
    """Decode an OTLP/JSON AnyValue such as ``{"intValue": "12"}``."""
    if value is None:
        return None
    obj = _json_object(value, f"value of attribute {key!r}")
    for name, item in obj.items():
        reader = _ANY_VALUE_READERS.get(name)
        if reader is not None:
            return reader(item, key)
    return None


def _read_string(value: object, key: str) -> object:
    if isinstance(value, str):
        return value
    raise _bad_value(key, "stringValue", value)


def _read_bool(value: object, key: str) -> object:
    if isinstance(value, bool):
        return value
    raise _bad_value(key, "boolValue", value)


def _read_int(value: object, key: str) -> object:
    if type(value) is int:
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    raise _bad_value(key, "intValue", value)


def _read_double(value: object, key: str) -> object:
    if type(value) is float or type(value) is int:
        return float(value)
    if value in ("NaN", "Infinity", "-Infinity"):
        return float(str(value).lower().replace("infinity", "inf"))
    raise _bad_value(key, "doubleValue", value)


def _read_bytes(value: object, key: str) -> object:
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            pass
    raise _bad_value(key, "bytesValue", value)


def _read_array(value: object, key: str) -> object:
    obj = _json_object(value, f"arrayValue of attribute {key!r}")
    items = obj.get("values")
    if items is None:
        return []
    if not isinstance(items, list):
        raise _bad_value(key, "arrayValue.values", items)
    return [_json_value(item, key) for item in items]


def _read_kvlist(value: object, key: str) -> object:
    obj = _json_object(value, f"kvlistValue of attribute {key!r}")
    return _json_attributes(obj.get("values"))


_ANY_VALUE_READERS: dict[str, Callable[[object, str], object]] = {}
for _names, _reader in (
    (("stringValue", "string_value"), _read_string),
    (("boolValue", "bool_value"), _read_bool),
    (("intValue", "int_value"), _read_int),
    (("doubleValue", "double_value"), _read_double),
    (("bytesValue", "bytes_value"), _read_bytes),
    (("arrayValue", "array_value"), _read_array),
    (("kvlistValue", "kvlist_value"), _read_kvlist),
):
    for _name in _names:
        _ANY_VALUE_READERS[_name] = _reader


def _bad_value(key: str, kind: str, value: object) -> SpanValidationError:
    return SpanValidationError(
        f"attribute {key!r} has a malformed {kind}: {_short(value)}", key
    )


def _json_object(value: object, what: str) -> dict[str, object]:
    if isinstance(value, dict):
        return value
    raise SpanValidationError(f"{what} must be a JSON object, got {_short(value)}")


def _json_get(obj: Mapping[str, object], camel: str, snake: str = "") -> object:
    value = obj.get(camel)
    if value is None and snake:
        value = obj.get(snake)
    return value


def _json_list(
    obj: Mapping[str, object], camel: str, snake: str
) -> list[object] | None:
    value = _json_get(obj, camel, snake)
    if value is None:
        return None
    if not isinstance(value, list):
        raise SpanValidationError(
            f"{camel} must be a JSON list, got {_short(value)}", camel
        )
    return value


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."
