"""Counter-based random numbers for dropout masks: Philox-4x32-10, in vectorized numpy.

Philox-4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3",
SC 2011; the constants of their Random123 library) maps a 128-bit counter and a 64-bit key to
128 random bits by ten rounds of two 32x32->64-bit multiplications. Nothing is stored between
draws: a mask is a pure function of its coordinates, so the numpy reference executor and the
compiled kernel (graphc/backend/kernels/random.py, which mirrors this module operation for
operation) compute it bit for bit alike, and a backward pass can regenerate a mask instead of
keeping it.

The mapping from a mask element to its random bits, exactly:

- Element i is the row-major (C order) flat index of the element in the mask's shape.
- block = i // 4 and word = i % 4: one Philox call gives the 4 words of 4 consecutive elements.
- counter = (block mod 2**32, block // 2**32, call, stream) and key = (seed, 0), each a uint32
  (seed and call are the two words of the op's int32 key operand, read as uint32 bits; stream
  is the op's `stream` attribute, which tells apart masks drawn in the same call).
- x = word `word` (0-based) of philox4x32_10(counter, key), as Random123 numbers them.
- u = (x >> 8) * 2**-24, a uniform in [0, 1) with 24 random bits, exact in float32.
- The element is kept iff u >= p (p compared as the float64 it is); equivalently, in integers,
  iff (x >> 8) >= ceil(p * 2**24), which is how both implementations decide it.
- A kept element's mask value is float32(1.0 / (1.0 - p)): the quotient computed in float64,
  then rounded once to float32 (`mask_scale`); a dropped one's is 0.0.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["PHILOX_M0", "PHILOX_M1", "PHILOX_W0", "PHILOX_W1", "ROUNDS", "philox4x32", "element_words",
           "keep_threshold", "mask_scale", "keep_mask", "dropout_mask_values"]

# Random123's multipliers (PHILOX_M4x32_0, PHILOX_M4x32_1) and Weyl key increments
# (PHILOX_W32_0, PHILOX_W32_1: the golden ratio and sqrt(3) - 1, as 32-bit fractions).
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
ROUNDS = 10

_WORD = 0xFFFFFFFF
# u has this many random bits: (x >> 8) * 2**-24 is exact in float32 (a 24-bit significand).
UNIFORM_BITS = 24


def philox4x32(counter, key, rounds: int = ROUNDS) -> np.ndarray:
    """Philox-4x32-`rounds` of each counter: `counter` (..., 4) and `key` (..., 2) broadcast
    together, as uint32 words; returns (..., 4) uint32.

    One round, as Random123's philox4x32round: (hi0, lo0) = M0 * c0, (hi1, lo1) = M1 * c2 (full
    64-bit products), then c = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0); the key gains the Weyl
    increments before every round but the first.
    """
    counter = _as_words(counter, 4, "counter")
    key = _as_words(key, 2, "key")
    c0, c1, c2, c3 = (counter[..., i] for i in range(4))
    k0, k1 = key[..., 0], key[..., 1]
    for round_index in range(rounds):
        if round_index:
            with np.errstate(over="ignore"):   # uint32 arithmetic wraps modulo 2**32, as meant
                k0 = k0 + np.uint32(PHILOX_W0)
                k1 = k1 + np.uint32(PHILOX_W1)
        product0 = c0.astype(np.uint64) * np.uint64(PHILOX_M0)
        product1 = c2.astype(np.uint64) * np.uint64(PHILOX_M1)
        hi0, lo0 = _high(product0), _low(product0)
        hi1, lo1 = _high(product1), _low(product1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return np.stack(np.broadcast_arrays(c0, c1, c2, c3), axis=-1)


def element_words(size: int, seed: int, call: int, stream: int) -> np.ndarray:
    """The random word x of each of `size` elements (flat index order), uint32 (see the mapping
    in the module docstring)."""
    seed, call, stream = (_as_uint32(v, what) for v, what in ((seed, "seed"), (call, "call"), (stream, "stream")))
    blocks = np.arange(-(-size // 4), dtype=np.uint64)
    counter = np.empty((blocks.size, 4), np.uint32)
    counter[:, 0] = _low(blocks)
    counter[:, 1] = _high(blocks)
    counter[:, 2] = call
    counter[:, 3] = stream
    return philox4x32(counter, np.array([seed, 0], np.uint32)).reshape(-1)[:size]


def keep_threshold(p: float) -> int:
    """The least t with t * 2**-24 >= p: an element is kept iff (x >> 8) >= t.

    p * 2**24 is exact in float64 (a scaling by a power of two), so is its ceiling."""
    _check_probability(p)
    return math.ceil(float(p) * 2.0 ** UNIFORM_BITS)


def mask_scale(p: float) -> np.float32:
    """The value of a kept element: 1/(1-p) computed in float64, rounded once to float32."""
    _check_probability(p)
    return np.float32(1.0 / (1.0 - float(p)))


def keep_mask(shape, p: float, seed: int, call: int, stream: int = 0) -> np.ndarray:
    """bool array of `shape`: True where the element is kept (u >= p)."""
    shape = tuple(int(d) for d in shape)
    words = element_words(math.prod(shape), seed, call, stream)
    return ((words >> np.uint32(32 - UNIFORM_BITS)) >= keep_threshold(p)).reshape(shape)


def dropout_mask_values(shape, p: float, seed: int, call: int, stream: int = 0) -> np.ndarray:
    """float32 array of `shape`: mask_scale(p) where the element is kept, 0.0 where dropped."""
    keep = keep_mask(shape, p, seed, call, stream)
    return np.where(keep, mask_scale(p), np.float32(0.0)).astype(np.float32)


def _check_probability(p) -> None:
    if not (isinstance(p, (float, int, np.floating, np.integer)) and not isinstance(p, bool) and 0.0 <= p < 1.0):
        raise ValueError(f"dropout: p must be a number in [0, 1), got {p!r}")


def _as_uint32(value, what: str) -> np.uint32:
    """An int of int32 or uint32 range as its uint32 bits (-1 -> 0xFFFFFFFF, as the int32 key reads)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not -2**31 <= int(value) <= _WORD:
        raise ValueError(f"philox: {what} must be an int32 or uint32 value, got {value!r}")
    return np.uint32(int(value) & _WORD)


def _as_words(values, count: int, what: str) -> np.ndarray:
    array = np.asarray(values)
    if array.shape[-1:] != (count,) or array.dtype.kind not in "iu":
        raise ValueError(f"philox: {what} must be integers of shape (..., {count}), got {array.dtype}{array.shape}")
    return (array.astype(np.int64) & _WORD).astype(np.uint32) if array.dtype != np.uint32 else array


def _low(product: np.ndarray) -> np.ndarray:
    return (product & np.uint64(_WORD)).astype(np.uint32)


def _high(product: np.ndarray) -> np.ndarray:
    return (product >> np.uint64(32)).astype(np.uint32)
