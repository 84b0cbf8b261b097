"""How many threads a program should use on this host, from costs measured on this host.

Splitting a program over n threads divides its work but adds a fork/join per call and a
barrier after every kernel phase; on small steps those fixed costs exceed what splitting saves,
and how much they cost depends on the CPU, its cores and the OS. So they are measured here, once
per machine (cached beside the compiled code), never assumed:

- `fork_join_s[n]`: one team run of an entry that does nothing, beyond a direct call;
- `barrier_s[n]`: one barrier among n threads;
- `flop_s`: a single thread's seconds per FLOP of vector multiply-adds (what GEMMs and
  convolutions, which dominate the programs worth splitting, run at);
- `efficiency[n]`: how much of an n-fold speed-up the same work reaches on n threads, fixed
  costs aside (below 1 where two "cores" share one core's units, or the CPU slows when busy).

`choose_thread_count` predicts a program's time at each thread count from its FLOPs and kernel
phases and takes more threads only for a clear predicted gain (`MIN_SPEEDUP`): a wrong guess
towards one thread costs a little speed, one towards more threads can cost a lot.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import json
import threading
import time

import llvmlite.ir as ir
import numpy as np

import graphc_runtime as rt
from graphc_runtime.native_ir import library_from_ir

__all__ = ["ThreadCosts", "choose_thread_count", "measured_thread_costs", "measure_again", "MIN_SPEEDUP"]

# Predicted speed-up below which a program stays on one thread.
MIN_SPEEDUP = 1.2
# Barriers assumed per kernel: most kernels are one phase, GEMMs that pack B two.
BARRIERS_PER_KERNEL = 2
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ThreadCosts:
    """Measured costs (seconds); the dicts are keyed by thread count (2 and up)."""

    flop_s: float
    fork_join_s: dict[int, float]
    barrier_s: dict[int, float]
    efficiency: dict[int, float]

    def predicted_seconds(self, flops: int, kernels: int, threads: int) -> float:
        work = flops * self.flop_s
        if threads == 1:
            return work
        barriers = BARRIERS_PER_KERNEL * kernels
        return (work / (threads * self.efficiency[threads]) + self.fork_join_s[threads]
                + barriers * self.barrier_s[threads])

    def to_json(self) -> str:
        return json.dumps({"version": FORMAT_VERSION, **dataclasses.asdict(self)})

    @classmethod
    def from_json(cls, text: str) -> "ThreadCosts":
        data = json.loads(text)
        if data.pop("version", None) != FORMAT_VERSION:
            raise ValueError("another format version")
        by_count = {key: {int(n): float(v) for n, v in data[key].items()}
                    for key in ("fork_join_s", "barrier_s", "efficiency")}
        costs = cls(flop_s=float(data["flop_s"]), **by_count)
        if not (costs.flop_s > 0 and all(v > 0 for d in by_count.values() for v in d.values())):
            raise ValueError("costs must be positive")
        if len({frozenset(d) for d in by_count.values()}) != 1:
            raise ValueError("costs for different thread counts")
        return costs


def choose_thread_count(flops: int, kernels: int, requested: int, costs: ThreadCosts) -> int:
    """The thread count, 1..requested, predicted fastest for a program of `flops` FLOPs in
    `kernels` kernels; more than one only if predicted at least MIN_SPEEDUP times faster."""
    alone = costs.predicted_seconds(flops, kernels, 1)
    candidates = [n for n in range(2, requested + 1) if n in costs.fork_join_s]
    if not candidates:
        return 1
    best = min(candidates, key=lambda n: costs.predicted_seconds(flops, kernels, n))
    return best if alone >= MIN_SPEEDUP * costs.predicted_seconds(flops, kernels, best) else 1


# Reentrant: a finalizer run by a collection during the measurement may compile.
_lock = threading.RLock()


def measured_thread_costs(max_threads: int) -> ThreadCosts:
    """This host's costs up to `max_threads` threads: from the cache, else measured now."""
    with _lock:
        return _measured(max_threads)


