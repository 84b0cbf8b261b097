"""Data-parallel training steps on MPI: 2 ranks × 1 thread against 1 rank × 2 threads and 1 rank ×
1 thread, the all-reduce's exposed share of a step, the choice between calling MPI from the native
step and from Python between native calls, the all-reduce on loopback, and a scaling model.

    python bench/bench_distributed.py                        # LeNet-5 and the MLP, batch 64 per rank: everything
    python bench/bench_distributed.py --models lenet5 --repeats 5
    python bench/bench_distributed.py --loopback             # the all-reduce's latency and bandwidth alone
    python bench/bench_distributed.py --scaling              # the model of bench/README.md, from a profile
    python bench/bench_distributed.py --sweep 16384 65536 262144 1099511627776   # the step's own profile, MPI bound

The script starts its own workers (`mpiexec -n 2 python -m mpi4py bench/bench_distributed.py
--worker ...`, and plain processes for one rank), so run it with plain `python`. In the 2-rank
job every variant runs on both ranks in the same interleaved rounds (a barrier before each
block of steps), rank 0 reports; each rank has one thread (GRAPHC_NUM_THREADS=1):

- `shared`: compile_training_step(comm=), the default on one node (allreduce="auto"): each
  bucket written into memory the ranks share, an MPI_Ibarrier started by the step's own
  kernels as soon as the backward has computed it, and every rank summing all the ranks'
  buckets in its update.
- `mpi overlapped`: allreduce="mpi": buckets summed by MPI_Iallreduce, started by the step's
  own kernels as soon as the backward has computed them, driven on by MPI_Test between later
  kernels.
- `mpi one bucket`: the same with one bucket (bucket_bytes huge): the all-reduce starts after
  the whole backward; native, but nothing overlaps.
- `python`: the step split at the all-reduce: a compiled function of the loss and gradients,
  comm.Allreduce of them from Python, then the SGD update in numpy.
- `local`: the step without comm=, on both ranks at once: the same load on the machine, no
  communication. Exposed share of a variant = (its time - local) / its time.

One rank: `1x1` (GRAPHC_NUM_THREADS=1) at batch 64, `1x2` (2 threads) at batch 128, the
2-rank global batch, and at batch 64. Throughput = examples per second of the global batch.
See bench/README.md and bench/NOTES.md ("2026-12-07: data-parallel training on MPI").
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import graphc as gc  # noqa: E402
from graphc.tools import models  # noqa: E402

WORKLOADS = {"lenet5": lambda b: models.lenet5(b), "mlp": lambda b: models.mlp(b)}
LR = 0.01
HUGE_BUCKET = 1 << 40


def timed(fn, feeds, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        fn(**feeds)
        times.append(time.perf_counter() - started)
    return times


# ---- workers -----------------------------------------------------------------------------------

def single_worker(args) -> dict:
    """One process, no MPI: the plain step's median seconds."""
    model = WORKLOADS[args.model](args.batch)
    params = gc.init_params(model.graph, seed=0)
    step = gc.compile_training_step(model.loss, params, gc.SGD(lr=LR))
    feeds = models.random_batch(model, np.random.default_rng(0))
    timed(step, feeds, 20)
    rounds = [float(np.median(timed(step, feeds, args.steps))) for _ in range(args.rounds)]
    return {"seconds": float(np.median(rounds)), "best": min(rounds), "threads": step.num_threads}


