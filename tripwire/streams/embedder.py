"""Model-free text embedder and compact vector codes for the loop detector."""

from __future__ import annotations

import hashlib
import logging
import math
import struct
from array import array
from collections.abc import Sequence
from functools import cache
from typing import Any

import numpy as np
import numpy.typing as npt

from tripwire.schemas.textcode import (
    SKETCH_SIZE,
    TextCode,
)

logger = logging.getLogger(__name__)

TEXT_DIM = 256
BIT_CODE_BITS = 2048
MAX_TEXT_CHARS = 4000

# Feature weights, in units of one character n-gram: a content word weighs
# 12 (a word of six letters also yields about 12 n-grams of sizes 3 to 5),
# a bigram of content words 7, and a function word, agent filler ("again",
# "let me") or bare number (an attempt counter) 2.
_WORD_UNITS = 12
_BIGRAM_UNITS = 7
_WEAK_UNITS = 2

# Bytes that make up words: ASCII letters and digits, the apostrophe, and
# every byte of a multi-byte UTF-8 character; anything else separates words.
_WORD_BYTES = set(b"abcdefghijklmnopqrstuvwxyz0123456789'") | set(range(128, 256))
_SEPARATE = bytes(b if b in _WORD_BYTES else 32 for b in range(256))
_MASK64 = (1 << 64) - 1
_MIX_INT = 0x9E3779B97F4A7C15
_BIGRAM_MIX = 0xC2B2AE3D27D4EB4F * _MIX_INT & _MASK64
_WORD_CACHE_SIZE = 16_384
# Quantisation tables are cached for peaks up to this weight (4 KB at most).
_TABLE_PEAK = 2048
_TABLE_CACHE_SIZE = 256
_MAXIMUM = np.maximum.reduce
_KEY_PAIR = struct.Struct("<QQ")
# What the embedder caches of a word (a raw token): its feature slots
# (2 * bucket + sign), packed as native uint16 and each repeated as often as
# it weighs, so a text's slots are one bytes.join away; and for a content
# word its keys, its digest times BIGRAM * MIX and times MIX (mod 2**64) as
# 16 little-endian bytes, empty for a function word or a number. The top 16
# bits of the second key are the word's sketch hash.
_Word = tuple[bytes, bytes]
_LITTLE_U64 = np.dtype("<u8")
_LITTLE_U16 = np.dtype("<u2")

_STOPWORD_TEXT = """
    a about above after again against all also am an and another any are as at
    be been before being below between both but by can could did do does doing
    done during each few for from further had has have having he her here
    hers him his how i i'd i'll i'm i've if in into is it it's its itself just
    let let's me more most my myself no nor not now of off on once one only or
    other our ours out over own same she should so some still such than that
    that's the their them then there these they this those through to too under
    until us very was we we'll were what when where which while who whom why
    will with would you you'll your yours ok okay sure please alright right well
    going gonna try trying tried retry retrying attempt attempting again time
    times new next last first let's lets see think looks seems going again yes
    hi hello thanks thank
"""
STOPWORDS: frozenset[str] = frozenset(_STOPWORD_TEXT.split())