def measure_again(max_threads: int) -> ThreadCosts:
    """Measure this host's costs now and replace the cached ones (`graphc calibrate`): for a
    calibration taken while the machine was busy, or after the hardware changed."""
    with _lock:
        costs = _measure(max_threads)
        rt.ObjectCache().put(_cache_key(max_threads), costs.to_json().encode("utf-8"))
        _measured.cache_clear()
        return costs


@functools.cache
def _measured(max_threads: int) -> ThreadCosts:
    cache = rt.ObjectCache()
    key = _cache_key(max_threads)
    stored = cache.get(key)
    if stored is not None:
        try:
            return ThreadCosts.from_json(stored.decode("utf-8"))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            pass  # measured again below
    costs = _measure(max_threads)
    cache.put(key, costs.to_json().encode("utf-8"))
    return costs


def _cache_key(max_threads: int) -> str:
    with open(__file__, "rb") as source:
        digest = hashlib.sha256(source.read()).hexdigest()
    host = rt.host.host_target()
    return rt.make_key("thread-costs", host.triple, host.cpu, host.features, str(max_threads),
                       str(rt.usable_cpu_count()), digest)


# ---------------------------------------------------------------- measuring

_REPEATS = 50       # calls per sample of the fixed costs (microseconds each)
_COMPUTE_REPEATS = 10  # calls per sample of the arithmetic (each about _COMPUTE_SECONDS long)
_SAMPLES = 7        # the fastest sample counts: the others met interference
_BARRIERS = 32


def _measure(max_threads: int) -> ThreadCosts:
    team = rt.default_team()
    entry = _calibration_entry()
    counts = range(2, max_threads + 1)
    direct = _fastest(lambda: entry.run_direct(0, 0))
    fork_join = {n: max(_fastest(lambda n=n: entry.run(team, 0, 0, n)) - direct, 1e-9) for n in counts}
    barrier = {n: max((_fastest(lambda n=n: entry.run(team, _BARRIERS, 0, n)) - direct - fork_join[n]) / _BARRIERS,
                      1e-9) for n in counts}
    flop_s, efficiency = _compute_rates(entry, team, counts, fork_join)
    return ThreadCosts(flop_s=flop_s, fork_join_s=fork_join, barrier_s=barrier, efficiency=efficiency)


def _fastest(call, repeats: int = _REPEATS) -> float:
    """Seconds per call: the fastest of several samples' averages."""
    call()
    samples = []
    for _ in range(_SAMPLES):
        start = time.perf_counter()
        for _ in range(repeats):
            call()
        samples.append((time.perf_counter() - start) / repeats)
    return min(samples)


# One thread's multiply-adds take about this long, split over the threads being measured.
_COMPUTE_SECONDS = 1e-4


def _compute_rates(entry, team, counts, fork_join: dict) -> tuple[float, dict[int, float]]:
    """A single thread's seconds per FLOP of vector multiply-adds, and the fraction of an
    n-fold speed-up the same multiply-adds reach on n threads, fork/join taken off."""
    probe = 1 << 12
    per_iteration = _fastest(lambda: entry.run_direct(0, probe), _COMPUTE_REPEATS) / probe
    iterations = max(probe, int(_COMPUTE_SECONDS / per_iteration)) // 840 * 840   # splits evenly
    alone = _fastest(lambda: entry.run_direct(0, iterations), _COMPUTE_REPEATS)
    efficiency = {}
    for n in counts:
        split = max(_fastest(lambda n=n: entry.run(team, 0, iterations, n), _COMPUTE_REPEATS) - fork_join[n], 1e-12)
        efficiency[n] = min(1.0, max(0.05, alone / (n * split)))
    return alone / (iterations * entry.flops_per_iteration), efficiency


