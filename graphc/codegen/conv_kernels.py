"""Native float32 kernels for conv2d (NCHW input, OIHW weights) and its two gradients.

All three lower to the shape-specialised GEMM of gemm.py through the im2col matrix of one
sample: `cols` is (K, P) with K = C*kh*kw and P = OH*OW, and row (c, i, j) holds the input
cell that tap (i, j) of channel c reads at every output pixel, zero where it reads padding.

    forward       out[n] (O, P)  = W (O, K) @ cols(x[n])        [+ bias per channel, relu]
    input grad    dcols  (K, P)  = W^T @ g[n] (O, P);  dx[n] = col2im(dcols)
    weight grad   dW     (O, K) += g[n] (O, P) @ cols(x[n])^T    summed over the batch

The batch is split across threads. Each thread owns a cols buffer and a GEMM workspace in
scratch and calls the GEMM single-threaded (tid 0 of 1), so the threads never synchronise
inside a phase; with a training batch of tens of samples per thread this balances well.

When a sample's cols matrix would not fit in L2 (`_COLS_BUDGET_FLOATS`), the forward pass
and the weight gradient cut the output rows into bands (`_Bands`) and run im2col and the
GEMM band by band: the band's cols stays in cache between the two, and the GEMM runs on a
narrower N, which it does faster (measured: 32x1024x288 at 49-55 GFLOP/s, 32x256x288 at
65-75). The GEMM has no leading-dimension argument, so a band's output goes through a small
tile (forward) and a band of g is first copied into one (weight gradient).

A 1x1 kernel with stride 1 and no padding has cols(x[n]) == x[n] and skips the copy (and
dx[n] == dcols skips col2im). All geometry is compile-time constant; loops stay IR loops,
so the code size does not grow with the image or kernel size.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator, Sequence

import llvmlite.ir as ir

from .gemm import emit_gemm, gemm_workspace_floats
from .kernel import Kernel, phase_args, phase_function
from .kernel_builder import F32, I32, I64, PTR, KernelBuilder
from .target import vector_width_f32

__all__ = ["ConvGeometry", "emit_conv2d", "emit_conv2d_input_grad", "emit_conv2d_weight_grad"]

# Per-thread scratch regions start on a 64-byte boundary (relative to scratch) so that two
# threads never write the same cache line.
_CACHE_LINE_FLOATS = 16

# Largest cols matrix (or band of one) kept: 256 KB, half the L2 of the smallest cores we
# run on (512 KB, AMD Zen 3), leaving room for the GEMM's packed panel and weights.
_COLS_BUDGET_FLOATS = 64 * 1024

# Room after a cols matrix for the zeros im2col's last vector store may write past it.
_COLS_SPILL = vector_width_f32()

_NULL = ir.Constant(PTR, None)


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """Shapes, stride and padding of one conv2d; pure Python, no IR."""

    batch: int
    channels: int
    height: int
    width: int
    out_channels: int
    kernel_h: int
    kernel_w: int
    stride_h: int
    stride_w: int
    pad_top: int
    pad_bottom: int
    pad_left: int
    pad_right: int

    @classmethod
    def from_shapes(cls, x_shape: Sequence[int], w_shape: Sequence[int], stride: Sequence[int],
                    padding: Sequence[Sequence[int]]) -> "ConvGeometry":
        """From the op's attributes: stride (sh, sw), padding ((top, bottom), (left, right))."""
        (n, c, h, w), (o, wc, kh, kw) = x_shape, w_shape
        (sh, sw), ((pt, pb), (pl, pr)) = stride, padding
        if c != wc:
            raise ValueError(f"input has {c} channels but the weight {tuple(w_shape)} expects {wc}")
        if min(n, c, h, w, o, kh, kw, sh, sw) < 1 or min(pt, pb, pl, pr) < 0:
            raise ValueError(f"invalid conv2d geometry: x {tuple(x_shape)}, w {tuple(w_shape)}, "
                             f"stride {tuple(stride)}, padding {tuple(padding)}")
        geometry = cls(n, c, h, w, o, kh, kw, sh, sw, pt, pb, pl, pr)
        if geometry.out_h < 1 or geometry.out_w < 1:
            raise ValueError(f"kernel {(kh, kw)} with padding {tuple(padding)} does not fit "
                             f"the input {(h, w)}")
        return geometry

    @property
    def out_h(self) -> int:
        return (self.height + self.pad_top + self.pad_bottom - self.kernel_h) // self.stride_h + 1

    @property
    def out_w(self) -> int:
        return (self.width + self.pad_left + self.pad_right - self.kernel_w) // self.stride_w + 1

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        return self.batch, self.out_channels, self.out_h, self.out_w

    @property
    def sample_floats(self) -> int:
        """Floats of one sample of the input."""
        return self.channels * self.height * self.width

    @property
    def patch_size(self) -> int:
        """K of the GEMMs: weights per output channel, rows of cols."""
        return self.channels * self.kernel_h * self.kernel_w

    @property
    def pixels(self) -> int:
        """P: output pixels per channel, columns of cols."""
        return self.out_h * self.out_w

    @property
    def cols_are_input(self) -> bool:
        """cols(x[n]) is x[n] itself: a 1x1 kernel, stride 1, no padding."""
        return (self.kernel_h == self.kernel_w == self.stride_h == self.stride_w == 1
                and self.pad_top == self.pad_bottom == self.pad_left == self.pad_right == 0)

    @property
    def flops(self) -> int:
        """Multiply-adds times two of the forward pass (each gradient costs the same)."""
        return 2 * self.batch * self.out_channels * self.pixels * self.patch_size


