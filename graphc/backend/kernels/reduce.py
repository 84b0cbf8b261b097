"""Sum over axes, and the vector reduction helpers the softmax kernels share.

After `collapse_dims` a sum is one of three loop nests, chosen by whether x's innermost dim is
reduced and whether anything is kept:

  * total (everything reduced, e.g. a loss): one contiguous span. Large ones run in two
    phases: each thread sums whole TOTAL_BLOCK blocks into `scratch`, then thread 0 sums the
    block results in order.
  * row sums (innermost dim reduced: axis -1 of (N, C); conv bias gradients, axes (0, 2, 3)
    of (N, C, H, W) = [N reduced, C kept, HW reduced]): threads split the outputs; each
    output sums contiguous spans with vector accumulators, folded to a scalar once. When a
    reduced dim lies outside a kept one (the conv bias gradient's N) and the outputs are
    few, the reduced dims are the outer loops and each output's running total a stack
    vector: x is read in memory order, which is faster (bench/NOTES.md), each
    output adding the same spans in the same order as output by output.
  * column sums (innermost dim kept: axis 0 of (N, C), the bias gradient of `linear`): threads
    split chunks of COLUMN_CHUNK_VECTORS vectors of out; each chunk accumulates rows of x in
    registers and is stored once.

Row sums of one shape over the same axes can share one loop nest (`emit_row_sum_group`): each
sums its own prologue over the same rows, so data they share is read from memory once, and each
output gets exactly the sum it would get alone.

Every output is computed by the same instructions whichever thread owns it, and partial
results are combined in a fixed order, so results do not depend on the thread count.
Accumulation is float32 in blocks (SPAN_BLOCK floats, ROW_BLOCK rows) whose results are added
into running totals: rounding error grows with the block length plus the number of blocks,
not with the whole length.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import llvmlite.ir as ir
import sympy

from graphc.backend import costs
from graphc.backend.emit.kernel import Kernel, phase_args, phase_function
from graphc.backend.emit.kernel_builder import F32, I32, KernelBuilder, shared_constant
from graphc.backend.kernels.layout import (collapse_dims, contiguous_strides, declare_intrinsic, dot_offset, emit_copy,
                                           entry_alloca, for_each_vector, load_lanes, only_thread_zero, open_phase,
                                           store_lanes, strided_loops, unflatten_index, vector_lanes, vector_suffix,
                                           zero_floats)
from graphc.backend.lowering_rules import Step, alias_root, lowers
from graphc.core.scalar import symbol

__all__ = ["emit_sum", "emit_row_sum_group", "row_sum_kind", "row_sum_member", "joins_row_sums", "row_sums_in_one_pass",
           "Prologue", "PrologueSource"]

# Independent accumulators of a span loop: enough to hide the latency of vector adds.
SPAN_ACCUMULATORS = 4
# Floats per block of a contiguous span sum (4 KiB; 32 per lane with 4 accumulators of 8).
SPAN_BLOCK = 1024
# Rows of x per block of a column sum.
ROW_BLOCK = 64
# Width of a column-sum work item in vectors: four accumulators, one 128-byte run per row.
COLUMN_CHUNK_VECTORS = 4
# A total over fewer floats is summed by one thread: two phases would cost more than they save.
PARALLEL_TOTAL_MIN = 32768
# Floats per work unit of a parallel total; one scratch float each.
TOTAL_BLOCK = 8192

# Most outputs of a row sum that reads x in memory order (one stack vector each, per sum of the
# pass: 16 KB with 8-lane vectors, 32 KB with 16).
MEMORY_ORDER_OUTPUTS = 512

# The identity of float addition that LLVM may fold away: x + -0.0 == x for every x.
SUM_IDENTITY = -0.0

Combine = Callable[[KernelBuilder, ir.Value, ir.Value], ir.Value]


def vector_add(kb: KernelBuilder, a: ir.Value, b: ir.Value) -> ir.Value:
    return kb.fadd(a, b)


def vector_max(kb: KernelBuilder, a: ir.Value, b: ir.Value) -> ir.Value:
    """Lanewise max (one vmaxps). A NaN may be dropped here; callers that exponentiate
    `x - max` get the NaN back through the sum of exponentials."""
    return kb.b.select(kb.b.fcmp_ordered(">", a, b), a, b)


class VectorAccumulators:
    """Running vector values kept in entry-block stack slots, promoted to registers by LLVM;
    they can be updated inside any number of nested `for_range` loops."""

    def __init__(self, kb: KernelBuilder, count: int, identity: float, combine: Combine,
                 name: str = "acc"):
        self.kb, self.identity, self.combine = kb, identity, combine
        self.slots = [entry_alloca(kb, kb.vec_type, f"{name}{i}") for i in range(count)]

    def reset(self) -> None:
        for slot in self.slots:
            self.kb.b.store(self.kb.splat(self.identity), slot)

    def update(self, index: int, value: ir.Value) -> None:
        slot = self.slots[index]
        self.kb.b.store(self.combine(self.kb, self._load(slot), value), slot)

    def update_all(self, values: Sequence[ir.Value]) -> None:
        for index, value in enumerate(values):
            self.update(index, value)

    def values(self) -> list[ir.Value]:
        return [self._load(slot) for slot in self.slots]

    def _load(self, slot: ir.Value) -> ir.Value:
        return self.kb.b.load(slot, typ=self.kb.vec_type)


def tree_combine(kb: KernelBuilder, values: Sequence[ir.Value], combine: Combine) -> ir.Value:
    """Combine values pairwise, ((a+b)+(c+d)) style."""
    values = list(values)
    while len(values) > 1:
        paired = [combine(kb, a, b) for a, b in zip(values[::2], values[1::2])]
        values = paired + values[len(paired) * 2:]
    return values[0]


def horizontal_sum(kb: KernelBuilder, vector: ir.Value) -> ir.Value:
    """Sum of a vector's lanes (a shuffle tree: `reassoc` lets LLVM pick the order, which is
    still fixed for a given target)."""
    reduce = declare_intrinsic(kb.module, f"llvm.vector.reduce.fadd.{vector_suffix(kb)}", F32,
                               [F32, kb.vec_type])
    return kb.b.call(reduce, [kb.f32(SUM_IDENTITY), vector], fastmath=("reassoc",))


def horizontal_max(kb: KernelBuilder, vector: ir.Value) -> ir.Value:
    """Max of a vector's lanes, by halving: llvm.vector.reduce.fmax would add NaN checks
    at every step (maxnum semantics) that `vector_max` does without."""
    lanes = kb.width
    while lanes > 1:
        lanes //= 2
        # Upper half of the live lanes onto the lower half; the other lanes become don't-cares.
        upper = kb.b.shuffle_vector(vector, shared_constant(kb.vec_type, ir.Undefined),
                                    shared_constant(ir.VectorType(I32, kb.width),
                                                    tuple((lane + lanes) % kb.width for lane in range(kb.width))))
        vector = vector_max(kb, vector, upper)
    return kb.b.extract_element(vector, ir.Constant(I32, 0))


PartialSums = Callable[[ir.Value, int], list[ir.Value]]


def blocked_sum(kb: KernelBuilder, n: int, block: int, n_vectors: int,
                partial_sums: PartialSums) -> list[ir.Value]:
    """Sum over items range(n) one block at a time.

    partial_sums(start, count) emits the sums (`n_vectors` vectors, in fresh accumulators)
    of items [start, start + count); the blocks' sums are added into running totals.
    """
    if n <= block:
        return partial_sums(kb.i64(0), n)
    whole_blocks, rest = divmod(n, block)
    totals = VectorAccumulators(kb, n_vectors, SUM_IDENTITY, vector_add, name="total")
    totals.reset()
    with kb.for_range(0, whole_blocks * block, step=block, name="block") as start:
        totals.update_all(partial_sums(start, block))
    if rest:
        totals.update_all(partial_sums(kb.i64(whole_blocks * block), rest))
    return totals.values()


def span_reduce(kb: KernelBuilder, ptr, start: ir.Value, count: int,
                identity: float, combine: Combine) -> ir.Value:
    """Lanewise reduction of the floats ptr[start:][:count] to one vector (unblocked).

    `ptr` may instead be a loader, (index, lanes) -> the vector of those elements with
    `identity` in the other lanes (a sum's fused prologue, see `Prologue`)."""
    n_accumulators = max(1, min(SPAN_ACCUMULATORS, len(vector_lanes(kb, count))))
    accumulators = VectorAccumulators(kb, n_accumulators, identity, combine)
    accumulators.reset()
    load = ptr if callable(ptr) else lambda index, lanes: load_lanes(kb, ptr, index, lanes, fill=identity)

    def accumulate(index: ir.Value, lanes: int, slot: int) -> None:
        accumulators.update(slot, load(index, lanes))

    for_each_vector(kb, start, count, accumulate, unroll=n_accumulators)
    return tree_combine(kb, accumulators.values(), combine)


def span_sum(kb: KernelBuilder, ptr, start: ir.Value, count: int) -> ir.Value:
    """Lanewise sum of ptr[start:][:count] (or of a loader's elements, see `span_reduce`) as
    one vector (add its lanes for the total)."""
    def block_sum(block_start: ir.Value, block_count: int) -> list[ir.Value]:
        return [span_reduce(kb, ptr, kb.add(start, block_start), block_count,
                            SUM_IDENTITY, vector_add)]
    return blocked_sum(kb, count, SPAN_BLOCK, 1, block_sum)[0]


def span_max(kb: KernelBuilder, ptr: ir.Value, start: ir.Value, count: int) -> ir.Value:
    """Lanewise max of ptr[start:][:count] as one vector (-inf in lanes that saw nothing)."""
    return span_reduce(kb, ptr, start, count, -math.inf, vector_max)


ChunkBody = Callable[[ir.Value, ir.Value, int], None]


def for_each_column_chunk(kb: KernelBuilder, tid: ir.Value, nthreads: ir.Value,
                          outer_sizes: Sequence[int], outer_x_strides: Sequence[int],
                          outer_out_strides: Sequence[int], columns: int,
                          emit_chunk: ChunkBody,
                          chunk_vectors: int = COLUMN_CHUNK_VECTORS) -> None:
    """Split (outer index, chunk of `columns` contiguous floats) work items between threads.

    Chunks are `chunk_vectors` vectors wide; the last of a row of chunks may be
    narrower. emit_chunk(x_start, out_start, chunk_width) emits one item's work, given where
    its first column lies in x and in out (outer offsets from the stride lists).
    """
    chunk = chunk_vectors * kb.width
    n_chunks = math.ceil(columns / chunk)
    last_chunk = columns - (n_chunks - 1) * chunk
    grid = list(outer_sizes) + [n_chunks]
    lo, hi = kb.split_range(math.prod(grid), tid, nthreads)
    with kb.for_range(lo, hi, name="chunk") as item:
        indices = unflatten_index(kb, item, grid)
        x_start = dot_offset(kb, indices, list(outer_x_strides) + [chunk])
        out_start = dot_offset(kb, indices, list(outer_out_strides) + [chunk])
        if n_chunks == 1 or last_chunk == chunk:
            emit_chunk(x_start, out_start, last_chunk)
        else:
            is_last = kb.b.icmp_signed("==", indices[-1], kb.i64(n_chunks - 1))
            with kb.b.if_else(is_last) as (last, whole):
                with last:
                    emit_chunk(x_start, out_start, last_chunk)
                with whole:
                    emit_chunk(x_start, out_start, chunk)


# ---------------------------------------------------------------------------- emit_sum

@dataclasses.dataclass(frozen=True)
class Prologue:
    """The elementwise producer of a sum's x, computed as x is read and never stored.

    `expr` is over x0.. = the kernel's inputs; `kinds[k]` says how input k is laid out: "full"
    (x's shape), "per_output" (one value per output of the sum, in out's order) or "scalar"."""

    expr: sympy.Expr
    kinds: tuple[str, ...]


class PrologueSource:
    """What a sum reads at an index of x: x's floats, or its prologue evaluated there."""

    def __init__(self, kb: KernelBuilder, inputs: Sequence[ir.Value], prologue: Prologue | None):
        self.kb, self.inputs, self.prologue = kb, list(inputs), prologue
        if prologue is not None:
            self.scalars = {k: kb.splat(kb.load(ptr, 0)) for k, (ptr, kind) in
                            enumerate(zip(inputs, prologue.kinds)) if kind == "scalar"}

    def loader(self, out_index: ir.Value | None = None):
        """(index, lanes) -> vector, for the rows of output `out_index` (needed by per-output
        inputs; None where the sum has one output)."""
        kb, prologue = self.kb, self.prologue
        if prologue is None:
            return lambda index, lanes: load_lanes(kb, self.inputs[0], index, lanes, fill=SUM_IDENTITY)
        fixed = dict(self.scalars)
        for k, kind in enumerate(prologue.kinds):
            if kind == "per_output":
                fixed[k] = kb.splat(kb.load(self.inputs[k], out_index if out_index is not None else 0))

        def load(index: ir.Value, lanes: int) -> ir.Value:
            from graphc.backend.kernels.elementwise import emit_expr  # elementwise imports this module's users
            values = [fixed[k] if k in fixed else load_lanes(kb, ptr, index, lanes)
                      for k, ptr in enumerate(self.inputs)]
            value = emit_expr(kb, prologue.expr, values)
            if lanes < kb.width:   # the prologue of absent elements need not be 0
                value = kb.b.select(kb.lane_mask(lanes), value, kb.splat(SUM_IDENTITY))
            return value
        return load


def sum_path(x_shape: Sequence[int], axes: Sequence[int]) -> str:
    """Which loop nest `emit_sum` emits: "zeros", "copy", "total", "rows" or "columns"."""
    _, _, sizes, out_strides = _collapsed(tuple(x_shape), tuple(axes))
    if math.prod(x_shape) == 0:
        return "zeros"
    reduced = [d for d, stride in enumerate(out_strides) if stride == 0]
    if not reduced:
        return "copy"
    if len(reduced) == len(sizes):
        return "total"
    return "rows" if reduced[-1] == len(sizes) - 1 else "columns"


def _collapsed(x_shape, axes):
    kept_shape = [d for i, d in enumerate(x_shape) if i not in axes]
    kept_strides = iter(contiguous_strides(kept_shape))
    # A reduced dim moves x but not out: its out stride is 0.
    out_strides = [0 if i in axes else next(kept_strides) for i in range(len(x_shape))]
    sizes, (in_strides, out_strides) = collapse_dims(x_shape, contiguous_strides(x_shape), out_strides)
    return kept_shape, in_strides, sizes, out_strides

def emit_sum(module: ir.Module, name: str, x_shape: Sequence[int], axes: Sequence[int], *,
             max_threads: int, width: int | None = None, prologue: Prologue | None = None) -> Kernel:
    """out = x.sum(axes): in0 float32 of x_shape; out holds the kept dims in order (keepdims
    changes only the shape). `axes` is a sorted tuple of distinct dims.

    With a `prologue` (total and row sums only, see `sum_path`), x is not an input: the
    kernel's inputs are the prologue's, and x's elements its expression over them.
    `width` overrides the host's vector width (tests use it to cover other hosts' tails).
    """
    x_shape, axes = tuple(x_shape), tuple(axes)
    if list(axes) != sorted(set(axes)) or any(not 0 <= a < len(x_shape) for a in axes):
        raise ValueError(f"axes {axes} must be sorted, distinct dims of a {len(x_shape)}-D x")
    kept_shape, in_strides, sizes, out_strides = _collapsed(x_shape, axes)
    n_out = math.prod(kept_shape)
    path = sum_path(x_shape, axes)
    if prologue is not None and path not in ("total", "rows"):
        raise ValueError(f"a sum's prologue needs a total or a row sum, not {path}")
    if path == "zeros":
        return _emit_zeros(module, name, n_out)
    if path == "copy":  # only size-1 dims were reduced
        return emit_copy(module, name, n_out, max_threads=max_threads, width=width)
    if path == "total":
        return _emit_total(module, name, sizes[0], max_threads, width, prologue)
    if path == "rows":
        return _emit_row_sums(module, name, sizes, in_strides, out_strides, width, prologue)
    return _emit_column_sums(module, name, sizes, in_strides, out_strides, width)


def _emit_zeros(module: ir.Module, name: str, n: int) -> Kernel:
    """The sum over an empty axis."""
    fn, kb = phase_function(module, name, 1)
    out, _, _, tid, _ = phase_args(fn)
    only_thread_zero(kb, tid)
    zero_floats(kb, out, 0, n)
    kb.b.ret_void()
    return Kernel([fn])


def _emit_total(module: ir.Module, name: str, n: int, max_threads: int,
                width: int | None, prologue: Prologue | None = None) -> Kernel:
    """out[0] = sum of all n floats of x."""
    n_inputs = 1 if prologue is None else len(prologue.kinds)
    if max_threads == 1 or n < PARALLEL_TOTAL_MIN:
        fn, kb = open_phase(module, name, n_inputs, width)
        out, inputs, _, tid, _ = phase_args(fn)
        only_thread_zero(kb, tid)
        kb.store(horizontal_sum(kb, span_sum(kb, PrologueSource(kb, inputs, prologue).loader(), kb.i64(0), n)), out)
        kb.b.ret_void()
        return Kernel([fn])

    n_blocks = math.ceil(n / TOTAL_BLOCK)
    last_block_length = n - (n_blocks - 1) * TOTAL_BLOCK
    partials, kb = open_phase(module, f"{name}_block_sums", n_inputs, width)
    _, inputs, scratch, tid, nthreads = phase_args(partials)
    lo, hi = kb.split_range(n_blocks, tid, nthreads)
    x = PrologueSource(kb, inputs, prologue).loader()

    def store_block_sum(block: ir.Value, length: int) -> None:
        block_sum = span_sum(kb, x, kb.mul(block, TOTAL_BLOCK), length)
        kb.store(horizontal_sum(kb, block_sum), scratch, block)

    # The last block may be short; the last thread (the only one whose hi is n_blocks) owns it.
    with kb.for_range(lo, kb.min(hi, n_blocks - 1), name="block") as block:
        store_block_sum(block, TOTAL_BLOCK)
    with kb.if_then(kb.b.icmp_signed("==", hi, kb.i64(n_blocks))):
        store_block_sum(kb.i64(n_blocks - 1), last_block_length)
    kb.b.ret_void()

    combine, kb = open_phase(module, f"{name}_combine", n_inputs, width)
    out, _, scratch, tid, _ = phase_args(combine)
    only_thread_zero(kb, tid)
    kb.store(horizontal_sum(kb, span_sum(kb, scratch, kb.i64(0), n_blocks)), out)
    kb.b.ret_void()
    return Kernel([partials, combine], scratch_floats=n_blocks)


def _emit_row_sums(module: ir.Module, name: str, sizes: Sequence[int],
                   in_strides: Sequence[int], out_strides: Sequence[int],
                   width: int | None, prologue: Prologue | None = None) -> Kernel:
    """Collapsed sum whose innermost dim is reduced: each output is a sum of contiguous rows
    of x (one per index of the outer reduced dims)."""
    fn, kb = open_phase(module, name, 1 if prologue is None else len(prologue.kinds), width)
    out, inputs, _, tid, nthreads = phase_args(fn)
    _row_sums_body(kb, [PrologueSource(kb, inputs, prologue)], [out], sizes, in_strides, out_strides, tid, nthreads)
    return Kernel([fn])


def _row_sums_body(kb: KernelBuilder, sources: list[PrologueSource], outs: list[ir.Value], sizes: Sequence[int],
                   in_strides: Sequence[int], out_strides: Sequence[int], tid: ir.Value, nthreads: ir.Value) -> None:
    """The loops of row sums, one output array per source, all summed over the same rows: a
    row the sources share is read from memory once and from cache by the others."""
    kept = [d for d, stride in enumerate(out_strides) if stride]
    outer_reduced = [d for d, stride in enumerate(out_strides[:-1]) if not stride]
    kept_sizes = [sizes[d] for d in kept]
    row_length = sizes[-1]

    lo, hi = kb.split_range(math.prod(kept_sizes), tid, nthreads)
    reduced_outside_kept = bool(outer_reduced) and outer_reduced[0] < kept[-1]
    if reduced_outside_kept and math.prod(kept_sizes) <= MEMORY_ORDER_OUTPUTS:
        _emit_row_sums_in_memory_order(kb, sources, outs, lo, hi, sizes, in_strides, kept, outer_reduced)
        kb.b.ret_void()
        return
    totals = VectorAccumulators(kb, len(sources), SUM_IDENTITY, vector_add, name="total")
    with kb.for_range(lo, hi, name="out") as index:
        base = dot_offset(kb, unflatten_index(kb, index, kept_sizes),
                          [in_strides[d] for d in kept])
        totals.reset()
        loaders = [source.loader(index) for source in sources]
        with strided_loops(kb, [sizes[d] for d in outer_reduced],
                           [in_strides[d] for d in outer_reduced], base) as row_start:
            for k, rows in enumerate(loaders):
                totals.update(k, span_sum(kb, rows, row_start, row_length))
        for out, total in zip(outs, totals.values()):
            kb.store(horizontal_sum(kb, total), out, index)
    kb.b.ret_void()


def _emit_row_sums_in_memory_order(kb: KernelBuilder, sources: list[PrologueSource], outs: list[ir.Value],
                                   lo: ir.Value, hi: ir.Value, sizes: Sequence[int],
                                   in_strides: Sequence[int], kept: list[int],
                                   outer_reduced: list[int]) -> None:
    """`_row_sums_body` with the outer reduced dims as the outer loops: x is read in memory
    order (the bias gradient of a conv: per sample, each channel's plane in turn), one
    running vector total per output in a stack array. Each output still adds up the same
    rows in the same order: the results are those of the output-major loops."""
    kept_sizes = [sizes[d] for d in kept]
    n_kept = math.prod(kept_sizes)
    with kb.b.goto_entry_block():
        totals = [kb.b.alloca(kb.vec_type, size=kb.i64(n_kept), name=f"totals{k}") for k in range(len(sources))]

    def total(k: int, index: ir.Value) -> ir.Value:
        return kb.b.gep(totals[k], [index], source_etype=kb.vec_type)

    with kb.for_range(lo, hi, name="out") as index:
        for k in range(len(sources)):
            kb.b.store(kb.splat(SUM_IDENTITY), total(k, index))
    with strided_loops(kb, [sizes[d] for d in outer_reduced],
                       [in_strides[d] for d in outer_reduced], kb.i64(0)) as rows_start:
        with kb.for_range(lo, hi, name="out") as index:
            row_start = dot_offset(kb, unflatten_index(kb, index, kept_sizes),
                                   [in_strides[d] for d in kept], rows_start)
            for k, source in enumerate(sources):
                running = kb.b.load(total(k, index), typ=kb.vec_type)
                row_sum = span_sum(kb, source.loader(index), row_start, sizes[-1])
                kb.b.store(kb.fadd(running, row_sum), total(k, index))
    with kb.for_range(lo, hi, name="out") as index:
        for k, out in enumerate(outs):
            kb.store(horizontal_sum(kb, kb.b.load(total(k, index), typ=kb.vec_type)), out, index)


def emit_row_sum_group(module: ir.Module, name: str, x_shape: Sequence[int], axes: Sequence[int],
                       members: Sequence[tuple[Prologue, Sequence[int]]], n_inputs: int,
                       width: int | None = None) -> Kernel:
    """Several row sums over x's shape and `axes` in one pass: member k sums its prologue, whose
    inputs are the kernel inputs `members[k][1]`; its result goes to `out` for member 0 and to
    kernel input n_inputs + k - 1 (an output passed where inputs are) for the others."""
    _, in_strides, sizes, out_strides = _collapsed(tuple(x_shape), tuple(axes))
    fn, kb = open_phase(module, name, n_inputs + len(members) - 1, width)
    out, pointers, _, tid, nthreads = phase_args(fn)
    sources = [PrologueSource(kb, [pointers[i] for i in indexes], prologue) for prologue, indexes in members]
    _row_sums_body(kb, sources, [out] + list(pointers[n_inputs:]), sizes, in_strides, out_strides, tid, nthreads)
    return Kernel([fn])


def _emit_column_sums(module: ir.Module, name: str, sizes: Sequence[int],
                      in_strides: Sequence[int], out_strides: Sequence[int],
                      width: int | None) -> Kernel:
    """Collapsed sum whose innermost dim is kept: out's innermost run of `columns` floats is a
    vector sum of runs of x, one per index of the reduced dims."""
    fn, kb = open_phase(module, name, 1, width)
    out, (x,), _, tid, nthreads = phase_args(fn)
    columns = sizes[-1]
    outer_kept = [d for d, stride in enumerate(out_strides[:-1]) if stride]
    reduced = [d for d, stride in enumerate(out_strides) if not stride]

    def emit_chunk(x_start: ir.Value, out_start: ir.Value, chunk_width: int) -> None:
        lanes = vector_lanes(kb, chunk_width)
        sums = _column_chunk_sums(kb, x, x_start, lanes, [sizes[d] for d in reduced],
                                  [in_strides[d] for d in reduced])
        for v, (value, n_lanes) in enumerate(zip(sums, lanes)):
            store_lanes(kb, value, out, kb.add(out_start, v * kb.width), n_lanes)

    for_each_column_chunk(kb, tid, nthreads, [sizes[d] for d in outer_kept],
                          [in_strides[d] for d in outer_kept],
                          [out_strides[d] for d in outer_kept], columns, emit_chunk)
    kb.b.ret_void()
    return Kernel([fn])


def _column_chunk_sums(kb: KernelBuilder, x: ir.Value, x_start: ir.Value, lanes: list[int],
                       reduced_sizes: Sequence[int], reduced_strides: Sequence[int]
                       ) -> list[ir.Value]:
    """Vector sums of the runs x[x_start + offset:][:sum(lanes)] over every offset of the
    reduced dims; the innermost reduced dim is summed in blocks of ROW_BLOCK rows."""
    *outer_sizes, rows = reduced_sizes
    *outer_strides, row_stride = reduced_strides
    totals = VectorAccumulators(kb, len(lanes), SUM_IDENTITY, vector_add, name="total")
    totals.reset()
    with strided_loops(kb, outer_sizes, outer_strides, x_start) as rows_start:
        def block_sums(first_row: ir.Value, n_rows: int) -> list[ir.Value]:
            sums = VectorAccumulators(kb, len(lanes), SUM_IDENTITY, vector_add)
            sums.reset()
            with kb.for_range(first_row, kb.add(first_row, n_rows), name="row") as row:
                run_start = kb.add(rows_start, kb.mul(row, row_stride))
                for v, n_lanes in enumerate(lanes):
                    sums.update(v, load_lanes(kb, x, kb.add(run_start, v * kb.width), n_lanes))
            return sums.values()

        totals.update_all(blocked_sum(kb, rows, ROW_BLOCK, len(lanes), block_sums))
    return totals.values()


# ---- lowering --------------------------------------------------------------------------------

def sum_prologue(node, producer) -> Step | None:
    """The sum `node` computing its elementwise operand `producer` as it reads it, if the sum is
    a total or row sum and each of the producer's operands is x-shaped, one value per output
    (batch norm's per-channel statistics) or one value."""
    prologue = _prologue(node, producer)
    if prologue is None:
        return None
    axes = node.attrs["axes"]
    return Step(node, list(producer.inputs),
                lambda m, name, threads: emit_sum(m, name, producer.shape, axes, max_threads=threads,
                                                  prologue=prologue),
                "sum+ew", [producer, node],
                flops=costs.elementwise_flops(producer.size, [prologue.expr]) + costs.sum_flops(producer.size))


def _prologue(node, producer) -> Prologue | None:
    axes = node.attrs["axes"]
    if producer.dtype != "float32" or sum_path(producer.shape, axes) not in ("total", "rows"):
        return None
    per_output = tuple(1 if i in axes else d for i, d in enumerate(producer.shape))
    kinds = []
    for operand in producer.inputs:
        if operand.dtype != "float32":
            return None
        padded = (1,) * (producer.ndim - operand.ndim) + tuple(operand.shape)
        if operand.shape == producer.shape:
            kinds.append("full")
        elif operand.size == 1:
            kinds.append("scalar")
        elif padded == per_output:
            kinds.append("per_output")
        else:
            return None
    return Prologue(producer.attrs["expr"], tuple(kinds))


# Each sum of a pass keeps a vector total per output (and, in memory order, a stack array of
# them): 4 stay in registers and in a few KB of stack, and BN never needs more than 3.
MAX_SUMS_IN_ONE_PASS = 4


def row_sum_kind(step: Step) -> tuple | None:
    """(x's shape, axes) of a step that could share a pass with other row sums (a float32 row
    sum, with or without a prologue), else None. Only steps of one kind can share."""
    member = row_sum_member(step)
    return member[:2] if member is not None else None


def joins_row_sums(group: list[Step], step: Step) -> bool:
    """Whether `step`, a row sum of the group's kind (`row_sum_kind`), can be computed in the
    group's pass: it reads a buffer of x's shape that a member reads, and the group is not
    full. The caller makes sure that it does not depend on the group."""
    if len(group) >= MAX_SUMS_IN_ONE_PASS:
        return False
    x_shape = row_sum_kind(group[0])[0]
    read = {alias_root(t).id for member in group for t in member.operands if t.shape == x_shape}
    return any(alias_root(t).id in read for t in step.operands if t.shape == x_shape)


def row_sums_in_one_pass(group: list[Step]) -> Step:
    """One step computing the row sums of `group` (see `joins_row_sums`) in a single pass over
    the data they share, as batch norm's backward needs Σdy and Σdy·(x - mean): its node is the
    first member's, the others are its extra outputs."""
    x_shape, axes, _ = row_sum_member(group[0])
    inputs = list(dict.fromkeys(t for step in group for t in step.operands))
    position = {t.id: i for i, t in enumerate(inputs)}
    members = tuple((row_sum_member(step)[2], tuple(position[t.id] for t in step.operands)) for step in group)
    return Step(group[0].node, inputs,
                lambda m, name, threads: emit_row_sum_group(m, name, x_shape, axes, members, len(inputs)),
                "&".join(step.label for step in group), [node for step in group for node in step.covers],
                flops=sum(step.flops for step in group), extra_outputs=[step.node for step in group[1:]])


def row_sum_member(step: Step):
    """(x's shape, axes, prologue) of a plain sum or a sum+ew step that is a float32 row sum."""
    node = step.node
    if node.op != "sum" or step.label not in ("sum", "sum+ew") or node.dtype != "float32":
        return None
    axes = node.attrs["axes"]
    if step.label == "sum":
        x_shape, prologue = node.inputs[0].shape, Prologue(symbol(0), ("full",))
    else:
        x_shape, prologue = step.covers[0].shape, _prologue(node, step.covers[0])
    if prologue is None or sum_path(x_shape, axes) != "rows":
        return None
    return tuple(x_shape), axes, prologue


@lowers("sum", prologue=sum_prologue)
def lower_sum(node, _epilogue) -> Step:
    x = node.inputs[0]
    return Step(node, [x], lambda m, name, threads: emit_sum(m, name, x.shape, node.attrs["axes"], max_threads=threads),
                "sum", [node], flops=costs.sum_flops(x.size))
