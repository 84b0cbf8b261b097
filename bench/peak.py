"""The machine's measured float32 GEMM peak: numpy (OpenBLAS) on a large square matmul.

    python bench/peak.py                      # 1 and all usable threads, 1024³
    python bench/peak.py --threads 1 2 --size 2048

OpenBLAS reads its thread count once, when numpy is imported, so each thread count is measured
in a worker interpreter started with OPENBLAS_NUM_THREADS (and OMP_NUM_THREADS) set; the
parent's own numpy is left as it was. bench_step.py keeps one worker per thread count and times
the GEMM in every row, interleaved with the training steps, so that graphc's fraction of the
peak compares two measurements taken under the same machine load.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))

from peers import median_time  # noqa: E402


class PeakWorker:
    """A process whose numpy uses `threads` BLAS threads, timing a size³ float32 matmul on request."""

    def __init__(self, threads: int, size: int = 1024):
        self.threads, self.size = threads, size
        env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
        self._process = subprocess.Popen([sys.executable, __file__, "--serve", "--size", str(size)], env=env,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def median_time(self, repeats: int, budget_s: float) -> float:
        """Median seconds per matmul (the same contract as peers.median_time)."""
        self._process.stdin.write(f"{repeats} {budget_s}\n")
        self._process.stdin.flush()
        return float(self._process.stdout.readline())

    def gflops(self, seconds: float) -> float:
        return 2 * self.size ** 3 / seconds / 1e9

    def close(self) -> None:
        self._process.stdin.close()
        self._process.wait()


def serve(size: int) -> None:
    """The worker's side: for each line "repeats budget" on stdin, print the median seconds."""
    import numpy as np
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    out = np.empty((size, size), dtype=np.float32)
    for line in sys.stdin:
        repeats, budget_s = line.split()
        print(median_time(lambda: np.matmul(a, b, out=out), int(repeats), float(budget_s)), flush=True)


def measure_peaks(thread_counts, size: int = 1024, rounds: int = 3) -> dict[int, float]:
    """GFLOP/s by thread count: the best of `rounds` medians of 10 matmuls."""
    peaks = {}
    for threads in thread_counts:
        worker = PeakWorker(threads, size)
        peaks[threads] = worker.gflops(min(worker.median_time(10, 1.0) for _ in range(rounds)))
        worker.close()
    return peaks


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", nargs="+", type=int, default=sorted({1, len(os.sched_getaffinity(0))}))
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--serve", action="store_true", help="run as a PeakWorker (reads requests from stdin)")
    args = parser.parse_args()
    if args.serve:
        serve(args.size)
        return
    for threads, gflops in measure_peaks(args.threads, args.size).items():
        print(f"float32 GEMM {args.size}³, {threads} thread(s): {gflops:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
