"""Per-kernel profile of a workload's compiled training step.

    python bench/profile_step.py lenet5 --batch 64 --threads 1
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from bench_step import WORKLOADS  # noqa: E402

import graphc as gc  # noqa: E402
from graphc.tools import models  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", choices=list(WORKLOADS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    gc.set_num_threads(args.threads)
    model = WORKLOADS[args.workload](args.batch)
    params = gc.init_params(model.graph, seed=0)
    step = gc.compile_training_step(model.loss, params, gc.SGD(lr=0.01))
    feeds = models.random_batch(model, np.random.default_rng(0))
    print(f"{args.workload} B={args.batch}, {args.threads} thread(s)")
    print(step.profile(repeats=args.repeats, **feeds))


if __name__ == "__main__":
    main()
