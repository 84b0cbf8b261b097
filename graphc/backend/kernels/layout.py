"""Kernels that only move floats: contiguous copy, numpy broadcasting, axis permutation, slice,
pad and concat.

This module also holds the IR building blocks the reduction and softmax kernels share: loops
over a contiguous span in vectors with a partial last vector, lane-masked loads and stores,
entry-block stack slots, and flat-index arithmetic for shapes known at generation time.

Every emitter first collapses its problem (`collapse_dims`): size-1 dims go, and neighbouring
dims that every operand walks as one are merged. A 4-D transpose NCHW -> NHWC becomes a batch
of 2-D (C, HW) transposes; broadcasting a bias (C,) to (N, C) becomes N row copies; a scalar
broadcast to any shape becomes one long splat.

Threads split the work in units large enough to amortise the split (row chunks, 64x64
transpose blocks); each writes only its own part of `out`. These kernels have one phase and
need no scratch; `max_threads` is accepted for the emitters' common signature.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Sequence

import llvmlite.ir as ir

from graphc.backend.emit.kernel import Kernel, phase_args, phase_function
from graphc.backend.emit.kernel_builder import F32, I1, I32, I64, PTR, KernelBuilder
from graphc.backend.lowering_rules import Step, lowers

__all__ = ["emit_copy", "emit_broadcast_copy", "emit_transpose", "emit_concat"]

I8 = ir.IntType(8)

# A thread's unit of work along one long row (64 KiB): rows longer than this are split between
# threads, e.g. the splat of a scalar gradient into a whole tensor.
ROW_CHUNK_FLOATS = 16384

# Edge of the square blocks a transpose is cut into. A 64x64 block of source and destination
# (2 x 16 KiB) stays in L1/L2 while it is transposed tile by tile, so every cache line read or
# written is used whole even though each tile touches only width floats of a row.
TRANSPOSE_BLOCK = 64


# ---------------------------------------------------------------------------- shape planning

def contiguous_strides(shape: Sequence[int]) -> list[int]:
    """Element strides of a C-contiguous array of `shape`."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return strides[::-1]


def collapse_dims(sizes: Sequence[int], *stride_lists: Sequence[int]
                  ) -> tuple[list[int], list[list[int]]]:
    """Drop size-1 dims and merge neighbours that every operand walks as one dim.

    Dim a (outer) and its neighbour b merge when, for every operand, stride[a] ==
    stride[b] * size[b]: stepping a is then the same as wrapping b. That holds for two
    contiguous dims and for two broadcast (stride 0) dims alike. Returns the new sizes and
    the new stride list of each operand, outermost dim first.
    """
    new_sizes: list[int] = []
    new_strides: list[list[int]] = [[] for _ in stride_lists]
    for dim, size in enumerate(sizes):
        if size == 1:
            continue
        strides = [operand[dim] for operand in stride_lists]
        if new_sizes and all(kept[-1] == stride * size
                             for kept, stride in zip(new_strides, strides)):
            new_sizes[-1] *= size
            for kept, stride in zip(new_strides, strides):
                kept[-1] = stride
        else:
            new_sizes.append(size)
            for kept, stride in zip(new_strides, strides):
                kept.append(stride)
    return new_sizes, new_strides


# ---------------------------------------------------------------------------- IR building blocks

def open_phase(module: ir.Module, name: str, n_inputs: int,
               width: int | None) -> tuple[ir.Function, KernelBuilder]:
    """`phase_function` with a builder of the given vector width (None: the host's)."""
    fn, kb = phase_function(module, name, n_inputs)
    return fn, KernelBuilder(kb.b, width)


def declare_intrinsic(module: ir.Module, name: str, return_type: ir.Type,
                      arg_types: Sequence[ir.Type]) -> ir.Function:
    """The LLVM intrinsic `name` (already mangled, e.g. llvm.floor.v8f32), declared once."""
    existing = module.globals.get(name)
    if existing is not None:
        return existing
    return ir.Function(module, ir.FunctionType(return_type, arg_types), name=name)


def vector_suffix(kb: KernelBuilder) -> str:
    """Intrinsic name mangling of the kernel's float vector type, e.g. 'v8f32'."""
    return f"v{kb.width}f32"