# --------------------------------------------------------------------------- public kernels

def emit_conv2d(module: ir.Module, name: str, x_shape, w_shape, stride, padding, *,
                bias: bool = False, relu: bool = False, max_threads: int) -> Kernel:
    """out = conv2d(x, w) [+ b[o] on channel o] [then relu]; inputs x, w[, b]. One phase.

    Bias and relu are the GEMM's epilogue, applied while the tile is in registers.
    """
    geometry = ConvGeometry.from_shapes(x_shape, w_shape, stride, padding)
    O, K, OW, P = geometry.out_channels, geometry.patch_size, geometry.out_w, geometry.pixels
    bands = _Bands.for_geometry(geometry)

    def band_gemm(rows):
        return _per_sample_callee(emit_gemm(module, f"{name}.gemm{rows}", O, rows * OW, K,
                                            bias="row" if bias else None, relu=relu))

    gemms = {rows: band_gemm(rows) for rows in bands.sizes}
    im2col = None if geometry.cols_are_input else _emit_im2col(module, f"{name}.im2col", geometry)
    scratch_layout = _ThreadScratch.create(
        geometry, bands, tile_floats=O * bands.rows * OW if bands.split else 0,
        gemm_floats=max(gemm_workspace_floats(O, rows * OW, K) for rows in bands.sizes))

    fn, kb = phase_function(module, name, 3 if bias else 2)
    out, inputs, scratch, tid, nthreads = phase_args(fn)
    x, w = inputs[:2]
    b = inputs[2] if bias else _NULL
    cols, tile, workspace = scratch_layout.buffers(kb, scratch, tid)
    with _my_samples(kb, geometry.batch, tid, nthreads) as n:
        x_n, out_n = _sample(kb, x, n, geometry.sample_floats), _sample(kb, out, n, O * P)

        def band(first_row, rows):
            b_matrix = _emit_band_cols(kb, im2col, x_n, cols, first_row, rows)
            c_matrix = tile if bands.split else out_n
            kb.b.call(gemms[rows], [w, b_matrix, c_matrix, b, workspace, kb.i64(0), kb.i64(1)])
            if bands.split:
                # Tile (O, rows*OW) -> out_n[:, first_row*OW:] (row stride P).
                _emit_copy_rows(kb, kb.gep(out_n, kb.mul(first_row, OW)), P, tile, rows * OW,
                                O, rows * OW)

        bands.emit_each(kb, band)
    kb.b.ret_void()
    return Kernel([fn], scratch_layout.total_floats(max_threads))


def emit_conv2d_input_grad(module: ir.Module, name: str, g_shape, w_shape, x_shape, stride,
                           padding, *, max_threads: int) -> Kernel:
    """out = dL/dx (shape x_shape) from g = dL/d(conv2d(x, w)); inputs g, w. One phase.

    Not cut into bands: with stride 1, col2im sums each input row from several bands'
    output rows, so it needs the sample's whole dcols.
    """
    geometry = ConvGeometry.from_shapes(x_shape, w_shape, stride, padding)
    _check_grad_shape(g_shape, geometry)
    O, K, P = geometry.out_channels, geometry.patch_size, geometry.pixels
    gemm = _per_sample_callee(emit_gemm(module, f"{name}.gemm", K, P, O, trans_a=True))
    col2im = None if geometry.cols_are_input else _emit_col2im(module, f"{name}.col2im", geometry)
    scratch_layout = _ThreadScratch.create(
        geometry, _Bands.whole(geometry), tile_floats=0,
        gemm_floats=gemm_workspace_floats(K, P, O, trans_a=True))

    fn, kb = phase_function(module, name, 2)
    out, (g, w), scratch, tid, nthreads = phase_args(fn)
    dcols, _, workspace = scratch_layout.buffers(kb, scratch, tid)
    with _my_samples(kb, geometry.batch, tid, nthreads) as n:
        dx_n = _sample(kb, out, n, geometry.sample_floats)
        gemm_out = dx_n if col2im is None else dcols
        kb.b.call(gemm, [w, _sample(kb, g, n, O * P), gemm_out, _NULL, workspace,
                         kb.i64(0), kb.i64(1)])
        if col2im is not None:
            kb.b.call(col2im, [dcols, dx_n])
    kb.b.ret_void()
    return Kernel([fn], scratch_layout.total_floats(max_threads))


