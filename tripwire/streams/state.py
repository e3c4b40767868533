"""Compact per-session and per-user-day detector state, with a binary codec."""

from __future__ import annotations

import hashlib
import logging
import struct
import sys
from array import array

from tripwire.errors import TripwireError
from tripwire.schemas.textcode import OUTPUT_VECTOR_BYTES, SKETCH_SIZE

logger = logging.getLogger(__name__)

STATE_VERSION = 1

# Dedupe keeps 48-bit hashes of span ids: within one session's ring of a few
# hundred ids a false duplicate has odds below 1e-9, at 6 bytes an id.
ID_BYTES = 6
ID_MASK = (1 << (8 * ID_BYTES)) - 1
SESSION_SEEN_CAPACITY = 224
USER_SEEN_CAPACITY = 512

# One remembered LLM output: kind, sketch length, content-word sketch, vector.
OUTPUT_SLOT_BYTES = 2 + 2 * SKETCH_SIZE + OUTPUT_VECTOR_BYTES
OUTPUT_KIND_TEXT = 1
OUTPUT_KIND_BITS = 2

# One span link for computing recursion depth: id, parent id, height, agent flag.
LINK_BYTES = 2 * ID_BYTES + 2
LINK_CAPACITY = 8
NO_PARENT = b"\x00" * ID_BYTES

_NANO = 1_000_000_000
_SESSION_SEEN_BYTES = SESSION_SEEN_CAPACITY * ID_BYTES
_NONE_STR = 0xFFFF

_SESSION_HEADER = struct.Struct("<BIIIQqIddIIHHQB")
_USER_HEADER = struct.Struct("<BQqIIH")


class StateDecodeError(TripwireError):
    """Stored state bytes cannot be decoded: wrong version or truncated."""


def span_key(span_id: str) -> bytes:
    """Return the 6-byte dedupe key of a span id.

    Hex ids (OpenTelemetry's 16 hex digits) keep their low 48 bits, which
    are already random; any other id is hashed with BLAKE2b.
    """
    if 0 < len(span_id) <= 16:
        try:
            return (int(span_id, 16) & ID_MASK).to_bytes(ID_BYTES, "little")
        except ValueError:
            pass
    return hashlib.blake2b(span_id.encode("utf-8"), digest_size=ID_BYTES).digest()


def to_nano(cost_usd: float) -> int:
    """Return a cost in whole nano-dollars, the unit states add up exactly."""
    return round(cost_usd * _NANO)


def from_nano(nano: int) -> float:
    """Return a nano-dollar amount in USD."""
    return nano / _NANO


class _IdRing:
    """Helpers over a bytearray ring of fixed-size ids.

    A ring grows by exact-size copies (no allocator slack) until it holds
    ``capacity`` ids, then overwrites its oldest id in place.
    """

    @staticmethod
    def contains(ring: bytearray, key: bytes) -> bool:
        index = ring.find(key)
        # A match across two ids is rare: the first find nearly always decides.
        while index != -1:
            if index % ID_BYTES == 0:
                return True
            index = ring.find(key, index + 1)
        return False

    @staticmethod
    def add(
        ring: bytearray, key: bytes, position: int, capacity: int
    ) -> tuple[bytearray, int]:
        if len(ring) < capacity * ID_BYTES:
            return ring + key, position
        start = position * ID_BYTES
        ring[start : start + ID_BYTES] = key
        return ring, (position + 1) % capacity