def entry_alloca(kb: KernelBuilder, typ: ir.Type, name: str) -> ir.Value:
    """A stack slot allocated in the function's entry block.

    Only entry-block allocas are promoted to registers by LLVM (SROA/mem2reg), which is what
    lets a value carried across `for_range` loops live in a register without hand-made phis.
    """
    current = kb.b.block
    kb.b.position_at_start(kb.b.function.entry_basic_block)
    slot = kb.b.alloca(typ, name=name)
    kb.b.position_at_end(current)
    return slot


def only_thread_zero(kb: KernelBuilder, tid: ir.Value) -> None:
    """Return at once on every thread but 0; emission continues in thread 0's path."""
    work = kb.b.append_basic_block("thread0")
    idle = kb.b.append_basic_block("idle")
    kb.b.cbranch(kb.b.icmp_signed("==", tid, kb.i64(0)), work, idle)
    kb.b.position_at_end(idle)
    kb.b.ret_void()
    kb.b.position_at_end(work)


def load_lanes(kb: KernelBuilder, ptr: ir.Value, index: ir.Value, lanes: int,
               fill: float = 0.0) -> ir.Value:
    """The `lanes` floats at ptr[index:] as a vector whose other lanes hold `fill`.

    A partial vector uses a masked load, which touches no memory past the last lane.
    """
    if lanes == kb.width:
        return kb.load_vec(ptr, index)
    return kb.masked_load_vec(ptr, index, kb.lane_mask(lanes), kb.splat(fill))


def store_lanes(kb: KernelBuilder, value: ir.Value, ptr: ir.Value, index: ir.Value,
                lanes: int) -> None:
    """Store the first `lanes` lanes of `value` at ptr[index:], touching nothing after them.

    A partial vector is stored as plain stores of power-of-two pieces (7 lanes: 4 + 2 + 1),
    not a masked store: AVX2 masked stores are microcoded on AMD cores (~20 cycles each).
    """
    if lanes == kb.width:
        kb.store_vec(value, ptr, index)
        return
    first = 0
    for piece in _power_of_two_pieces(lanes):
        if piece == 1:
            part = kb.b.extract_element(value, ir.Constant(I32, first))
        else:
            part = kb.b.shuffle_vector(value, ir.Constant(kb.vec_type, ir.Undefined),
                                       ir.Constant(ir.VectorType(I32, piece),
                                                   list(range(first, first + piece))))
        kb.b.store(part, kb.gep(ptr, kb.add(index, first)), align=4)
        first += piece


def _power_of_two_pieces(count: int) -> list[int]:
    """count as a sum of distinct powers of two, largest first: 7 -> [4, 2, 1]."""
    return [1 << bit for bit in reversed(range(count.bit_length())) if count >> bit & 1]


def vector_lanes(kb: KernelBuilder, count: int) -> list[int]:
    """How `count` consecutive floats split into vectors: full ones, then a partial one."""
    full, rest = divmod(count, kb.width)
    return [kb.width] * full + ([rest] if rest else [])


VectorBody = Callable[[ir.Value, int, int], None]


def for_each_vector(kb: KernelBuilder, start: ir.Value, count: int, body: VectorBody,
                    unroll: int = 1) -> None:
    """Emit body(index, lanes, slot) for each vector of the floats [start, start + count).

    Groups of `unroll` full vectors form one IR loop iteration, numbered slot 0..unroll-1 so
    that a body can keep independent accumulators per slot (latency hiding). The leftover
    full vectors and the final partial vector (lanes < width) are emitted after the loop.
    """
    group = kb.width * unroll
    looped = count // group * group
    if looped:
        with kb.for_range(0, looped, step=group, name="vec") as offset:
            for slot in range(unroll):
                body(kb.add(start, kb.add(offset, slot * kb.width)), kb.width, slot)
    position = looped
    for slot, lanes in enumerate(vector_lanes(kb, count - looped)):
        body(kb.add(start, position), lanes, slot % unroll)
        position += lanes


@contextlib.contextmanager
def strided_loops(kb: KernelBuilder, sizes: Sequence[int], strides: Sequence[int],
                  base: ir.Value) -> Iterator[ir.Value]:
    """Nested IR loops over a multi-index (outermost first); yields base + sum(i_k * stride_k)."""
    with contextlib.ExitStack() as loops:
        offset = kb.as_i64(base)
        for size, stride in zip(sizes, strides):
            index = loops.enter_context(kb.for_range(0, size, name="dim"))
            offset = kb.add(offset, kb.mul(index, stride))
        yield offset


