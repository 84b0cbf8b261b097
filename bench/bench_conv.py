"""GFLOP/s of graphc's conv2d kernels (forward, input grad, weight grad) and pools, against
the numpy reference ops, at the shapes of LeNet-5 and of a small 3x32x32 conv net.

    OPENBLAS_NUM_THREADS=1 python bench/bench_conv.py             # all layers, one thread
    python bench/bench_conv.py --cpu-time                         # on a machine others share
    python bench/bench_conv.py --threads 2                        # graphc on two threads
    python bench/bench_conv.py --layers lenet.conv2 cnn.conv3     # some layers only
    python bench/bench_conv.py --compile                          # IR size and LLVM time

A conv kernel's FLOPs are 2*N*O*OH*OW*C*kh*kw (the same for the three kernels); the
forward includes the bias + relu epilogue. Pools report microseconds only. numpy runs the
reference implementation of graphc/core/ops (what the reference executor runs), one thread.
Compile time is per kernel (IR -> optimised object); "path" is the way conv_kernels
computes the kernel (see its *_PATHS).

--compile instead reports, per network, the training step's conv kernels (every layer's
forward and weight gradient, and the input gradient of all but the first layer) generated
into one LLVM module as a program has them: its IR size (text, before and after LLVM's
optimization) and the milliseconds LLVM takes to optimize it and to emit machine code
(best of 3).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys
import threading
import time
import types

# Must precede the numpy import to take effect.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from graphc.backend.kernels.conv import (ConvGeometry, chosen_paths, emit_conv2d, emit_conv2d_input_grad,
                                         emit_conv2d_weight_grad)
from graphc.backend.kernels.pool import emit_avg_pool2d, emit_avg_pool2d_grad, emit_max_pool2d, emit_max_pool2d_grad
from graphc.backend.llvm import target  # noqa: E402
from graphc.core.ops import OPS  # noqa: E402

BATCH = 64


def same(k):
    """"same" padding of an odd k x k kernel."""
    return ((k // 2, k // 2), (k // 2, k // 2))


VALID = ((0, 0), (0, 0))

# name: (x_shape, w_shape, padding); stride 1 everywhere. "lenet" is graphc.models.lenet5,
# "cnn" graphc.models.convnet (two 3x3 convs, max pool, two 3x3 convs, max pool, ...).
CONV_LAYERS = {
    "lenet.conv1": ((BATCH, 1, 28, 28), (6, 1, 5, 5), same(5)),
    "lenet.conv2": ((BATCH, 6, 14, 14), (16, 6, 5, 5), VALID),
    "cnn.conv1": ((BATCH, 3, 32, 32), (32, 3, 3, 3), same(3)),
    "cnn.conv2": ((BATCH, 32, 32, 32), (32, 32, 3, 3), same(3)),
    "cnn.conv3": ((BATCH, 32, 16, 16), (64, 32, 3, 3), same(3)),
    "cnn.conv4": ((BATCH, 64, 16, 16), (64, 64, 3, 3), same(3)),
}
# name: x_shape of a 2x2, stride 2 pool.
POOL_LAYERS = {
    "lenet.pool1": (BATCH, 6, 28, 28),
    "lenet.pool2": (BATCH, 16, 10, 10),
    "cnn.pool1": (BATCH, 32, 32, 32),
    "cnn.pool2": (BATCH, 64, 16, 16),
}


# ----------------------------------------------------------------------------- running

# The clock timings use: wall time, or with --cpu-time the calling thread's CPU time, which
# ignores the time other processes take from it on a shared machine (one thread only).
clock = time.perf_counter


def best_seconds(run, repeats: int = 5, sample_seconds: float = 0.05) -> float:
    """Best-of-`repeats` time of one call, each sample about `sample_seconds` long."""
    start = clock()
    run()
    calls = max(1, int(sample_seconds / max(clock() - start, 1e-6)))
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        for _ in range(calls):
            run()
        best = min(best, (clock() - start) / calls)
    return best


class CompiledKernel:
    """One kernel compiled alone, callable on numpy buffers with `nthreads` threads."""

    def __init__(self, emit, n_inputs: int, nthreads: int):
        module = target.new_module("bench")
        kernel = emit(module, "kernel")
        for phase in kernel.phases:
            phase.linkage = "external"  # phases are internal; called here directly
        start = time.perf_counter()
        obj = target.compile_to_object(str(module))
        self.compile_seconds = time.perf_counter() - start
        self.engine = target.load_object(obj)  # owns the code: keep it alive
        signature = ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * (n_inputs + 2),
                                     ctypes.c_int64, ctypes.c_int64)
        self.phases = [signature(self.engine.get_function_address(fn.name))
                       for fn in kernel.phases]
        self.scratch = np.zeros(max(1, kernel.scratch_floats), np.float32)
        self.nthreads = nthreads

    def runner(self, out: np.ndarray, inputs: list[np.ndarray]):
        args = [out.ctypes.data] + [a.ctypes.data for a in inputs] + [self.scratch.ctypes.data]
        if self.nthreads == 1:
            def run_alone():
                for phase in self.phases:
                    phase(*args, 0, 1)
            return run_alone
        return _ThreadedRunner(self.phases, args, self.nthreads)


class _ThreadedRunner:
    """Runs the phases on persistent threads (ctypes releases the GIL), a barrier between
    phases as the program entry has. Thread start-up is outside the timed calls."""

    def __init__(self, phases, args, nthreads):
        self.phases, self.args, self.nthreads = phases, args, nthreads
        self.start = threading.Barrier(nthreads)
        self.between = threading.Barrier(nthreads)
        for tid in range(1, nthreads):
            threading.Thread(target=self._worker, args=(tid,), daemon=True).start()

    def _worker(self, tid):
        while True:
            self.start.wait()
            self._run(tid)

    def _run(self, tid):
        for phase in self.phases:
            phase(*self.args, tid, self.nthreads)
            self.between.wait()

    def __call__(self):
        self.start.wait()
        self._run(0)


def reference(op_name, args, out_shape, **attrs):
    node = types.SimpleNamespace(shape=tuple(out_shape))
    return OPS[op_name].reference(args, attrs, node, np.float32)


def check(got, expected, label):
    error = np.abs(got - expected).max() / max(1e-30, float(np.abs(expected).max()))
    if error > 1e-4:
        raise AssertionError(f"{label}: relative error {error:.3g}")


# --------------------------------------------------------------------------- benchmarks

def bench_conv_layer(name, x_shape, w_shape, padding, nthreads):
    stride = (1, 1)
    geometry = ConvGeometry.from_shapes(x_shape, w_shape, stride, padding)
    y_shape = geometry.out_shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape, dtype=np.float32)
    w = rng.standard_normal(w_shape, dtype=np.float32)
    b = rng.standard_normal(w_shape[:1], dtype=np.float32)
    g = rng.standard_normal(y_shape, dtype=np.float32)
    attrs = dict(stride=stride, padding=padding)
    options = dict(max_threads=nthreads)

    kernels = [
        ("forward", lambda m, n: emit_conv2d(m, n, x_shape, w_shape, stride, padding, bias=True,
                                             relu=True, **options),
         [x, w, b], y_shape,
         lambda: np.maximum(reference("conv2d", [x, w], y_shape, **attrs)
                            + b[None, :, None, None], 0)),
        ("input grad", lambda m, n: emit_conv2d_input_grad(m, n, y_shape, w_shape, x_shape,
                                                           stride, padding, **options),
         [g, w], x_shape,
         lambda: reference("conv2d_input_grad", [g, w], x_shape, x_shape=x_shape, **attrs)),
        ("weight grad", lambda m, n: emit_conv2d_weight_grad(m, n, x_shape, y_shape, w_shape,
                                                             stride, padding, **options),
         [x, g], w_shape,
         lambda: reference("conv2d_weight_grad", [x, g], w_shape, w_shape=w_shape, **attrs)),
    ]
    paths = chosen_paths(x_shape, w_shape, stride, padding)
    for kind, emit, inputs, out_shape, numpy_run in kernels:
        compiled = CompiledKernel(emit, len(inputs), nthreads)
        out = np.empty(out_shape, np.float32)
        run = compiled.runner(out, inputs)
        run()
        check(out, numpy_run(), f"{name} {kind}")
        ours = best_seconds(run)
        theirs = best_seconds(numpy_run, repeats=3)
        print(f"{name:12} {kind:12} {geometry.flops / ours / 1e9:8.1f} {ours * 1e6:10.0f} "
              f"{geometry.flops / theirs / 1e9:9.1f} {theirs * 1e6:10.0f} {theirs / ours:7.1f}"
              f" {compiled.compile_seconds * 1e3:8.0f}  {paths[kind.replace(' ', '_')]}",
              flush=True)


def bench_pool_layer(name, x_shape, nthreads):
    kernel, stride, padding = (2, 2), (2, 2), ((0, 0), (0, 0))
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape, dtype=np.float32)
    n, c, h, w = x_shape
    y_shape = (n, c, h // 2, w // 2)
    g = rng.standard_normal(y_shape, dtype=np.float32)
    attrs = dict(kernel=kernel, stride=stride, padding=padding)
    geometry = (x_shape, kernel, stride, padding)
    options = dict(max_threads=nthreads)
    kernels = [
        ("max", lambda m, k: emit_max_pool2d(m, k, *geometry, **options), [x], y_shape,
         lambda: reference("max_pool2d", [x], y_shape, **attrs)),
        ("max grad", lambda m, k: emit_max_pool2d_grad(m, k, *geometry, **options), [x, g],
         x_shape, lambda: reference("max_pool2d_grad", [x, g], x_shape, **attrs)),
        ("avg", lambda m, k: emit_avg_pool2d(m, k, *geometry, **options), [x], y_shape,
         lambda: reference("avg_pool2d", [x], y_shape, **attrs)),
        ("avg grad", lambda m, k: emit_avg_pool2d_grad(m, k, *geometry, **options), [g], x_shape,
         lambda: reference("avg_pool2d_grad", [g], x_shape, x_shape=x_shape, **attrs)),
    ]
    for kind, emit, inputs, out_shape, numpy_run in kernels:
        compiled = CompiledKernel(emit, len(inputs), nthreads)
        out = np.empty(out_shape, np.float32)
        run = compiled.runner(out, inputs)
        run()
        check(out, numpy_run(), f"{name} {kind}")
        ours = best_seconds(run)
        theirs = best_seconds(numpy_run, repeats=3)
        print(f"{name:12} {kind:12} {'':8} {ours * 1e6:10.0f} {'':9} {theirs * 1e6:10.0f} "
              f"{theirs / ours:7.1f} {compiled.compile_seconds * 1e3:8.0f}", flush=True)


def compile_report(network: str, nthreads: int) -> None:
    """IR size and LLVM time of a network's training conv kernels in one module."""
    def emit_all(module):
        layers = [name for name in CONV_LAYERS if name.startswith(network + ".")]
        for index, name in enumerate(layers):
            x_shape, w_shape, padding = CONV_LAYERS[name]
            stride, options = (1, 1), dict(max_threads=nthreads)
            y_shape = ConvGeometry.from_shapes(x_shape, w_shape, stride, padding).out_shape
            kernels = [emit_conv2d(module, f"{name}.forward", x_shape, w_shape, stride, padding,
                                   bias=True, relu=True, **options),
                       emit_conv2d_weight_grad(module, f"{name}.weight_grad", x_shape, y_shape,
                                               w_shape, stride, padding, **options)]
            if index > 0:   # training never needs the input gradient of the first layer
                kernels.append(emit_conv2d_input_grad(module, f"{name}.input_grad", y_shape,
                                                      w_shape, x_shape, stride, padding,
                                                      **options))
            for kernel in kernels:
                for phase in kernel.phases:
                    phase.linkage = "external"   # as the program's entry would call them

    best = None
    for _ in range(3):
        module = target.new_module("conv_kernels")
        emit_all(module)
        text = str(module)
        module_ref = target.parse_and_verify(text)
        start = time.perf_counter()
        target.optimize(module_ref)
        optimized = time.perf_counter()
        target.host_target_machine().emit_object(module_ref)
        emitted = time.perf_counter()
        sample = (optimized - start + emitted - optimized, optimized - start,
                  emitted - optimized, len(text), len(str(module_ref)))
        best = sample if best is None or sample < best else best
    _, optimize_s, emit_s, ir_chars, optimized_chars = best
    print(f"{network:8} conv kernels: IR {ir_chars:8d} chars ({optimized_chars:8d} optimized), "
          f"optimize {optimize_s * 1e3:6.0f} ms, emit {emit_s * 1e3:6.0f} ms", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", nargs="*", default=list(CONV_LAYERS) + list(POOL_LAYERS))
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for graphc's kernels (numpy uses OPENBLAS_NUM_THREADS)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time by the thread's CPU time (for a busy machine; one thread)")
    parser.add_argument("--compile", action="store_true",
                        help="report IR size and LLVM time of each network's conv kernels")
    args = parser.parse_args(argv)
    if args.compile:
        for network in ("lenet", "cnn"):
            compile_report(network, args.threads)
        return
    if args.cpu_time:
        if args.threads != 1:
            parser.error("--cpu-time measures one thread only")
        global clock
        clock = time.thread_time
    print(f"host {target.target_fingerprint().split('|')[1]}, vector width "
          f"{target.vector_width_f32()}, batch {BATCH}, graphc threads {args.threads}, "
          f"OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}")
    print(f"{'layer':12} {'kernel':12} {'GFLOP/s':>8} {'graphc us':>10} {'numpy GF/s':>9} "
          f"{'numpy us':>10} {'speedup':>7} {'compile ms':>8}  path")
    for name in args.layers:
        if name in CONV_LAYERS:
            bench_conv_layer(name, *CONV_LAYERS[name], args.threads)
        else:
            bench_pool_layer(name, POOL_LAYERS[name], args.threads)


if __name__ == "__main__":
    main()
