"""Where a cold compile's time goes: one workload's training step compiled in this fresh
interpreter with an empty cache, its stages on a timeline, the garbage collections during it,
and (with --llvm) LLVM's passes on its modules, compiled again one after the other.

    python bench/compile_stages.py resnet20
    python bench/compile_stages.py lenet5 --batch 64 --optimizer sgd --llvm

The stages are timed by wrapping the compiler's functions in place (this script only): the
training graph, the graph passes, IR generation (and printing; each module compiles in the
background from when it is handed to LLVM) and the wait for the last modules' machine code.
Before the training graph comes setup (thread costs, the cache key); between the graph passes
and IR generation, lowering for the thread count.
"""
import argparse
import collections
import gc as cyclic_gc
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ["GRAPHC_CACHE_DIR"] = tempfile.mkdtemp(prefix="graphc-compile-stages-")
from bench_step import WORKLOADS, graphc_optimizer  # noqa: E402

import graphc as gc  # noqa: E402
import graphc.backend.compiler as compiler  # noqa: E402
import graphc.transforms  # noqa: E402
from graphc.backend.llvm import parallel  # noqa: E402

STAGES = [(compiler, "_training_graph", "training graph"), (graphc.transforms, "optimize", "graph passes"),
          (compiler, "assemble", "IR generation"), (parallel.ObjectCompiler, "objects", "waiting for LLVM")]


class Timeline:
    def __init__(self):
        self.start = time.perf_counter()
        self.events = []                 # (seconds, text)
        self.collections = collections.Counter()
        self.collection_seconds = collections.Counter()
        self.module_texts = []

    def mark(self, text: str) -> None:
        self.events.append((time.perf_counter() - self.start, text))

    def wrap(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            self.mark(f"{label} begins")
            try:
                return original(*args, **kwargs)
            finally:
                self.mark(f"{label} ends")
        setattr(owner, name, timed)

    def watch_modules(self) -> None:
        submit = parallel.ObjectCompiler.submit

        def submitted(compiler_, text, **kwargs):
            self.module_texts.append(text)
            self.mark(f"module {len(self.module_texts)} handed to LLVM ({len(text) // 1000} KB of IR)")
            return submit(compiler_, text, **kwargs)
        parallel.ObjectCompiler.submit = submitted

    def watch_collections(self) -> None:
        began = [0.0]

        def callback(phase, info):
            if phase == "start":
                began[0] = time.perf_counter()
            else:
                self.collections[info["generation"]] += 1
                self.collection_seconds[info["generation"]] += time.perf_counter() - began[0]
        cyclic_gc.callbacks.append(callback)


def llvm_passes(texts: list[str], top: int) -> str:
    """LLVM's time by pass over `texts`, compiled one after the other in this process."""
    import llvmlite.binding as llvm

    from graphc.backend.llvm.parallel import compile_module
    llvm.set_time_passes(True)
    start = time.process_time()
    for text in texts:
        compile_module(text, isolated=True)
    seconds = time.process_time() - start
    report = llvm.report_and_reset_timings()
    llvm.set_time_passes(False)
    by_pass = collections.Counter()
    row = re.compile(r"\s+(?:[\d.]+ \(.*?\)\s+){2}([\d.]+) \(.*?\)\s+[\d.]+ \(.*?\)\s+(.*)")
    for line in report.splitlines():
        match = row.match(line)
        if match and match.group(2).strip() != "Total":
            by_pass[re.sub(r" #\d+$", "", match.group(2).strip())] += float(match.group(1))
    lines = [f"LLVM, {len(texts)} modules one after the other: {seconds:.3f} s CPU; by pass (user + system s):"]
    lines += [f"  {value:7.3f}  {name}" for name, value in by_pass.most_common(top)]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", choices=sorted(WORKLOADS))
    parser.add_argument("--batch", type=int, help="default: 64, and 128 for resnet20")
    parser.add_argument("--optimizer", choices=["sgd", "adam"], help="default: adam for the ResNets, else sgd")
    parser.add_argument("--llvm", action="store_true", help="also LLVM's time by pass, the modules compiled again")
    args = parser.parse_args()
    batch = args.batch or (128 if args.workload == "resnet20" else 64)
    optimizer = args.optimizer or ("adam" if args.workload.startswith("resnet") else "sgd")
    model = WORKLOADS[args.workload](batch)
    params = gc.init_params(model.graph, seed=0)

    timeline = Timeline()
    for owner, name, label in STAGES:
        timeline.wrap(owner, name, label)
    timeline.watch_modules()
    timeline.watch_collections()
    timeline.start = time.perf_counter()
    gc.compile_training_step(model.loss, params, graphc_optimizer(optimizer))
    timeline.mark("compiled")

    print(f"{args.workload} B={batch} {optimizer}: cold compile, seconds from its start")
    for seconds, text in timeline.events:
        print(f"  {seconds:7.3f}  {text}")
    print("garbage collections during it: " + ", ".join(
        f"generation {g}: {timeline.collections[g]} in {timeline.collection_seconds[g]:.3f} s" for g in range(3)))
    if args.llvm:
        print(llvm_passes(timeline.module_texts, top=12))


if __name__ == "__main__":
    main()
