"""Per-kernel time profile of a compiled function.

A profiling twin of the program is compiled with a tick counter read after every kernel phase
(all threads meet there, so each phase is charged its wall time); the ticks are converted to
seconds by timing the same clock against `time.perf_counter`. The twin runs on copies of the
params, so profiling a training step does not train the model.
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


@dataclasses.dataclass
class ProfileReport:
    kernels: list[KernelTime]
    seconds_per_call: float          # wall time of a whole call, Python included
    threads: int

    @property
    def native_seconds(self) -> float:
        return sum(k.seconds for k in self.kernels)

    def __str__(self):
        total = self.native_seconds
        lines = [f"{'kernel':<6} {'what':<24} {'value':>7} {'shape':<18} {'µs':>9} {'%':>6} {'GFLOP/s':>8}"]
        for k in sorted(self.kernels, key=lambda k: -k.seconds):
            gflops = f"{k.flops / k.seconds / 1e9:8.1f}" if k.flops and k.seconds > 0 else f"{'':>8}"
            lines.append(f"k{k.index:<5} {k.label:<24} {'%' + str(k.node_id):>7} {str(k.shape):<18} "
                         f"{k.seconds * 1e6:9.1f} {100 * k.seconds / total:6.1f} {gflops}")
        flops = sum(k.flops for k in self.kernels)
        lines.append(f"native total {total * 1e6:.1f} µs ({flops / total / 1e9:.1f} GFLOP/s); "
                     f"whole call {self.seconds_per_call * 1e6:.1f} µs; {self.threads} thread(s)")
        return "\n".join(lines)


def profile(fn, feeds: dict, repeats: int = 20) -> ProfileReport:
    """Time each kernel of compiled function `fn` over `repeats` calls on `feeds`."""
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
    kernels = [KernelTime(i, step.label, step.node.id, step.node.shape, float(per_step[i]), step.flops)
               for i, step in enumerate(spec.steps)]
    return ProfileReport(kernels, per_call, program.num_threads)


def _seconds_per_tick(library) -> float:
    ticks = ctypes.CFUNCTYPE(ctypes.c_int64)(library.address(TICKS_NAME))
    t0, c0 = time.perf_counter(), ticks()
    while time.perf_counter() - t0 < 0.02:
        pass
    t1, c1 = time.perf_counter(), ticks()
    return (t1 - t0) / max(c1 - c0, 1)