def emit_conv2d_weight_grad(module: ir.Module, name: str, x_shape, g_shape, w_shape, stride,
                            padding, *, max_threads: int) -> Kernel:
    """out = dL/dw (shape w_shape) from x and g = dL/d(conv2d(x, w)); inputs x, g.

    Phase 1: each thread sums g[n] @ cols(x[n])^T over its share of the batch into its own
    partial (thread 0's partial is `out` itself, the others' live in scratch).
    Phase 2 (after the barrier): the threads split the elements of dW and add the other
    threads' partials into `out`.
    """
    geometry = ConvGeometry.from_shapes(x_shape, w_shape, stride, padding)
    _check_grad_shape(g_shape, geometry)
    O, K, OW, P = geometry.out_channels, geometry.patch_size, geometry.out_w, geometry.pixels
    weights = O * K
    bands = _Bands.for_geometry(geometry)

    def band_gemm(rows):
        return _per_sample_callee(emit_gemm(module, f"{name}.gemm{rows}", O, K, rows * OW,
                                            trans_b=True, accumulate=True))

    gemms = {rows: band_gemm(rows) for rows in bands.sizes}
    im2col = None if geometry.cols_are_input else _emit_im2col(module, f"{name}.im2col", geometry)
    scratch_layout = _ThreadScratch.create(
        geometry, bands, tile_floats=O * bands.rows * OW if bands.split else 0,
        gemm_floats=max(gemm_workspace_floats(O, K, rows * OW, trans_b=True)
                        for rows in bands.sizes))
    partials_offset = scratch_layout.total_floats(max_threads)
    partial_floats = _round_up(weights, _CACHE_LINE_FLOATS)

    def partial_of(kb, scratch, thread):
        """Thread `thread` (>= 1)'s partial sum of dW in scratch."""
        return kb.gep(scratch, kb.add(partials_offset, kb.mul(kb.sub(thread, 1), partial_floats)))

    fn, kb = phase_function(module, name, 2)
    out, (x, g), scratch, tid, nthreads = phase_args(fn)
    cols, tile, workspace = scratch_layout.buffers(kb, scratch, tid)
    is_first_thread = kb.b.icmp_signed("==", tid, kb.i64(0))
    # (For tid 0 the unselected partial_of address is out of range, never used.)
    partial = kb.b.select(is_first_thread, out, partial_of(kb, scratch, tid))
    # Zeroed even by threads without samples: phase 2 adds every thread's partial.
    emit_fill_zero(kb, partial, kb.i64(weights))
    with _my_samples(kb, geometry.batch, tid, nthreads) as n:
        x_n, g_n = _sample(kb, x, n, geometry.sample_floats), _sample(kb, g, n, O * P)

        def band(first_row, rows):
            b_matrix = _emit_band_cols(kb, im2col, x_n, cols, first_row, rows)
            a_matrix = g_n
            if bands.split:
                # g_n[:, first_row*OW:] (row stride P) -> tile (O, rows*OW).
                _emit_copy_rows(kb, tile, rows * OW, kb.gep(g_n, kb.mul(first_row, OW)), P,
                                O, rows * OW)
                a_matrix = tile
            kb.b.call(gemms[rows], [a_matrix, b_matrix, partial, _NULL, workspace,
                                    kb.i64(0), kb.i64(1)])

        bands.emit_each(kb, band)
    kb.b.ret_void()

    reduce_fn, kb = phase_function(module, f"{name}.reduce", 2)
    out, _, scratch, tid, nthreads = phase_args(reduce_fn)
    lo, hi = kb.split_range(weights, tid, nthreads)
    with compact_for_range(kb, 1, nthreads, name="thread") as thread:
        _emit_add(kb, kb.gep(out, lo), kb.gep(partial_of(kb, scratch, thread), lo), kb.sub(hi, lo))
    kb.b.ret_void()
    return Kernel([fn, reduce_fn], partials_offset + (max_threads - 1) * partial_floats)


