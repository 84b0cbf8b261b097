"""The memory a data-parallel step's buckets live in when every rank runs on one node: an MPI
shared-memory window (MPI_Win_allocate_shared), a part per rank, each holding every bucket
at the offsets of buckets.window_layout. Each rank's step writes its own part and reads all.

The window is never freed: MPI_Win_free is collective, and ranks release their steps at
different moments. It lives until MPI_Finalize, one per data-parallel step compiled. A
process forked from a rank shares it too: it must not call the rank's step.
"""
from __future__ import annotations

import re

import numpy as np

from graphc.distributed.buckets import BUCKET_STATE, WINDOW_ALIGNMENT, window_layout

__all__ = ["SharedBuckets"]

_PAGE = 4096


class SharedBuckets:
    """The shared memory of the buckets `shapes` (bucket State name -> shape, float32), for
    the ranks of `comm`, all on this node. Collective over `comm`."""

    def __init__(self, comm, shapes: dict[str, tuple[int, ...]]):
        from mpi4py import MPI
        names = sorted(shapes, key=_bucket_number)
        sizes = [int(np.prod(shapes[name])) for name in names]
        offsets = window_layout(sizes)
        nbytes = offsets[-1] + 4 * sizes[-1] if names else 0
        nbytes = max(_PAGE, -(-nbytes // _PAGE) * _PAGE)
        self.window = MPI.Win.Allocate_shared(nbytes, 1, comm=comm)
        parts = [self.window.Shared_query(rank)[0] for rank in range(comm.Get_size())]
        self.bases = tuple(np.frombuffer(part, np.uint8).ctypes.data for part in parts)
        own = np.frombuffer(parts[comm.Get_rank()], np.uint8)
        if any(base % WINDOW_ALIGNMENT for base in self.bases):
            raise RuntimeError(f"MPI's shared memory is not {WINDOW_ALIGNMENT}-byte aligned: {self.bases}")
        self.arrays = {name: own[offset:offset + 4 * size].view(np.float32).reshape(shapes[name])
                       for name, size, offset in zip(names, sizes, offsets)}


def _bucket_number(name: str) -> int:
    match = re.fullmatch(re.escape(BUCKET_STATE) + r"(\d+)", name)
    if match is None:
        raise ValueError(f"internal error: {name!r} names no bucket")
    return int(match.group(1))