class SessionState:
    """What the detector remembers about one session, in a few kilobytes.

    Counters and totals are exact (cost in nano-dollars, so sums do not
    depend on span order). The windows are bounded: the last span ids (for
    dedupe), cost per event-time bucket (burn rate), the last tool calls
    (loop and error signals), the last LLM outputs as quantised vectors and
    content-word hashes (loop similarity), and agent-span links (depth).
    """

    __slots__ = (
        "agent_name",
        "agent_spans",
        "alerted",
        "burn",
        "cost_nano",
        "depth",
        "first_at",
        "killed",
        "last_at",
        "links",
        "llm_calls",
        "outputs",
        "seen",
        "seen_position",
        "tokens",
        "tool_calls",
        "tool_errors",
        "tool_window",
        "tools",
        "unpriced",
        "user_id",
    )

    def __init__(self) -> None:
        self.user_id: str | None = None
        self.agent_name: str | None = None
        self.llm_calls = 0
        self.tool_calls = 0
        self.agent_spans = 0
        self.tokens = 0
        self.cost_nano = 0
        self.unpriced = 0
        self.first_at = 0.0
        self.last_at = 0.0
        self.killed = 0
        self.alerted = 0
        self.depth = 0
        self.seen = bytearray()
        self.seen_position = 0
        # Flat pairs: event-time bucket index, cost in nano-dollars.
        self.burn = array("q")
        # Tool-call identities, oldest first; 0 marks a call without args hash.
        self.tools = array("Q")
        # Bit i set: the i-th most recent tool call failed.
        self.tool_errors = 0
        self.tool_window = 0
        self.outputs = bytearray()
        self.links = bytearray()

    @property
    def cost_usd(self) -> float:
        """The session's total cost so far, in USD."""
        return from_nano(self.cost_nano)

    @property
    def spans(self) -> int:
        """Distinct spans counted so far."""
        return self.llm_calls + self.tool_calls + self.agent_spans

    def has_seen(self, key: bytes) -> bool:
        """Return whether a span with this dedupe key was already counted."""
        seen = self.seen
        return key in seen and _IdRing.contains(seen, key)

    def remember(self, key: bytes) -> None:
        """Record a span's dedupe key, evicting the oldest when the ring is full."""
        seen = self.seen
        if len(seen) < _SESSION_SEEN_BYTES:
            self.seen = seen + key
            return
        self.seen, self.seen_position = _IdRing.add(
            seen, key, self.seen_position, SESSION_SEEN_CAPACITY
        )

    def encode(self) -> bytes:
        """Return the state as compact, versioned bytes."""
        header = _SESSION_HEADER.pack(
            STATE_VERSION,
            self.llm_calls,
            self.tool_calls,
            self.agent_spans,
            self.tokens,
            self.cost_nano,
            self.unpriced,
            self.first_at,
            self.last_at,
            self.killed,
            self.alerted,
            self.depth,
            self.seen_position,
            self.tool_errors,
            self.tool_window,
        )
        parts = [
            header,
            _pack_str(self.user_id),
            _pack_str(self.agent_name),
            _pack_blob(self.seen),
            _pack_blob(_little(self.burn)),
            _pack_blob(_little(self.tools)),
            _pack_blob(self.outputs),
            _pack_blob(self.links),
        ]
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes) -> SessionState:
        """Rebuild a state from :meth:`encode` output.

        Raises:
            StateDecodeError: the bytes are of another version or truncated.
        """
        _check_version(data, "session")
        state = cls()
        try:
            (
                _,
                state.llm_calls,
                state.tool_calls,
                state.agent_spans,
                state.tokens,
                state.cost_nano,
                state.unpriced,
                state.first_at,
                state.last_at,
                state.killed,
                state.alerted,
                state.depth,
                state.seen_position,
                state.tool_errors,
                state.tool_window,
            ) = _SESSION_HEADER.unpack_from(data, 0)
            offset = _SESSION_HEADER.size
            state.user_id, offset = _unpack_str(data, offset)
            agent_name, offset = _unpack_str(data, offset)
            seen, offset = _unpack_blob(data, offset)
            burn, offset = _unpack_blob(data, offset)
            tools, offset = _unpack_blob(data, offset)
            outputs, offset = _unpack_blob(data, offset)
            links, offset = _unpack_blob(data, offset)
        except (struct.error, UnicodeDecodeError) as exc:
            raise StateDecodeError(
                f"session state of {len(data)} bytes is truncated or corrupt: {exc}; "
                "drop the entry so the session restarts from empty"
            ) from exc
        # Agent names repeat across sessions: share one string per name.
        state.agent_name = sys.intern(agent_name) if agent_name else agent_name
        state.seen = bytearray(seen)
        state.burn = _from_little("q", burn)
        state.tools = _from_little("Q", tools)
        state.outputs = bytearray(outputs)
        state.links = bytearray(links)
        return state

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SessionState):
            return NotImplemented
        return all(getattr(self, s) == getattr(other, s) for s in self.__slots__)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"SessionState(llm_calls={self.llm_calls}, tool_calls={self.tool_calls}, "
            f"tokens={self.tokens}, cost_usd={self.cost_usd:.6f}, depth={self.depth})"
        )


