"""The weight gradient of a 3x3 stride-1 convolution by Winograd's minimal filtering.

Over an m x m tile t of output pixels, dW gains the 2D correlation of the tile's n x n input
cells d[c] (n = m + 2) with its output gradient g[o] as the filter: a 3x3 result. That is
the transpose of the forward's F(m x m, 3 x 3): the tile's contribution to sum over k of
dW[k] w[k] is g . A^T [(G w) * (B^T d)], whose gradient in w is G^T [(A g) * (B^T d)]. Summed
over every tile of every sample before transforming back,

    dW[o, c] = G^T [ sum over t of (A g_t[o] A^T) * (B^T d_t[c] B) ] G

with the forward's matrices (winograd.py's F2 and F4): for each of the n^2 positions xi, the
sum is a GEMM with the tiles as its reduction,

    S[xi][c, o] = sum over t of D[xi][c, t] * H[xi][t, o]

n^2 multiply-adds a tile per (c, o) pair against the direct weight gradient's 9 m^2.

Phase 1: each thread sums its share of the batch into its own S (n^2 x C x Op). Per sample,
g[n] is transposed to gT (pixels x Op, as the channels-in-lanes weight gradient does), and
per chunk of tile rows (winograd.py's `_TilePlan`):
  1. D, as the forward transforms its input (tiles minor);
  2. H from gT, vectorised along the output channels (channels minor);
  3. the n^2 GEMMs on the shared register tile: 6 input channels broadcast from D x vectors
     of output channels, over the chunk's tiles, adding into S.
Phase 2: threads split the input channels, add the threads' S rows of theirs and transform
them back into dWt (K x Op); phase 3 (thread 0) transposes dWt into out (O, K).
"""
from __future__ import annotations

import llvmlite.ir as ir

from graphc.backend.emit.kernel import Kernel, phase_args, phase_function
from graphc.backend.emit.kernel_builder import KernelBuilder
from graphc.backend.kernels.conv.buffers import (_my_samples, _Placement, _round_up, _sample, _ScratchLayout,
                                                 emit_fill_zero)
from graphc.backend.kernels.conv.forward import _emit_channel_groups
from graphc.backend.kernels.conv.geometry import ConvGeometry, _lanes_efficiency
from graphc.backend.kernels.conv.tiles import _TILE_ROWS, _call_tile, _call_transpose, _equal_runs, _Tables
from graphc.backend.kernels.conv.winograd import (_UNCOUNTED, F2, _cache_stride, _Scheme, _TilePlan, _tiles, _transform,
                                                  _transform_width, winograd_possible)
from graphc.backend.llvm.target import vector_width_f32

__all__ = ["weight_grad_winograd_possible", "weight_grad_winograd_efficiency", "emit_weight_grad_winograd"]


def weight_grad_winograd_possible(g: ConvGeometry, width: int, scheme: _Scheme = F2) -> bool:
    return winograd_possible(g, width, scheme)


def _chunk_rows(g: ConvGeometry, width: int, m: int) -> int:
    """Rows of tiles per chunk: the fewest that divide the tile rows and hold a vector of
    tiles (the reduction of a GEMM call), else all of them."""
    rows, cols = _tiles(g, m)
    enough = [d for d in range(1, rows + 1) if rows % d == 0 and d * cols >= width]
    return min(enough) if enough else rows


def weight_grad_winograd_efficiency(g: ConvGeometry, width: int, scheme: _Scheme = F2) -> float:
    """As winograd.py's `winograd_efficiency`, with output channels in the lanes: the GEMMs'
    n^2 C O at the lanes' efficiency, D's transform as the forward's input transform, and H's
    about 2 n^2 instructions a tile per vector of output channels."""
    m, n = scheme.m, scheme.n
    C, O, lanes = g.channels, g.out_channels, _transform_width(g, width, m)
    made = (n * n * C * O / _lanes_efficiency(O, width) +
            2 * width * C * n * n / 16 * (16 / lanes + 1.6) * m / 2 + 2 * n * n * _round_up(O, width))
    return 9 * m * m * C * O / made * _UNCOUNTED


def _transposed(rows, columns: int) -> tuple:
    """A matrix given as rows of (coefficient, index) terms, transposed (same form)."""
    return tuple(tuple((coefficient, i) for i, terms in enumerate(rows) for coefficient, index in terms
                       if index == j) for j in range(columns))