def unflatten_index(kb: KernelBuilder, flat: ir.Value, sizes: Sequence[int]) -> list[ir.Value]:
    """The multi-index (outermost first) of a row-major flat index over `sizes`.

    The sizes are constants, so the divisions become multiplications and shifts.
    """
    indices = []
    for size in reversed(sizes[1:]):
        indices.append(kb.b.urem(flat, kb.i64(size)))
        flat = kb.b.udiv(flat, kb.i64(size))
    indices.append(flat)
    return indices[::-1]


def dot_offset(kb: KernelBuilder, indices: Sequence[ir.Value], strides: Sequence[int],
               base: ir.Value | int = 0) -> ir.Value:
    """base + sum(index_k * stride_k)."""
    offset = kb.as_i64(base)
    for index, stride in zip(indices, strides):
        offset = kb.add(offset, kb.mul(index, stride))
    return offset


def copy_floats(kb: KernelBuilder, dst: ir.Value, dst_index: ir.Value, src: ir.Value,
                src_index: ir.Value, count: ir.Value | int) -> None:
    """dst[dst_index:][:count] = src[src_index:][:count] (non-overlapping).

    llvm.memcpy is inlined as vector moves for small constant counts and otherwise calls
    libc's memcpy, which is as fast as a copy loop gets on every x86 generation.
    """
    memcpy = declare_intrinsic(kb.module, "llvm.memcpy.p0.p0.i64", ir.VoidType(),
                               [PTR, PTR, I64, I1])
    kb.b.call(memcpy, [kb.gep(dst, dst_index), kb.gep(src, src_index),
                       kb.mul(count, 4), ir.Constant(I1, 0)])


def zero_floats(kb: KernelBuilder, dst: ir.Value, index: ir.Value | int,
                count: ir.Value | int) -> None:
    """dst[index:][:count] = 0.0 (the all-zero bit pattern)."""
    memset = declare_intrinsic(kb.module, "llvm.memset.p0.i64", ir.VoidType(),
                               [PTR, I8, I64, I1])
    kb.b.call(memset, [kb.gep(dst, index), ir.Constant(I8, 0), kb.mul(count, 4),
                       ir.Constant(I1, 0)])


def fill_floats(kb: KernelBuilder, dst: ir.Value, start: ir.Value, count: ir.Value | int,
                value: ir.Value) -> None:
    """dst[start:][:count] = the vector `value` (all lanes equal); `count` may be dynamic."""
    if isinstance(count, int):
        for_each_vector(kb, start, count, lambda index, lanes, _slot: store_lanes(
            kb, value, dst, index, lanes))
        return
    full = kb.sub(count, kb.b.urem(count, kb.i64(kb.width)))
    with kb.for_range(0, full, step=kb.width, name="fill") as offset:
        kb.store_vec(value, dst, kb.add(start, offset))
    tail_mask = kb.lane_mask_dynamic(kb.sub(count, full))  # may enable no lane
    kb.masked_store_vec(value, dst, kb.add(start, full), tail_mask)


# ---------------------------------------------------------------------------- the kernels

def emit_copy(module: ir.Module, name: str, n: int, *, max_threads: int,
              width: int | None = None) -> Kernel:
    """out[:n] = in0[:n], threads splitting it in 64 KiB chunks.

    `width` overrides the host's vector width (tests use it to cover other hosts' tails).
    """
    return _emit_row_gather(module, name, [], [], n, splat=False, width=width)


def emit_broadcast_copy(module: ir.Module, name: str, x_shape: Sequence[int],
                        out_shape: Sequence[int], *, max_threads: int,
                        width: int | None = None) -> Kernel:
    """out = numpy.broadcast_to(in0, out_shape), materialised contiguously."""
    x_shape, out_shape = tuple(x_shape), tuple(out_shape)
    lead = len(out_shape) - len(x_shape)
    if lead < 0 or any(d not in (1, o) for d, o in zip(x_shape, out_shape[lead:])):
        raise ValueError(f"cannot broadcast {x_shape} to {out_shape}")
    padded = (1,) * lead + x_shape
    # A stretched dim is read with stride 0: every out index along it sees the same x value.
    in_strides = [0 if d == 1 else s for d, s in zip(padded, contiguous_strides(padded))]
    sizes, (in_strides,) = collapse_dims(out_shape, in_strides)
    if not sizes:
        return _emit_row_gather(module, name, [], [], 1, splat=False, width=width)
    return _emit_row_gather(module, name, sizes[:-1], in_strides[:-1], sizes[-1],
                            splat=in_strides[-1] == 0, width=width)