class UserDayState:
    """One user's usage on one UTC day, with the caps already enforced."""

    __slots__ = ("alerted", "cost_nano", "day", "killed", "seen", "seen_position",
                 "tokens")  # fmt: skip

    def __init__(self, day: str = "") -> None:
        self.day = day
        self.tokens = 0
        self.cost_nano = 0
        self.killed = 0
        self.alerted = 0
        self.seen = bytearray()
        self.seen_position = 0

    @property
    def cost_usd(self) -> float:
        """The user's cost on this day so far, in USD."""
        return from_nano(self.cost_nano)

    def has_seen(self, key: bytes) -> bool:
        """Return whether usage with this span key was already counted."""
        return _IdRing.contains(self.seen, key)

    def remember(self, key: bytes) -> None:
        """Record a usage record's span key, evicting the oldest when full."""
        self.seen, self.seen_position = _IdRing.add(
            self.seen, key, self.seen_position, USER_SEEN_CAPACITY
        )

    def encode(self) -> bytes:
        """Return the state as compact, versioned bytes."""
        header = _USER_HEADER.pack(
            STATE_VERSION,
            self.tokens,
            self.cost_nano,
            self.killed,
            self.alerted,
            self.seen_position,
        )
        return b"".join([header, _pack_str(self.day), _pack_blob(self.seen)])

    @classmethod
    def decode(cls, data: bytes) -> UserDayState:
        """Rebuild a state from :meth:`encode` output.

        Raises:
            StateDecodeError: the bytes are of another version or truncated.
        """
        _check_version(data, "user-day")
        state = cls()
        try:
            (
                _,
                state.tokens,
                state.cost_nano,
                state.killed,
                state.alerted,
                state.seen_position,
            ) = _USER_HEADER.unpack_from(data, 0)
            day, offset = _unpack_str(data, _USER_HEADER.size)
            seen, offset = _unpack_blob(data, offset)
        except (struct.error, UnicodeDecodeError) as exc:
            raise StateDecodeError(
                f"user-day state of {len(data)} bytes is truncated or corrupt: {exc}; "
                "drop the entry so the day restarts from empty"
            ) from exc
        state.day = day or ""
        state.seen = bytearray(seen)
        return state

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, UserDayState):
            return NotImplemented
        return all(getattr(self, s) == getattr(other, s) for s in self.__slots__)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"UserDayState(day={self.day!r}, tokens={self.tokens}, "
            f"cost_usd={self.cost_usd:.6f})"
        )


def _check_version(data: bytes, what: str) -> None:
    if not data:
        raise StateDecodeError(
            f"{what} state is empty; drop the entry so it restarts from empty"
        )
    if data[0] != STATE_VERSION:
        raise StateDecodeError(
            f"{what} state has format version {data[0]}, this build reads version "
            f"{STATE_VERSION}; run a matching build or drop the table"
        )


def _little(values: array[int]) -> bytes:
    if sys.byteorder == "little":
        return values.tobytes()
    swapped = array(values.typecode, values)
    swapped.byteswap()
    return swapped.tobytes()


def _from_little(typecode: str, data: bytes) -> array[int]:
    values = array(typecode)
    if len(data) % values.itemsize:
        raise StateDecodeError(
            f"state window of {len(data)} bytes is not a whole number of "
            f"{values.itemsize}-byte entries; drop the entry"
        )
    values.frombytes(data)
    if sys.byteorder != "little":
        values.byteswap()
    return values


def _pack_str(value: str | None) -> bytes:
    if value is None:
        return struct.pack("<H", _NONE_STR)
    raw = value.encode("utf-8")[: _NONE_STR - 1]
    return struct.pack("<H", len(raw)) + raw


def _unpack_str(data: bytes, offset: int) -> tuple[str | None, int]:
    (length,) = struct.unpack_from("<H", data, offset)
    offset += 2
    if length == _NONE_STR:
        return None, offset
    end = offset + length
    if end > len(data):
        raise struct.error(f"string of {length} bytes runs past the end")
    return data[offset:end].decode("utf-8"), end


def _pack_blob(blob: bytes | bytearray) -> bytes:
    return struct.pack("<I", len(blob)) + bytes(blob)


def _unpack_blob(data: bytes, offset: int) -> tuple[bytes, int]:
    (length,) = struct.unpack_from("<I", data, offset)
    offset += 4
    end = offset + length
    if end > len(data):
        raise struct.error(f"blob of {length} bytes runs past the end")
    return data[offset:end], end