class TextEmbedder:
    """Hashed lexical embedding of short texts; no model, no vocabulary.

    Words are lower-cased and lightly stemmed ("searching", "searched" and
    "searches" are one word). Features are word unigrams (function words,
    agent filler such as "again" or "let me", and bare numbers weigh 1/6 of
    a content word), bigrams of consecutive content words (7/12), and
    character 3-5 grams of the content words (1/12 each); each is hashed
    with a sign into one of
    ``dim`` buckets, and each bucket's net weight ``x`` becomes
    ``sign(x) * log1p(|x|)`` (sublinear term frequency). Vectors are
    L2-normalised. Everything is deterministic across processes (no use of
    Python's salted ``hash``).

    Args:
        dim: buckets, a power of two.
        max_chars: only the first ``max_chars`` characters of a text count.
    """

    def __init__(self, dim: int = TEXT_DIM, max_chars: int = MAX_TEXT_CHARS) -> None:
        if dim < 8 or dim & (dim - 1):
            raise ValueError(f"embedding dim must be a power of two >= 8, got {dim}")
        self.dim = dim
        self.max_chars = max_chars
        self._slot_shift = 64 - dim.bit_length()
        self._shift = np.uint64(self._slot_shift)
        self._words: dict[bytes, _Word] = {}
        # Quantised level of each net weight, per peak weight.
        self._tables: dict[int, npt.NDArray[np.int8]] = {}

    def embed(self, text: str) -> npt.NDArray[np.float64] | None:
        """Return the L2-normalised embedding of ``text``; None if it has no words."""
        found = self._counts(text)
        if found is None:
            return None
        net = found[0] / _WORD_UNITS
        vector: npt.NDArray[np.float64] = np.copysign(np.log1p(np.abs(net)), net)
        norm = float(np.sqrt(vector @ vector))
        return vector / norm if norm > 0 else vector

    def wire_code(self, text: str) -> str | None:
        """Return the wire form of ``text``'s code, for a span's ``output_code``.

        The code is the one the detector computes from the text itself
        (``encode(text, SKETCH_SIZE)``), so a span carrying it gets the same
        decisions as one carrying the text.

        Returns:
            ``t1:`` and base64 (see :meth:`TextCode.to_wire`), or None when
            the text has no words.
        """
        code = self.encode(text, SKETCH_SIZE)
        return code.to_wire() if code is not None else None

    def encode(self, text: str, sketch_size: int) -> TextCode | None:
        """Return the quantised embedding and content-word sketch of ``text``.

        Args:
            text: the output text; only its first ``max_chars`` characters
                count.
            sketch_size: how many content-word hashes to keep.

        Returns:
            The code, or None when the text has no words (or, against all
            odds, every feature cancels out).
        """
        found = self._counts(text)
        if found is None:
            return None
        net, keys = found
        peak = int(_MAXIMUM(np.abs(net)))
        if peak == 0:
            return None

        if peak <= _TABLE_PEAK:
            table = self._tables.get(peak)
            if table is None:
                table = self._table(peak)
            quantised = table[net].tobytes()
        else:
            quantised = _quantise_levels(net, peak).tobytes()
        # A content word's sketch hash is the top 16 bits of its second key.
        ordered = np.sort(keys.view(_LITTLE_U16)[7::8]).tolist()
        return TextCode(quantised, _smallest_distinct(ordered, sketch_size))

    def _counts(
        self, text: str
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint64]] | None:
        """Return the net weight units per bucket, and the content words' keys.

        The keys are two per content word, in text order (see ``_Word``).
        """
        tokens = text[: self.max_chars].lower().encode("utf-8", "surrogatepass")
        raw = tokens.translate(_SEPARATE).split()
        if not raw:
            return None

        words = self._words
        if len(words) >= _WORD_CACHE_SIZE:
            words.clear()
        try:
            slot_parts, key_parts = zip(*map(words.__getitem__, raw), strict=True)
        except KeyError:
            slot_parts, key_parts = zip(*map(self._word, raw), strict=True)
        slots = b"".join(slot_parts)
        # Content words only: function words and numbers have empty keys.
        keys = np.frombuffer(b"".join(key_parts), _LITTLE_U64)
        if keys.size > 2:
            # A bigram's key, (a * BIGRAM + b) * MIX, is the sum of the first
            # word's ``a * BIGRAM * MIX`` and the second word's ``b * MIX``;
            # its slots join the words' slots, repeated as often as it weighs.
            pairs = (keys[0:-2:2] + keys[3::2]) >> self._shift
            slots += pairs.astype(np.uint16).tobytes() * _BIGRAM_UNITS
        counts = np.bincount(np.frombuffer(slots, np.uint16), minlength=2 * self.dim)

        # Slot 2b counts bucket b with a plus sign, slot 2b + 1 with a minus.
        net: npt.NDArray[np.int64] = counts[0::2] - counts[1::2]
        return net, keys

    def _word(self, token: bytes) -> _Word:
        """Return what the cache holds of a word, learning it if need be."""
        return self._words.get(token) or self._learn(token)

    def _learn(self, token: bytes) -> _Word:
        """Compute a word's feature slots and keys, and cache them."""
        text = token.decode("utf-8", "replace").strip("'")
        content = not (text in STOPWORDS or text.isdigit())
        if content:
            text = stem(text)
        stemmed = text.encode("utf-8") or b"'"
        hashed = int.from_bytes(
            hashlib.blake2b(stemmed, digest_size=8).digest(), "little"
        )

        # Weights are whole units, so one bincount over repeated slots
        # counts a text: a word's own slot repeats as often as it weighs.
        units = _WORD_UNITS if content else _WEAK_UNITS
        slots = [self._slot(hashed)] * units
        keys = b""
        if content:
            slots.extend(self._slot(key) for key in _gram_keys(b" " + stemmed + b" "))
            keys = _KEY_PAIR.pack(
                hashed * _BIGRAM_MIX & _MASK64, hashed * _MIX_INT & _MASK64
            )
        word = (array("H", slots).tobytes(), keys)
        self._words[token] = word
        return word

    def _table(self, peak: int) -> npt.NDArray[np.int8]:
        """Return (and cache) the quantised levels of the weights -peak to peak.

        Level ``w`` is at index ``w``, a negative one counting from the end
        as Python and numpy indices do: 0 to peak, then -peak to -1.
        """
        if len(self._tables) >= _TABLE_CACHE_SIZE:
            self._tables.clear()
        weights = np.arange(-peak, peak + 1, dtype=np.int64)
        table = np.roll(_quantise_levels(weights, peak), -peak)
        self._tables[peak] = table
        return table

    def _slot(self, key: int) -> int:
        """Return ``2 * bucket + sign`` of a 64-bit feature key."""
        return (key * _MIX_INT & _MASK64) >> self._slot_shift


