"""The protocol every lowered kernel follows, so the program assembler can call any of them.

A kernel computes one IR node (possibly with fused epilogue work) into an output buffer. It is
one or more LLVM functions, its *phases*, which the program's entry calls in order with a
barrier between them when several threads run. Every phase has the same signature:

    void phase(ptr out, ptr in_0, ..., ptr in_{k-1}, ptr scratch, i64 tid, i64 nthreads)

- `out` and `in_i` point at the node's output and operand buffers: float32 (or int32 for
  integer tensors), C-contiguous, laid out as the IR shapes say.
- `scratch` is `scratch_floats` float32 elements private to this kernel while it runs (the same
  memory is reused by later kernels); shared by all threads, so a kernel splits it by `tid`.
- All `nthreads` threads call every phase concurrently (1 <= nthreads <= the `max_threads` the
  kernel was generated for); each computes its share (see KernelBuilder.split_range). A phase
  that is not worth parallelizing lets thread 0 do everything and returns at once on others.
- A phase must not read `out` before writing it unless it zeroed it first (buffers are reused).
"""
from __future__ import annotations

import dataclasses

import llvmlite.ir as ir

from graphc.backend.emit.kernel_builder import I64, PTR, KernelBuilder


@dataclasses.dataclass
class Kernel:
    phases: list[ir.Function]
    scratch_floats: int = 0


def phase_function(module: ir.Module, name: str, n_inputs: int,
                   linkage: str = "internal") -> tuple[ir.Function, KernelBuilder]:
    """Declare a phase with the protocol's signature; returns it and a builder at its entry.

    The function's args are (out, in_0..in_{n-1}, scratch, tid, nthreads), named accordingly.
    The caller emits the body and ends it with `kb.b.ret_void()`. Pointers carry no `noalias`:
    an in-place update (a param's new value written over it) passes one buffer twice.
    Tests pass linkage="external" to call a phase directly.
    """
    fnty = ir.FunctionType(ir.VoidType(), [PTR] * (n_inputs + 2) + [I64, I64])
    fn = ir.Function(module, fnty, name=name)
    fn.linkage = linkage
    names = ["out"] + [f"in{i}" for i in range(n_inputs)] + ["scratch", "tid", "nthreads"]
    for arg, arg_name in zip(fn.args, names):
        arg.name = arg_name
    builder = ir.IRBuilder(fn.append_basic_block("entry"))
    return fn, KernelBuilder(builder)


def phase_args(fn: ir.Function):
    """(out, [inputs], scratch, tid, nthreads) of a phase function."""
    args = list(fn.args)
    return args[0], args[1:-3], args[-3], args[-2], args[-1]
