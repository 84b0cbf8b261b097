"""Training-step benchmark: graphc's compiled step against its peers on the same workloads,
with interleaved timing.

    python bench/bench_step.py                       # the classic workloads, B = 64 and 256, 1 and 2 threads
    python bench/bench_step.py --workloads lenet5 --batches 64 --threads 1 --peers torch jax
    python bench/bench_step.py --workloads resnet8 resnet20 --peers torch torch.compile jax --mlp-adam

Peers (each only when installed; --peers picks among them): the numpy reference executor,
PyTorch eager, torch.compile, JAX jit. Prints median µs per step (forward + backward + update:
plain SGD, or Adam for the ResNets, the same optimizer for every peer), graphc's GFLOP/s and its fraction of the float32 GEMM peak (numpy 1024³ at the row's
thread count: the best measured so far in the run, at the start and in every row's interleaved
rounds; bench/peak.py), and for each peer its time and peer/graphc (> 1: graphc is faster).
Then graphc's thread scaling (its thread counts timed in the same rounds), the peers' compile
times (their first call) and graphc's (cold: empty cache; warm: from the disk cache).
`--mlp-adam` adds graphc's Adam step against its SGD step on the MLP, timed in the same rounds.
See bench/README.md.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from peak import PeakWorker  # noqa: E402
from peers import JaxWorker, median_time, torch_step  # noqa: E402

import graphc as gc  # noqa: E402
from graphc.core.optim import Adam  # noqa: E402
from graphc.tools import models  # noqa: E402

WORKLOADS = {
    "logreg": lambda b: models.softmax_regression(b, 784, 10),
    "mlp": lambda b: models.mlp(b),
    "lenet5": lambda b: models.lenet5(b),
    "convnet": lambda b: models.convnet(b),
    "w5": lambda b: models.logistic_regression(b, 64),
    # batch norm in training mode: normalized by the batch, running statistics updated
    "resnet8": lambda b: models.resnet8(b, training=True),
    "resnet20": lambda b: models.resnet20(b, training=True),
}
# What runs without --workloads: the classic workloads (the ResNets take minutes; name them)
DEFAULT_WORKLOADS = ["logreg", "mlp", "lenet5", "convnet", "w5"]
# The batches of a workload's rows: W5 is defined at B = 64 only; the ResNets run at the batch
# of issue 16 unless --batches is given; every other workload at --batches (default 64, 256).
FIXED_BATCHES = {"w5": [64]}
DEFAULT_BATCHES = {"resnet8": [64], "resnet20": [128]}
PEERS = ["reference", "torch", "torch.compile", "jax"]
LR = 0.01
# The optimizer of a workload's rows, the same for graphc and every peer (--optimizer overrides it)
OPTIMIZERS = ["sgd", "adam"]
WORKLOAD_OPTIMIZER = {"resnet8": "adam", "resnet20": "adam"}
LEARNING_RATES = {"sgd": LR, "adam": 1e-3}   # Adam: torch.optim.Adam's default


def graphc_optimizer(optimizer: str):
    if optimizer == "sgd":
        return gc.SGD(lr=LEARNING_RATES["sgd"])
    return Adam(lr=LEARNING_RATES["adam"])


def batches_of(name: str, batches: list[int] | None) -> list[int]:
    """The batches of the workload's rows, given --batches (None when not given)."""
    if name in FIXED_BATCHES:
        return FIXED_BATCHES[name]
    if batches is None:
        return DEFAULT_BATCHES.get(name, [64, 256])
    return batches


def forward_macs(model) -> int:
    """Multiply-accumulates of the forward pass's matmuls and convolutions."""
    macs = 0
    for node in model.graph.ancestors([model.loss]):
        if node.op == "matmul":
            macs += node.size * node.inputs[0].shape[1]
        elif node.op == "conv2d":
            macs += node.size * int(np.prod(node.inputs[1].shape[1:]))
    return macs


