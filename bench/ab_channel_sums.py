"""A/B of batch norm's channel sums in the conv kernels: one workload's training step compiled
without them, with the forward's only, and whole, timed in interleaved rounds in one process.

    python bench/ab_channel_sums.py resnet20 --threads 1 --rounds 8

Each variant compiles into a cache directory of its own (the program cache keys on the graph,
which the variants share).
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_step import WORKLOADS, graphc_optimizer  # noqa: E402

import graphc as gc  # noqa: E402
import graphc.backend.compiler as compiler  # noqa: E402
import graphc.backend.lowering as lowering  # noqa: E402
from graphc.tools import models  # noqa: E402

WHOLE = lowering._channel_sums_in_producers


def forward_only(steps, output_ids):
    for step in steps:
        if step.label.startswith("conv2d_input_grad"):
            step.with_channel_sums = None
    return WHOLE(steps, output_ids)


VARIANTS = {"unfused": lambda steps, output_ids: steps, "forward only": forward_only, "fused": WHOLE}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", choices=["resnet8", "resnet20"])
    parser.add_argument("--batch", type=int, help="default: 64 for resnet8, 128 for resnet20")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    batch = args.batch or {"resnet8": 64, "resnet20": 128}[args.workload]
    gc.set_num_threads(args.threads)
    steps = {}
    for label, plan in VARIANTS.items():
        os.environ["GRAPHC_CACHE_DIR"] = tempfile.mkdtemp(prefix="graphc-ab-")
        compiler._cache = None
        lowering._channel_sums_in_producers = plan
        model = WORKLOADS[args.workload](batch)
        step = gc.compile_training_step(model.loss, gc.init_params(model.graph, seed=0), graphc_optimizer("adam"))
        feeds = models.random_batch(model, np.random.default_rng(1))
        step(**feeds)
        steps[label] = (step, feeds)
    lowering._channel_sums_in_producers = WHOLE
    times = {label: [] for label in steps}
    for _ in range(args.rounds):
        for label, (step, feeds) in steps.items():
            start = time.perf_counter()
            for _ in range(3):
                step(**feeds)
            times[label].append((time.perf_counter() - start) / 3)
    print(f"{args.workload} B={batch}, {args.threads} thread(s), median / best of {args.rounds} rounds (ms)")
    for label, values in times.items():
        print(f"  {label:<13} {np.median(values) * 1e3:8.2f} {min(values) * 1e3:8.2f}")
    print(f"  unfused / fused: x{np.median(times['unfused']) / np.median(times['fused']):.3f}")


if __name__ == "__main__":
    main()
