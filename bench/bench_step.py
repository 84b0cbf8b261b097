"""Training-step benchmark: graphc's compiled step against the numpy reference executor and,
when installed, PyTorch eager — same workloads, same process, interleaved timing.

    python bench/bench_step.py                       # every workload, B = 64 and 256, 1 and 2 threads
    python bench/bench_step.py --workloads lenet5 --batches 64 --threads 1

Prints median µs per step (forward + backward + SGD update) and graphc's speedup over each
peer (ratio > 1: graphc is faster), graphc's GFLOP/s, and compile times (cold: empty cache;
warm: the same step compiled again, from the disk cache).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

import graphc as gc  # noqa: E402
from graphc import models  # noqa: E402

WORKLOADS = {
    "logreg": lambda b: models.softmax_regression(b, 784, 10),
    "mlp": lambda b: models.mlp(b),
    "lenet5": lambda b: models.lenet5(b),
    "convnet": lambda b: models.convnet(b),
    "w5": lambda b: models.logistic_regression(b, 64),
}
LR = 0.01


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


def median_time(fn, repeats: int, budget_s: float) -> float:
    """Median seconds per call over `repeats` calls (fewer if the budget runs out), after a warm-up."""
    fn()
    times = []
    deadline = time.perf_counter() + budget_s
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if time.perf_counter() > deadline and len(times) >= 3:
            break
    return statistics.median(times)


def interleaved(fns: dict, rounds: int, repeats: int, budget_s: float) -> dict:
    """Medians of each function, measured in alternating rounds so all see the same machine load."""
    samples = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            samples[k].append(median_time(fn, repeats, budget_s / rounds))
    return {k: min(v) for k, v in samples.items()}


def compile_times(name: str, batch: int):
    """(cold, warm) seconds to compile the step: cold with an empty cache, warm from the disk cache."""
    from graphc import compiler
    saved = os.environ.get("GRAPHC_CACHE_DIR")
    with tempfile.TemporaryDirectory() as cache_dir:
        os.environ["GRAPHC_CACHE_DIR"] = cache_dir
        compiler._cache = None
        result = []
        for _ in range(2):
            model = WORKLOADS[name](batch)
            params = gc.init_params(model.graph, seed=0)
            start = time.perf_counter()
            gc.compile_training_step(model.loss, params, gc.SGD(lr=LR))
            result.append(time.perf_counter() - start)
    if saved is None:
        os.environ.pop("GRAPHC_CACHE_DIR", None)
    else:
        os.environ["GRAPHC_CACHE_DIR"] = saved
    compiler._cache = None
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--batches", nargs="+", type=int, default=[64, 256])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--no-reference", action="store_true", help="skip the (slow) numpy reference executor")
    parser.add_argument("--torch-compile", action="store_true", help="also time torch.compile (slow to compile)")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timing per peer and row")
    args = parser.parse_args()

    try:
        import torch
        from peers import torch_step
    except ImportError:
        torch = None
    print(f"graphc {gc.__version__}; PyTorch {torch.__version__ if torch else 'not installed'}; "
          f"{os.cpu_count()} CPUs")
    header = f"{'workload':<9} {'B':>4} {'thr':>3} {'graphc µs':>10} {'GFLOP/s':>8}"
    peers = (["reference"] if not args.no_reference else []) + (["torch"] if torch else []) + \
            (["torch.compile"] if torch and args.torch_compile else [])
    for peer in peers:
        header += f" {peer + ' µs':>16} {'×':>6}"
    print(header)
    rng = np.random.default_rng(0)
    for name in args.workloads:
        for batch in args.batches:
            batch = 64 if name == "w5" and batch != 64 else batch
            for threads in args.threads:
                gc.set_num_threads(threads)
                model = WORKLOADS[name](batch)
                params = gc.init_params(model.graph, seed=0)
                feeds = models.random_batch(model, rng)
                step = gc.compile_training_step(model.loss, params, gc.SGD(lr=LR))
                fns = {"graphc": lambda: step(**feeds)}
                if "reference" in peers and threads == args.threads[0]:
                    ref_params = {k: v.copy() for k, v in params.items()}
                    ref = reference_step(model, ref_params)
                    fns["reference"] = lambda: ref(feeds)
                if torch:
                    torch.set_num_threads(threads)
                    x = torch.from_numpy(feeds["x"])
                    y = torch.from_numpy(feeds["y"].astype(np.int64)) if name != "w5" else torch.from_numpy(feeds["y"])
                    eager = torch_step(name, torch, LR)
                    fns["torch"] = lambda: eager(x, y)
                    if args.torch_compile:
                        compiled = torch_step(name, torch, LR, compiled=True)
                        fns["torch.compile"] = lambda: compiled(x, y)
                times = interleaved(fns, rounds=3, repeats=200, budget_s=args.budget * len(fns))
                flops = 6 * forward_macs(model)
                row = f"{name:<9} {batch:>4} {threads:>3} {times['graphc'] * 1e6:>10.1f} " \
                      f"{flops / times['graphc'] / 1e9:>8.1f}"
                for peer in peers:
                    if peer in times:
                        row += f" {times[peer] * 1e6:>16.1f} {times[peer] / times['graphc']:>6.2f}"
                    else:
                        row += f" {'':>16} {'':>6}"
                print(row, flush=True)
            if name == "w5":
                break
    print("\ncompile time of the training step (s): cold (empty cache) / warm (disk cache)")
    for name in args.workloads:
        cold, warm = compile_times(name, 64)
        print(f"  {name:<9} {cold:6.2f} / {warm:6.3f}")


if __name__ == "__main__":
    main()