def emit_transpose(module: ir.Module, name: str, x_shape: Sequence[int], axes: Sequence[int],
                   *, max_threads: int, width: int | None = None) -> Kernel:
    """out = numpy.transpose(in0, axes), materialised contiguously.

    When the permutation keeps x's innermost dim innermost, rows are copied whole; otherwise
    the problem is a batch of 2-D transposes between x's innermost dim and out's, done in
    cache blocks of register-transposed width x width tiles.
    """
    x_shape, axes = tuple(x_shape), tuple(axes)
    if sorted(axes) != list(range(len(x_shape))):
        raise ValueError(f"axes {axes} are not a permutation of {len(x_shape)} dims")
    x_strides = contiguous_strides(x_shape)
    out_sizes = [x_shape[a] for a in axes]
    sizes, (in_strides, out_strides) = collapse_dims(
        out_sizes, [x_strides[a] for a in axes], contiguous_strides(out_sizes))
    if not sizes:
        return _emit_row_gather(module, name, [], [], 1, splat=False, width=width)
    if in_strides[-1] == 1:
        return _emit_row_gather(module, name, sizes[:-1], in_strides[:-1], sizes[-1],
                                splat=False, width=width)
    return _emit_tiled_transpose(module, name, sizes, in_strides, out_strides, width)


def emit_slice(module: ir.Module, name: str, x_shape: Sequence[int], starts: Sequence[int],
               stops: Sequence[int], *, max_threads: int, width: int | None = None) -> Kernel:
    """out = in0[starts[0]:stops[0], ...], materialised contiguously: a row gather whose rows
    start at the box's corner."""
    out_shape = [stop - start for start, stop in zip(starts, stops)]
    x_strides = contiguous_strides(x_shape)
    corner = sum(start * stride for start, stride in zip(starts, x_strides))
    return _emit_row_gather(module, name, out_shape[:-1], x_strides[:-1], out_shape[-1], splat=False,
                            width=width, base=corner)


def emit_pad(module: ir.Module, name: str, x_shape: Sequence[int], pad_width: Sequence[tuple[int, int]],
             value: float, *, max_threads: int, width: int | None = None) -> Kernel:
    """out = numpy.pad(in0, pad_width, constant_values=value), one row of out per work item:
    rows inside x's box are the constant, x's row, the constant; the others all constant."""
    fn, kb = open_phase(module, name, 1, width)
    out, (x,), _, tid, nthreads = phase_args(fn)
    out_shape = [d + before + after for d, (before, after) in zip(x_shape, pad_width)]
    (before_last, after_last), x_row, out_row = pad_width[-1], x_shape[-1], out_shape[-1]
    fill = kb.splat(ir.Constant(F32, value))
    lo, hi = kb.split_range(math.prod(out_shape[:-1]), tid, nthreads)
    with kb.for_range(lo, hi, name="row") as row:
        out_index = kb.mul(row, out_row)
        indices = unflatten_index(kb, row, out_shape[:-1]) if len(out_shape) > 1 else []
        inside = ir.Constant(I1, 1)
        for index, d, (before, _) in zip(indices, x_shape, pad_width):
            shifted = kb.sub(index, before)   # unsigned: below the box wraps around, above it
            inside = kb.b.and_(inside, kb.b.icmp_unsigned("<", shifted, kb.i64(d)))
        with kb.b.if_else(inside) as (copy_row, fill_row):
            with copy_row:
                x_index = dot_offset(kb, [kb.sub(i, before) for i, (before, _) in zip(indices, pad_width)],
                                     contiguous_strides(x_shape)[:-1])
                if before_last:
                    fill_floats(kb, out, out_index, before_last, fill)
                copy_floats(kb, out, kb.add(out_index, before_last), x, x_index, x_row)
                if after_last:
                    fill_floats(kb, out, kb.add(out_index, before_last + x_row), after_last, fill)
            with fill_row:
                fill_floats(kb, out, out_index, out_row, fill)
    kb.b.ret_void()
    return Kernel([fn])


