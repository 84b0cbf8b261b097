"""The harness of the native conv/pool kernel tests (test_conv_pool_kernels, test_conv_batch_lanes).

Each case emits one kernel; all of a test's kernels go into one LLVM module, compiled once, and
each runs with one thread and with two threads called concurrently from Python (ctypes releases
the GIL), with a barrier between phases as the program entry has. Output and scratch start as
NaN so a kernel that reads either before writing it fails.
"""
from __future__ import annotations

import ctypes
import dataclasses
import threading
import types

import numpy as np

from graphc.backend.llvm import target
from graphc.core.ops import OPS

MAX_THREADS = 2
RTOL = 1e-4          # largest error relative to the largest expected magnitude


@dataclasses.dataclass
class Case:
    """One kernel to check: how to emit it, its numpy inputs and the expected output."""

    label: str
    emit: object            # emit(module, name) -> Kernel
    inputs: list
    expected: np.ndarray


def compile_kernels(emitters) -> tuple:
    """(engine, kernels): each emit(module, name) -> Kernel in one module, compiled and loaded,
    its phases made callable from here (they are internal in a program)."""
    module = target.new_module("test_conv_pool")
    kernels = [emit(module, f"k{i}") for i, emit in enumerate(emitters)]
    for kernel in kernels:
        for phase in kernel.phases:
            phase.linkage = "external"
    return target.load_object(target.compile_to_object(str(module))), kernels


def check_cases(cases: list[Case]) -> None:
    engine, kernels = compile_kernels([case.emit for case in cases])
    failures = []
    for case, kernel in zip(cases, kernels):
        for nthreads in (1, MAX_THREADS):
            got = run_kernel(engine, kernel, case.inputs, case.expected.shape, nthreads)
            error = relative_error(got, case.expected)
            if not error <= RTOL:
                failures.append(f"{case.label} threads={nthreads}: relative error {error:.3g}")
    assert not failures, "\n".join(failures)


def run_kernel(engine, kernel, inputs, out_shape, nthreads: int) -> np.ndarray:
    """Call the kernel's phases in order on `nthreads` concurrent threads."""
    pointer = ctypes.c_void_p
    signature = ctypes.CFUNCTYPE(None, *[pointer] * (len(inputs) + 2),
                                 ctypes.c_int64, ctypes.c_int64)
    phases = [signature(engine.get_function_address(fn.name)) for fn in kernel.phases]
    out = np.full(out_shape, np.nan, np.float32)
    scratch = np.full(max(1, kernel.scratch_floats), np.nan, np.float32)
    args = [out.ctypes.data] + [a.ctypes.data for a in inputs] + [scratch.ctypes.data]
    barrier = threading.Barrier(nthreads)

    def thread_body(tid):
        for phase in phases:
            phase(*args, tid, nthreads)
            barrier.wait()

    threads = [threading.Thread(target=thread_body, args=(tid,)) for tid in range(1, nthreads)]
    for thread in threads:
        thread.start()
    thread_body(0)
    for thread in threads:
        thread.join()
    return out


def relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    if np.isnan(expected).any():
        same_nans = np.array_equal(np.isnan(got), np.isnan(expected))
        got, expected = np.nan_to_num(got), np.nan_to_num(expected)
        if not same_nans:
            return np.inf
    scale = max(float(np.abs(expected).max()), 1e-30)
    return float(np.abs(got - expected).max()) / scale


def reference(op_name, args, out_shape, **attrs):
    node = types.SimpleNamespace(shape=tuple(out_shape))
    return OPS[op_name].reference(args, attrs, node, np.float32).astype(np.float32)


def random(rng, shape):
    return rng.standard_normal(shape).astype(np.float32)


def conv_output_shape(x_shape, w_shape, stride, padding):
    (n, _, h, w), (o, _, kh, kw) = x_shape, w_shape
    (pt, pb), (pl, pr) = padding
    return n, o, (h + pt + pb - kh) // stride[0] + 1, (w + pl + pr - kw) // stride[1] + 1
