"""Model-free text embedder and compact vector codes for the loop detector."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)

TEXT_DIM = 256
BIT_CODE_BITS = 2048
MAX_TEXT_CHARS = 4000

# Weights of the three feature groups: word unigrams, bigrams of content
# words, and character 3-5 grams. A cosine of the combined vector is close to
# the weighted mean of the per-group cosines, since signed hashing keeps the
# groups nearly orthogonal.
_GROUP_WEIGHTS = (1.0, 0.6, 0.8)
# Per-word weight: content words count fully; function words, agent filler
# ("again", "let me") and bare numbers (attempt counters) barely count.
_CONTENT_WEIGHT = 1.0
_STOP_WEIGHT = 0.15
_NUMBER_WEIGHT = 0.15

_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")
_MASK64 = (1 << 64) - 1
_BASE = 0x100000001B3
_MIX = np.uint64(0x9E3779B97F4A7C15)
_BIGRAM = np.uint64(0xC2B2AE3D27D4EB4F)
_NGRAM_SALT = (np.uint64(0x165667B19E3779F9), np.uint64(0x27D4EB2F165667C5),
               np.uint64(0x94D049BB133111EB))  # fmt: skip
_SIGN_SHIFT = np.uint64(31)
_SKETCH_SHIFT = np.uint64(48)

_STOPWORD_TEXT = """
    a about above after again against all also am an and another any are as at
    be been before being below between both but by can could did do does doing
    done down during each few for from further had has have having he her here
    hers him his how i i'd i'll i'm i've if in into is it it's its itself just
    let let's me more most my myself no nor not now of off on once one only or
    other our ours out over own same she should so some still such than that
    that's the their them then there these they this those through to too under
    until up us very was we we'll were what when where which while who whom why
    will with would you you'll your yours ok okay sure please alright right well
    going gonna try trying tried retry retrying attempt attempting again time
    times new next last first let's lets see think looks seems going again yes
    hi hello thanks thank