class PythonBetween:
    """The step split where the all-reduce goes: a compiled function of the loss and gradients,
    comm.Allreduce of them (one buffer), then SGD in numpy, in place."""

    def __init__(self, model, params, comm):
        from mpi4py import MPI
        self.comm, self.in_place, self.params = comm, MPI.IN_PLACE, params
        names = [name for name in params if name in model.graph.params]
        grads = gc.grad(model.loss, [model.graph.params[name] for name in names])
        self.fn = gc.compile([model.loss, *grads], params)
        self.views, offset = [], 1
        self.flat = np.empty(1 + sum(params[name].size for name in names), np.float32)
        for name in names:
            self.views.append((params[name], self.flat[offset:offset + params[name].size].reshape(params[name].shape)))
            offset += params[name].size
        self.phases = {"backward": [], "allreduce": [], "update": []}

    def __call__(self, **feeds):
        t0 = time.perf_counter()
        loss, *grads = self.fn(**feeds)
        self.flat[0] = loss
        for (_, view), grad in zip(self.views, grads):
            view[...] = grad
        t1 = time.perf_counter()
        self.comm.Allreduce(self.in_place, self.flat)
        t2 = time.perf_counter()
        scale = LR / self.comm.Get_size()
        for param, view in self.views:
            param -= scale * view
        t3 = time.perf_counter()
        for phase, seconds in zip(self.phases, (t1 - t0, t2 - t1, t3 - t2)):
            self.phases[phase].append(seconds)
        return float(self.flat[0]) / self.comm.Get_size()


def ranks_worker(args) -> dict | None:
    """Under mpiexec: every variant, interleaved; rank 0 returns the medians."""
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    model = WORKLOADS[args.model](args.batch)
    start = gc.init_params(model.graph, seed=0)

    def fresh():
        return {name: value.copy() for name, value in start.items()}

    variants = {
        "shared": gc.compile_training_step(model.loss, fresh(), gc.SGD(lr=LR), comm=comm,
                                           bucket_bytes=args.bucket_bytes),
        "mpi overlapped": gc.compile_training_step(model.loss, fresh(), gc.SGD(lr=LR), comm=comm,
                                                   bucket_bytes=args.bucket_bytes, allreduce="mpi"),
        "mpi one bucket": gc.compile_training_step(model.loss, fresh(), gc.SGD(lr=LR), comm=comm,
                                                   bucket_bytes=HUGE_BUCKET, allreduce="mpi"),
        "python": PythonBetween(WORKLOADS[args.model](args.batch), fresh(), comm),
        "local": gc.compile_training_step(model.loss, fresh(), gc.SGD(lr=LR)),
    }
    feeds = models.random_batch(model, np.random.default_rng(comm.Get_rank()))
    for step in variants.values():
        timed(step, feeds, 20)
    rounds = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, step in variants.items():
            comm.Barrier()
            rounds[name].append(float(np.median(timed(step, feeds, args.steps))))
    kernels = {variant: bound_profile(variants[variant], comm, feeds, args.rounds * args.steps)
               for variant in ("shared", "mpi overlapped")}
    if comm.Get_rank() != 0:
        return None
    seconds = {name: float(np.median(values)) for name, values in rounds.items()}
    best = {name: min(values) for name, values in rounds.items()}
    python = variants["python"]
    return {"seconds": seconds, "best": best, "kernels": kernels,
            "python_phases": {phase: float(np.median(times)) for phase, times in python.phases.items()},
            "buckets": variants["shared"].describe().count("allreduce_start"),
            "progress_points": variants["shared"].describe().count("allreduce_progress")}