def reference_step(model, params):
    names = list(params)
    grads = gc.grad(model.loss, [model.graph.params[n] for n in names])

    def step(feeds):
        values = gc.evaluate([model.loss] + grads, feeds, params)
        for n, g in zip(names, values[1:]):
            params[n] -= LR * g
    return step


# Pause before each timer, so that none is timed while the previous one's threads still spin:
# a BLAS or OpenMP pool busy-waits for work after its last call (OpenBLAS for ~0.1 s). Measured
# on LeNet-5 B=64 at 2 threads: graphc's steps in the first 100 ms after the peak GEMM's
# 2-thread run took 2.3-2.9 ms, then 1.7-1.9 ms.
SETTLE_S = 0.2


def interleaved(timers: dict, rounds: int, repeats: int, budget_s: float) -> dict:
    """Best of `rounds` medians of each timer, measured in alternating rounds so all see the same
    machine load; each timer gets about `budget_s` in all, each after a pause of SETTLE_S. A
    timer takes (repeats, budget seconds) and returns a median in seconds."""
    samples = {k: [] for k in timers}
    for _ in range(rounds):
        for k, timer in timers.items():
            time.sleep(SETTLE_S)
            samples[k].append(timer(repeats, budget_s / rounds))
    return {k: min(v) for k, v in samples.items()}


def local_timer(fn):
    return functools.partial(median_time, fn)


def blas_pinned(threads: int, timer):
    """`timer` with numpy's BLAS limited to `threads` threads while it runs (threadpoolctl), so
    the reference's GEMMs use the row's thread count and not numpy's default of every core."""
    from threadpoolctl import threadpool_limits

    def pinned(repeats, budget_s):
        with threadpool_limits(limits=threads, user_api="blas"):
            return timer(repeats, budget_s)
    return pinned


def first_call_seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compile_times(name: str, batch: int, optimizer: str) -> tuple[float, float]:
    """(cold, warm) seconds to compile the step, measured in a fresh interpreter (graphc imported
    first): cold is its first compile, with an empty disk cache; warm compiles it again from the
    disk cache. A fresh interpreter, because in this one the rows' compiles have warmed the
    in-memory caches (sympy's, graphc's) and imported graphc's lazily imported modules."""
    with tempfile.TemporaryDirectory() as cache_dir:
        out = subprocess.run([sys.executable, __file__, "--compile-times", name, str(batch), "--optimizer", optimizer],
                             capture_output=True, text=True, env=dict(os.environ, GRAPHC_CACHE_DIR=cache_dir))
    if out.returncode != 0:
        raise RuntimeError(f"timing the compile of {name} B={batch} failed:\n{out.stderr}")
    cold, warm = json.loads(out.stdout.splitlines()[-1])
    return cold, warm


def _time_compiles(name: str, batch: int, optimizer: str) -> list[float]:
    """What `compile_times`' fresh interpreter runs."""
    result = []
    for _ in range(2):
        model = WORKLOADS[name](batch)
        params = gc.init_params(model.graph, seed=0)
        start = time.perf_counter()
        gc.compile_training_step(model.loss, params, graphc_optimizer(optimizer))
        result.append(time.perf_counter() - start)
    return result


