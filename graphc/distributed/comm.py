"""The communicator of a data-parallel step, as its native code needs it: checked, its ABI,
the words of the step's communicator slot, and each rank's share of the node's cores.

Everything comes from mpi4py: `MPI._sizeof` gives the handles' sizes, `MPI._handleof` the
communicator, datatype and op handles, `int(MPI.IN_PLACE)` MPI_IN_PLACE (-1 in MPICH, 1 in
Open MPI), and the MPI library mpi4py links gives the functions' addresses.
"""
from __future__ import annotations

import ctypes
import functools
import os

import numpy as np

import graphc_runtime as rt
from graphc.backend.kernels.collective import REQUESTS, MpiAbi, SlotWord, slot_words

__all__ = ["checked_comm", "mpi_abi", "slot_values", "ranks_on_this_node", "threads_per_rank", "MPI_FUNCTIONS"]

# What the kernels call, by their slot word.
MPI_FUNCTIONS = {SlotWord.IALLREDUCE: "MPI_Iallreduce", SlotWord.WAIT: "MPI_Wait", SlotWord.TEST: "MPI_Test",
                 SlotWord.ABORT: "MPI_Abort", SlotWord.IBARRIER: "MPI_Ibarrier"}


def _mpi():
    from mpi4py import MPI
    return MPI


def checked_comm(comm, where: str):
    """`comm` if it is an mpi4py intracommunicator the step can use; TypeError or ValueError
    naming `where` otherwise."""
    try:
        MPI = _mpi()
    except ImportError:
        raise TypeError(f"{where}: comm must be an mpi4py communicator, and mpi4py is not installed "
                        f"(pip install 'graphc[mpi]'), got {comm!r}") from None
    if not isinstance(comm, MPI.Intracomm):
        raise TypeError(f"{where}: comm must be an mpi4py intracommunicator such as MPI.COMM_WORLD, got {comm!r}")
    if comm == MPI.COMM_NULL:
        raise ValueError(f"{where}: comm is MPI.COMM_NULL")
    level = MPI.Query_thread()
    if level < MPI.THREAD_SERIALIZED and not (level == MPI.THREAD_FUNNELED and MPI.Is_thread_main()):
        # The step calls MPI from the thread that calls the step.
        raise ValueError(f"{where}: MPI was initialized at thread level {level}; the step calls MPI from the "
                         f"thread that calls it, which needs MPI_THREAD_SERIALIZED, or MPI_THREAD_FUNNELED and "
                         f"the main thread (mpi4py's default is MPI_THREAD_MULTIPLE)")
    return comm


def mpi_abi() -> MpiAbi:
    MPI = _mpi()
    return MpiAbi(comm_bytes=MPI._sizeof(MPI.Comm), datatype_bytes=MPI._sizeof(MPI.Datatype),
                  op_bytes=MPI._sizeof(MPI.Op), request_bytes=MPI._sizeof(MPI.Request),
                  status_bytes=MPI._sizeof(MPI.Status))


@functools.lru_cache(maxsize=1)
def _function_addresses() -> dict[int, int]:
    # mpi4py's extension module links the MPI library: a lookup through it finds MPI's symbols
    # whichever way the library was loaded.
    library = ctypes.CDLL(_mpi().__file__)
    return {word: ctypes.cast(getattr(library, name), ctypes.c_void_p).value for word, name in MPI_FUNCTIONS.items()}


@functools.lru_cache(maxsize=1)
def _getpid_address() -> int:
    return ctypes.cast(ctypes.CDLL(None).getpid, ctypes.c_void_p).value


def slot_values(comm, buckets: int, bases: tuple[int, ...] = ()) -> np.ndarray:
    """The communicator slot's int64 words (backend/kernels/collective.py) for `comm`, with
    room for `buckets` requests, each MPI_REQUEST_NULL, then `bases`, each rank's address of
    the shared memory of its buckets (none: MPI sums them)."""
    MPI = _mpi()
    words = np.zeros(slot_words(buckets, len(bases)), np.int64)
    words[SlotWord.OWNER] = os.getpid() ^ _getpid_address()
    for word, address in _function_addresses().items():
        words[word] = address
    words[SlotWord.COMM] = MPI._handleof(comm)
    words[SlotWord.DATATYPE] = MPI._handleof(MPI.FLOAT)
    words[SlotWord.OP] = MPI._handleof(MPI.SUM)
    words[SlotWord.IN_PLACE] = int(MPI.IN_PLACE)
    words[SlotWord.SCALE] = np.array([1.0 / comm.Get_size(), 0.0], np.float32).view(np.int64)[0]
    words[SlotWord.RANK] = comm.Get_rank()
    words[SlotWord.FINISHED] = MPI._handleof(MPI.REQUEST_NULL)
    words[REQUESTS:REQUESTS + buckets] = MPI._handleof(MPI.REQUEST_NULL)
    if bases:
        words[SlotWord.BASES_AT] = REQUESTS + buckets
        words[REQUESTS + buckets:] = bases
    return words


def ranks_on_this_node(comm) -> int:
    """How many ranks of `comm` run on this node. Collective over `comm`."""
    node = comm.Split_type(_mpi().COMM_TYPE_SHARED)
    try:
        return node.Get_size()
    finally:
        node.Free()


def threads_per_rank(ranks_here: int) -> int:
    """The threads one rank's programs use: its share of the node's cores among the
    `ranks_here` ranks running on the node (each defaulting to all cores would oversubscribe
    them), at most gc.get_num_threads()."""
    return max(1, min(rt.get_num_threads(), rt.usable_cpu_count() // ranks_here))
