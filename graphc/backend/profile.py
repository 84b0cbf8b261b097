"""Per-kernel time profile of a compiled function.

A profiling twin of the program is compiled with a tick counter read after every kernel phase
(all threads meet there, so each phase is charged its wall time); the ticks are converted to
seconds by timing the same clock against `time.perf_counter`. The twin runs on copies of the
params, so profiling a training step does not train the model.

Each kernel's rates divide its FLOPs and bytes (costs.py's rules, carried by its Step) by its
time; its % of peak divides its GFLOP/s by graphc's own GEMM on as many threads (gemm_peak.py),
measured only when asked, as it takes a few tenths of a second.
"""
from __future__ import annotations

import ctypes
import dataclasses
import time

import numpy as np

import graphc_runtime as rt
from graphc.backend.assemble import PROFILE_SLOT
from graphc.backend.emit.entry import ENTRY_NAME, TICKS_NAME


@dataclasses.dataclass
class KernelTime:
    index: int
    label: str
    node_id: int
    shape: tuple
    seconds: float
    flops: int
    bytes_moved: int = 0      # the least the kernel moves (Step.bytes_moved)

    # The rates are None where there is nothing to divide: no FLOPs (a copy), or no time measured.
    @property
    def gflop_per_s(self) -> float | None:
        return self.flops / self.seconds / 1e9 if self.flops and self.seconds > 0 else None

    @property
    def gb_per_s(self) -> float | None:
        return self.bytes_moved / self.seconds / 1e9 if self.bytes_moved and self.seconds > 0 else None


@dataclasses.dataclass
class ProfileReport:
    kernels: list[KernelTime]
    seconds_per_call: float          # wall time of a whole call, Python included
    threads: int
    # graphc's GEMM on as many threads (gemm_peak.py), if asked for: `profile(..., peak=True)`
    # or `with_gemm_peak()`
    gemm_peak_gflops: float | None = None

    @property
    def native_seconds(self) -> float:
        return sum(k.seconds for k in self.kernels)

    def with_gemm_peak(self) -> ProfileReport:
        """This report with the GEMM peak measured (once per process and thread count)."""
        from graphc.backend.gemm_peak import gemm_peak_gflops
        return dataclasses.replace(self, gemm_peak_gflops=gemm_peak_gflops(self.threads))

    def fraction_of_peak(self, kernel: KernelTime) -> float | None:
        """The kernel's GFLOP/s over the GEMM peak (None without FLOPs or a measured peak)."""
        rate = kernel.gflop_per_s
        return rate / self.gemm_peak_gflops if rate is not None and self.gemm_peak_gflops else None

    def __str__(self):
        total = self.native_seconds
        peak = self.gemm_peak_gflops is not None
        lines = [f"{'kernel':<6} {'what':<24} {'value':>7} {'shape':<18} {'µs':>9} {'%':>6} {'GFLOP/s':>8} "
                 f"{'GB/s':>7}" + (f" {'%peak':>6}" if peak else "")]
        for k in sorted(self.kernels, key=lambda k: -k.seconds):
            line = (f"k{k.index:<5} {k.label:<24} {'%' + str(k.node_id):>7} {str(k.shape):<18} "
                    f"{k.seconds * 1e6:9.1f} {100 * k.seconds / total:6.1f} {_rate(k.gflop_per_s, 8)} "
                    f"{_rate(k.gb_per_s, 7)}")
            if peak:
                fraction = self.fraction_of_peak(k)
                line += " " + _rate(None if fraction is None else 100 * fraction, 6)
            lines.append(line.rstrip())
        flops = sum(k.flops for k in self.kernels)
        moved = sum(k.bytes_moved for k in self.kernels)
        lines.append(f"native total {total * 1e6:.1f} µs ({flops / total / 1e9:.1f} GFLOP/s, "
                     f"{moved / total / 1e9:.1f} GB/s); whole call {self.seconds_per_call * 1e6:.1f} µs; "
                     f"{self.threads} thread(s)"
                     + (f"; GEMM peak {self.gemm_peak_gflops:.1f} GFLOP/s" if peak else ""))
        return "\n".join(lines)


def _rate(value: float | None, width: int) -> str:
    return f"{value:{width}.1f}" if value is not None else " " * width


def profile(fn, feeds: dict, repeats: int = 20, *, peak: bool = False) -> ProfileReport:
    """Time each kernel of compiled function `fn` over `repeats` calls on `feeds`; with `peak`,
    also measure the GEMM peak on the same threads (see ProfileReport.with_gemm_peak)."""
    from graphc.backend.compiler import CompiledTrainingStep, object_code
    spec = fn.recipe.assemble(profile=True)
    library = rt.NativeLibrary(object_code(spec.llvm_ir))
    params = {name: array.copy() for name, array in fn.params.items()}
    program = rt.Program(library, ENTRY_NAME, spec.slots, params, max_threads=spec.max_threads)
    # Called as `fn` calls its program: a training step for its loss alone, anything else for
    # fresh output arrays.
    if isinstance(fn, CompiledTrainingStep):
        def call():
            return program.call_scalar(feeds)
    else:
        def call():
            return program(**feeds)
    call()
    counters = program.state[PROFILE_SLOT]
    counters[:] = 0
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    per_call = (time.perf_counter() - start) / repeats
    seconds_per_tick = _seconds_per_tick(library)
    per_step = np.zeros(len(spec.steps))
    for phase, ticks in enumerate(counters):
        per_step[spec.phase_steps[phase]] += ticks * seconds_per_tick / repeats
    kernels = [KernelTime(i, step.label, step.node.id, step.node.shape, float(per_step[i]), step.flops,
                          step.bytes_moved)
               for i, step in enumerate(spec.steps)]
    report = ProfileReport(kernels, per_call, program.num_threads)
    return report.with_gemm_peak() if peak else report


def _seconds_per_tick(library) -> float:
    ticks = ctypes.CFUNCTYPE(ctypes.c_int64)(library.address(TICKS_NAME))
    t0, c0 = time.perf_counter(), ticks()
    while time.perf_counter() - t0 < 0.02:
        pass
    t1, c1 = time.perf_counter(), ticks()
    return (t1 - t0) / max(c1 - c0, 1)
