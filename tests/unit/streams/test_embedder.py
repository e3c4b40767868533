"""Text embedder and the compact codes of span-carried embeddings."""

from __future__ import annotations

import hashlib
import itertools
import math

import numpy as np
import pytest

from tripwire.schemas.textcode import MAX_WIRE_CHARS, TextCode, TextCodeError
from tripwire.streams import embedder
from tripwire.streams.embedder import (
    BIT_CODE_BITS,
    TEXT_DIM,
    TextEmbedder,
    bit_code,
    bit_cosines,
    int8_cosines,
    stem,
)


def test_embedding_is_unit_length_and_deterministic() -> None:
    text = "Let me search the quarterly report for the Q3 revenue figure."

    first = TextEmbedder().embed(text)
    second = TextEmbedder().embed(text)

    assert first is not None
    assert second is not None
    assert first.shape == (TEXT_DIM,)
    assert float(np.linalg.norm(first)) == pytest.approx(1.0)
    assert np.array_equal(first, second)


@pytest.mark.parametrize("text", ["", "   ", "!!! --- ???", "\n\t"])
def test_texts_without_words_have_no_embedding(text: str) -> None:
    embedder = TextEmbedder()

    assert embedder.embed(text) is None
    assert embedder.encode(text, 16) is None


def test_code_is_quantised_and_keeps_the_cosine() -> None:
    embedder = TextEmbedder()
    first = "I'll search the report again for the Q3 figure."
    second = "Let me search the report once more to find the Q3 figure."
    one = embedder.embed(first)
    two = embedder.embed(second)
    assert one is not None
    assert two is not None

    code_one = embedder.encode(first, 16)
    code_two = embedder.encode(second, 16)
    assert code_one is not None
    assert code_two is not None

    assert len(code_one.vector) == TEXT_DIM
    exact = float(one @ two)
    quantised = int8_cosines(code_one.vector, code_two.vector)[0]
    assert quantised == pytest.approx(exact, abs=0.01)


def test_sketch_holds_sorted_content_words_only() -> None:
    code = TextEmbedder().encode("The the and deploy deploying staging 42 again", 16)

    assert code is not None
    # "deploy" and "deploying" share a stem; "the", "and", "again", "42" are weak.
    assert len(code.sketch) == 2
    assert list(code.sketch) == sorted(code.sketch)
    assert TextEmbedder().encode("one two three four five six", 3) is not None


def test_sketch_is_capped_at_the_smallest_hashes() -> None:
    words = " ".join(f"word{chr(97 + i)}x" for i in range(26))
    full = TextEmbedder().encode(words, 64)
    capped = TextEmbedder().encode(words, 5)

    assert full is not None
    assert capped is not None
    assert capped.sketch == full.sketch[:5]


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("searching", "search"),
        ("searched", "search"),
        ("searches", "search"),
        ("verified", "verify"),
        ("verifying", "verify"),
        ("files", "file"),
        ("stopped", "stop"),
        ("missing", "miss"),
        ("customer's", "customer"),
        ("status", "status"),
        ("updated", "updat"),
        ("update", "updat"),
    ],
)
def test_stem(word: str, expected: str) -> None:
    assert stem(word) == expected


def test_function_words_barely_move_the_embedding() -> None:
    embedder = TextEmbedder()
    base = embedder.embed("search the report for the revenue figure")
    filler = embedder.embed("let me search the report again for the revenue figure")
    content = embedder.embed("search the contract for the renewal date")
    assert base is not None
    assert filler is not None
    assert content is not None

    assert float(base @ filler) > 0.9
    assert float(base @ content) < 0.6


def _pair_with_cosine(
    rng: np.random.Generator, dim: int, cosine: float
) -> tuple[np.ndarray, np.ndarray]:
    first = rng.normal(size=dim)
    first /= np.linalg.norm(first)
    noise = rng.normal(size=dim)
    noise -= (noise @ first) * first
    noise /= np.linalg.norm(noise)
    second = cosine * first + np.sqrt(1 - cosine**2) * noise
    return first, second


@pytest.mark.parametrize("dim", [256, 384, 1536, 3072])
@pytest.mark.parametrize("cosine", [0.98, 0.92, 0.80, 0.0])
def test_bit_codes_estimate_the_cosine(dim: int, cosine: float) -> None:
    rng = np.random.default_rng(dim)
    errors = []
    for _ in range(20):
        first, second = _pair_with_cosine(rng, dim, cosine)
        code_one = bit_code(first.tolist())
        code_two = bit_code(second.tolist())
        assert code_one is not None
        assert code_two is not None
        assert len(code_one) == BIT_CODE_BITS // 8
        errors.append(bit_cosines(code_one, code_two)[0] - cosine)

    # With 2048 random hyperplanes the angle's share p = angle / pi is read
    # with standard error sqrt(p (1 - p) / 2048): 0.009 in cosine at 0.92.
    angle = np.arccos(cosine)
    share = angle / np.pi
    spread = np.sin(angle) * np.pi * np.sqrt(share * (1 - share) / BIT_CODE_BITS)
    assert abs(float(np.mean(errors))) < 2 * spread + 0.002
    assert float(np.max(np.abs(errors))) < 4 * spread + 0.002


