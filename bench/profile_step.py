"""Per-kernel profile of a workload's compiled training step.

    python bench/profile_step.py lenet5 --batch 64 --threads 1
    python bench/profile_step.py resnet20 --threads 1 2 --breakdown      # Adam; B = 128 (its default)

`--breakdown` sorts the kernels into classes by the IR nodes each covers (`step.steps`) and
prints each class's share of the native time: the convolutions (forward, input gradient,
weight gradient) with their GFLOP/s and fraction of the machine's float32 GEMM peak (numpy
1024³ at the same thread count, bench/peak.py, best of the runs before and after the profile);
batch norm and ReLU, forward and backward; the head (global pooling, linear, loss); the
optimizer's update. See `kernel_class`.
"""
import argparse
import os
import sys
from collections import defaultdict

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from bench_step import WORKLOAD_OPTIMIZER, WORKLOADS, batches_of, graphc_optimizer  # noqa: E402
from peak import PeakWorker  # noqa: E402

import graphc as gc  # noqa: E402
from graphc.backend.kernels.conv import chosen_paths  # noqa: E402
from graphc.tools import models  # noqa: E402

CONV_CLASSES = {"conv2d": "conv forward", "conv2d_input_grad": "conv input grad",
                "conv2d_weight_grad": "conv weight grad"}
# Ops of the classifier head; a node serving one of them (its gradient) is the head's too.
HEAD_OPS = {"matmul", "transpose", "softmax_cross_entropy", "softmax", "one_hot"}
CLASS_ORDER = ["conv forward", "conv input grad", "conv weight grad", "BN+ReLU forward", "BN+ReLU backward",
               "BN running stats", "head", "optimizer update", "other"]


def kernel_class(step_, forward_ids: set, stat_ids: set) -> str:
    """The class of one kernel (a `Step`) by the nodes it covers.

    - conv: the kernel's label (a conv kernel may absorb an elementwise consumer, "+ew", an
      update, or batch norm's per-channel sums of its result, "&sum"; its time stays the conv's,
      so the BN+ReLU classes are a lower bound).
    - head: a node of a matmul, the loss or softmax, or of the global average pool (2-D (N, C)
      values), or the gradient of one of them.
    - optimizer update / BN running stats: nodes that are neither forward (ancestors of the loss)
      nor gradients (`grad_of` set): the optimizer's update, or the running-statistics update
      when they feed a buffer write.
    - BN+ReLU forward / backward: the rest, in the ResNets batch norm (its statistics, the
      normalization, its affine), ReLU, and the residual add fused with them, forward or their
      gradients. In a model without batch norm, whatever elementwise and reduction work is left.
    """
    base = step_.label.split("+")[0].split("&")[0]   # "sum&sum+ew": sums sharing one pass
    if base in CONV_CLASSES:
        return CONV_CLASSES[base]
    nodes = step_.covers
    if any(n.op in HEAD_OPS or (n.grad_of is not None and n.grad_of.op in HEAD_OPS) for n in nodes):
        return "head"
    if any(n.grad_of is None and n.id not in forward_ids for n in nodes):
        return "BN running stats" if any(n.id in stat_ids for n in nodes) else "optimizer update"
    if any(len(n.shape) == 2 or (n.grad_of is not None and len(n.grad_of.shape) == 2) for n in nodes):
        return "head"
    if base in ("ew", "sum"):   # also "sum+ew" (a sum reading its elementwise producer), "ew+2" (two outputs)
        return "BN+ReLU backward" if any(n.grad_of is not None for n in nodes) else "BN+ReLU forward"
    return "other"


def conv_path(step_) -> str | None:
    """The path (graphc/backend/kernels/conv's *_PATHS) a conv kernel takes, or None."""
    node = step_.covers[0]
    kind = {"conv2d": "forward", "conv2d_input_grad": "input_grad", "conv2d_weight_grad": "weight_grad"}.get(node.op)
    if kind is None:
        return None
    a = node.attrs
    x_shape, w_shape = {"forward": (node.inputs[0].shape, node.inputs[1].shape),
                        "input_grad": (a.get("x_shape"), node.inputs[1].shape),
                        "weight_grad": (node.inputs[0].shape, a.get("w_shape"))}[kind]
    return chosen_paths(x_shape, w_shape, a["stride"], a["padding"])[kind]


