"""Raw memory for native code: aligned numpy buffers and fast data pointers.

Native code receives plain addresses, so the runtime needs two things from numpy that
numpy makes slow or does not offer: the address of an array's data on every call (the
documented ``ndarray.ctypes.data`` is slow because it builds a helper object, which
alone would exceed the per-call budget of a tiny training step), and buffers aligned to a
cache line (numpy only promises the element alignment).
"""

from __future__ import annotations

import ctypes
import math

import numpy as np

CACHE_LINE_BYTES = 64

# numpy's C ABI fixes the layout of an array object: the Python object header, then
# `char *data` (PyArrayObject_fields). Compiled extensions read the field at this offset
# through numpy's own macros, so it is stable across numpy versions; reading it builds
# nothing. `_data_field_is_readable` proves the layout on this interpreter at import
# and the slow documented path is used where it does not hold.
_DATA_FIELD_OFFSET = object.__basicsize__
_pointer_at = ctypes.c_void_p.from_address


def _read_data_field(array: np.ndarray) -> int:
    return _pointer_at(id(array) + _DATA_FIELD_OFFSET).value or 0


def _data_field_is_readable() -> bool:
    base = np.arange(24, dtype=np.float32)
    probes = (base, base[5:], base.reshape(2, 3, 4)[1], np.zeros(()), np.empty(0))
    try:
        return all(_read_data_field(probe) == probe.ctypes.data for probe in probes)
    except (ValueError, OverflowError):  # id() is not an address on this interpreter
        return False


def _documented_data_pointer(array: np.ndarray) -> int:
    return array.ctypes.data


# For hot paths that already know they hold an ndarray (anything else would read garbage).
unchecked_data_pointer = _read_data_field if _data_field_is_readable() else _documented_data_pointer


def data_pointer(array: np.ndarray) -> int:
    """Address of the first element of `array` (an ndarray or subclass)."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"data_pointer needs a numpy array, got {type(array).__name__}")
    return unchecked_data_pointer(array)


def aligned_zeros(shape: int | tuple[int, ...], dtype="float32", alignment: int = CACHE_LINE_BYTES) -> np.ndarray:
    """A zero-filled C-contiguous array whose data starts on an `alignment`-byte boundary.

    The array is a view into a slightly larger byte buffer, which it keeps alive. (An array
    of no elements has no data to align; numpy may point it anywhere in the buffer.)
    """
    if alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"alignment must be a power of two, got {alignment}")
    dtype = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.zeros(nbytes + alignment, dtype=np.uint8)
    start = -data_pointer(raw) % alignment
    return raw[start:start + nbytes].view(dtype).reshape(shape)
