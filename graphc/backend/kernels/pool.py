"""Native float32 kernels for 2-D average and max pooling (NCHW) and their gradients.

The semantics are graphc/core/ops/pool.py's: average pooling counts padded cells as zeros and
divides by kh*kw; max pooling ignores padding (it never wins) and its gradient goes to each
window's first maximal input in row-major window order (PyTorch's tie rule); a NaN in a
window wins over numbers, as numpy's max and argmax have it.

Every output pixel of every (n, c) plane is independent, so threads split the N*C planes.
Within a plane the output is cut at compile time into rectangles (see `_plane_regions`): in
the interior one every window lies inside the image, and its windows are processed a vector
of output columns at a time, each lane one window, with constant offsets and no bounds
checks; around it, windows are clipped to the image and processed one at a time.

A window computation is written once as a fold over the window's cells (`fold` of
`_ScalarWindow` and `_VectorWindows`) and runs unchanged on scalars (one window) and on
vectors (a lane per window). Compared
with leaving vectorization to LLVM, this also covers output rows shorter than LLVM's
vector-times-interleave (LeNet's 14 and 5 columns) and the max-pool gradient's search,
which LLVM kept scalar, with a mispredicted branch per cell.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Callable, Iterator, Sequence

import llvmlite.ir as ir

from graphc.backend import costs
from graphc.backend.emit.kernel import Kernel, phase_args, phase_function
from graphc.backend.emit.kernel_builder import I32, I64, KernelBuilder, shared_constant
from graphc.backend.kernels.conv.buffers import emit_fill_zero, splat_i32
from graphc.backend.kernels.elementwise import emit_elementwise_epilogue, emit_expr
from graphc.backend.kernels.layout import entry_alloca
from graphc.backend.kernels.window import WindowGeometry
from graphc.backend.lowering_rules import lowers, no_param_operands, step_with_elementwise_epilogue

__all__ = ["PoolGeometry", "emit_avg_pool2d", "emit_avg_pool2d_grad", "emit_max_pool2d",
           "emit_max_pool2d_grad"]

# Per-thread scratch regions start on a 64-byte boundary so that threads never share a line.
_CACHE_LINE_FLOATS = 16


@dataclasses.dataclass(frozen=True)
class PoolGeometry(WindowGeometry):
    """Input shape, kernel, stride and padding of one pooling; pure Python, no IR."""

    planes: int = 1   # N*C

    @classmethod
    def from_attrs(cls, x_shape: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
                   padding: Sequence[Sequence[int]]) -> "PoolGeometry":
        """From the op's attributes: kernel (kh, kw), stride (sh, sw),
        padding ((top, bottom), (left, right))."""
        (n, c, h, w), (kh, kw), (sh, sw) = x_shape, kernel, stride
        (pt, pb), (pl, pr) = padding
        geometry = cls(h, w, kh, kw, sh, sw, pt, pb, pl, pr, planes=n * c)
        if min(n, c, h, w, kh, kw, sh, sw) < 1 or min(pt, pb, pl, pr) < 0:
            raise ValueError(f"invalid pooling geometry: x {tuple(x_shape)}, kernel "
                             f"{tuple(kernel)}, stride {tuple(stride)}, padding {tuple(padding)}")
        if geometry.out_h < 1 or geometry.out_w < 1:
            raise ValueError(f"kernel {(kh, kw)} does not fit the input {(h, w)}")
        # A window of padding only would have no maximum; the pooling ops rule it out by
        # limiting the padding to half the kernel.
        if max(pt, pb) >= kh or max(pl, pr) >= kw:
            raise ValueError(f"padding {tuple(padding)} must be less than the kernel {(kh, kw)}")
        return geometry

    @property
    def in_plane(self) -> int:
        return self.height * self.width

    @property
    def out_plane(self) -> int:
        return self.out_h * self.out_w



# --------------------------------------------------------------------------- public kernels
# Each returns a one-phase Kernel.

def emit_avg_pool2d(module: ir.Module, name: str, x_shape, kernel, stride, padding, *,
                    max_threads: int) -> Kernel:
    """out = avg_pool2d(x); input x."""
    geometry = PoolGeometry.from_attrs(x_shape, kernel, stride, padding)
    fn, kb = phase_function(module, name, 1)
    out, (x,), _, tid, nthreads = phase_args(fn)
    with _my_planes(kb, geometry, tid, nthreads) as plane:
        x_plane, out_plane = _in_plane(kb, geometry, x, plane), _out_plane(kb, geometry, out, plane)

        def average(window):
            (total,) = window.fold(x_plane, [window.zero()],
                                   lambda state, value, offset: [kb.fadd(state[0], value)])
            divisor = window.broadcast(kb.f32(geometry.taps))
            window.store(kb.b.fdiv(total, divisor), out_plane)

        _emit_each_window(kb, geometry, average)
    kb.b.ret_void()
    return _one_phase_kernel(fn, max_threads)


def emit_max_pool2d(module: ir.Module, name: str, x_shape, kernel, stride, padding, *,
                    max_threads: int) -> Kernel:
    """out = max_pool2d(x); input x."""
    geometry = PoolGeometry.from_attrs(x_shape, kernel, stride, padding)
    fn, kb = phase_function(module, name, 1)
    out, (x,), _, tid, nthreads = phase_args(fn)
    with _my_planes(kb, geometry, tid, nthreads) as plane:
        x_plane, out_plane = _in_plane(kb, geometry, x, plane), _out_plane(kb, geometry, out, plane)

        def maximum(window):
            best, _ = _emit_window_argmax(kb, window, x_plane)
            window.store(best, out_plane)

        _emit_each_window(kb, geometry, maximum)
    kb.b.ret_void()
    return _one_phase_kernel(fn, max_threads)


def emit_avg_pool2d_grad(module: ir.Module, name: str, x_shape, kernel, stride, padding, *,
                         max_threads: int, epilogue=None, epilogue_operands: int = 0) -> Kernel:
    """out = dL/dx (shape x_shape) of avg_pool2d from its output gradient; inputs g, then the
    `epilogue_operands` operands of `epilogue` (see `_fused_epilogue`).

    Zeroes each dx plane, then adds g / (kh*kw) into every in-image cell of each window, one
    window at a time (windows may overlap, so vector lanes could collide). Windows that tile
    the image (LeNet's 2x2, stride 2) take a vector path instead: `_FlatSpread` when its
    pattern repeats within a few vectors, else `_emit_tiled_spread`, row by row.
    """
    geometry = PoolGeometry.from_attrs(x_shape, kernel, stride, padding)
    fn, kb = phase_function(module, name, 1 + epilogue_operands)
    out, (g, *extras), _, tid, nthreads = phase_args(fn)
    flat = _FlatSpread.plan(geometry, kb.width)
    if flat is not None:
        flat.emit(kb, out, g, extras, epilogue, tid, nthreads)
        kb.b.ret_void()
        return _one_phase_kernel(fn, max_threads)
    with _my_planes(kb, geometry, tid, nthreads) as plane:
        dx_plane, g_plane = _in_plane(kb, geometry, out, plane), _out_plane(kb, geometry, g, plane)
        if _windows_tile_rows(geometry, kb.width):
            fused = _emit_tiled_spread(kb, geometry, dx_plane, g_plane, epilogue,
                                       [_in_plane(kb, geometry, extra, plane) for extra in extras])
            if not fused:
                _fused_epilogue(kb, geometry, epilogue, dx_plane, extras, plane)
        else:
            emit_fill_zero(kb, dx_plane, kb.i64(geometry.in_plane))

            def spread(window):
                share = kb.b.fdiv(kb.load(g_plane, window.out_index), kb.f32(geometry.taps))
                window.for_each_offset(lambda offset: kb.store(
                    kb.fadd(kb.load(dx_plane, offset), share), dx_plane, offset))

            _emit_each_window(kb, geometry, spread, vectorize=False)
            _fused_epilogue(kb, geometry, epilogue, dx_plane, extras, plane)
    kb.b.ret_void()
    return _one_phase_kernel(fn, max_threads)


def emit_max_pool2d_grad(module: ir.Module, name: str, x_shape, kernel, stride, padding, *,
                         max_threads: int, epilogue=None, epilogue_operands: int = 0) -> Kernel:
    """out = dL/dx of max_pool2d; inputs x and g (the output gradient), then the
    `epilogue_operands` operands of `epilogue` (see `_fused_epilogue`).

    Per plane, two loops: the first finds every window's winner (the offset of its first
    maximal cell) into this thread's scratch, vectorized like the forward pass; the second
    zeroes dx and adds each g into dx at its window's winner, one window at a time (windows
    may share a winner). 2x2 windows with stride 2 over rows of whole vectors (the conv net's
    pools) take `_emit_max_grad_2x2` instead: no scratch, no scatter.
    """
    geometry = PoolGeometry.from_attrs(x_shape, kernel, stride, padding)
    fn, kb = phase_function(module, name, 2 + epilogue_operands)
    out, (x, g, *extras), scratch, tid, nthreads = phase_args(fn)
    if _pairs_of_whole_vectors(geometry, kb.width):
        with _my_planes(kb, geometry, tid, nthreads) as plane:
            _emit_max_grad_2x2(kb, geometry, _in_plane(kb, geometry, x, plane),
                               _out_plane(kb, geometry, g, plane), _in_plane(kb, geometry, out, plane),
                               epilogue, [_in_plane(kb, geometry, extra, plane) for extra in extras])
        kb.b.ret_void()
        return _one_phase_kernel(fn, max_threads)
    # One i32 offset per window (a plane has < 2**31 cells), in one float slot each; each
    # thread's array starts on its own cache line.
    winners_floats = -(-geometry.out_plane // _CACHE_LINE_FLOATS) * _CACHE_LINE_FLOATS
    winners = kb.gep(scratch, kb.mul(tid, winners_floats))
    with _my_planes(kb, geometry, tid, nthreads) as plane:
        x_plane = _in_plane(kb, geometry, x, plane)

        def find_winner(window):
            _, winner = _emit_window_argmax(kb, window, x_plane)
            window.store(winner, winners)

        _emit_each_window(kb, geometry, find_winner)

        dx_plane = _in_plane(kb, geometry, out, plane)
        g_plane = _out_plane(kb, geometry, g, plane)
        emit_fill_zero(kb, dx_plane, kb.i64(geometry.in_plane))
        with kb.for_range(0, geometry.out_plane, name="window") as o:
            slot = kb.b.gep(winners, [o], inbounds=True, source_etype=I32)
            winner = kb.b.sext(kb.b.load(slot, typ=I32), I64)
            kb.store(kb.fadd(kb.load(dx_plane, winner), kb.load(g_plane, o)), dx_plane, winner)
        _fused_epilogue(kb, geometry, epilogue, dx_plane, extras, plane)
    kb.b.ret_void()
    return _one_phase_kernel(fn, max_threads, scratch_per_thread=winners_floats)


def _pairs_of_whole_vectors(geometry: PoolGeometry, width: int) -> bool:
    """2x2 windows, stride 2, no padding, tiling the image, over rows of whole vectors."""
    g = geometry
    return ((g.kernel_h, g.kernel_w, g.stride_h, g.stride_w) == (2, 2, 2, 2)
            and (g.pad_top, g.pad_bottom, g.pad_left, g.pad_right) == (0, 0, 0, 0)
            and g.height % 2 == 0 and g.width % width == 0)


def _emit_max_grad_2x2(kb: KernelBuilder, geometry: PoolGeometry, x_plane, g_plane, dx_plane,
                       epilogue, extra_planes) -> None:
    """dx of one plane of a 2x2, stride-2 max pooling, a vector of columns of both rows of a
    row of windows at a time (W/2 windows per vector), with `epilogue` fused (see
    `_fused_epilogue`).

    Each lane gets its window's four cells in window order (its own, its pair neighbour's,
    the two below, by lane swaps and selects), runs `_emit_window_argmax`'s fold on them
    (first maximum wins, a NaN wins over numbers), and takes its window's g where it is the
    winner, 0 elsewhere: both rows are written whole, nothing is zeroed or scattered first.
    """
    width, W = kb.width, geometry.width
    swap = shared_constant(ir.VectorType(I32, width), tuple(lane ^ 1 for lane in range(width)))
    pairs = shared_constant(ir.VectorType(I32, width), tuple(lane // 2 for lane in range(width)))
    even = shared_constant(kb.mask_type, tuple(lane % 2 == 0 for lane in range(width)))
    undefined = shared_constant(kb.vec_type, ir.Undefined)
    i32_vector = ir.VectorType(I32, width)
    # The window-order position of each lane's own cell in the top row and in the bottom row.
    own = [shared_constant(i32_vector, tuple(2 * row + lane % 2 for lane in range(width))) for row in (0, 1)]
    with kb.for_range(0, geometry.out_h, name="window_row") as r:
        top_row = kb.mul(r, 2 * W)
        with kb.for_range(0, W, step=width, name="column") as column:
            at = [kb.add(top_row, column), kb.add(kb.add(top_row, W), column)]
            rows = [kb.load_vec(x_plane, offset) for offset in at]
            swapped = [kb.b.shuffle_vector(row, undefined, swap) for row in rows]
            cells = [kb.b.select(even, rows[0], swapped[0]), kb.b.select(even, swapped[0], rows[0]),
                     kb.b.select(even, rows[1], swapped[1]), kb.b.select(even, swapped[1], rows[1])]
            best, winner = cells[0], shared_constant(i32_vector, (0,) * width)
            for position, value in enumerate(cells[1:], start=1):
                takes_over = _takes_over(kb, value, best)
                best = kb.b.select(takes_over, value, best)
                winner = kb.b.select(takes_over, shared_constant(i32_vector, (position,) * width), winner)
            g_at = kb.add(kb.mul(r, geometry.out_w), kb.b.udiv(column, kb.i64(2)))
            shares = kb.masked_load_vec(g_plane, g_at, kb.lane_mask(width // 2))
            spread = kb.b.shuffle_vector(shares, undefined, pairs)
            zero = kb.splat(0.0)
            for row in (0, 1):
                wins = kb.b.icmp_signed("==", winner, own[row])
                _store_spread(kb, kb.b.select(wins, spread, zero), dx_plane, at[row], width, epilogue,
                              extra_planes)


def _emit_window_argmax(kb: KernelBuilder, window, x_plane: ir.Value):
    """(max, i32 offset of the first cell holding it) over the window's cells.

    A later cell takes over when strictly greater (so ties keep the first, PyTorch's rule)
    or when it is the first NaN (numpy's max and argmax propagate NaN): `value >u best`
    holds for a NaN value, and a NaN best is never replaced. Unused results (the offset in
    the forward pass) are removed by LLVM.
    """
    def step(state, value, offset):
        best, winner = state
        takes_over = _takes_over(kb, value, best)
        return [kb.b.select(takes_over, value, best), kb.b.select(takes_over, offset, winner)]

    return window.fold(x_plane, list(window.first_cell(x_plane)), step)


def _takes_over(kb: KernelBuilder, value: ir.Value, best: ir.Value) -> ir.Value:
    """Whether a later cell of a window replaces the best so far: strictly greater, or the
    first NaN (`>u` holds for a NaN value), and never once the best is a NaN."""
    return kb.b.and_(kb.b.fcmp_unordered(">", value, best), kb.b.fcmp_ordered("ord", best, best))


def _windows_tile_rows(geometry: PoolGeometry, width: int) -> bool:
    """Windows side by side without gaps, overlap or padding, kw dividing the vector width:
    then a vector of dx is `width // kw` values of g, each repeated kw times."""
    g = geometry
    return (g.stride_h == g.kernel_h and g.stride_w == g.kernel_w and width % g.kernel_w == 0
            and (g.pad_top, g.pad_bottom, g.pad_left, g.pad_right) == (0, 0, 0, 0))


def _emit_tiled_spread(kb: KernelBuilder, geometry: PoolGeometry, dx_plane, g_plane, epilogue,
                       extra_planes) -> bool:
    """dx plane of an average pooling whose windows tile the image: dx[h, w] = g[h // kh,
    w // kw] / taps inside the windows, 0 in the rows and columns past the last window.

    When the windows cover the whole image, `epilogue` (if any) is applied to each vector
    before it is stored, reading the `extra_planes` at the same cells; returns whether it was
    (with ragged edges the caller runs it over the finished plane: it applies to the zeros too).
    """
    g = geometry
    width = kb.width
    covered_w = g.out_w * g.kernel_w            # columns inside some window
    repeat = shared_constant(ir.VectorType(I32, width), tuple(lane // g.kernel_w for lane in range(width)))
    undefined = shared_constant(kb.vec_type, ir.Undefined)
    scale = kb.splat(1.0 / g.taps)
    ragged = g.out_h * g.kernel_h < g.height or covered_w < g.width
    if ragged:
        emit_fill_zero(kb, dx_plane, kb.i64(g.in_plane))  # ragged edges get no gradient
    fuse = epilogue is not None and not ragged
    with kb.for_range(0, g.out_h * g.kernel_h, name="h") as h:
        g_row = kb.gep(g_plane, kb.mul(kb.b.udiv(h, kb.i64(g.kernel_h)), g.out_w))

        def spread_vector(w0: int | ir.Value, lanes: int):
            """dx_row[w0 : w0 + lanes] from g_row[w0 / kw : ...] (lanes <= width)."""
            g_offset = kb.b.udiv(kb.as_i64(w0), kb.i64(g.kernel_w))
            shares = kb.masked_load_vec(g_row, g_offset, kb.lane_mask(-(-lanes // g.kernel_w)))
            value = kb.fmul(kb.b.shuffle_vector(shares, undefined, repeat), scale)
            offset = kb.add(kb.mul(h, g.width), w0)
            _store_spread(kb, value, dx_plane, offset, lanes, epilogue if fuse else None, extra_planes)

        whole = covered_w // width * width
        if whole:
            with kb.for_range(0, whole, step=width, name="w") as w0:
                spread_vector(w0, width)
        if covered_w > whole:
            spread_vector(whole, covered_w - whole)
    return fuse


@dataclasses.dataclass(frozen=True)
class _FlatSpread:
    """The gradient of an average pooling whose windows tile the image exactly, computed over
    dx as one flat array of whole vectors, across rows and planes.

    A row of windows (kh rows of dx, W columns) takes its values from one row of g (out_w
    values), and this holds across planes too, so dx's flat index p takes g[(p // (kh*W)) *
    out_w + p % W // kw] / taps. The pattern repeats every `period` = lcm(kh*W, width) floats
    of dx, `g_period` floats of g later. Within a period, vector j's lanes read g at `starts[j]`
    plus the constant lane `indices[j]`, all within one vector: a load and a shuffle make it.

    Rows of dx whose width is not a multiple of the vector width (LeNet's 28 and 10) would
    otherwise end in a masked store each, slow on some CPUs (AMD's vmaskmovps), and the
    10-wide rows would use 10 of 16 lanes. Each thread takes whole periods; the last thread
    also does the tail of dx after the last whole period.

    A vector that crosses from one row of dx to the next within a row of windows reads the
    end and the start of the same g row: then its lanes come from two loads of g (`starts[j]`
    has two offsets, and `indices[j]` counts the second load's lanes from `width` on, as
    shufflevector takes them).
    """

    total: int                  # floats of dx
    period: int                 # floats of dx per period
    g_period: int               # floats of g per period
    starts: tuple[tuple[int, ...], ...]    # per vector of a period: the g offsets it loads
    indices: tuple[tuple[int, ...], ...]   # per vector: each lane's place in those loads
    taps: int

    # A period longer than this many vectors would be unrolled into too much code.
    MAX_VECTORS = 16

    @classmethod
    def plan(cls, geometry: PoolGeometry, width: int) -> "_FlatSpread | None":
        g = geometry
        tiles = (g.stride_h == g.kernel_h and g.stride_w == g.kernel_w
                 and (g.pad_top, g.pad_bottom, g.pad_left, g.pad_right) == (0, 0, 0, 0)
                 and g.out_h * g.kernel_h == g.height and g.out_w * g.kernel_w == g.width)
        if not tiles:
            return None
        window_row = g.kernel_h * g.width
        period = math.lcm(window_row, width)
        if period // width > cls.MAX_VECTORS:
            return None
        source = [p // window_row * g.out_w + p % g.width // g.kernel_w for p in range(period)]
        starts, indices = [], []
        for j in range(period // width):
            lanes = source[j * width:(j + 1) * width]
            first = min(lanes)
            rest = [lane for lane in lanes if lane >= first + width]
            second = min(rest, default=None)
            if rest and max(rest) >= second + width:
                return None   # three loads' worth of g: not worth a special case
            starts.append((first,) if second is None else (first, second))
            indices.append(tuple(lane - first if lane < first + width else width + lane - second
                                 for lane in lanes))
        return cls(g.planes * g.in_plane, period, period // window_row * g.out_w, tuple(starts),
                   tuple(indices), g.taps)

    def emit(self, kb: KernelBuilder, dx, g, extras, epilogue, tid, nthreads) -> None:
        periods, tail = divmod(self.total, self.period)
        lo, hi = kb.split_range(periods, tid, nthreads)
        with kb.for_range(lo, hi, name="period") as period:
            dx_base, g_base = kb.mul(period, self.period), kb.mul(period, self.g_period)
            for j in range(len(self.starts)):
                self._vector(kb, j, dx_base, g_base, dx, g, extras, epilogue, kb.width)
        if tail:
            with kb.if_then(kb.b.icmp_signed("==", tid, kb.sub(nthreads, 1))):
                dx_base, g_base = kb.i64(periods * self.period), kb.i64(periods * self.g_period)
                for j in range(-(-tail // kb.width)):
                    self._vector(kb, j, dx_base, g_base, dx, g, extras, epilogue,
                                 min(kb.width, tail - j * kb.width))

    def _vector(self, kb: KernelBuilder, j: int, dx_base, g_base, dx, g, extras, epilogue,
                lanes: int) -> None:
        """Vector j of the period at (dx_base, g_base); its first `lanes` lanes only."""
        width = kb.width
        loads = []
        for number, start in enumerate(self.starts[j]):
            # Only the g values the lanes use are read: the last vectors of g end there.
            used = [index - number * width for index in self.indices[j][:lanes]
                    if number * width <= index < (number + 1) * width]
            at = kb.add(g_base, start)
            needed = max(used, default=-1) + 1
            loads.append(kb.load_vec(g, at) if needed == width
                         else kb.masked_load_vec(g, at, kb.lane_mask(needed)))
        if len(loads) == 1:
            loads.append(shared_constant(kb.vec_type, ir.Undefined))
        lane_sources = shared_constant(ir.VectorType(I32, width), self.indices[j])
        value = kb.fmul(kb.b.shuffle_vector(loads[0], loads[1], lane_sources), kb.splat(1.0 / self.taps))
        _store_spread(kb, value, dx, kb.add(dx_base, j * width), lanes, epilogue, extras)


def _store_spread(kb: KernelBuilder, value: ir.Value, dx: ir.Value, at: ir.Value, lanes: int, epilogue,
                  extras) -> None:
    """dx[at : at + lanes] = epilogue(value, E1[at : ...], ...) (or value without an epilogue);
    the lanes past `lanes` are neither read nor written."""
    mask = None if lanes == kb.width else kb.lane_mask(lanes)
    if epilogue is not None:
        operands = [kb.load_vec(e, at) if mask is None else kb.masked_load_vec(e, at, mask) for e in extras]
        value = emit_expr(kb, epilogue, [value] + operands)
    if mask is None:
        kb.store_vec(value, dx, at)
    else:
        kb.masked_store_vec(value, dx, at, mask)


def _fused_epilogue(kb: KernelBuilder, geometry: PoolGeometry, epilogue, dx_plane, extras, plane) -> None:
    """dx = epilogue(dx, E1, ...) over a finished dx plane while it is in L1: the elementwise
    consumer of a pooling gradient (ReLU's backward, x1*Step(x0)) fused into it. Each E is a
    buffer of dx's shape; x0 in `epilogue` is dx, x1.. the E's."""
    if epilogue is None:
        return
    extra_planes = [_in_plane(kb, geometry, extra, plane) for extra in extras]
    emit_elementwise_epilogue(kb, epilogue, dx_plane, extra_planes, geometry.in_plane)


def _one_phase_kernel(fn: ir.Function, max_threads: int, scratch_per_thread: int = 0) -> Kernel:
    if max_threads < 1:
        raise ValueError(f"max_threads must be >= 1, got {max_threads}")
    return Kernel([fn], max_threads * scratch_per_thread)


# --------------------------------------------------------------------------- plane driver

@contextlib.contextmanager
def _my_planes(kb: KernelBuilder, geometry: PoolGeometry, tid, nthreads) -> Iterator[ir.Value]:
    """Loop over this thread's share of the N*C planes; yields the plane index."""
    lo, hi = kb.split_range(geometry.planes, tid, nthreads)
    with kb.for_range(lo, hi, name="plane") as plane:
        yield plane


def _in_plane(kb: KernelBuilder, geometry: PoolGeometry, base: ir.Value, plane) -> ir.Value:
    """Plane `plane` of an input-shaped buffer (x, dx)."""
    return kb.gep(base, kb.mul(plane, geometry.in_plane))


def _out_plane(kb: KernelBuilder, geometry: PoolGeometry, base: ir.Value, plane) -> ir.Value:
    """Plane `plane` of an output-shaped buffer (the pooled output, g)."""
    return kb.gep(base, kb.mul(plane, geometry.out_plane))


def _emit_each_window(kb: KernelBuilder, geometry: PoolGeometry, visit: Callable, *,
                      vectorize: bool = True) -> None:
    """visit(window) for every output pixel of a plane, region by region: the interior
    region a vector of windows at a time when `vectorize`, all others one window at a time.
    """
    for region in _plane_regions(geometry):
        with kb.for_range(region.oh_lo, region.oh_hi, name="oh") as oh:
            if region.interior and vectorize:
                _emit_vector_row(kb, geometry, oh, region.ow_lo, region.ow_hi, visit)
                continue
            with kb.for_range(region.ow_lo, region.ow_hi, name="ow") as ow:
                visit(_ScalarWindow(kb, geometry, oh, ow, region.interior))


def _emit_vector_row(kb: KernelBuilder, geometry: PoolGeometry, oh: ir.Value, ow_lo: int,
                     ow_hi: int, visit: Callable) -> None:
    """Output columns [ow_lo, ow_hi) of row oh: whole vectors, then one partial vector."""
    width = kb.width
    whole_end = ow_lo + (ow_hi - ow_lo) // width * width
    with kb.for_range(ow_lo, whole_end, step=width, name="ow") as ow:
        visit(_VectorWindows(kb, geometry, oh, ow, width))
    if whole_end < ow_hi:
        visit(_VectorWindows(kb, geometry, oh, kb.i64(whole_end), ow_hi - whole_end))


@dataclasses.dataclass(frozen=True)
class _Region:
    """Output rows [oh_lo, oh_hi) x columns [ow_lo, ow_hi) of a plane; `interior` when
    every window there lies inside the image."""

    oh_lo: int
    oh_hi: int
    ow_lo: int
    ow_hi: int
    interior: bool


def _plane_regions(geometry: PoolGeometry) -> list[_Region]:
    """Non-empty rectangles that tile the output plane: the interior one, and the top, bottom,
    left and right bands around it, whose windows overlap the padding."""
    g = geometry
    r0, r1 = _interior_outputs(g.pad_top, g.stride_h, g.kernel_h, g.height, g.out_h)
    c0, c1 = _interior_outputs(g.pad_left, g.stride_w, g.kernel_w, g.width, g.out_w)
    regions = [_Region(0, r0, 0, g.out_w, False),
               _Region(r0, r1, 0, c0, False),
               _Region(r0, r1, c0, c1, True),
               _Region(r0, r1, c1, g.out_w, False),
               _Region(r1, g.out_h, 0, g.out_w, False)]
    return [r for r in regions if r.oh_lo < r.oh_hi and r.ow_lo < r.ow_hi]


def _interior_outputs(pad: int, stride: int, kernel: int, in_size: int,
                      out_size: int) -> tuple[int, int]:
    """[lo, hi): outputs o whose window [o*stride - pad, o*stride - pad + kernel) lies inside
    [0, in_size); lo <= hi, both in [0, out_size]."""
    lo = min(-(-pad // stride), out_size)
    last = (in_size - kernel + pad) // stride  # floor; negative when no window fits
    return lo, max(lo, min(last + 1, out_size))


# ------------------------------------------------------------------------------- windows
# Both window kinds offer the same fold interface; values are f32 or <W x float>, offsets
# (into the input plane) i32 or <W x i32>.

_Step = Callable[[list, ir.Value, ir.Value], list]


class _ScalarWindow:
    """The window of output (oh, ow): its in-image cells, clipped to the image unless the
    window is known to be inside (`interior`), in row-major window order."""

    def __init__(self, kb: KernelBuilder, geometry: PoolGeometry, oh: ir.Value, ow: ir.Value,
                 interior: bool):
        g = geometry
        self.kb, self.geometry, self.interior = kb, g, interior
        self.out_index = kb.add(kb.mul(oh, g.out_w), ow)
        top = kb.sub(kb.mul(oh, g.stride_h), g.pad_top)
        left = kb.sub(kb.mul(ow, g.stride_w), g.pad_left)
        if interior:
            self.first_row, self.first_col = top, left
        else:
            self.first_row, self.first_col = kb.max(top, 0), kb.max(left, 0)
            self.row_end = kb.min(kb.add(top, g.kernel_h), g.height)
            self.col_end = kb.min(kb.add(left, g.kernel_w), g.width)

    def zero(self) -> ir.Value:
        return self.kb.f32(0.0)

    def broadcast(self, scalar: ir.Value) -> ir.Value:
        return scalar

    def first_cell(self, x_plane: ir.Value) -> tuple[ir.Value, ir.Value]:
        """(value, offset) of the first in-image cell (PoolGeometry ensures there is one)."""
        offset = self._offset(self.first_row, self.first_col)
        return self.kb.load(x_plane, offset), self.kb.b.trunc(offset, I32)

    def for_each_offset(self, body: Callable[[ir.Value], None]) -> None:
        """body(i64 offset) for every cell: unrolled inside the image, else loops."""
        kb, g = self.kb, self.geometry
        if self.interior:
            corner = self._offset(self.first_row, self.first_col)
            for i in range(g.kernel_h):
                for j in range(g.kernel_w):
                    body(kb.add(corner, i * g.width + j))
            return
        with kb.for_range(self.first_row, self.row_end, name="ih") as ih:
            with kb.for_range(self.first_col, self.col_end, name="iw") as iw:
                body(self._offset(ih, iw))

    def fold(self, x_plane: ir.Value, state: list, step: _Step) -> list:
        """state = step(state, value, i32 offset) over every cell in order (the first one
        included); the final state. The state lives in entry-block stack slots, registers
        after mem2reg."""
        kb = self.kb
        slots = [entry_alloca(kb, value.type, f"state{i}") for i, value in enumerate(state)]
        for slot, value in zip(slots, state):
            kb.b.store(value, slot)

        def visit(offset):
            current = [kb.b.load(slot, typ=slot.allocated_type) for slot in slots]
            new = step(current, kb.load(x_plane, offset), kb.b.trunc(offset, I32))
            for slot, value in zip(slots, new):
                kb.b.store(value, slot)

        self.for_each_offset(visit)
        return [kb.b.load(slot, typ=slot.allocated_type) for slot in slots]

    def store(self, value: ir.Value, plane: ir.Value) -> None:
        """Store the window's result (f32, or i32 into a scratch array) at its output index."""
        self.kb.b.store(value, self.kb.b.gep(plane, [self.out_index], inbounds=True,
                                             source_etype=value.type))

    def _offset(self, row: ir.Value, col: ir.Value) -> ir.Value:
        return self.kb.add(self.kb.mul(row, self.geometry.width), col)


class _VectorWindows:
    """`lanes` (<= W) consecutive interior windows of output row oh from column ow, lane L
    being window (oh, ow + L). Their cells are all inside the image, so cell (i, j) of every
    lane is one strided vector load; lanes past `lanes` are never loaded nor stored."""

    def __init__(self, kb: KernelBuilder, geometry: PoolGeometry, oh: ir.Value, ow: ir.Value,
                 lanes: int):
        g = geometry
        self.kb, self.geometry, self.lanes = kb, g, lanes
        self.out_index = kb.add(kb.mul(oh, g.out_w), ow)
        top = kb.sub(kb.mul(oh, g.stride_h), g.pad_top)
        left = kb.sub(kb.mul(ow, g.stride_w), g.pad_left)
        self.corner = kb.add(kb.mul(top, g.width), left)   # lane 0's first cell
        self.i32_vector = ir.VectorType(I32, kb.width)

    def zero(self) -> ir.Value:
        return self.kb.splat(0.0)

    def broadcast(self, scalar: ir.Value) -> ir.Value:
        return self.kb.splat(scalar)

    def first_cell(self, x_plane: ir.Value) -> tuple[ir.Value, ir.Value]:
        return self._cell(x_plane, 0, 0)

    def fold(self, x_plane: ir.Value, state: list, step: _Step) -> list:
        """state = step(state, values, i32 offsets) over every cell, unrolled."""
        for i in range(self.geometry.kernel_h):
            for j in range(self.geometry.kernel_w):
                state = step(state, *self._cell(x_plane, i, j))
        return state

    def store(self, value: ir.Value, plane: ir.Value) -> None:
        """Store the active lanes (f32 or i32) at consecutive output indices."""
        kb = self.kb
        if self.lanes == kb.width:
            kb.b.store(value, kb.b.gep(plane, [self.out_index], inbounds=True,
                                       source_etype=value.type.element), align=4)
            return
        # Once per row: lane-by-lane stores, as there is no fast masked store on every CPU.
        for lane in range(self.lanes):
            element = kb.b.extract_element(value, ir.Constant(I32, lane))
            index = kb.add(self.out_index, lane)
            kb.b.store(element, kb.b.gep(plane, [index], inbounds=True,
                                         source_etype=element.type))

    def _cell(self, x_plane: ir.Value, i: int, j: int) -> tuple[ir.Value, ir.Value]:
        """(values, i32 offsets) of cell (i, j) of every lane's window."""
        kb, g = self.kb, self.geometry
        start = kb.add(self.corner, i * g.width + j)
        step = g.stride_w
        lane_steps = ir.Constant(self.i32_vector, [lane * step for lane in range(kb.width)])
        offsets = kb.b.add(splat_i32(kb, kb.b.trunc(start, I32)), lane_steps)
        return _load_strided(kb, x_plane, start, step, self.lanes), offsets


def _load_strided(kb: KernelBuilder, base: ir.Value, start: ir.Value, stride: int,
                  lanes: int) -> ir.Value:
    """<W x float> with lane L = base[start + L*stride] for L < lanes (other lanes unused).

    Stride 1 is one load, stride 2 two loads and an even-lane shuffle; larger strides build
    the vector lane by lane. Elements past the last used one are never read (masks), as
    they may lie past the end of the buffer.
    """
    width = kb.width
    span = (lanes - 1) * stride + 1     # floats from the first used element to the last
    if stride > 2:
        vector = ir.Constant(kb.vec_type, ir.Undefined)
        for lane in range(lanes):
            element = kb.load(base, kb.add(start, lane * stride))
            vector = kb.b.insert_element(vector, element, ir.Constant(I32, lane))
        return vector
    parts = []
    for part in range(stride):
        used = min(max(span - part * width, 0), width)
        if used == 0:
            parts.append(kb.splat(0.0))
        elif used == width:
            parts.append(kb.load_vec(base, kb.add(start, part * width)))
        else:
            parts.append(kb.masked_load_vec(base, kb.add(start, part * width),
                                            kb.lane_mask(used)))
    if stride == 1:
        return parts[0]
    even_lanes = ir.Constant(ir.VectorType(I32, width), [2 * lane for lane in range(width)])
    return kb.b.shuffle_vector(parts[0], parts[1], even_lanes)


# ---- lowering --------------------------------------------------------------------------------

def _lower_pool(emit, x_shape_of, windows_of, flops):
    """`windows_of(node)`: the pooling's windows (elements of y, or of dy for a gradient);
    `flops(windows, kernel)`: their cost (costs.py)."""
    def lower(node, epilogue):
        a = node.attrs
        x_shape = x_shape_of(node)
        return step_with_elementwise_epilogue(
            node, epilogue, lambda m, name, threads, **fused: emit(
                m, name, x_shape, a["kernel"], a["stride"], a["padding"], max_threads=threads, **fused),
            flops=flops(windows_of(node), a["kernel"]))
    return lower


def _output_size(node) -> int:
    return node.size


def _dy_size(node) -> int:
    return node.inputs[-1].size   # a gradient's last input is dy


lowers("avg_pool2d")(_lower_pool(emit_avg_pool2d, lambda node: node.inputs[0].shape, _output_size,
                                 costs.avg_pool2d_flops))
lowers("max_pool2d")(_lower_pool(emit_max_pool2d, lambda node: node.inputs[0].shape, _output_size,
                                 costs.max_pool2d_flops))
# The gradients take their elementwise consumer (ReLU's backward) as an epilogue.
lowers("avg_pool2d_grad", elementwise_epilogue=True, epilogue_allowed=no_param_operands)(
    _lower_pool(emit_avg_pool2d_grad, lambda node: node.attrs["x_shape"], _dy_size, costs.avg_pool2d_grad_flops))
lowers("max_pool2d_grad", elementwise_epilogue=True, epilogue_allowed=no_param_operands)(
    _lower_pool(emit_max_pool2d_grad, lambda node: node.inputs[0].shape, _dy_size, costs.max_pool2d_grad_flops))