def emit_weight_grad_winograd(module: ir.Module, name: str, g: ConvGeometry, *, max_threads: int,
                              scheme: _Scheme = F2) -> Kernel:
    width = vector_width_f32()
    m, n = scheme.m, scheme.n
    positions = n * n
    gradient_rows, output_rows = _transposed(scheme.at, n), _transposed(scheme.g, 3)
    # F4 reads past a row's end (winograd.py): x is copied, with a margin.
    plan = _TilePlan(g, _Placement.padding_of(g, always=m > 2, margin=m), _chunk_rows(g, width, m), m=m)
    C, O, K, P, chunk = g.channels, g.out_channels, g.patch_size, g.pixels, plan.chunk
    lanes = _round_up(O, width)
    d_stride, h_stride, s_stride = _cache_stride(C * chunk), _cache_stride(chunk * lanes), _cache_stride(C * lanes)
    layout = _ScratchLayout(shared={"dWt": K * lanes}, private={
        "x": plan.placement.buffer_floats(width), "gT": P * lanes,
        "d": positions * d_stride, "h": positions * h_stride, "s": positions * s_stride})
    tables = _Tables(module, name)
    d_rows = tables.add("rows", [r * chunk for r in range(_TILE_ROWS)])
    h_steps = tables.add("steps", [t * lanes for t in range(chunk)])

    fn, kb = phase_function(module, f"{name}.compute", 2)
    out, (x, grad), scratch, tid, nthreads = phase_args(fn)
    g_t, d, h = (layout.private(kb, scratch, tid, key) for key in ("gT", "d", "h"))
    partial = layout.private(kb, scratch, tid, "s")
    x_buffer = plan.placement.prepare_buffer(kb, layout.private(kb, scratch, tid, "x"))
    # Zeroed even by threads without samples: phase 2 adds every thread's partial.
    emit_fill_zero(kb, partial, kb.i64(positions * s_stride))
    with _my_samples(kb, g.batch, tid, nthreads) as sample:
        x_n = plan.placement.place(kb, _sample(kb, x, sample, g.sample_floats), x_buffer)
        _call_transpose(kb, _sample(kb, grad, sample, O * P), P, g_t, lanes, rows=O, cols=P, lanes=lanes)
        with kb.for_range(0, plan.chunks, name="chunk") as index:
            row0 = kb.mul(index, plan.chunk_rows)
            plan.transform_input(kb, x_n, row0, d, d_stride, scheme.bt)
            _transform_gradient(kb, plan, gradient_rows, g_t, row0, h, h_stride, lanes)
            with kb.for_range(0, positions, name="xi") as xi:
                d_xi, h_xi = kb.gep(d, kb.mul(xi, d_stride)), kb.gep(h, kb.mul(xi, h_stride))
                s_xi = kb.gep(partial, kb.mul(xi, s_stride))
                for first, rows, count in _equal_runs(C, _TILE_ROWS):
                    with kb.for_range(0, count, name="group") as group:
                        c0 = kb.add(first, kb.mul(group, rows))

                        def tile(ch0, vecs, c0=c0, rows=rows):
                            c = kb.gep(s_xi, kb.add(kb.mul(c0, lanes), ch0))
                            _call_tile(kb, rows, vecs, "b",
                                       a=kb.gep(d_xi, kb.mul(c0, chunk)), a_rows=d_rows,
                                       b=kb.gep(h_xi, ch0), steps=h_steps, stride=1, n=chunk,
                                       c=c, c_row=lanes, v_step=kb.width, init=c, init_row=lanes,
                                       init_vec=kb.width)

                        _emit_channel_groups(kb, lanes, tile)
    kb.b.ret_void()

    # Threads split the input channels: each adds every thread's S rows of its channels
    # into thread 0's and transforms them into dWt.
    reduce_fn, kb = phase_function(module, f"{name}.reduce", 2)
    out, _, scratch, tid, nthreads = phase_args(reduce_fn)
    total, dw_t = layout.private(kb, scratch, kb.i64(0), "s"), layout.shared(kb, scratch, "dWt")
    with kb.for_range(*kb.split_range(C, tid, nthreads), name="c") as c:
        with kb.for_range(0, lanes, step=kb.width, name="o") as o:
            at = kb.add(kb.mul(c, lanes), o)
            for xi in range(positions):
                cell = kb.add(at, xi * s_stride)
                with kb.for_range(1, nthreads, name="thread") as thread:
                    other = layout.private(kb, scratch, thread, "s")
                    kb.store_vec(kb.fadd(kb.load_vec(total, cell), kb.load_vec(other, cell)), total, cell)
            sums = [[kb.load_vec(total, kb.add(at, (n * i + j) * s_stride)) for j in range(n)] for i in range(n)]
            taps = _transform(kb, output_rows, sums)
            for i in range(3):
                for j in range(3):
                    kb.store_vec(taps[i][j], dw_t, kb.add(kb.mul(kb.add(kb.mul(c, 9), 3 * i + j), lanes), o))
    kb.b.ret_void()
    transpose, kb = phase_function(module, f"{name}.transpose", 2)
    out, _, scratch, tid, _ = phase_args(transpose)
    with kb.if_then(kb.b.icmp_signed("==", tid, kb.i64(0))):
        _call_transpose(kb, layout.shared(kb, scratch, "dWt"), lanes, out, K, rows=K, cols=O, lanes=K)
    kb.b.ret_void()
    return Kernel([fn, reduce_fn, transpose], layout.total_floats(max_threads))


def _transform_gradient(kb: KernelBuilder, plan: _TilePlan, rows, g_t, row0, h, h_stride: int,
                        lanes: int) -> None:
    """h[xi*h_stride + t*lanes + o] = (A g A^T)[xi] (rows: A's) for the m x m cells g of output
    channel o in the chunk's tile t, from gT (pixels x lanes), a vector of channels at a time."""
    out_w, m, n = plan.g.out_w, plan.m, len(rows)
    with kb.for_range(0, plan.chunk_rows, name="row") as row:
        y = kb.mul(kb.add(row0, row), m)
        with kb.for_range(0, plan.tile_cols, name="col") as col:
            pixel = kb.add(kb.mul(y, out_w), kb.mul(col, m))
            tile = kb.add(kb.mul(row, plan.tile_cols), col)
            with kb.for_range(0, lanes, step=kb.width, name="o") as o:
                cells = [[kb.load_vec(g_t, kb.add(kb.mul(kb.add(pixel, a * out_w + b), lanes), o))
                          for b in range(m)] for a in range(m)]
                transformed = _transform(kb, rows, cells)
                for xi in range(n * n):
                    kb.store_vec(transformed[xi // n][xi % n], h,
                                 kb.add(kb.add(kb.mul(tile, lanes), o), xi * h_stride))