def emit_concat(module: ir.Module, name: str, shapes: Sequence[Sequence[int]], axis: int, *,
                max_threads: int, width: int | None = None) -> Kernel:
    """out = numpy.concatenate(in0, in1, ..., axis): each input copied into its slab of out.

    Seen from `axis`, out is a batch of rows (the dims before it); each row is input 0's run,
    input 1's, ... one after the other, input k's run a contiguous shape_k[axis] * (inner size)
    floats. When every run fits in one work item, a thread fills whole rows of out, every
    input's run in turn, so that each cache line of out is written once and whole (runs of a
    few floats, as a concat on the last axis has, would otherwise make every input's pass
    read and write all of out again). Longer runs are copied input by input, threads sharing
    each input's rows in chunks of ROW_CHUNK_FLOATS.
    """
    shapes = [tuple(shape) for shape in shapes]
    outer = math.prod(shapes[0][:axis])
    runs = [math.prod(shape[axis:]) for shape in shapes]
    if any(math.prod(shape[:axis]) != outer for shape in shapes):
        raise ValueError(f"shapes {shapes} differ before axis {axis}")
    fn, kb = open_phase(module, name, len(shapes), width)
    out, inputs, _, tid, nthreads = phase_args(fn)
    starts = [sum(runs[:k]) for k in range(len(runs))]
    if outer > 1 and max(runs) <= ROW_CHUNK_FLOATS:
        lo, hi = kb.split_range(outer, tid, nthreads)
        with kb.for_range(lo, hi, name="row") as row:
            for x, run, start in zip(inputs, runs, starts):
                copy_floats(kb, out, kb.add(kb.mul(row, sum(runs)), start), x, kb.mul(row, run), run)
    else:
        for x, run, start in zip(inputs, runs, starts):
            _copy_rows(kb, out, x, tid, nthreads, [outer] if outer > 1 else [], [run] if outer > 1 else [], run,
                       splat=False, out_row_stride=sum(runs), out_base=start)
    kb.b.ret_void()
    return Kernel([fn])


# ---------------------------------------------------------------------------- row gathers

def _emit_row_gather(module: ir.Module, name: str, row_sizes: Sequence[int],
                     row_strides: Sequence[int], row_length: int, *, splat: bool,
                     width: int | None, base: int = 0) -> Kernel:
    """out[r, :] = x[offset(r) : offset(r) + row_length], or with `splat` the single value
    x[offset(r)] repeated, for the rows r of a contiguous out of shape row_sizes + (row_length,).

    offset(r) = base + sum(r_k * row_strides[k]).
    """
    fn, kb = open_phase(module, name, 1, width)
    out, (x,), _, tid, nthreads = phase_args(fn)
    _copy_rows(kb, out, x, tid, nthreads, row_sizes, row_strides, row_length, splat=splat, base=base)
    kb.b.ret_void()
    return Kernel([fn])


def _copy_rows(kb: KernelBuilder, out: ir.Value, x: ir.Value, tid: ir.Value, nthreads: ir.Value,
               row_sizes: Sequence[int], row_strides: Sequence[int], row_length: int, *, splat: bool,
               base: int = 0, out_row_stride: int | None = None, out_base: int = 0) -> None:
    """Thread `tid`'s share of the row copies out[out_base + r * out_row_stride :][:row_length] =
    x[offset(r):][:row_length] (or x[offset(r)] splat), r the flat index of a row over `row_sizes`.

    out's rows are contiguous by default (out_row_stride = row_length); a wider stride places
    them in a slab of a wider out (concat). Work items are (row, chunk of the row).
    """
    out_row_stride = row_length if out_row_stride is None else out_row_stride
    n_chunks = math.ceil(row_length / ROW_CHUNK_FLOATS)
    n_rows = math.prod(row_sizes)
    lo, hi = kb.split_range(n_rows * n_chunks, tid, nthreads)
    with kb.for_range(lo, hi, name="item") as item:
        indices = unflatten_index(kb, item, list(row_sizes) + [n_chunks])
        chunk_start = kb.mul(indices[-1], ROW_CHUNK_FLOATS)
        count = (row_length if n_chunks == 1
                 else kb.min(ROW_CHUNK_FLOATS, kb.sub(row_length, chunk_start)))
        row = kb.b.udiv(item, kb.i64(n_chunks)) if n_chunks > 1 else item
        out_index = kb.add(kb.add(kb.mul(row, out_row_stride), out_base), chunk_start)
        x_index = dot_offset(kb, indices[:-1], row_strides, base)
        if splat:
            fill_floats(kb, out, out_index, count, kb.splat(kb.load(x, x_index)))
        else:
            copy_floats(kb, out, out_index, x, kb.add(x_index, chunk_start), count)


