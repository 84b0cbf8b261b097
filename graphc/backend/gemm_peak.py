"""The GEMM peak profiles compare kernels with: graphc's own float32 GEMM, timed on this machine.

A kernel's GFLOP/s as a fraction of this peak says how close it comes to what graphc's best
kernel reaches here with the same threads (for memory-bound kernels, GB/s is the measure that
suits). The GEMM is a square matmul compiled like any program (gc.compile, so its machine code
is in the disk cache) and assembled again for exactly the threads asked, as profile.py
assembles its twin; it runs in a Program of its own, on `threads` threads, leaving the
process's thread setting alone. Measured once per process and thread count, in about 0.3 s.
"""
from __future__ import annotations

import functools
import threading
import time

import numpy as np

import graphc_runtime as rt

__all__ = ["gemm_peak_gflops", "PEAK_SIZE"]

# 2·512³ FLOPs is about a millisecond on two AVX-512 cores: long enough to time one call, and
# of whole micro-kernel tiles, so the number is the kernel's speed, not its edges'.
PEAK_SIZE = 512
_SAMPLES = 7             # the fastest sample counts: the others met interference
_SAMPLE_SECONDS = 0.03

_lock = threading.Lock()


def gemm_peak_gflops(threads: int) -> float:
    """GFLOP/s of graphc's float32 GEMM, PEAK_SIZE³, on `threads` threads."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    with _lock:
        return _measured(threads)


@functools.cache
def _measured(threads: int) -> float:
    call = _gemm_call(threads)
    call()
    start = time.perf_counter()
    call()
    calls_per_sample = max(1, int(_SAMPLE_SECONDS / max(time.perf_counter() - start, 1e-9)))
    fastest = float("inf")
    for _ in range(_SAMPLES):
        start = time.perf_counter()
        for _ in range(calls_per_sample):
            call()
        fastest = min(fastest, (time.perf_counter() - start) / calls_per_sample)
    return 2 * PEAK_SIZE ** 3 / fastest / 1e9


def _gemm_call(threads: int):
    """A function running the PEAK_SIZE³ GEMM once on `threads` threads."""
    import graphc as gc
    from graphc.backend.compiler import object_code
    from graphc.backend.emit.entry import ENTRY_NAME

    n = PEAK_SIZE
    graph = gc.Graph("gemm_peak")
    a = graph.input("a", (n, n))
    b = graph.param("b", (n, n))
    rng = np.random.default_rng(0)
    params = {"b": rng.standard_normal((n, n), dtype=np.float32)}
    feeds = {"a": rng.standard_normal((n, n), dtype=np.float32)}
    spec = gc.compile([gc.matmul(a, b)], params).recipe.assemble(max_threads=threads)
    program = rt.Program(rt.NativeLibrary(object_code(spec.llvm_ir)), ENTRY_NAME, spec.slots, params,
                         max_threads=threads)
    return lambda: program.call(feeds, threads=threads)
