"""What check_finite costs: a training step compiled with and without it, timed in the same
process, interleaved round by round.

    python bench/bench_check_finite.py                                 # mlp, lenet5, digits_cnn; B=64; 1 and 2 threads
    python bench/bench_check_finite.py --workloads mlp --threads 1 --rounds 20

Each row: median µs per step (forward, backward and update) of the program without checks
and of the one with them (every kernel's results scanned, the updated buffers saved first),
and on/off (the issue asks for at most 2). Each program trains its own copy of the params on
one random batch, at a learning rate small enough to stay finite.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import graphc as gc
from graphc.tools import models

WORKLOADS = {
    "mlp": (lambda b: models.mlp(b), lambda: gc.SGD(lr=0.01)),
    "mlp-adam": (lambda b: models.mlp(b), lambda: gc.Adam(lr=1e-3)),
    "lenet5": (lambda b: models.lenet5(b), lambda: gc.SGD(lr=0.01)),
    # batch norm (running statistics updated in place), dropout, Adam's moments
    "digits_cnn": (lambda b: models.digits_cnn(b), lambda: gc.Adam(lr=1e-3)),
}


def per_call_seconds(step, feeds: dict, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        step(**feeds)
    return (time.perf_counter() - start) / calls


def measure(name: str, batch: int, threads: int, rounds: int, budget_s: float) -> tuple[float, float]:
    """Median seconds per step without and with check_finite."""
    build, optimizer = WORKLOADS[name]
    model = build(batch)
    feeds = models.random_batch(model, np.random.default_rng(0))
    params = gc.init_params(model.graph, seed=0)
    gc.set_num_threads(threads)
    steps = {flag: gc.compile_training_step(model.loss, {k: v.copy() for k, v in params.items()}, optimizer(),
                                            check_finite=flag)
             for flag in (False, True)}
    for step in steps.values():
        step(**feeds)   # warm-up
    once = per_call_seconds(steps[False], feeds, 3)
    calls = max(1, int(budget_s / rounds / 2 / max(once, 1e-6)))
    times = {False: [], True: []}
    for _ in range(rounds):
        for flag, step in steps.items():
            times[flag].append(per_call_seconds(step, feeds, calls))
    return statistics.median(times[False]), statistics.median(times[True])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=["mlp", "mlp-adam", "lenet5", "digits_cnn"],
                        choices=sorted(WORKLOADS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timing per row")
    args = parser.parse_args(argv)
    print(f"{'workload':<12} {'B':>4} {'thr':>3} {'off µs':>10} {'on µs':>10} {'on/off':>7}")
    for name in args.workloads:
        for threads in args.threads:
            off, on = measure(name, args.batch, threads, args.rounds, args.budget)
            print(f"{name:<12} {args.batch:>4} {threads:>3} {off * 1e6:10.1f} {on * 1e6:10.1f} {on / off:7.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