def row_timers(name: str, model, feeds: dict, threads: int, peers: list[str], torch, jax_worker,
               first_calls: list, optimizer: str = "sgd") -> dict:
    """Timers (see `interleaved`) of graphc's step and of `peers` on one batch; the compiling peers
    compile here, appending (row label, peer, seconds of the first call) to `first_calls`."""
    label = f"{name} B={model.x.shape[0]} @{threads}"
    lr = LEARNING_RATES[optimizer]
    params = gc.init_params(model.graph, seed=0)
    initial = {k: v.copy() for k, v in params.items()}  # graphc's steps train `params` in place
    step = gc.compile_training_step(model.loss, params, graphc_optimizer(optimizer))
    timers = {"graphc": local_timer(lambda: step(**feeds))}
    if "reference" in peers and optimizer == "sgd" and not model.graph.buffers:
        ref = reference_step(model, {k: v.copy() for k, v in initial.items()})
        timers["reference"] = blas_pinned(threads, local_timer(lambda: ref(feeds)))
    if "torch" in peers or "torch.compile" in peers:
        torch.set_num_threads(threads)
        x = torch.from_numpy(feeds["x"])
        y = torch.from_numpy(feeds["y"] if name == "w5" else feeds["y"].astype(np.int64))
        if "torch" in peers:
            eager = torch_step(name, torch, lr, optimizer=optimizer)
            timers["torch"] = local_timer(lambda: eager(x, y))
        if "torch.compile" in peers:
            compiled = torch_step(name, torch, lr, compiled=True, optimizer=optimizer)
            first_calls.append((label, "torch.compile", first_call_seconds(lambda: compiled(x, y))))
            timers["torch.compile"] = local_timer(lambda: compiled(x, y))
    if "jax" in peers:
        first_calls.append((label, "jax", jax_worker.setup(name, initial, feeds["x"], feeds["y"], lr, optimizer)))
        timers["jax"] = jax_worker.median_time
    return timers


def adam_vs_sgd_times(batch: int, threads: int, rounds: int, budget_s: float, torch) -> dict:
    """graphc's MLP step with Adam and with SGD (and PyTorch eager's, when `torch` is given),
    compiled at `threads` threads and timed in turn in the same rounds (best round of each)."""
    model = WORKLOADS["mlp"](batch)
    feeds = models.random_batch(model, np.random.default_rng(2))
    previous = gc.get_num_threads()
    gc.set_num_threads(threads)
    try:
        timers = {}
        for optimizer in OPTIMIZERS:
            step = gc.compile_training_step(model.loss, gc.init_params(model.graph, seed=0),
                                            graphc_optimizer(optimizer))
            timers[f"graphc {optimizer}"] = local_timer(lambda step=step: step(**feeds))
        if torch is not None:
            torch.set_num_threads(threads)
            x, y = torch.from_numpy(feeds["x"]), torch.from_numpy(feeds["y"].astype(np.int64))
            for optimizer in OPTIMIZERS:
                eager = torch_step("mlp", torch, LEARNING_RATES[optimizer], optimizer=optimizer)
                timers[f"torch {optimizer}"] = local_timer(lambda eager=eager: eager(x, y))
        return interleaved(timers, rounds=rounds, repeats=200, budget_s=budget_s)
    finally:
        gc.set_num_threads(previous)


def scaling_times(name: str, batch: int, thread_counts: list[int], rounds: int, budget_s: float,
                  optimizer: str = "sgd") -> dict:
    """graphc's median step time at each thread count, the counts timed in turn in the same
    rounds (best round of each): a ratio of two rows of the table compares two different
    moments of a shared machine, this one compares the same moments."""
    model = WORKLOADS[name](batch)
    feeds = models.random_batch(model, np.random.default_rng(1))
    timers = {}
    previous = gc.get_num_threads()
    try:
        for threads in thread_counts:
            gc.set_num_threads(threads)
            step = gc.compile_training_step(model.loss, gc.init_params(model.graph, seed=0),
                                            graphc_optimizer(optimizer))

            def timer(repeats, budget, step=step, threads=threads):
                gc.set_num_threads(threads)
                return median_time(lambda: step(**feeds), repeats, budget)
            timers[threads] = timer
        return interleaved(timers, rounds=rounds, repeats=200, budget_s=budget_s)
    finally:
        gc.set_num_threads(previous)