def _check_grad_shape(g_shape, geometry: ConvGeometry) -> None:
    if tuple(g_shape) != geometry.out_shape:
        raise ValueError(f"output gradient has shape {tuple(g_shape)}, the conv2d output "
                         f"is {geometry.out_shape}")


def _emit_band_cols(kb: KernelBuilder, im2col, x_n: ir.Value, cols: ir.Value,
                    first_row: ir.Value, rows: int) -> ir.Value:
    """The GEMM's B for output rows [first_row, first_row + rows): cols filled by im2col, or
    the input itself (then there is a single band)."""
    if im2col is None:
        return x_n
    kb.b.call(im2col, [x_n, cols, first_row, kb.i64(rows)])
    return cols


# ----------------------------------------------------------------------- bands, scratch

@dataclasses.dataclass(frozen=True)
class _Bands:
    """Output rows of a sample cut into `full` bands of `rows` rows and a last band of
    `tail` rows (0 if none). A single band is the whole sample."""

    rows: int
    full: int
    tail: int

    @classmethod
    def for_geometry(cls, geometry: ConvGeometry) -> "_Bands":
        """The fewest bands whose cols fit in the budget, of balanced heights (16 rows in
        at most 14 make two bands of 8, not 14 + 2: a 2-row GEMM is inefficient)."""
        if geometry.cols_are_input:
            return cls.whole(geometry)
        line = geometry.patch_size * geometry.out_w  # cols floats per output row
        most_rows = max(1, _COLS_BUDGET_FLOATS // line)
        count = -(-geometry.out_h // most_rows)
        rows = -(-geometry.out_h // count)
        return cls(rows, geometry.out_h // rows, geometry.out_h % rows)

    @classmethod
    def whole(cls, geometry: ConvGeometry) -> "_Bands":
        return cls(geometry.out_h, 1, 0)

    @property
    def split(self) -> bool:
        return self.full + (self.tail > 0) > 1

    @property
    def sizes(self) -> list[int]:
        """Distinct band heights: each needs its own GEMM (N = rows*OW is compiled in)."""
        return [self.rows] + ([self.tail] if self.tail else [])

    def emit_each(self, kb: KernelBuilder, body: Callable[[ir.Value, int], None]) -> None:
        """body(first_row, rows) for every band: an IR loop over the full bands, then the
        tail band."""
        with compact_for_range(kb, 0, self.full, name="band") as band:
            body(kb.mul(band, self.rows), self.rows)
        if self.tail:
            body(kb.i64(self.full * self.rows), self.tail)


@dataclasses.dataclass(frozen=True)
class _ThreadScratch:
    """Each thread's slice of scratch: a cols matrix for one band (absent when cols is the
    input itself), a tile for a band of the output or of g (only when there are several
    bands), and a single-thread GEMM workspace. Each part starts on a cache line."""

    cols_floats: int
    tile_floats: int
    gemm_floats: int

    @classmethod
    def create(cls, geometry: ConvGeometry, bands: _Bands, *, tile_floats: int,
               gemm_floats: int) -> "_ThreadScratch":
        cols = 0
        if not geometry.cols_are_input:
            cols = geometry.patch_size * bands.rows * geometry.out_w + _COLS_SPILL
        return cls(*(_round_up(floats, _CACHE_LINE_FLOATS)
                     for floats in (cols, tile_floats, gemm_floats)))

    @property
    def per_thread(self) -> int:
        return self.cols_floats + self.tile_floats + self.gemm_floats

    def total_floats(self, max_threads: int) -> int:
        if max_threads < 1:
            raise ValueError(f"max_threads must be >= 1, got {max_threads}")
        return max_threads * self.per_thread

    def buffers(self, kb: KernelBuilder, scratch: ir.Value, tid: ir.Value):
        """(cols, tile, gemm workspace) of thread `tid`."""
        cols = kb.gep(scratch, kb.mul(tid, self.per_thread))
        tile = kb.gep(cols, self.cols_floats)
        return cols, tile, kb.gep(tile, self.tile_floats)


@contextlib.contextmanager
def _my_samples(kb: KernelBuilder, batch: int, tid, nthreads) -> Iterator[ir.Value]:
    """Loop over this thread's share of the batch; yields the sample index."""
    lo, hi = kb.split_range(batch, tid, nthreads)
    with compact_for_range(kb, lo, hi, name="n") as n:
        yield n


def _sample(kb: KernelBuilder, base: ir.Value, n: ir.Value, floats_per_sample: int) -> ir.Value:
    return kb.gep(base, kb.mul(n, floats_per_sample))


def _per_sample_callee(fn: ir.Function) -> ir.Function:
    """A function this kernel calls once per sample or band: internal (no other caller) and
    never inlined. Inlined into the batch loop it ran no faster, and LLVM re-optimized it
    there, which doubled the compile time."""
    fn.linkage = "internal"
    fn.attributes.add("noinline")
    return fn


def _helper_function(module: ir.Module, name: str, pointers: Sequence[str],
                     indices: Sequence[str] = ()):
    """A per-sample `void name(ptr..., i64...)` whose buffers never overlap (noalias)."""
    arg_types = [PTR] * len(pointers) + [I64] * len(indices)
    fn = _per_sample_callee(ir.Function(module, ir.FunctionType(ir.VoidType(), arg_types),
                                        name=name))
    for arg, arg_name in zip(fn.args, [*pointers, *indices]):
        arg.name = arg_name
    for arg in fn.args[:len(pointers)]:
        arg.add_attribute("noalias")
    return fn, KernelBuilder(ir.IRBuilder(fn.append_basic_block("entry")))


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


# --------------------------------------------------------------------------- im2col, col2im

def _emit_im2col(module: ir.Module, name: str, geometry: ConvGeometry) -> ir.Function:
    """`im2col(x_n, cols, first_row, rows)`: the cols matrix of output rows
    [first_row, first_row + rows) of one sample, zeros included: (K, rows*OW).

    With stride_w 1 each cols line is written with whole vectors, masked loads supplying the
    zeros of the padding: see `_emit_line_by_vectors`. The last vector of a line may spill
    zeros into the next one, which is written later (lines and taps are filled in memory
    order), or into the `_COLS_SPILL` floats after the matrix.
    """
    fn, kb = _helper_function(module, name, ["x", "cols"], ["first_row", "rows"])
    x, cols, first_row, rows = fn.args
    OW = geometry.out_w

    def before_tap(cols_row, line_lo, line_hi):
        # Lines whose input row is padding read only zeros.
        emit_fill_zero(kb, cols_row, kb.mul(line_lo, OW))
        end = kb.mul(line_hi, OW)
        emit_fill_zero(kb, kb.gep(cols_row, end), kb.sub(kb.mul(rows, OW), end))

    def copy_line(cols_line, x_line, iw0, ow_lo, ow_hi):
        if geometry.stride_w == 1:
            _emit_line_by_vectors(kb, cols_line, x_line, iw0, ow_lo, ow_hi, OW)
            return
        emit_fill_zero(kb, cols_line, ow_lo)
        x_first = kb.gep(x_line, kb.add(iw0, kb.mul(ow_lo, geometry.stride_w)))
        _emit_gather(kb, kb.gep(cols_line, ow_lo), x_first, kb.sub(ow_hi, ow_lo),
                    geometry.stride_w)
        emit_fill_zero(kb, kb.gep(cols_line, ow_hi), kb.sub(OW, ow_hi))

    _emit_patch_walk(kb, geometry, x, cols, (first_row, rows), before_tap, copy_line)
    kb.b.ret_void()
    return fn


def _emit_line_by_vectors(kb: KernelBuilder, cols_line: ir.Value, x_line: ir.Value,
                          iw0: ir.Value, ow_lo: ir.Value, ow_hi: ir.Value, out_w: int) -> None:
    """cols_line[ow] = x_line[iw0 + ow] for ow in [ow_lo, ow_hi), 0 for the rest of
    [0, out_w), with unit stride: one masked load and one plain store per vector.

    Masked lanes are never read, so the address may point before or after the input row
    (hence no `inbounds`); whole-vector stores avoid masked stores, which are slow on some
    CPUs (AMD's vmaskmovps), at the price of writing up to width-1 zeros past the line.
    """
    with compact_for_range(kb, 0, out_w, step=kb.width, name="ow") as ow:
        inside = _lanes_between(kb, kb.sub(ow_lo, ow), kb.sub(ow_hi, ow))
        source = kb.b.gep(x_line, [kb.add(iw0, ow)], source_etype=F32)
        kb.store_vec(kb.masked_load_vec(source, 0, inside), cols_line, ow)


def _emit_col2im(module: ir.Module, name: str, geometry: ConvGeometry) -> ir.Function:
    """`col2im(dcols, dx_n)`: dx_n = the adjoint of im2col applied to dcols: each input cell
    gets the sum of the cols entries that were copied from it (padding entries are dropped)."""
    fn, kb = _helper_function(module, name, ["dcols", "dx"])
    dcols, dx = fn.args
    if geometry.stride_h == geometry.stride_w == 1:
        _emit_col2im_by_gathering(kb, geometry, dcols, dx)
    else:
        _emit_col2im_by_scattering(kb, geometry, dcols, dx)
    kb.b.ret_void()
    return fn


def _emit_col2im_by_gathering(kb: KernelBuilder, geometry: ConvGeometry, dcols: ir.Value,
                              dx: ir.Value) -> None:
    """Stride 1: dx[c, ih, iw] = sum over taps (i, j) of dcols row (c, i, j) at output pixel
    (ih + pt - i, iw + pl - j), for the pixels that exist.

    Each vector of dx is summed in registers from kh*kw masked loads (a missing pixel is a
    masked lane) and stored once: no zeroing and no read-modify-write of dx. Measured 1.3-2x
    faster than scattering the cols lines into dx.
    """
    g = geometry
    no_lanes = ir.Constant(kb.mask_type, [False] * kb.width)

    def dx_vector(c, ih, iw, store_mask):
        terms = []
        for i in range(g.kernel_h):
            oh = kb.sub(ih, i - g.pad_top)
            row_exists = kb.b.and_(kb.b.icmp_signed(">=", oh, kb.i64(0)),
                                   kb.b.icmp_signed("<", oh, kb.i64(g.out_h)))
            for j in range(g.kernel_w):
                # Lane L reads output column ow = iw + L - shift, if in [0, OW).
                shift = j - g.pad_left
                ow = kb.sub(iw, shift)  # lane 0's column, maybe outside the line
                exists = _lanes_between(kb, kb.sub(shift, iw), kb.sub(g.out_w + shift, iw))
                row = kb.add(kb.mul(c, g.kernel_h * g.kernel_w), i * g.kernel_w + j)
                entry = kb.add(kb.add(kb.mul(row, g.pixels), kb.mul(oh, g.out_w)), ow)
                source = kb.b.gep(dcols, [entry], source_etype=F32)
                mask = kb.b.select(row_exists, exists, no_lanes)
                terms.append(kb.masked_load_vec(source, 0, mask))
        dx_line = kb.gep(dx, kb.add(kb.mul(c, g.height * g.width), kb.mul(ih, g.width)))
        _store(kb, _sum_tree(kb, terms), dx_line, iw, store_mask)

    whole = g.width - g.width % kb.width
    with compact_for_range(kb, 0, g.channels, name="c") as c:
        with compact_for_range(kb, 0, g.height, name="ih") as ih:
            with compact_for_range(kb, 0, whole, step=kb.width, name="iw") as iw:
                dx_vector(c, ih, iw, None)
            if whole < g.width:
                dx_vector(c, ih, kb.i64(whole), kb.lane_mask(g.width - whole))


def _sum_tree(kb: KernelBuilder, terms: list[ir.Value]) -> ir.Value:
    """Sum as a balanced tree: independent adds instead of one long dependency chain."""
    while len(terms) > 1:
        terms = [kb.fadd(terms[k], terms[k + 1]) if k + 1 < len(terms) else terms[k]
                 for k in range(0, len(terms), 2)]
    return terms[0]


def _emit_col2im_by_scattering(kb: KernelBuilder, geometry: ConvGeometry, dcols: ir.Value,
                               dx: ir.Value) -> None:
    """Any stride: zero dx, then add every in-image cols line into the input row it came from.
    Taps run in sequence: several of them add into the same input cells."""
    emit_fill_zero(kb, dx, kb.i64(geometry.sample_floats))

    def add_line(cols_line, x_line, iw0, ow_lo, ow_hi):
        x_first = kb.gep(x_line, kb.add(iw0, kb.mul(ow_lo, geometry.stride_w)))
        _emit_scatter_add(kb, x_first, kb.gep(cols_line, ow_lo), kb.sub(ow_hi, ow_lo),
                         geometry.stride_w)

    whole_sample = (kb.i64(0), kb.i64(geometry.out_h))
    _emit_patch_walk(kb, geometry, dx, dcols, whole_sample, lambda *_: None, add_line)


def _emit_patch_walk(kb: KernelBuilder, geometry: ConvGeometry, x: ir.Value, cols: ir.Value,
                     band: tuple[ir.Value, ir.Value], before_tap: Callable,
                     on_line: Callable) -> None:
    """The loop nest shared by im2col and col2im, over the cols rows of one sample's band of
    output rows [first_row, first_row + rows) (`band`).

    Cols row (c, i, j) holds what tap (i, j) reads from input plane c at every output pixel
    of the band, output row by output row ("lines" of out_w entries). For each cols row, in
    memory order, `before_tap(cols_row, line_lo, line_hi)` is emitted first, where lines
    [line_lo, line_hi) are those whose input row ih = oh*sh + i - pt is inside the image;
    then for each of those `on_line(cols_line, x_line, iw0, ow_lo, ow_hi)`: cols_line is the
    line's first entry, x_line input row ih, output column ow reads input column iw0 + ow*sw
    (iw0 = j - pl may be negative), and [ow_lo, ow_hi) are the columns for which it is inside.
    """
    g = geometry
    first_row, rows = band
    last_row = kb.add(first_row, rows)
    with compact_for_range(kb, 0, g.channels, name="c") as c:
        x_plane = kb.gep(x, kb.mul(c, g.height * g.width))
        with compact_for_range(kb, 0, g.kernel_h, name="i") as i:
            oh_lo, oh_hi = _inside_outputs(kb, i, g.pad_top, g.stride_h, g.height, g.out_h)
            # Clipped to the band, then made relative to it.
            band_lo = kb.min(kb.max(oh_lo, first_row), last_row)
            band_hi = kb.max(kb.min(oh_hi, last_row), band_lo)
            with compact_for_range(kb, 0, g.kernel_w, name="j") as j:
                ow_lo, ow_hi = _inside_outputs(kb, j, g.pad_left, g.stride_w, g.width, g.out_w)
                iw0 = kb.sub(j, g.pad_left)
                row = kb.add(kb.mul(kb.add(kb.mul(c, g.kernel_h), i), g.kernel_w), j)
                cols_row = kb.gep(cols, kb.mul(row, kb.mul(rows, g.out_w)))
                before_tap(cols_row, kb.sub(band_lo, first_row), kb.sub(band_hi, first_row))
                with compact_for_range(kb, band_lo, band_hi, name="oh") as oh:
                    ih = kb.sub(kb.add(kb.mul(oh, g.stride_h), i), g.pad_top)
                    x_line = kb.gep(x_plane, kb.mul(ih, g.width))
                    cols_line = kb.gep(cols_row, kb.mul(kb.sub(oh, first_row), g.out_w))
                    on_line(cols_line, x_line, iw0, ow_lo, ow_hi)


def _inside_outputs(kb: KernelBuilder, tap: ir.Value, pad: int, stride: int, in_size: int,
                    out_size: int) -> tuple[ir.Value, ir.Value]:
    """[lo, hi): the outputs o in [0, out_size) whose input o*stride + tap - pad is in
    [0, in_size). Empty ranges come out as lo == hi, never lo > hi."""
    def ceil_div_nonnegative(numerator):
        numerator = kb.max(numerator, 0)
        return kb.b.udiv(kb.add(numerator, stride - 1), kb.i64(stride))

    # o*stride >= pad - tap  and  o*stride < in_size + pad - tap
    lo = kb.min(ceil_div_nonnegative(kb.sub(pad, tap)), out_size)
    hi = kb.min(ceil_div_nonnegative(kb.sub(in_size + pad, tap)), out_size)
    return lo, kb.max(hi, lo)


def _lanes_between(kb: KernelBuilder, lo: ir.Value, hi: ir.Value) -> ir.Value:
    """The mask of lanes L with lo <= L < hi (i64 bounds, any sign).

    Compared as i32 vectors: i64 lane vectors take two registers each on AVX2 and made
    instruction selection much slower. The bounds are clamped to [0, width] first, so the
    truncation is exact.
    """
    def lane_bound(value):
        clamped = kb.min(kb.max(value, 0), kb.width)
        return splat_i32(kb, kb.b.trunc(clamped, I32))

    lanes = ir.Constant(ir.VectorType(I32, kb.width), list(range(kb.width)))
    return kb.b.and_(kb.b.icmp_signed(">=", lanes, lane_bound(lo)),
                     kb.b.icmp_signed("<", lanes, lane_bound(hi)))


def splat_i32(kb: KernelBuilder, scalar: ir.Value) -> ir.Value:
    """Broadcast an i32 to <width x i32> (lane indices and offsets: half the registers of
    i64 lanes on AVX2)."""
    vector_type = ir.VectorType(I32, kb.width)
    undefined = ir.Constant(vector_type, ir.Undefined)
    one_lane = kb.b.insert_element(undefined, scalar, ir.Constant(I32, 0))
    return kb.b.shuffle_vector(one_lane, undefined, ir.Constant(vector_type, [0] * kb.width))


# ------------------------------------------------------------------------------- loops

@contextlib.contextmanager
def compact_for_range(kb: KernelBuilder, start, stop, step: int = 1,
                      name: str = "i") -> Iterator[ir.Value]:
    """`kb.for_range`, tagged so that LLVM does not unroll it by a runtime trip count.

    Runtime unrolling copies a loop 4-8 times with remainder loops; on these short loops
    (a few vectors per line) it gained no speed while LLVM's loop strength reduction on the
    copies made im2col's compile time ten times longer (400 ms instead of 35 ms).
    Loops with a constant trip count are still fully unrolled when small.
    """
    with kb.for_range(start, stop, step, name) as index:
        yield index
    back_edge = index.incomings[-1][1].terminator
    back_edge.set_metadata("llvm.loop", _loop_id(kb.module, "llvm.loop.unroll.runtime.disable"))


def _loop_id(module: ir.Module, *properties: str) -> ir.values.MDValue:
    """A new loop ID node, !{self, !{!"property"}...}. LLVM identifies a loop by a node whose
    first operand is itself; llvmlite's add_metadata would share equal nodes between loops,
    so the node is made directly and then pointed at itself."""
    hints = [module.add_metadata([ir.MetaDataString(module, p)]) for p in properties]
    loop_id = ir.values.MDValue(module, hints, name=str(len(module.metadata)))
    loop_id.operands = (loop_id, *hints)
    return loop_id


# ------------------------------------------------------------------------ row primitives
# Runs of `count` floats (an i64 IR value). Unit-stride runs use whole vectors and one masked
# vector for the remainder; strided ones are scalar loops (strided convolutions only).

def _emit_vectors(kb: KernelBuilder, count: ir.Value, body: Callable) -> None:
    """body(index, mask) for each vector of range(count): mask is None for whole vectors
    and the lane mask of the remainder for the last, partial one."""
    whole = kb.b.and_(count, kb.i64(-kb.width))  # width is a power of two
    with compact_for_range(kb, 0, whole, step=kb.width, name="v") as index:
        body(index, None)
    with kb.if_then(kb.b.icmp_signed("<", whole, count)):
        body(whole, kb.lane_mask_dynamic(kb.sub(count, whole)))


def _load(kb: KernelBuilder, ptr: ir.Value, index: ir.Value, mask) -> ir.Value:
    return kb.load_vec(ptr, index) if mask is None else kb.masked_load_vec(ptr, index, mask)


def _store(kb: KernelBuilder, value: ir.Value, ptr: ir.Value, index: ir.Value, mask) -> None:
    if mask is None:
        kb.store_vec(value, ptr, index)
    else:
        kb.masked_store_vec(value, ptr, index, mask)


def emit_fill_zero(kb: KernelBuilder, dst: ir.Value, count: ir.Value) -> None:
    """dst[0:count] = 0."""
    _emit_vectors(kb, count, lambda k, mask: _store(kb, kb.splat(0.0), dst, k, mask))


def _emit_add(kb: KernelBuilder, dst: ir.Value, src: ir.Value, count: ir.Value) -> None:
    """dst[0:count] += src[0:count]."""
    _emit_scatter_add(kb, dst, src, count, 1)


def _emit_gather(kb: KernelBuilder, dst: ir.Value, src: ir.Value, count: ir.Value,
                src_stride: int) -> None:
    """dst[k] = src[k*src_stride] for k < count."""
    if src_stride == 1:
        _emit_vectors(kb, count, lambda k, mask: _store(kb, _load(kb, src, k, mask), dst, k, mask))
        return
    with compact_for_range(kb, 0, count, name="k") as k:
        kb.store(kb.load(src, kb.mul(k, src_stride)), dst, k)


def _emit_scatter_add(kb: KernelBuilder, dst: ir.Value, src: ir.Value, count: ir.Value,
                     dst_stride: int) -> None:
    """dst[k*dst_stride] += src[k] for k < count."""
    if dst_stride == 1:
        def add_vector(k, mask):
            total = kb.fadd(_load(kb, dst, k, mask), _load(kb, src, k, mask))
            _store(kb, total, dst, k, mask)
        _emit_vectors(kb, count, add_vector)
        return
    with compact_for_range(kb, 0, count, name="k") as k:
        index = kb.mul(k, dst_stride)
        kb.store(kb.fadd(kb.load(dst, index), kb.load(src, k)), dst, index)


def _emit_copy_rows(kb: KernelBuilder, dst: ir.Value, dst_stride: int, src: ir.Value,
                    src_stride: int, rows: int, count: int) -> None:
    """dst[r*dst_stride + k] = src[r*src_stride + k] for r < rows, k < count."""
    with compact_for_range(kb, 0, rows, name="r") as r:
        _emit_gather(kb, kb.gep(dst, kb.mul(r, dst_stride)), kb.gep(src, kb.mul(r, src_stride)),
                    kb.i64(count), 1)
