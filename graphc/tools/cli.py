"""The `graphc` command.

    graphc demo                 train the digits CNN with the compiled step, compare every classic
                                classifier, write pictures of training and of the gradient graph
    graphc show SCRIPT.py       print and draw the graphs a script builds (--grad adds the backward graph)
    graphc report SCRIPT.py     an HTML report of each graph a script builds: graphs, kernels, code, memory
    graphc profile WORKLOAD     time each kernel of a benchmark workload's compiled training step
    graphc export-c A.gcx OUT/  a shared library and a C header for saved programs (fn.save)
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="graphc", description="graphc: a compiler for neural-network training.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train the digits CNN and compare every classic classifier",
                               description="Train a CNN on scikit-learn's embedded 8x8 handwritten digits with "
                                           "graphc's compiled training step, then train and evaluate every classic "
                                           "classifier of the course and print a table; write curves, filters "
                                           "and the gradient graph to the output folder.")
    demo.add_argument("--out", default="graphc-out", help="folder for the pictures (default: %(default)s)")
    demo.add_argument("--epochs", type=int, default=30, help="CNN training epochs (default: %(default)s)")
    demo.add_argument("--batch", type=int, default=32, help="minibatch size (default: %(default)s)")
    demo.add_argument("--lr", type=float, default=0.05, help="CNN learning rate (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the split, the init and the sampling")
    demo.add_argument("--threads", type=int, default=None, help="native threads (default: all cores)")
    demo.add_argument("--quick", action="store_true", help="a few epochs everywhere: a smoke test, not a result")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")

    show = commands.add_parser("show", help="print and draw the graphs a script builds",
                               description="Run SCRIPT.py, then print every graphc graph it built (one line per "
                                           "node, backward nodes marked) and the optimized graph with the kernel "
                                           "(fusion group) of each node, and draw both as SVG.")
    show.add_argument("script", help="a Python script that builds graphc graphs")
    show.add_argument("script_args", nargs="*", help="arguments passed to the script (after --)")
    show.add_argument("--grad", action="store_true", help="add the gradient graph of each graph's loss")
    show.add_argument("--out", default="graphc-out/graphs", help="folder for the drawings (default: %(default)s)")

    report = commands.add_parser("report", help="write an HTML report of each graph a script builds",
                                 description="Run SCRIPT.py, then compile each graphc graph it built (a training "
                                             "step of its loss, or a function of its outputs) and write one "
                                             "self-contained HTML file per graph: the forward, backward and "
                                             "optimized graphs, each kernel with its IR and assembly, the passes "
                                             "and the memory plan. Open it in any browser; nothing else is needed.")
    report.add_argument("script", help="a Python script that builds graphc graphs")
    report.add_argument("script_args", nargs="*", help="arguments passed to the script (after --)")
    report.add_argument("--out", default="graphc-out/reports", help="folder for the reports (default: %(default)s)")

    profile = commands.add_parser("profile", help="time each kernel of a workload's compiled training step",
                                  description="Compile a benchmark workload's training step and print the time, "
                                              "share and GFLOP/s of each kernel.")
    profile.add_argument("workload", choices=["logreg", "mlp", "lenet5", "convnet", "w5"])
    profile.add_argument("--batch", type=int, default=64)
    profile.add_argument("--threads", type=int, default=None)

    commands.add_parser("calibrate", help="measure this machine's threading costs again",
                        description="Measure the fork/join, barrier and arithmetic costs that decide how many "
                                    "threads each compiled program uses, replace the cached ones and print "
                                    "them. Run it on an idle machine: costs measured under load keep programs "
                                    "on fewer threads.")

    export = commands.add_parser("export-c", help="a shared library and a C header for saved programs",
                                 description="Link artifacts saved with fn.save(path) (a training step and/or a "
                                             "compiled function) into OUTDIR/lib<name>.so with OUTDIR/<name>.h: "
                                             "<prefix>_step and <prefix>_predict, params in the caller's memory. "
                                             "Needs a C compiler (cc, or $CC).")
    export.add_argument("paths", nargs="+", metavar="ARTIFACT... OUTDIR", help="the artifacts, then the folder")
    export.add_argument("--name", default=None, help="the library's name (default: the first artifact's)")
    export.add_argument("--prefix", default="gc", help="prefix of the C functions (default: %(default)s)")
    export.add_argument("--cc", default=None, help="the C compiler (default: $CC, else cc)")

    args = parser.parse_args(argv)
    if getattr(args, "threads", None):
        from graphc_runtime import set_num_threads
        set_num_threads(args.threads)
    if args.command == "demo":
        from graphc.tools.demo import run_demo
        return run_demo(args)
    if args.command == "calibrate":
        return _calibrate()
    if args.command == "show":
        from graphc.tools.show import show as run_show
        return run_show(args.script, with_grad=args.grad, out_dir=args.out, script_args=args.script_args)
    if args.command == "report":
        from graphc.tools.report_script import report_script
        return report_script(args.script, out_dir=args.out, script_args=args.script_args)
    if args.command == "export-c":
        return _export_c(parser, args)
    return _profile(args)


def _export_c(parser, args) -> int:
    from graphc.tools.export_c import export_c
    if len(args.paths) < 2:
        parser.error("export-c needs at least one artifact and the output folder")
    *artifacts, out_dir = args.paths
    try:
        written = export_c(artifacts, out_dir, name=args.name, prefix=args.prefix, cc=args.cc)
    except ValueError as error:
        print(f"graphc export-c: {error}", file=sys.stderr)
        return 1
    for path in written.values():
        print(path)
    return 0


def _profile(args) -> int:
    import numpy as np

    from graphc import compile_training_step, init_params
    from graphc.core.optim import SGD
    from graphc.tools import models
    builders = {"logreg": lambda b: models.softmax_regression(b), "mlp": models.mlp, "lenet5": models.lenet5,
                "convnet": models.convnet, "w5": lambda b: models.logistic_regression(b, 64)}
    model = builders[args.workload](args.batch)
    params = init_params(model.graph, seed=0)
    step = compile_training_step(model.loss, params, SGD(lr=0.01))
    print(step.profile(**models.random_batch(model, np.random.default_rng(0))))
    return 0


if __name__ == "__main__":
    sys.exit(main())


def _calibrate() -> int:
    from graphc.backend.thread_costs import measure_again
    from graphc_runtime import get_num_threads
    threads = get_num_threads()
    if threads == 1:
        print("one thread: nothing to calibrate (GRAPHC_NUM_THREADS is 1 or this machine has one core)")
        return 0
    costs = measure_again(threads)
    print(f"a thread's multiply-adds: {1e-9 / costs.flop_s:.1f} GFLOP/s")
    for n in sorted(costs.fork_join_s):
        print(f"{n} threads: fork/join {costs.fork_join_s[n] * 1e6:.2f} µs, barrier {costs.barrier_s[n] * 1e6:.2f} µs, "
              f"efficiency {costs.efficiency[n]:.2f}")
    return 0