def _smallest_distinct(ordered: list[int], count: int) -> tuple[int, ...]:
    """Return the first ``count`` distinct values of an ascending list."""
    kept: list[int] = []
    last = -1
    for value in ordered:
        if value != last:
            if len(kept) == count:
                break
            kept.append(value)
            last = value
    return tuple(kept)


def _quantise_levels(net: npt.NDArray[np.int64], peak: int) -> npt.NDArray[np.int8]:
    """Return ``sign(x) * log1p(|x| / units)`` of each weight ``x``, as int8.

    The levels are scaled so that a weight of ``peak`` maps to 127 (cosines
    do not depend on the scale).
    """
    scale = 127 / math.log1p(peak / _WORD_UNITS)
    scaled = np.copysign(np.log1p(np.abs(net) / _WORD_UNITS) * scale, net)
    levels: npt.NDArray[np.int8] = np.rint(scaled).astype(np.int8)
    return levels


def stem(word: str) -> str:
    """Return a crude English stem: plural, past and gerund endings removed.

    Enough for "searching", "searched" and "searches" (and "verified",
    "verifying") to meet; not a linguistic stemmer.
    """
    word = word.removesuffix("'s")
    if len(word) > 4 and word.endswith(("ies", "ied")):
        return word[:-3] + "y"
    if len(word) > 5 and word.endswith("ing"):
        word = word[:-3]
    elif len(word) > 4 and word.endswith(("ed", "ches", "shes", "sses", "xes", "zes")):
        word = word[:-2]
    elif len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        word = word[:-1]
    if len(word) > 3 and word[-1] == word[-2] and word[-1] not in "lsz":
        word = word[:-1]
    if len(word) > 4 and word.endswith("e"):
        word = word[:-1]
    return word


def _gram_keys(padded: bytes) -> list[int]:
    """Return a distinct 64-bit key for each 3-, 4- and 5-gram of ``padded``."""
    keys = []
    for size in (3, 4, 5):
        for start in range(len(padded) - size + 1):
            gram = int.from_bytes(padded[start : start + size], "little")
            keys.append(gram << 3 | size)
    return keys


def quantise(vector: npt.NDArray[np.floating[Any]]) -> bytes:
    """Return a vector as int8 bytes, scaled so its largest entry is +-127."""
    peak = float(np.max(np.abs(vector))) if vector.size else 0.0
    if peak == 0:
        return bytes(vector.size)
    return bytes(np.rint(vector * (127 / peak)).astype(np.int8).tobytes())


