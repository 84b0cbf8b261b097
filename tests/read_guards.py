"""Input arrays that end where readable memory ends, so a kernel reading past one faults.

Output buffers are checked with sentinels around them (a stray write changes a sentinel), but
a stray read leaves no trace: a masked load with a wrong mask, or a gather of the short last
group of rows, would read a few bytes past an input and still pass. Placed against a page
with no access rights, that read ends the test process instead. Where the page cannot be
protected (no mprotect), the copy is an ordinary array.
"""
from __future__ import annotations

import ctypes
import mmap

import numpy as np

_PAGE = mmap.PAGESIZE
_PROT_NONE = 0

try:
    _mprotect = ctypes.CDLL(None, use_errno=True).mprotect
    _mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
except (OSError, AttributeError):  # pragma: no cover - not a POSIX libc
    _mprotect = None


def ending_at_guard_page(array: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of `array` whose last byte is followed by an inaccessible page."""
    array = np.ascontiguousarray(array)
    if _mprotect is None or array.nbytes == 0:
        return array.copy()
    data_pages = -(-array.nbytes // _PAGE)
    buffer = mmap.mmap(-1, (data_pages + 1) * _PAGE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
    if _mprotect(base + data_pages * _PAGE, _PAGE, _PROT_NONE) != 0:  # pragma: no cover
        return array.copy()
    start = data_pages * _PAGE - array.nbytes
    # The view keeps `buffer` (and so the mapping) alive as its base.
    view = np.frombuffer(buffer, dtype=array.dtype, count=array.size, offset=start).reshape(array.shape)
    view[...] = array
    return view