def breakdown(step, report) -> dict:
    """{class: (seconds, flops)} of a profile `report` of compiled training step `step`."""
    graph = step.graph
    forward_ids = {n.id for n in graph.ancestors(list(step.recipe.outputs))}
    inplace = step.recipe.assemble_args["inplace"]           # write node id -> param/state name
    stat_writes = [n for n in graph.nodes if inplace.get(n.id) in graph.buffers]
    stat_ids = {n.id for n in graph.ancestors(stat_writes)} - forward_ids if stat_writes else set()
    by_node = {s.node.id: s for s in step.steps}
    classes = defaultdict(lambda: [0.0, 0])
    for k in report.kernels:
        entry = classes[kernel_class(by_node[k.node_id], forward_ids, stat_ids)]
        entry[0] += k.seconds
        entry[1] += k.flops
    return {c: tuple(classes[c]) for c in CLASS_ORDER if c in classes}


def best_peak(threads: int, rounds: int = 3) -> float:
    worker = PeakWorker(threads)
    try:
        return worker.gflops(min(worker.median_time(10, 1.0) for _ in range(rounds)))
    finally:
        worker.close()


def print_breakdown(step, report, peak: float) -> None:
    total = report.native_seconds
    classes = breakdown(step, report)
    print(f"{'class':<18} {'µs':>10} {'%':>6} {'GFLOP/s':>8} {'%peak':>6}")
    for name, (seconds, flops) in classes.items():
        rate = ""
        if name in CONV_CLASSES.values() and flops and seconds:
            rate = f"{flops / seconds / 1e9:8.1f} {flops / seconds / 1e9 / peak:6.1%}"
        print(f"{name:<18} {seconds * 1e6:10.1f} {seconds / total:6.1%} {rate}")
    conv = [classes[c] for c in CONV_CLASSES.values() if c in classes]
    if conv:
        seconds, flops = sum(c[0] for c in conv), sum(c[1] for c in conv)
        print(f"{'all convolutions':<18} {seconds * 1e6:10.1f} {seconds / total:6.1%} "
              f"{flops / seconds / 1e9:8.1f} {flops / seconds / 1e9 / peak:6.1%}")
        by_node = {s.node.id: s for s in step.steps}
        paths = [conv_path(by_node[k.node_id]) for k in report.kernels]
        winograd = [k for k, path in zip(report.kernels, paths) if path and path.startswith("winograd")]
        if winograd:
            share = sum(k.seconds for k in winograd) / seconds
            print(f"  Winograd: {len(winograd)} of {sum(p is not None for p in paths)} conv kernels, {share:.0%} of "
                  f"their time; GFLOP/s count the direct convolution's FLOPs: 2.25x F(2,3)'s, 4x F(4,3)'s")
    bn = [classes[c] for c in ("BN+ReLU forward", "BN+ReLU backward", "BN running stats") if c in classes]
    if bn:
        seconds = sum(c[0] for c in bn)
        print(f"{'BN+ReLU, all':<18} {seconds * 1e6:10.1f} {seconds / total:6.1%}")
    print(f"native total {total * 1e6:.1f} µs; whole call {report.seconds_per_call * 1e6:.1f} µs; "
          f"GEMM peak {peak:.1f} GFLOP/s at {report.threads} thread(s)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", choices=list(WORKLOADS))
    parser.add_argument("--batch", type=int, default=None, help="default: the workload's first (bench_step.py)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default=None,
                        help="default: the workload's in bench_step.py (SGD; Adam for the ResNets)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also the time by class of kernel, and the convolutions' fraction of the GEMM peak")
    parser.add_argument("--quiet", action="store_true", help="without the table of every kernel")
    args = parser.parse_args()
    batch = args.batch or batches_of(args.workload, None)[0]
    optimizer = args.optimizer or WORKLOAD_OPTIMIZER.get(args.workload, "sgd")
    for threads in args.threads:
        peak_before = best_peak(threads) if args.breakdown else None
        gc.set_num_threads(threads)
        model = WORKLOADS[args.workload](batch)
        params = gc.init_params(model.graph, seed=0)
        step = gc.compile_training_step(model.loss, params, graphc_optimizer(optimizer))
        feeds = models.random_batch(model, np.random.default_rng(0))
        report = step.profile(repeats=args.repeats, **feeds)
        print(f"{args.workload} B={batch}, {optimizer}, {threads} thread(s)")
        if not args.quiet:
            print(report)
        if args.breakdown:
            print_breakdown(step, report, max(peak_before, best_peak(threads)))
        print()


if __name__ == "__main__":
    main()