class _CalibrationEntry:
    """An entry that runs `args[0]` barriers among the threads that call it, then its share of
    `args[1]` iterations of vector multiply-adds (the sum of each thread's results goes to
    `args[2][tid]`, so that nothing is optimized away): the fork/join of a call that does
    neither, a barrier's cost from the difference, and the threads' arithmetic throughput."""

    def __init__(self, library, flops_per_iteration: int):
        self._library = library
        self.flops_per_iteration = flops_per_iteration
        self.address = library.address("graphc_calibration_entry")
        self._work = np.zeros(2, np.int64)
        self._results = np.zeros(rt.MAX_THREADS, np.float32)
        self._argv = (ctypes.c_void_p * 3)(self._work.ctypes.data, self._work[1:].ctypes.data,
                                           self._results.ctypes.data)
        self._argv_address = ctypes.addressof(self._argv)
        self._direct = rt.EntryFunction(self.address)

    def run(self, team, barriers: int, iterations: int, nthreads: int) -> None:
        self._work[:] = barriers, iterations
        team.run(self.address, self._argv_address, nthreads)

    def run_direct(self, barriers: int, iterations: int) -> None:
        self._work[:] = barriers, iterations
        self._direct(self._argv_address, 0, 1)


_CHAINS = 8   # independent multiply-add chains: enough to keep two FMA units of 4 cycles busy


@functools.cache
def _calibration_entry() -> _CalibrationEntry:
    from graphc.backend.emit.entry import emit_barrier
    from graphc.backend.emit.kernel_builder import I64, PTR

    width = rt.host.host_target().simd.width
    vector = ir.VectorType(ir.FloatType(), width)
    module = ir.Module("graphc-calibration")
    module.triple = rt.host.host_target().triple
    barrier = emit_barrier(module)
    fmuladd = ir.Function(module, ir.FunctionType(vector, [vector] * 3), f"llvm.fmuladd.v{width}f32")
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [PTR, I64, I64]), "graphc_calibration_entry")
    args, tid, nthreads = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    barriers = b.load(b.load(args, typ=PTR), typ=I64)
    iterations = b.load(b.load(b.gep(args, [ir.Constant(I64, 1)], source_etype=PTR), typ=PTR), typ=I64)
    results = b.load(b.gep(args, [ir.Constant(I64, 2)], source_etype=PTR), typ=PTR)
    share = b.sdiv(iterations, nthreads)

    def counted_loop(count, body, values=()):
        """for i in range(count): values = body(values); returns the final values."""
        start = b.block
        loop, inside, done = (fn.append_basic_block(name) for name in ("loop", "body", "done"))
        b.branch(loop)
        b.position_at_end(loop)
        index = b.phi(I64)
        index.add_incoming(ir.Constant(I64, 0), start)
        phis = [b.phi(value.type) for value in values]
        for phi, value in zip(phis, values):
            phi.add_incoming(value, start)
        b.cbranch(b.icmp_signed("<", index, count), inside, done)
        b.position_at_end(inside)
        updated = body(phis)
        index.add_incoming(b.add(index, ir.Constant(I64, 1)), b.block)
        for phi, value in zip(phis, updated):
            phi.add_incoming(value, b.block)
        b.branch(loop)
        b.position_at_end(done)
        return phis

    def one_barrier(_):
        b.call(barrier, [nthreads])
        return []

    counted_loop(barriers, one_barrier)
    scale, step = (ir.Constant(vector, [ir.Constant(ir.FloatType(), v)] * width) for v in (0.999, 1e-3))
    seeds = [ir.Constant(vector, [ir.Constant(ir.FloatType(), float(k))] * width) for k in range(_CHAINS)]
    sums = counted_loop(share, lambda accumulators: [b.call(fmuladd, [acc, scale, step]) for acc in accumulators],
                        seeds)
    total = sums[0]
    for value in sums[1:]:
        total = b.fadd(total, value)
    b.store(b.extract_element(total, ir.Constant(I64, 0)), b.gep(results, [tid], source_etype=ir.FloatType()))
    b.ret_void()
    library = library_from_ir("graphc-calibration", str(module), __file__)
    return _CalibrationEntry(library, flops_per_iteration=2 * _CHAINS * width)