def bound_profile(step, comm, feeds, calls: int) -> dict:
    """Median seconds per call, by kind of work, of `step`'s profiling twin with its MPI slot
    bound (step.profile runs the twin without a communicator): waits (blocked until a bucket's
    sum is complete), MPI's work inside the starts and progress points, the collective kernels'
    copies and averaging, and the other kernels. Every rank must call it (it runs collectives).
    The twin's buckets are the step's own shared memory (it only reads its own otherwise)."""
    import ctypes

    import graphc_runtime as rt
    from graphc.backend.assemble import PROFILE_SLOT
    from graphc.backend.compiler import object_code
    from graphc.backend.emit.entry import ENTRY_NAME, TICKS_NAME
    spec = step.recipe.assemble(profile=True)
    library = rt.NativeLibrary(object_code(spec.llvm_ir))
    params = {name: array.copy() for name, array in step.params.items()}
    from graphc.distributed.buckets import BUCKET_STATE
    shared = {name: array for name, array in step._program.state.items() if name.startswith(BUCKET_STATE)}
    twin = rt.Program(library, ENTRY_NAME, spec.slots, params, max_threads=spec.max_threads, state_memory=shared)
    (slot,) = [name for name in twin.state if name.startswith("mpi:comm")]
    twin.state[slot].view(np.int64)[:] = step._call_values._fixed[slot][1]
    ticks = ctypes.CFUNCTYPE(ctypes.c_int64)(library.address(TICKS_NAME))
    t0, c0 = time.perf_counter(), ticks()
    time.sleep(0.05)
    seconds_per_tick = (time.perf_counter() - t0) / (ticks() - c0)
    counters = twin.state[PROFILE_SLOT]
    for _ in range(20):
        twin.call_scalar(feeds)
    samples = []
    for _ in range(calls):
        counters[:] = 0
        twin.call_scalar(feeds)
        samples.append(counters * seconds_per_tick)
    median = np.median(np.array(samples), axis=0)
    kinds = {"waits": 0.0, "mpi in starts and progress": 0.0, "copies and averaging": 0.0, "other kernels": 0.0}
    phases_of = {index: spec.phase_steps.count(index) for index in set(spec.phase_steps)}
    position = {}
    for phase, index in enumerate(spec.phase_steps):
        label, nth = spec.steps[index].label, position.setdefault(index, phase) != phase
        if label.startswith("allreduce_done"):           # wait, then average (and the fused update)
            kind = "copies and averaging" if nth else "waits"
        elif label == "allreduce_finish":                 # the shared step's last barrier
            kind = "waits"
        elif label == "allreduce_start" and phases_of[index] == 2 and not nth:   # copy into the bucket
            kind = "copies and averaging"
        elif label in ("allreduce_start", "allreduce_progress"):
            kind = "mpi in starts and progress"
        else:
            kind = "other kernels"
        kinds[kind] += median[phase]
    return {kind: float(value) for kind, value in kinds.items()}


def sweep_worker(args) -> dict | None:
    """Under mpiexec: the bound profile of the overlapped step for each of args.sweep's bucket sizes."""
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    model = WORKLOADS[args.model](args.batch)
    start = gc.init_params(model.graph, seed=0)
    feeds = models.random_batch(model, np.random.default_rng(comm.Get_rank()))
    rows = []
    for bucket_bytes in args.sweep:
        step = gc.compile_training_step(model.loss, {k: v.copy() for k, v in start.items()}, gc.SGD(lr=LR),
                                        comm=comm, bucket_bytes=bucket_bytes)
        kernels = bound_profile(step, comm, feeds, args.rounds * args.steps)
        listing = step.describe()
        rows.append({"bucket_bytes": bucket_bytes, "buckets": listing.count("allreduce_start"),
                     "progress_points": listing.count("allreduce_progress"), "kernels": kernels})
    return {"rows": rows} if comm.Get_rank() == 0 else None