# ---------------------------------------------------------------------------- transposes

def _emit_tiled_transpose(module: ir.Module, name: str, sizes: Sequence[int],
                          in_strides: Sequence[int], out_strides: Sequence[int],
                          width: int | None) -> Kernel:
    """Collapsed transpose whose innermost out dim is not x's innermost dim.

    Call x's innermost dim (stride 1 in x) the column dim and out's innermost dim (stride 1
    in out) the row dim: each batch index (the other dims) is a 2-D transpose of a
    (rows x columns) slab of x into a (columns x rows) slab of out. Work items are
    (batch index, row block, column block) of TRANSPOSE_BLOCK-square blocks.
    """
    fn, kb = open_phase(module, name, 1, width)
    out, (x,), _, tid, nthreads = phase_args(fn)
    row_dim, col_dim = len(sizes) - 1, in_strides.index(1)
    batch = [d for d in range(len(sizes)) if d not in (row_dim, col_dim)]
    slab = _Slab(rows=sizes[row_dim], cols=sizes[col_dim],
                 x_row_stride=in_strides[row_dim], out_row_stride=out_strides[col_dim])

    grid = [sizes[d] for d in batch] + [slab.row_blocks, slab.col_blocks]
    lo, hi = kb.split_range(math.prod(grid), tid, nthreads)
    with kb.for_range(lo, hi, name="block") as item:
        indices = unflatten_index(kb, item, grid)
        row_block, col_block = indices[-2:]
        x_block = dot_offset(kb, indices, [in_strides[d] for d in batch]
                             + [TRANSPOSE_BLOCK * slab.x_row_stride, TRANSPOSE_BLOCK])
        out_block = dot_offset(kb, indices, [out_strides[d] for d in batch]
                               + [TRANSPOSE_BLOCK, TRANSPOSE_BLOCK * slab.out_row_stride])
        slab.emit_block(kb, out, out_block, x, x_block, row_block, col_block)
    kb.b.ret_void()
    return Kernel([fn])