def installed_peers(wanted: list[str]) -> list[str]:
    have = {"reference": importlib.util.find_spec("threadpoolctl") is not None,
            "torch": importlib.util.find_spec("torch") is not None,
            "jax": importlib.util.find_spec("jax") is not None}
    have["torch.compile"] = have["torch"]
    for peer in wanted:
        if not have[peer]:
            print(f"({peer} is not installed: skipped; `pip install -e .[bench]` installs the peers)")
    return [peer for peer in PEERS if peer in wanted and have[peer]]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=DEFAULT_WORKLOADS, choices=list(WORKLOADS),
                        help="default: the classic workloads (%(default)s); resnet8 and resnet20 when named")
    parser.add_argument("--batches", nargs="+", type=int, default=None,
                        help="default: 64 and 256; resnet8 64 and resnet20 128 (issue 16); w5 always 64")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                        help="the update of every row, for graphc and every peer (default: SGD, lr 0.01; "
                             "Adam, lr 0.001, for the ResNets)")
    parser.add_argument("--mlp-adam", action="store_true",
                        help="also time graphc's MLP step with Adam against the same with SGD (and PyTorch "
                             "eager's), in the same rounds, at each thread count and batch")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--peers", nargs="*", default=PEERS, choices=PEERS,
                        help="peers to time (default: every installed one); the reference runs at the first "
                             "thread count only (it is slow), its BLAS pinned to that many threads")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timing per peer and row")
    parser.add_argument("--scaling-rounds", type=int, default=9,
                        help="rounds of the thread-scaling table (graphc at each thread count, interleaved)")
    parser.add_argument("--compile-times", nargs=2, metavar=("WORKLOAD", "BATCH"),
                        help="print the cold and warm compile seconds of one step as JSON (what "
                             "compile_times' fresh interpreter runs; set GRAPHC_CACHE_DIR to an empty directory)")
    args = parser.parse_args()

    def optimizer_of(name):
        return args.optimizer or WORKLOAD_OPTIMIZER.get(name, "sgd")

    if args.compile_times:
        name, batch = args.compile_times
        print(json.dumps(_time_compiles(name, int(batch), optimizer_of(name))))
        return

    peers = installed_peers(args.peers)
    torch = None
    if {"torch", "torch.compile"} & set(peers):
        import logging

        import torch

        # Dynamo warns that it ignores the optimizer's profiler hooks, once per compiled step.
        torch._logging.set_logs(dynamo=logging.ERROR)
    jax_workers = {t: JaxWorker(t) for t in args.threads} if "jax" in peers else {}
    peak_workers = {t: PeakWorker(t) for t in args.threads}
    # The peak is the machine's best: a GEMM slowed by other load must not inflate graphc's fraction.
    best_peak = {t: w.gflops(min(w.median_time(10, 1.0) for _ in range(3))) for t, w in peak_workers.items()}

    print(f"graphc {gc.__version__}; {len(os.sched_getaffinity(0))} usable CPUs; peers: {', '.join(peers) or 'none'}")
    if torch:
        print(f"PyTorch {torch.__version__}: torch.set_num_threads(thr)")
    if jax_workers:
        print(f"{next(iter(jax_workers.values())).version()}: one worker process per thread count, "
              "pinned to thr CPUs (XLA sizes its thread pool by them)")
    print("times: median µs per step, best of 3 interleaved rounds; ×: peer time / graphc time (> 1: graphc faster)")
    print("update: " + ", ".join(f"{name} {optimizer_of(name)}" for name in args.workloads) +
          " (the same for every peer; the reference runs SGD rows without buffers only)")
    print("GFLOP/s: graphc's (6 FLOPs per forward MAC); peak: best numpy float32 GEMM 1024³ at thr threads so far")
    header = f"{'workload':<9} {'B':>4} {'thr':>3} {'graphc µs':>10} {'GFLOP/s':>8} {'peak':>6} {'%peak':>6}"
    for peer in peers:
        header += f" {peer + ' µs':>16} {'×':>6}"
    print(header)
    rng = np.random.default_rng(0)
    first_calls = []
    for name in args.workloads:
        for batch in batches_of(name, args.batches):
            for threads in args.threads:
                gc.set_num_threads(threads)
                model = WORKLOADS[name](batch)
                row_peers = [p for p in peers if p != "reference" or threads == args.threads[0]]
                timers = row_timers(name, model, models.random_batch(model, rng), threads, row_peers, torch,
                                    jax_workers.get(threads), first_calls, optimizer_of(name))
                timers["peak"] = peak_workers[threads].median_time
                times = interleaved(timers, rounds=3, repeats=200, budget_s=args.budget)
                gflops = 6 * forward_macs(model) / times["graphc"] / 1e9
                peak = best_peak[threads] = max(best_peak[threads], peak_workers[threads].gflops(times["peak"]))
                row = f"{name:<9} {batch:>4} {threads:>3} {times['graphc'] * 1e6:>10.1f} " \
                      f"{gflops:>8.1f} {peak:>6.1f} {gflops / peak:>6.1%}"
                for peer in peers:
                    if peer in times:
                        row += f" {times[peer] * 1e6:>16.1f} {times[peer] / times['graphc']:>6.2f}"
                    else:
                        row += f" {'':>16} {'':>6}"
                print(row, flush=True)
    if args.mlp_adam:
        print("\nAdam against SGD on the MLP: median µs per step of each, timed in turn in the same "
              f"{args.scaling_rounds} rounds (best round of each); ratio = Adam µs / SGD µs")
        for batch in batches_of("mlp", args.batches):
            for threads in args.threads:
                times = adam_vs_sgd_times(batch, threads, args.scaling_rounds, args.budget, torch)
                line = f"  mlp B={batch:<4} @{threads}  graphc {times['graphc adam'] * 1e6:9.1f} / " \
                       f"{times['graphc sgd'] * 1e6:9.1f}  ×{times['graphc adam'] / times['graphc sgd']:.2f}"
                if torch is not None:
                    line += f"   torch eager {times['torch adam'] * 1e6:9.1f} / {times['torch sgd'] * 1e6:9.1f}" \
                            f"  ×{times['torch adam'] / times['torch sgd']:.2f}"
                print(line, flush=True)
    for worker in [*jax_workers.values(), *peak_workers.values()]:
        worker.close()
    print("best GEMM peak of the run: " + ", ".join(f"{p:.1f} GFLOP/s @{t}" for t, p in best_peak.items()))

    if len(args.threads) > 1:
        low, high = min(args.threads), max(args.threads)
        print(f"\ngraphc's thread scaling: median µs per step at {low} and {high} threads, timed in turn in "
              f"the same {args.scaling_rounds} rounds (best round of each); speedup = µs@{low} / µs@{high}")
        for name in args.workloads:
            for batch in batches_of(name, args.batches):
                times = scaling_times(name, batch, [low, high], args.scaling_rounds, args.budget, optimizer_of(name))
                print(f"  {name:<9} B={batch:<4} {times[low] * 1e6:10.1f} / {times[high] * 1e6:10.1f}"
                      f"   ×{times[low] / times[high]:.2f}", flush=True)

    if first_calls:
        print("\npeers' compile time: seconds of the first call (trace + compile + one step)")
        for label, peer, seconds in first_calls:
            print(f"  {label:<20} {peer:<14} {seconds:7.2f}")
    print("\ngraphc's compile time of the training step (s), in a fresh interpreter: "
          "cold (its first compile, empty disk cache) / warm (disk cache)")
    for name in args.workloads:
        # the first batch of the workload's default rows: 64, resnet20 128
        batch = batches_of(name, None)[0]
        cold, warm = compile_times(name, batch, optimizer_of(name))
        print(f"  {name:<9} B={batch:<4} {optimizer_of(name):<4} {cold:6.2f} / {warm:6.3f}")


if __name__ == "__main__":
    main()
