"""The loop detector's text code and its wire form, a span's ``output_code``."""

from __future__ import annotations

import binascii
import struct
from dataclasses import dataclass
from functools import lru_cache

from tripwire.errors import TripwireError

# What a text code holds: an int8 vector of this many dimensions and at most
# this many 16-bit content-word hashes.
OUTPUT_VECTOR_BYTES = 256
SKETCH_SIZE = 16
# Codes kept decoded: more than a worker batch holds, so the detector finds
# every code the span decoder has just read.
_RECENT_CODES = 1024

# The wire form of a text code: this prefix, then standard base64 (padded) of
# the vector's bytes followed by each sketch hash as 2 little-endian bytes.
WIRE_PREFIX = "t1:"
MAX_WIRE_CHARS = len(WIRE_PREFIX) + 4 * -(-(OUTPUT_VECTOR_BYTES + 2 * SKETCH_SIZE) // 3)
_ZERO_VECTOR = bytes(OUTPUT_VECTOR_BYTES)
_SKETCH_FORMATS = [struct.Struct(f"<{size}H") for size in range(SKETCH_SIZE + 1)]


class TextCodeError(TripwireError):
    """A text code in wire form is malformed."""


@dataclass(frozen=True, slots=True)
class TextCode:
    """What the loop detector keeps of one output text.

    Attributes:
        vector: the int8-quantised embedding, one byte per dimension, scaled
            so its largest entry is +-127 (cosines do not depend on scale).
        sketch: 16-bit hashes of the text's stemmed content words, ascending,
            the smallest ``sketch_size`` of them, so that two sketches can be
            compared below the smaller of their largest hashes.
    """

    vector: bytes
    sketch: tuple[int, ...]

    def to_wire(self) -> str:
        """Return the code as compact ASCII, for a span's ``output_code``.

        The form is ``t1:`` and the base64 of the vector's bytes followed by
        each sketch hash as two little-endian bytes: 387 characters for a
        full sketch. :meth:`from_wire` reads it back.

        Raises:
            TextCodeError: the vector is not ``OUTPUT_VECTOR_BYTES`` long or
                the sketch holds more than ``SKETCH_SIZE`` hashes.
        """
        if len(self.vector) != OUTPUT_VECTOR_BYTES or len(self.sketch) > SKETCH_SIZE:
            raise TextCodeError(
                f"a wire text code holds a {OUTPUT_VECTOR_BYTES}-byte vector and at "
                f"most {SKETCH_SIZE} sketch hashes, got {len(self.vector)} bytes and "
                f"{len(self.sketch)} hashes; encode with sketch_size={SKETCH_SIZE}"
            )

        raw = self.vector + _SKETCH_FORMATS[len(self.sketch)].pack(*self.sketch)
        return WIRE_PREFIX + binascii.b2a_base64(raw, newline=False).decode("ascii")

    @classmethod
    def from_wire(cls, code: str) -> TextCode:
        """Read a code written by :meth:`to_wire`, checking its form.

        The span decoder and the detector both read a span's code; the last
        few codes read are kept, so the second read costs a dictionary look-up.

        Args:
            code: the wire form, ``t1:`` and base64.

        Returns:
            The code, equal to the one that was written.

        Raises:
            TextCodeError: the prefix is unknown, the base64 is broken, the
                length is not a vector and a whole sketch, the vector is all
                zeros, or the sketch is not strictly ascending.
        """
        return _read_wire(code)


@lru_cache(maxsize=_RECENT_CODES)
def _read_wire(code: str) -> TextCode:
    if not code.startswith(WIRE_PREFIX) or len(code) > MAX_WIRE_CHARS:
        raise TextCodeError(
            f"text code must start with {WIRE_PREFIX!r} and be at most "
            f"{MAX_WIRE_CHARS} characters, got {len(code)} characters starting "
            f"{code[:8]!r}; compute it with TextCode.to_wire"
        )
    try:
        raw = binascii.a2b_base64(code[len(WIRE_PREFIX) :], strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        raise TextCodeError(
            f"text code is not valid base64 after {WIRE_PREFIX!r}: {exc}"
        ) from None
    extra = len(raw) - OUTPUT_VECTOR_BYTES
    if extra < 0 or extra % 2:
        raise TextCodeError(
            f"text code holds {len(raw)} bytes; it must hold the "
            f"{OUTPUT_VECTOR_BYTES}-byte vector and 2 bytes per sketch hash"
        )

    vector = raw[:OUTPUT_VECTOR_BYTES]
    sketch: tuple[int, ...] = _SKETCH_FORMATS[extra // 2].unpack_from(
        raw, OUTPUT_VECTOR_BYTES
    )
    if vector == _ZERO_VECTOR:
        raise TextCodeError("text code has an all-zero vector, which no text has")
    if sorted(set(sketch)) != list(sketch):
        raise TextCodeError(
            f"text code sketch must be strictly ascending, got {list(sketch)}"
        )
    return TextCode(vector, sketch)