def int8_cosines(
    stored: bytes | bytearray, newest: bytes, row_bytes: int | None = None
) -> list[float]:
    """Return the cosine of ``newest`` with each int8 vector packed in ``stored``.

    An all-zero vector (which :class:`TextEmbedder` never produces) has
    cosine 0 with everything.

    Args:
        stored: the vectors, one per row of ``row_bytes``; a vector is the
            last ``len(newest)`` bytes of its row.
        newest: the vector to compare with each of them.
        row_bytes: bytes per row, at least ``len(newest)``; by default
            ``len(newest)``, the vectors packed back to back.
    """
    size = len(newest)
    row = row_bytes or size
    # The newest vector goes in as one more row, so that one product of the
    # matrix with its transpose gives every dot product and squared norm.
    packed = b"".join((stored, bytes(row - size), newest))
    rows = np.frombuffer(packed, np.int8).reshape(-1, row)
    matrix = rows[:, row - size :].astype(np.float64)
    gram: list[list[float]] = (matrix @ matrix.T).tolist()
    dots = gram[-1]
    newest_square = dots[-1]
    # The 1.0 keeps a zero vector's cosine at 0; int8 norms are >= 127.
    return [
        dot / math.sqrt(gram[index][index] * newest_square + 1.0)
        for index, dot in enumerate(dots[:-1])
    ]


def bit_code(embedding: Sequence[float]) -> bytes | None:
    """Return a 2048-bit sign code of an embedding carried on a span.

    The vector is zero-padded to a power of two (at least 2048), turned by a
    fixed pseudo-random rotation (two rounds of random signs and a
    Walsh-Hadamard transform) and the signs of its first 2048 coordinates are
    kept: 2048 random-hyperplane bits, from which :func:`bit_cosines`
    estimates the cosine with a standard error near 0.01 at 0.92.

    Args:
        embedding: the vector, of any dimension.

    Returns:
        256 bytes, or None when the vector is empty, zero or not finite.
    """
    vector = np.asarray(embedding, dtype=np.float64)
    if vector.ndim != 1 or vector.size == 0 or not np.all(np.isfinite(vector)):
        return None
    if not np.any(vector):
        return None

    size = max(BIT_CODE_BITS, 1 << math.ceil(math.log2(vector.size)))
    padded = np.zeros(size)
    padded[: vector.size] = vector
    first, second = _rotation_signs(size)
    rotated = _hadamard(_hadamard(padded * first) * second)
    return bytes(np.packbits(rotated[:BIT_CODE_BITS] > 0).tobytes())


def bit_cosines(
    stored: bytes | bytearray, newest: bytes, row_bytes: int | None = None
) -> list[float]:
    """Return the estimated cosine of ``newest`` with each bit code in ``stored``.

    Args:
        stored: the codes, one per row of ``row_bytes``; a code is the last
            ``len(newest)`` bytes of its row.
        newest: the code to compare with each of them.
        row_bytes: bytes per row; by default ``len(newest)``.
    """
    new = np.frombuffer(newest, np.uint8)
    row = row_bytes or new.size
    rows = np.frombuffer(bytes(stored), np.uint8).reshape(-1, row)[:, row - new.size :]
    differing = np.bitwise_count(rows ^ new).sum(axis=1)
    cosines: list[float] = np.cos(np.pi * differing / (8 * new.size)).tolist()
    return cosines


def _hadamard(vector: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    size = vector.size
    half = 1
    out = vector
    while half < size:
        blocks = out.reshape(-1, 2, half)
        left = blocks[:, 0, :]
        right = blocks[:, 1, :]
        out = np.concatenate((left + right, left - right), axis=1).reshape(size)
        half *= 2
    return out


@cache
def _rotation_signs(
    size: int,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    index = np.arange(2 * size, dtype=np.uint64)
    bits = _splitmix(index + np.uint64(0x5DEECE66D)) >> np.uint64(63)
    signs = bits.astype(np.float64) * 2 - 1
    return signs[:size], signs[size:]


def _splitmix(values: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    z = values + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))