"""
STOPWORDS: frozenset[str] = frozenset(_STOPWORD_TEXT.split())


@dataclass(frozen=True, slots=True)
class TextCode:
    """What the loop detector keeps of one output text.

    Attributes:
        vector: the int8-quantised, L2-normalised embedding, ``TEXT_DIM`` bytes.
        sketch: 16-bit hashes of the text's content words, ascending, at most
            ``limit`` of them (the smallest, so two sketches stay comparable).
    """

    vector: bytes
    sketch: tuple[int, ...]


class TextEmbedder:
    """Hashed lexical embedding of short texts; no model, no vocabulary.

    Features are word unigrams (function words and numbers down-weighted),
    bigrams of content words and character 3-5 grams of the normalised text,
    each hashed with a sign into ``dim`` buckets, sublinear in their count
    (``sign(x) * log1p(|x|)``), L2-normalised per group, mixed with fixed
    weights and normalised again. Everything is deterministic across
    processes (no use of Python's salted ``hash``).
    """

    def __init__(self, dim: int = TEXT_DIM, max_chars: int = MAX_TEXT_CHARS) -> None:
        if dim < 8 or dim & (dim - 1):
            raise ValueError(f"embedding dim must be a power of two >= 8, got {dim}")
        self.dim = dim
        self.max_chars = max_chars
        self._shift = np.uint64(64 - dim.bit_length() + 1)
        # Room for the padding spaces and multi-byte characters.
        powers, inverses = _powers(4 * max_chars + 8)
        self._powers = powers
        self._inverses = inverses

    def embed(self, text: str) -> npt.NDArray[np.float32] | None:
        """Return the L2-normalised embedding of ``text``; None if it has no words."""
        features = self._features(text)
        if features is None:
            return None
        return self._vector(*features)

    def encode(self, text: str, sketch_size: int) -> TextCode | None:
        """Return the quantised embedding and content-word sketch of ``text``.

        Args:
            text: the output text; only its first ``max_chars`` characters
                count.
            sketch_size: how many content-word hashes to keep.

        Returns:
            The code, or None when the text has no words.
        """
        features = self._features(text)
        if features is None:
            return None
        vector = self._vector(*features)
        word_hashes, weights, _, _ = features
        content = word_hashes[weights == _CONTENT_WEIGHT]
        sketch = np.unique((content * _MIX) >> _SKETCH_SHIFT)[:sketch_size]
        return TextCode(quantise(vector), tuple(int(v) for v in sketch))

    def _features(
        self, text: str
    ) -> (
        tuple[
            npt.NDArray[np.uint64],
            npt.NDArray[np.float64],
            npt.NDArray[np.uint64],
            npt.NDArray[np.float64],
        ]
        | None
    ):
        words = _WORD.findall(text[: self.max_chars].lower())
        if not words:
            return None

        weights = np.array(
            [
                _STOP_WEIGHT
                if word in STOPWORDS
                else _NUMBER_WEIGHT
                if word.isdigit()
                else _CONTENT_WEIGHT
                for word in words
            ]
        )
        data = np.frombuffer((" " + " ".join(words) + " ").encode("utf-8"), np.uint8)
        size = data.size
        prefix = np.zeros(size + 1, np.uint64)
        np.cumsum(data * self._powers[:size], out=prefix[1:])
        spaces = np.flatnonzero(data == 32)
        starts = spaces[:-1] + 1
        word_hashes = (prefix[spaces[1:]] - prefix[starts]) * self._inverses[starts]

        # Each byte takes the weight of the word it belongs to (a space, of
        # the word after it); an n-gram takes the weight of its middle byte.
        byte_word = np.cumsum(data == 32) - 1
        byte_weight = weights[np.minimum(byte_word, len(words) - 1)]
        grams: list[npt.NDArray[np.uint64]] = []
        gram_weights: list[npt.NDArray[np.float64]] = []
        for n, salt in zip((3, 4, 5), _NGRAM_SALT, strict=True):
            count = size - n + 1
            if count <= 0:
                continue
            head = np.arange(count)
            hashes = (prefix[head + n] - prefix[head]) * self._inverses[:count]
            grams.append(hashes ^ salt)
            gram_weights.append(byte_weight[head + n // 2])
        gram_hashes = np.concatenate(grams) if grams else np.zeros(0, np.uint64)
        gram_weight = np.concatenate(gram_weights) if grams else np.zeros(0)
        return word_hashes, weights, gram_hashes, gram_weight

    def _vector(
        self,
        word_hashes: npt.NDArray[np.uint64],
        weights: npt.NDArray[np.float64],
        gram_hashes: npt.NDArray[np.uint64],
        gram_weight: npt.NDArray[np.float64],
    ) -> npt.NDArray[np.float32]:
        content = word_hashes[weights == _CONTENT_WEIGHT]
        bigrams = content[:-1] * _BIGRAM + content[1:]
        groups = (
            self._hashed(word_hashes, weights),
            self._hashed(bigrams, np.ones(bigrams.size)),
            self._hashed(gram_hashes, gram_weight),
        )
        total = np.zeros(self.dim)
        for group, weight in zip(groups, _GROUP_WEIGHTS, strict=True):
            norm = float(np.sqrt(group @ group))
            if norm > 0:
                total += group * (weight / norm)
        norm = float(np.sqrt(total @ total))
        if norm > 0:
            total /= norm
        return total.astype(np.float32)

    def _hashed(
        self, hashes: npt.NDArray[np.uint64], weights: npt.NDArray[np.float64]
    ) -> npt.NDArray[np.float64]:
        if hashes.size == 0:
            return np.zeros(self.dim)
        mixed = hashes * _MIX
        buckets = (mixed >> self._shift).astype(np.intp)
        signs = ((mixed >> _SIGN_SHIFT) & np.uint64(1)).astype(np.float64) * 2 - 1
        counts = np.bincount(buckets, weights=signs * weights, minlength=self.dim)
        return np.sign(counts) * np.log1p(np.abs(counts))


def quantise(vector: npt.NDArray[np.floating[Any]]) -> bytes:
    """Return a vector as int8 bytes, scaled so its largest entry is +-127."""
    peak = float(np.max(np.abs(vector))) if vector.size else 0.0
    if peak == 0:
        return bytes(vector.size)
    return bytes(np.rint(vector * (127 / peak)).astype(np.int8).tobytes())


def int8_cosines(stored: bytes | bytearray, newest: bytes) -> npt.NDArray[np.float64]:
    """Return the cosine of ``newest`` with each int8 vector packed in ``stored``."""
    new = np.frombuffer(newest, np.int8).astype(np.int32)
    rows = np.frombuffer(stored, np.int8).reshape(-1, new.size).astype(np.int32)
    dots = rows @ new
    norms = np.sqrt((rows * rows).sum(axis=1) * float(new @ new))
    with np.errstate(divide="ignore", invalid="ignore"):
        cosines = np.where(norms > 0, dots / norms, 0.0)
    return np.asarray(cosines, np.float64)


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


def bit_cosines(stored: bytes | bytearray, newest: bytes) -> npt.NDArray[np.float64]:
    """Return the estimated cosine of ``newest`` with each bit code in ``stored``."""
    new = np.frombuffer(newest, np.uint8)
    rows = np.frombuffer(stored, np.uint8).reshape(-1, new.size)
    differing = np.bitwise_count(rows ^ new).sum(axis=1)
    return np.asarray(np.cos(np.pi * differing / (8 * new.size)), np.float64)


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


@cache
def _powers(size: int) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    inverse = pow(_BASE, -1, 1 << 64)
    powers = np.empty(size, np.uint64)
    inverses = np.empty(size, np.uint64)
    power = 1
    back = 1
    for index in range(size):
        powers[index] = power
        inverses[index] = back
        power = power * _BASE & _MASK64
        back = back * inverse & _MASK64
    return powers, inverses
