"""GFLOP/s of graphc's generated GEMM against numpy (OpenBLAS), one thread.

    OPENBLAS_NUM_THREADS=1 python bench/bench_gemm.py              # all shapes, NN/TN/NT
    python bench/bench_gemm.py --threads 2                         # our kernel on 2 threads
    python bench/bench_gemm.py --shapes 64x784x512 --variants NN

Shapes are MxNxK.  Variant letters say whether A and B are stored
transposed: "TN" is C = A^T B with A stored (K, M) (as in dW = X^T G), "NT"
is C = A B^T with B stored (N, K) (as in dX = G W^T).  numpy gets the same
transposed views, which OpenBLAS handles without copying.

Compile time is per GEMM (IR -> optimised object), each in its own module.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import os
import sys
import time

# Must precede the numpy import to take effect.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from graphc.backend.kernels.gemm import emit_gemm, gemm_workspace_floats  # noqa: E402
from graphc.backend.llvm import target  # noqa: E402

DEFAULT_SHAPES = ["64x784x512", "256x784x512", "64x512x256", "256x512x256",
                  "6x784x25", "16x100x150", "512x512x512"]
DEFAULT_VARIANTS = ["NN", "TN", "NT"]

_P = ctypes.c_void_p
GEMM_CFUNC = ctypes.CFUNCTYPE(None, _P, _P, _P, _P, _P, ctypes.c_int64, ctypes.c_int64)


def best_seconds(runs, flops: float, repeats: int = 9) -> list[float]:
    """Best time of one call of each of `runs`, sampled in turn.

    Samples of the competitors alternate (~30 ms each) so that a slow spell
    of the machine (shared or virtual CPUs) hits all of them alike.
    """
    for run in runs:
        run()
    calls = max(1, int(3e7 / flops * 30))  # ~30 ms at ~30 GFLOP/s
    best = [float("inf")] * len(runs)
    for _ in range(repeats):
        for i, run in enumerate(runs):
            start = time.perf_counter()
            for _ in range(calls):
                run()
            best[i] = min(best[i], (time.perf_counter() - start) / calls)
    return best


def compile_gemm(M, N, K, trans_a, trans_b):
    """(engine, ctypes function, compile seconds) for one GEMM."""
    module = target.new_module("bench")
    emit_gemm(module, "gemm", M, N, K, trans_a=trans_a, trans_b=trans_b)
    start = time.perf_counter()
    obj = target.compile_to_object(str(module))
    seconds = time.perf_counter() - start
    engine = target.load_object(obj)
    return engine, GEMM_CFUNC(engine.get_function_address("gemm")), seconds


def make_runner(fn, A, B, C, workspace, nthreads, pool):
    args = (A.ctypes.data, B.ctypes.data, C.ctypes.data, None, workspace.ctypes.data)
    if nthreads == 1:
        return lambda: fn(*args, 0, 1)

    def run_threads():
        # ctypes releases the GIL, so the calls really run in parallel.
        futures = [pool.submit(fn, *args, tid, nthreads) for tid in range(nthreads)]
        for future in futures:
            future.result()
    return run_threads


def bench_one(shape, variant, nthreads, pool):
    M, N, K = shape
    trans_a, trans_b = variant[0] == "T", variant[1] == "T"
    rng = np.random.default_rng(0)
    A = rng.standard_normal((K, M) if trans_a else (M, K), dtype=np.float32)
    B = rng.standard_normal((N, K) if trans_b else (K, N), dtype=np.float32)
    C = np.empty((M, N), np.float32)
    workspace = np.empty(gemm_workspace_floats(M, N, K, trans_a=trans_a, trans_b=trans_b,
                                               nthreads=nthreads), np.float32)
    engine, fn, compile_s = compile_gemm(M, N, K, trans_a, trans_b)

    opA, opB = (A.T if trans_a else A), (B.T if trans_b else B)
    ours = make_runner(fn, A, B, C, workspace, nthreads, pool)
    ours()
    error = np.abs(C - opA @ opB).max() / max(1.0, np.abs(C).max())
    assert error < 1e-4, f"wrong result for {shape} {variant}: {error}"

    flops = 2.0 * M * N * K
    ref_out = np.empty_like(C)
    ours_s, numpy_s = best_seconds([ours, lambda: np.dot(opA, opB, out=ref_out)], flops)
    del engine  # keep the engine alive until timing is done
    return flops / ours_s / 1e9, flops / numpy_s / 1e9, ours_s, compile_s


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=DEFAULT_SHAPES)
    parser.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS)
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for graphc's kernel (numpy uses OPENBLAS_NUM_THREADS)")
    args = parser.parse_args(argv)

    print(f"host {target.target_fingerprint().split('|')[1]}, vector width "
          f"{target.vector_width_f32()}, graphc threads {args.threads}, "
          f"OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}")
    print(f"{'MxNxK':>12} {'op':>3} {'graphc GF/s':>12} {'numpy GF/s':>11} "
          f"{'ratio':>6} {'graphc us':>10} {'compile ms':>11}")
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.threads) as pool:
        for shape_text in args.shapes:
            shape = tuple(int(d) for d in shape_text.split("x"))
            for variant in args.variants:
                ours, numpy_gf, ours_s, compile_s = bench_one(shape, variant,
                                                              args.threads, pool)
                print(f"{shape_text:>12} {variant:>3} {ours:12.1f} {numpy_gf:11.1f} "
                      f"{ours / numpy_gf:6.2f} {ours_s * 1e6:10.1f} {compile_s * 1e3:11.0f}",
                      flush=True)


if __name__ == "__main__":
    main()
