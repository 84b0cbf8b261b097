"""Peak memory of a compiled training step against what it must hold: params + inputs + the
largest live set of its static memory plan (issue 5's bound: ≤ 1.25× that sum).

    python bench/memory.py                                   # every workload, B = 64 and 256, 1 thread
    python bench/memory.py --workloads lenet5 --batches 64 --threads 2

Each row is measured in a fresh interpreter (Linux only: it reads /proc/self/status):

 1. Build the model, compile its step once and drop it, and make one batch of data and drop it.
    That pays the one-time costs (imports, LLVM initialization, filling graphc's disk cache,
    numpy's random generator: ~100 KiB of interpreter heap the first time a batch is drawn)
    outside the measurement and gives the memory plan (CompiledFunction.memory), which the
    measured step shares.
 2. Baseline: garbage-collect, hand freed heap back to the OS (malloc_trim), reset the kernel's
    high-water mark of resident memory (VmHWM, by writing 5 to /proc/self/clear_refs) and read
    the resident size (VmRSS).
 3. Allocate params and inputs, compile the step again (a disk-cache hit, as in any rerun) and
    call it once, so that every arena page has been touched. "compile+run" = VmHWM - baseline.
 4. Reset VmHWM again and call the step 20 times. "run" = VmHWM - baseline: the step's peak
    footprint while training, including everything it keeps resident: params, inputs, the arena,
    per-call outputs, its machine code, the compiled function's Python objects, and page rounding.
 5. "traced": the same peak counted from numpy's own allocation records (tracemalloc, running since
    the baseline): numpy-owned bytes alive when the step loop starts (params, inputs, the arena)
    plus the largest growth of all traced memory during the loop (Python objects included, such
    as the floats the calls return). It leaves out machine code, Python objects the
    compile left behind and allocator slack, so it shows the data alone. Measured in a second
    fresh interpreter: tracemalloc keeps a record of every allocation it traces, in resident
    memory of its own (~30 KiB for the objects a small step's compile leaves), which would
    count against the step in steps 3 and 4.

bound = params + inputs + live; ratio = run / bound (the issue's criterion).
"""
from __future__ import annotations

import argparse
import ctypes
import gc as garbage
import json
import os
import re
import subprocess
import sys
import tracemalloc

sys.path.insert(0, os.path.dirname(__file__))

# numpy reports its data buffers to tracemalloc in this domain (NPY_TRACE_DOMAIN in numpy's C source).
NUMPY_TRACE_DOMAIN = 389047
STEPS = 20
LR = 0.01


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE).group(1))


def _settle_and_reset_peak() -> int:
    """Drop garbage, return free heap to the OS, reset VmHWM; the resident bytes now."""
    garbage.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return _status_kib("VmRSS") * 1024


def _numpy_traced_bytes() -> int:
    snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.DomainFilter(True, NUMPY_TRACE_DOMAIN)])
    return sum(stat.size for stat in snapshot.statistics("filename"))


def measure(name: str, batch: int, threads: int, traced: bool) -> dict:
    """The numbers of one row, measured in this process (see the module docstring): with
    `traced`, the traced bytes alone, otherwise all the others."""
    import numpy as np
    from bench_step import WORKLOADS

    import graphc as gc
    from graphc.tools import models

    gc.set_num_threads(threads)
    model = WORKLOADS[name](batch)
    plan = gc.compile_training_step(model.loss, gc.init_params(model.graph, seed=0), gc.SGD(lr=LR)).memory
    models.random_batch(model, np.random.default_rng(0))  # numpy's generator, first used here, stays out

    if traced:
        tracemalloc.start()
    baseline = _settle_and_reset_peak()
    params = gc.init_params(model.graph, seed=0)
    feeds = models.random_batch(model, np.random.default_rng(0))
    step = gc.compile_training_step(model.loss, params, gc.SGD(lr=LR))
    step(**feeds)
    compile_and_run = _status_kib("VmHWM") * 1024 - baseline

    _settle_and_reset_peak()
    if traced:
        held = _numpy_traced_bytes()
        tracemalloc.reset_peak()
        loop_start = tracemalloc.get_traced_memory()[0]
        for _ in range(STEPS):
            step(**feeds)
        return dict(traced=held + tracemalloc.get_traced_memory()[1] - loop_start)
    for _ in range(STEPS):
        step(**feeds)
    run = _status_kib("VmHWM") * 1024 - baseline
    return dict(params=sum(p.nbytes for p in params.values()), inputs=sum(f.nbytes for f in feeds.values()),
                live=plan.peak_live_bytes, arena=plan.arena_bytes, compile_and_run=compile_and_run, run=run)


def main():
    from bench_step import WORKLOADS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--batches", nargs="+", type=int, default=[64, 256])
    parser.add_argument("--threads", nargs="+", type=int, default=[1])
    parser.add_argument("--row", nargs=4, metavar=("WORKLOAD", "BATCH", "THREADS", "TRACED"),
                        help="measure one row in this process and print it as JSON (what each fresh interpreter runs)")
    args = parser.parse_args()
    if args.row:
        name, batch, threads, traced = args.row
        print(json.dumps(measure(name, int(batch), int(threads), traced == "traced")))
        return

    print("KiB; bound = params + inputs + live (the planner's largest live set); arena: the planner's arena size")
    print("run: peak RSS growth while stepping; compile+run: including the (disk-cached) compile; "
          "traced: numpy-owned bytes only")
    columns = ["params", "inputs", "live", "bound", "arena", "compile_and_run", "run", "traced"]
    print(f"{'workload':<9} {'B':>4} {'thr':>3} " + " ".join(f"{c.replace('_and_', '+'):>11}" for c in columns)
          + f" {'run/bound':>9} {'traced/bound':>12}")
    for name in args.workloads:
        for batch in [64] if name == "w5" else args.batches:  # W5 is defined at B = 64 only
            for threads in args.threads:
                row = {}
                for mode in ("untraced", "traced"):
                    out = subprocess.run([sys.executable, __file__, "--row", name, str(batch), str(threads), mode],
                                         capture_output=True, text=True, check=True)
                    row.update(json.loads(out.stdout.splitlines()[-1]))
                row["bound"] = row["params"] + row["inputs"] + row["live"]
                print(f"{name:<9} {batch:>4} {threads:>3} " + " ".join(f"{row[c] / 1024:>11.1f}" for c in columns)
                      + f" {row['run'] / row['bound']:>9.2f} {row['traced'] / row['bound']:>12.2f}", flush=True)


if __name__ == "__main__":
    main()