def test_bit_codes_are_deterministic_and_scale_free() -> None:
    vector = np.random.default_rng(3).normal(size=768)

    assert bit_code(vector.tolist()) == bit_code((vector * 7.5).tolist())
    code = bit_code(vector.tolist())
    assert code is not None
    assert bit_cosines(code, code) == [pytest.approx(1.0)]


@pytest.mark.parametrize(
    "vector", [[], [0.0, 0.0, 0.0], [1.0, float("nan")], [float("inf"), 1.0]]
)
def test_bit_code_refuses_degenerate_vectors(vector: list[float]) -> None:
    assert bit_code(vector) is None


def test_cosines_against_several_stored_vectors() -> None:
    embedder = TextEmbedder()
    texts = ["deploy the build", "deploy the build now", "bake a cake"]
    codes = [embedder.encode(text, 16) for text in texts]
    assert all(code is not None for code in codes)
    stored = b"".join(code.vector for code in codes if code is not None)
    newest = codes[0]
    assert newest is not None

    scores = int8_cosines(stored, newest.vector)

    assert len(scores) == 3
    assert scores[0] == pytest.approx(1.0, abs=1e-6)
    assert scores[1] > scores[2]
    assert int8_cosines(bytes(TEXT_DIM), newest.vector) == [0.0]


def test_wire_code_reads_back_as_the_code_of_the_text() -> None:
    embedder = TextEmbedder()
    text = "Let me search the quarterly report again for the Q3 revenue figure."

    wire = embedder.wire_code(text)

    assert wire is not None
    assert wire.startswith("t1:")
    assert wire.isascii()
    assert len(wire) <= MAX_WIRE_CHARS
    assert TextCode.from_wire(wire) == embedder.encode(text, 16)
    assert embedder.wire_code(" ... ") is None


def test_full_sketch_code_fills_the_wire_limit() -> None:
    words = " ".join(f"topic{index} subject{index}" for index in range(40))
    code = TextEmbedder().encode(words, 16)
    assert code is not None
    assert len(code.sketch) == 16

    assert len(code.to_wire()) == MAX_WIRE_CHARS


@pytest.mark.parametrize(
    "code",
    [TextCode(bytes(range(100)), ()), TextCode(b"\x7f" * TEXT_DIM, tuple(range(17)))],
)
def test_codes_that_do_not_fit_the_wire_form_are_refused(code: TextCode) -> None:
    with pytest.raises(TextCodeError, match="256-byte vector"):
        code.to_wire()


def test_text_with_a_lone_surrogate_is_encoded() -> None:
    # Python strings from an SDK may hold one; the exporter must not fail.
    code = TextEmbedder().encode("searching the report \ud800 again", 16)

    assert code is not None
    assert code.sketch


def test_long_repeated_text_is_quantised_past_the_cached_tables() -> None:
    # Net weights past the cached quantisation tables take the direct path.
    code = TextEmbedder().encode("search " * 600, 16)

    assert code is not None
    assert np.abs(np.frombuffer(code.vector, np.int8)).max() == 127
    assert TextCode.from_wire(code.to_wire()) == code


def _direct_code(text: str, sketch_size: int) -> TextCode | None:
    """The code as the embedder's docstring describes it, feature by feature."""
    mask = (1 << 64) - 1
    mix = 0x9E3779B97F4A7C15
    raw = text[:4000].lower().encode("utf-8", "surrogatepass")
    tokens = bytes(b if b in embedder._WORD_BYTES else 32 for b in raw).split()
    net = np.zeros(TEXT_DIM, dtype=np.int64)

    def add(key: int, units: int) -> None:
        slot = (key * mix & mask) >> (64 - (TEXT_DIM.bit_length()))
        net[slot // 2] += -units if slot % 2 else units

    digests = []
    for token in tokens:
        word = token.decode("utf-8", "replace").strip("'")
        content = not (word in embedder.STOPWORDS or word.isdigit())
        stemmed = (stem(word) if content else word).encode() or b"'"
        digest = int.from_bytes(
            hashlib.blake2b(stemmed, digest_size=8).digest(), "little"
        )
        add(digest, 12 if content else 2)
        if content:
            for gram in embedder._gram_keys(b" " + stemmed + b" "):
                add(gram, 1)
            digests.append(digest)
    for first, second in itertools.pairwise(digests):
        add((first * 0xC2B2AE3D27D4EB4F + second) & mask, 7)
    if not tokens or not net.any():
        return None

    peak = int(np.abs(net).max())
    scaled = np.sign(net) * np.log1p(np.abs(net) / 12) * (127 / math.log1p(peak / 12))
    sketch = sorted({(digest * mix & mask) >> 48 for digest in digests})
    return TextCode(
        np.rint(scaled).astype(np.int8).tobytes(), tuple(sketch[:sketch_size])
    )


@pytest.mark.parametrize(
    "text",
    [
        "Let me search the quarterly report again for the Q3 revenue figure.",
        "I'll retry: searching, searched, searches... the API returned 502 again!",
        "Déjà vu: the naïve café's menu lists crème brûlée twice; 東京 too.",
        "ok ok ok the the a 12 34",
        "report " * 700,
    ],
)
def test_code_matches_the_direct_computation(text: str) -> None:
    for size in (16, 3):
        assert TextEmbedder().encode(text, size) == _direct_code(text, size)