def loopback_worker(args) -> dict | None:
    """Median seconds of a blocking MPI_Allreduce (SUM, float32) by message size, 2 ranks."""
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    result = {}
    for nbytes in [4, 64, 1024, 16384, 65536, 262144, 1 << 20, 4 << 20]:
        buffer = np.ones(nbytes // 4, np.float32)
        for _ in range(10):
            comm.Allreduce(MPI.IN_PLACE, buffer)
        samples = []
        for _ in range(args.rounds):
            comm.Barrier()
            repeats = 200 if nbytes <= 65536 else 20
            started = time.perf_counter()
            for _ in range(repeats):
                comm.Allreduce(MPI.IN_PLACE, buffer)
            samples.append((time.perf_counter() - started) / repeats)
        result[nbytes] = float(np.median(samples))
    return result if comm.Get_rank() == 0 else None


def schedule_worker(args) -> dict:
    """One process: the profile of the 1-rank data-parallel step (its twin runs without MPI),
    as the scaling model needs it: each kernel's label, node size and time, in schedule order."""
    from mpi4py import MPI
    model = WORKLOADS[args.model](args.batch)
    params = gc.init_params(model.graph, seed=0)
    step = gc.compile_training_step(model.loss, params, gc.SGD(lr=LR), comm=MPI.COMM_WORLD,
                                    bucket_bytes=args.bucket_bytes)
    feeds = models.random_batch(model, np.random.default_rng(0))
    reports = [step.profile(**feeds, repeats=args.steps) for _ in range(args.rounds)]
    kernels = []
    for i, (kernel, spec_step) in enumerate(zip(reports[0].kernels, step.steps)):
        seconds = float(np.median([report.kernels[i].seconds for report in reports]))
        kernels.append({"label": kernel.label, "seconds": seconds,
                        "bytes": spec_step.node.size * 4 if kernel.label == "allreduce_start" else 0})
    return {"kernels": kernels}


# ---- the driver --------------------------------------------------------------------------------

def _mpiexec() -> str:
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    found = beside if os.path.exists(beside) else shutil.which("mpiexec")
    if found is None:
        sys.exit("bench_distributed: no mpiexec (pip install '.[mpi]')")
    return found


def _run(worker: str, args, ranks: int = 0, threads: int = 1, **options) -> dict:
    command = [sys.executable, *(["-m", "mpi4py"] if ranks else []), os.path.abspath(__file__), "--worker", worker,
               "--steps", str(args.steps), "--rounds", str(args.rounds), "--bucket-bytes", str(args.bucket_bytes)]
    for name, value in options.items():
        command += [f"--{name}", *str(value).split()]
    if ranks:
        command = [_mpiexec(), "-n", str(ranks), *command]
    env = {**os.environ, "GRAPHC_NUM_THREADS": str(threads), "MPIEXEC_TIMEOUT": "1200"}
    job = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1500)
    if job.returncode != 0:
        sys.exit(f"bench_distributed: {' '.join(command)} failed:\n{job.stderr[-3000:]}")
    lines = [line for line in job.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT "):])


def compare(args) -> None:
    """Rows of median and best (the least busy round's) ms per step; exposed shares and the
    2-rank / 2-thread ratio from both."""
    rows = []
    for name in args.models:
        samples = {"1x1": [], "1x2 (B=128)": [], "1x2 (B=64)": []}
        ranks = []
        for _ in range(args.repeats):    # the configurations alternate, so that a busy spell hits them all
            samples["1x1"].append(_run("single", args, model=name, batch=args.batch))
            samples["1x2 (B=128)"].append(_run("single", args, threads=2, model=name, batch=2 * args.batch))
            samples["1x2 (B=64)"].append(_run("single", args, threads=2, model=name, batch=args.batch))
            ranks.append(_run("ranks", args, ranks=2, model=name, batch=args.batch))
        single = {key: (float(np.median([r["seconds"] for r in runs])), min(r["best"] for r in runs))
                  for key, runs in samples.items()}
        two = {variant: (float(np.median([r["seconds"][variant] for r in ranks])),
                         min(r["best"][variant] for r in ranks)) for variant in ranks[0]["seconds"]}
        phases = {phase: float(np.median([r["python_phases"][phase] for r in ranks])) for phase in
                  ranks[0]["python_phases"]}
        kernels = {variant: {kind: float(np.median([r["kernels"][variant][kind] for r in ranks]))
                             for kind in ranks[0]["kernels"][variant]} for variant in ranks[0]["kernels"]}
        rows.append((name, single, two, phases, kernels, ranks[0]["buckets"], ranks[0]["progress_points"]))
    batch = args.batch
    print(f"per-rank batch {batch}; {args.repeats} runs x {args.rounds} rounds x {args.steps} steps: median and best "
          f"round; load average {os.getloadavg()[0]:.2f}")
    for name, single, two, phases, kernels, buckets, points in rows:
        print(f"\n{name}: {buckets} buckets, {points} progress points")
        print(f"  {'configuration':<34} {'ms/step':>8} {'best':>7} {'examples/s':>11} {'best':>8} {'exposed':>8} "
              f"{'best':>6}")
        configurations = [("1 rank x 1 thread, B=64", single["1x1"], batch),
                          ("1 rank x 2 threads, B=128", single["1x2 (B=128)"], 2 * batch),
                          ("1 rank x 2 threads, B=64", single["1x2 (B=64)"], batch)]
        configurations += [(f"2 ranks x 1 thread: {variant}", seconds, 2 * batch) for variant, seconds in two.items()]
        for label, (median, best), examples in configurations:
            line = f"  {label:<34} {median * 1e3:8.3f} {best * 1e3:7.3f} {examples / median:11.0f} {examples / best:8.0f}"
            if label.startswith("2 ranks") and not label.endswith("local"):
                line += f" {(median - two['local'][0]) / median:8.1%} {(best - two['local'][1]) / best:6.1%}"
            print(line)
        print("  python variant per step: " + ", ".join(f"{phase} {s * 1e3:.3f} ms" for phase, s in phases.items()))
        for variant, kinds in kernels.items():
            total = sum(kinds.values())
            print(f"  {variant}, profiled with MPI ({total * 1e3:.3f} ms): " + ", ".join(
                f"{kind} {value * 1e3:.3f} ms ({value / total:.1%})" for kind, value in kinds.items()))
        for variant in ("shared", "mpi overlapped"):
            for reading, k in [("median", 0), ("best", 1)]:
                print(f"  2 ranks ({variant}) / 1 rank x 2 threads, throughput ({reading}): "
                      f"{single['1x2 (B=128)'][k] / two[variant][k]:.2f}x at the same global batch (128), "
                      f"{2 * single['1x2 (B=64)'][k] / two[variant][k]:.2f}x at the same batch per process (64)")


def sweep(args) -> None:
    for name in args.models:
        rows = _run("sweep", args, ranks=2, model=name, batch=args.batch, sweep=" ".join(map(str, args.sweep)))["rows"]
        kinds = list(rows[0]["kernels"])
        print(f"\n{name}: µs per step of the overlapped step profiled with MPI bound, by bucket_bytes")
        print(f"  {'bucket_bytes':>13} {'buckets':>7} {'points':>6} " + " ".join(f"{kind:>26}" for kind in kinds)
              + f" {'total':>8}")
        for row in rows:
            values = [row["kernels"][kind] * 1e6 for kind in kinds]
            print(f"  {row['bucket_bytes']:>13} {row['buckets']:>7} {row['progress_points']:>6} "
                  + " ".join(f"{value:26.1f}" for value in values) + f" {sum(values):8.1f}")


def loopback(args) -> dict:
    result = {int(k): v for k, v in _run("loopback", args, ranks=2).items()}
    print(f"{'bytes':>9} {'µs':>9} {'GB/s':>7}   (blocking MPI_Allreduce, 2 ranks, loopback)")
    for nbytes, seconds in result.items():
        print(f"{nbytes:>9} {seconds * 1e6:9.1f} {nbytes / seconds / 1e9:7.2f}")
    return result


# The network of the scaling model (bench/README.md): 25 Gb/s, a per-message latency typical of
# RDMA over converged Ethernet, and a CPU summing at a few GB/s.
NETWORK_BYTES_PER_SECOND = 25e9 / 8
NETWORK_LATENCY = 5e-6
SUM_BYTES_PER_SECOND = 5e9


def allreduce_seconds(nbytes: float, ranks: int, algorithm: str) -> float:
    """The all-reduce of nbytes among `ranks` by the alpha-beta-gamma model; "best" is the
    faster of the two for this size, as MPI libraries choose by message size."""
    if ranks == 1:
        return 0.0
    if algorithm == "best":
        return min(allreduce_seconds(nbytes, ranks, "ring"), allreduce_seconds(nbytes, ranks, "tree"))
    alpha, beta, gamma = NETWORK_LATENCY, 1 / NETWORK_BYTES_PER_SECOND, 1 / SUM_BYTES_PER_SECOND
    if algorithm == "ring":                          # reduce-scatter then all-gather around a ring
        return 2 * (ranks - 1) * alpha + (ranks - 1) / ranks * nbytes * (2 * beta + gamma)
    steps = math.ceil(math.log2(ranks))              # recursive doubling: the whole message each step
    return steps * (alpha + nbytes * (beta + gamma))


def scaling(args) -> None:
    for name in args.models:
        kernels = _run("schedule", args, model=name, batch=args.batch)["kernels"]
        compute = sum(k["seconds"] for k in kernels)
        clock, ready, backward_end = 0.0, [], None
        for kernel in kernels:
            clock += kernel["seconds"]
            if kernel["label"] == "allreduce_start":
                ready.append((clock, kernel["bytes"]))
            elif kernel["label"].startswith("allreduce_done") and backward_end is None:
                backward_end = clock - kernel["seconds"]
        total = sum(nbytes for _, nbytes in ready)
        print(f"\n{name}: step {compute * 1e3:.3f} ms on one thread, batch {args.batch}; {len(ready)} buckets, "
              f"{total / 1e6:.2f} MB; first bucket ready at {ready[0][0] * 1e3:.3f} ms, backward ends at "
              f"{backward_end * 1e3:.3f} ms")
        print(f"  {'ranks':>5} {'algorithm':>9} {'all-reduce ms':>13} {'exposed ms':>10} {'efficiency':>10} "
              f"{'no overlap':>10} {'B for 90%':>9}")
        for ranks in (8, 64, 512):
            for algorithm in ("ring", "tree", "best"):
                finished = 0.0
                for at, nbytes in ready:     # one bucket at a time, each once it is ready
                    finished = max(finished, at) + allreduce_seconds(nbytes, ranks, algorithm)
                exposed = max(0.0, finished - backward_end)
                whole = allreduce_seconds(total, ranks, algorithm)
                # the per-rank batch whose compute hides the exposed part 9 to 1 (the exposed
                # part shrinks as the backward grows: an upper bound)
                batch_90 = args.batch * max(1.0, 9 * exposed / compute)
                print(f"  {ranks:>5} {algorithm:>9} {whole * 1e3:13.3f} {exposed * 1e3:10.3f} "
                      f"{compute / (compute + exposed):10.1%} {compute / (compute + whole):10.1%} {batch_90:9.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--batch", type=int, default=64, help="examples per rank (default 64)")
    parser.add_argument("--steps", type=int, default=50, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved blocks per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each configuration, alternating")
    parser.add_argument("--bucket-bytes", type=int, default=None)
    parser.add_argument("--loopback", action="store_true", help="only the all-reduce on loopback")
    parser.add_argument("--scaling", action="store_true", help="only the scaling model")
    parser.add_argument("--sweep", type=int, nargs="+", metavar="BYTES",
                        help="only the overlapped step's profile with MPI bound, for each bucket_bytes")
    parser.add_argument("--worker", choices=["single", "ranks", "loopback", "schedule", "sweep"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bucket_bytes is None:
        from graphc.distributed.buckets import DEFAULT_BUCKET_BYTES
        args.bucket_bytes = DEFAULT_BUCKET_BYTES
    if args.worker:
        worker = {"single": single_worker, "ranks": ranks_worker, "loopback": loopback_worker,
                  "schedule": schedule_worker, "sweep": sweep_worker}[args.worker]
        result = worker(args)
        if result is not None:
            print("RESULT " + json.dumps(result), flush=True)
        return
    if args.sweep:
        sweep(args)
    elif args.loopback:
        loopback(args)
    elif args.scaling:
        scaling(args)
    else:
        compare(args)


if __name__ == "__main__":
    main()