class _Slab:
    """One 2-D transpose out[c, r] = x[r, c] (r < rows, c < cols) cut into blocks and tiles.

    Rows of x are `x_row_stride` apart and rows of out `out_row_stride` apart; columns are
    contiguous in both. Blocks are TRANSPOSE_BLOCK square; inside a block, width x width
    tiles are transposed in registers. Only the last block of each direction has partial
    tiles (rows % width or cols % width wide), loaded masked and stored piecewise.
    """

    def __init__(self, rows: int, cols: int, x_row_stride: int, out_row_stride: int):
        self.rows, self.cols = rows, cols
        self.x_row_stride, self.out_row_stride = x_row_stride, out_row_stride
        self.row_blocks = math.ceil(rows / TRANSPOSE_BLOCK)
        self.col_blocks = math.ceil(cols / TRANSPOSE_BLOCK)

    def emit_block(self, kb: KernelBuilder, out: ir.Value, out_block: ir.Value,
                   x: ir.Value, x_block: ir.Value, row_block: ir.Value,
                   col_block: ir.Value) -> None:
        """Transpose block (row_block, col_block); offsets are relative to its corner."""
        w = kb.width
        row_tail, col_tail = self.rows % w, self.cols % w
        whole_rows = self._whole_tiles_extent(kb, self.rows, row_block)
        whole_cols = self._whole_tiles_extent(kb, self.cols, col_block)

        def tile_row(r: ir.Value, n_rows: int) -> None:
            with kb.for_range(0, whole_cols, step=w, name="tile_c") as c:
                self._emit_tile(kb, out, out_block, x, x_block, r, c, n_rows, w)
            if col_tail:
                with kb.if_then(self._has_partial_tile(kb, whole_cols, self.cols, col_block)):
                    self._emit_tile(kb, out, out_block, x, x_block, r, whole_cols,
                                    n_rows, col_tail)

        with kb.for_range(0, whole_rows, step=w, name="tile_r") as r:
            tile_row(r, w)
        if row_tail:
            with kb.if_then(self._has_partial_tile(kb, whole_rows, self.rows, row_block)):
                tile_row(whole_rows, row_tail)

    def _emit_tile(self, kb: KernelBuilder, out: ir.Value, out_block: ir.Value,
                   x: ir.Value, x_block: ir.Value, r: ir.Value, c: ir.Value,
                   n_rows: int, n_cols: int) -> None:
        """out[c + j, r + i] = x[r + i, c + j] for i < n_rows, j < n_cols (<= width): load
        the tile's rows, transpose them in registers, store its columns. Absent rows are
        zeros that land in lanes never stored."""
        x_tile = kb.add(x_block, kb.add(kb.mul(r, self.x_row_stride), c))
        out_tile = kb.add(out_block, kb.add(kb.mul(c, self.out_row_stride), r))
        rows = [load_lanes(kb, x, kb.add(x_tile, i * self.x_row_stride), n_cols)
                if i < n_rows else kb.splat(0.0) for i in range(kb.width)]
        columns = kb.transpose(rows)
        for j in range(n_cols):
            store_lanes(kb, columns[j], out, kb.add(out_tile, j * self.out_row_stride), n_rows)

    @staticmethod
    def _whole_tiles_extent(kb: KernelBuilder, extent: int, block: ir.Value) -> ir.Value:
        """Rows (or columns) of this block covered by whole tiles. Blocks start at multiples
        of TRANSPOSE_BLOCK, itself a multiple of the width, so this is never negative."""
        whole = extent - extent % kb.width
        return kb.min(TRANSPOSE_BLOCK, kb.sub(whole, kb.mul(block, TRANSPOSE_BLOCK)))

    @staticmethod
    def _has_partial_tile(kb: KernelBuilder, whole_extent: ir.Value, extent: int,
                          block: ir.Value) -> ir.Value:
        """Whether the block extends past its whole tiles (only a last block can)."""
        block_end = kb.add(kb.mul(block, TRANSPOSE_BLOCK), whole_extent)
        return kb.b.icmp_signed("<", block_end, kb.i64(extent))


# ---- lowering --------------------------------------------------------------------------------

def _moving_step(node, emit, label: str) -> Step:
    """The step of a kernel that only moves its one operand's values: `emit(module, name,
    threads)` builds it."""
    return Step(node, [node.inputs[0]], emit, label, [node], flops=0)


@lowers("transpose")
def lower_transpose(node, _epilogue) -> Step:
    shape, axes = node.inputs[0].shape, node.attrs["axes"]
    return _moving_step(node, lambda m, name, threads: emit_transpose(m, name, shape, axes, max_threads=threads),
                        "transpose")


@lowers("slice")
def lower_slice(node, _epilogue) -> Step:
    shape, a = node.inputs[0].shape, node.attrs
    return _moving_step(node, lambda m, name, threads: emit_slice(m, name, shape, a["starts"], a["stops"],
                                                                  max_threads=threads), "slice")


@lowers("pad")
def lower_pad(node, _epilogue) -> Step:
    shape, a = node.inputs[0].shape, node.attrs
    return _moving_step(node, lambda m, name, threads: emit_pad(m, name, shape, a["pad_width"], a["value"],
                                                                max_threads=threads), "pad")


@lowers("concat")
def lower_concat(node, _epilogue) -> Step:
    shapes, axis = [operand.shape for operand in node.inputs], node.attrs["axis"]
    return Step(node, list(node.inputs),
                lambda m, name, threads: emit_concat(m, name, shapes, axis, max_threads=threads),
                "concat", [node], flops=0)


def copy_step(node, source) -> Step:
    """A step copying `source`'s buffer into `node`'s (materializes an output that aliases another value)."""
    return Step(node, [source], lambda m, name, threads: emit_copy(m, name, node.size, max_threads=threads),
                "copy", [], flops=0)
