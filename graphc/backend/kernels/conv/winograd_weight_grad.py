"""The weight gradient of a 3x3 stride-1 convolution by Winograd's F(3x3, 2x2).

Over a 2x2 tile t of output pixels, dW gains a 2D correlation of the tile's 4x4 input cells
d[c] with its 2x2 output gradient g[o] as the filter: a 3x3 result, which F(3, 2) computes
from 16 products. Summed over every tile of every sample before transforming back,

    dW[o, c] = A^T [ sum over t of (G g_t[o] G^T) * (B^T d_t[c] B) ] A

so that for each of the 16 positions xi, the sum is a GEMM with the tiles as its reduction:

    S[xi][c, o] = sum over t of D[xi][c, t] * H[xi][t, o]

16 multiply-adds a tile per (c, o) pair against the direct weight gradient's 36.

Phase 1: each thread sums its share of the batch into its own S (16 x C x Op). Per sample,
g[n] is transposed to gT (pixels x Op, as the channels-in-lanes weight gradient does), and
per chunk of tile rows (winograd.py's `_TilePlan`):
  1. D, as the forward transforms its input (tiles minor), with this B^T;
  2. H from gT, vectorised along the output channels (channels minor);
  3. the 16 GEMMs on the shared register tile: 6 input channels broadcast from D x vectors
     of output channels, over the chunk's tiles, adding into S.
G's halves are left out of H and applied to S once (`_H_SCALE`).
Phase 2 (thread 0): adds the threads' S, transforms back into dWt (K x Op) and transposes
it into out (O, K).
"""
from __future__ import annotations

import llvmlite.ir as ir

from graphc.backend.emit.kernel import Kernel, phase_args, phase_function
from graphc.backend.emit.kernel_builder import KernelBuilder
from graphc.backend.kernels.conv.buffers import (_my_samples, _Placement, _round_up, _sample, _ScratchLayout,
                                                 _sum_thread_partials, emit_fill_zero)
from graphc.backend.kernels.conv.forward import _emit_channel_groups
from graphc.backend.kernels.conv.geometry import ConvGeometry, _lanes_efficiency
from graphc.backend.kernels.conv.tiles import _TILE_ROWS, _call_tile, _call_transpose, _equal_runs, _Tables, _tile_function
from graphc.backend.kernels.conv.winograd import (_UNCOUNTED, _cache_stride, _TilePlan, _tiles, _transform,
                                                  _transform_width, winograd_possible)
from graphc.backend.llvm.target import vector_width_f32

__all__ = ["weight_grad_winograd_possible", "weight_grad_winograd_efficiency", "emit_weight_grad_winograd"]

# F(3, 2) with the points 0, 1, -1 and infinity: the rows of B^T, G (without the 1/2 of its
# middle rows: `_H_SCALE`) and A^T as (coefficient, index) terms.
_BT = (((1, 0), (-1, 2)), ((1, 1), (1, 2)), ((-1, 1), (1, 2)), ((-1, 1), (1, 3)))
_G = (((1, 0),), ((1, 0), (1, 1)), ((1, 0), (-1, 1)), ((1, 1),))
_H_SCALE = (1.0, 0.5, 0.5, 1.0)
_AT = (((1, 0), (1, 1), (1, 2)), ((1, 1), (-1, 2)), ((1, 1), (1, 2), (1, 3)))


def weight_grad_winograd_possible(g: ConvGeometry, width: int) -> bool:
    return winograd_possible(g, width)


def _chunk_rows(g: ConvGeometry, width: int) -> int:
    """Rows of tiles per chunk: the fewest that divide the tile rows and hold a vector of
    tiles (the reduction of a GEMM call), else all of them."""
    rows, cols = _tiles(g)
    enough = [d for d in range(1, rows + 1) if rows % d == 0 and d * cols >= width]
    return min(enough) if enough else rows


def weight_grad_winograd_efficiency(g: ConvGeometry, width: int) -> float:
    """As winograd.py's `winograd_efficiency`, with output channels in the lanes: the GEMMs'
    16 C O at the lanes' efficiency, D's transform as the forward's input transform, and H's
    about 32 instructions a tile per vector of output channels."""
    C, O, lanes = g.channels, g.out_channels, _transform_width(g, width)
    made = (16 * C * O / _lanes_efficiency(O, width) + 2 * width * C * (16 / lanes + 1.6) +
            32 * _round_up(O, width))
    return 36 * C * O / made * _UNCOUNTED


def emit_weight_grad_winograd(module: ir.Module, name: str, g: ConvGeometry, *, max_threads: int) -> Kernel:
    width = vector_width_f32()
    plan = _TilePlan(g, _Placement.padding_of(g), _chunk_rows(g, width))
    C, O, K, P, chunk = g.channels, g.out_channels, g.patch_size, g.pixels, plan.chunk
    lanes = _round_up(O, width)
    d_stride, h_stride, s_stride = _cache_stride(C * chunk), _cache_stride(chunk * lanes), _cache_stride(C * lanes)
    layout = _ScratchLayout(shared={"dWt": K * lanes}, private={
        "x": plan.placement.buffer_floats(width), "gT": P * lanes,
        "d": 16 * d_stride, "h": 16 * h_stride, "s": 16 * s_stride})
    tables = _Tables(module, name)
    d_rows = tables.add("rows", [r * chunk for r in range(_TILE_ROWS)])
    h_steps = tables.add("steps", [t * lanes for t in range(chunk)])

    fn, kb = phase_function(module, f"{name}.compute", 2)
    out, (x, grad), scratch, tid, nthreads = phase_args(fn)
    g_t, d, h = (layout.private(kb, scratch, tid, key) for key in ("gT", "d", "h"))
    partial = layout.private(kb, scratch, tid, "s")
    x_buffer = plan.placement.prepare_buffer(kb, layout.private(kb, scratch, tid, "x"))
    # Zeroed even by threads without samples: phase 2 adds every thread's partial.
    emit_fill_zero(kb, partial, kb.i64(16 * s_stride))
    with _my_samples(kb, g.batch, tid, nthreads) as n:
        x_n = plan.placement.place(kb, _sample(kb, x, n, g.sample_floats), x_buffer)
        _call_transpose(kb, _sample(kb, grad, n, O * P), P, g_t, lanes, rows=O, cols=P, lanes=lanes)
        with kb.for_range(0, plan.chunks, name="chunk") as index:
            row0 = kb.mul(index, plan.chunk_rows)
            plan.transform_input(kb, x_n, row0, d, d_stride, _BT)
            _transform_gradient(kb, plan, g_t, row0, h, h_stride, lanes)
            with kb.for_range(0, 16, name="xi") as xi:
                d_xi, h_xi = kb.gep(d, kb.mul(xi, d_stride)), kb.gep(h, kb.mul(xi, h_stride))
                s_xi = kb.gep(partial, kb.mul(xi, s_stride))
                for first, rows, count in _equal_runs(C, _TILE_ROWS):
                    with kb.for_range(0, count, name="group") as group:
                        c0 = kb.add(first, kb.mul(group, rows))

                        def tile(ch0, vecs, c0=c0, rows=rows):
                            c = kb.gep(s_xi, kb.add(kb.mul(c0, lanes), ch0))
                            _call_tile(kb, _tile_function(module, rows, vecs, "b"),
                                       a=kb.gep(d_xi, kb.mul(c0, chunk)), a_rows=d_rows,
                                       b=kb.gep(h_xi, ch0), steps=h_steps, stride=1, n=chunk,
                                       c=c, c_row=lanes, v_step=kb.width, init=c, init_row=lanes,
                                       init_vec=kb.width)

                        _emit_channel_groups(kb, lanes, tile)
    kb.b.ret_void()

    reduce_fn, kb = phase_function(module, f"{name}.reduce", 2)
    out, _, scratch, tid, nthreads = phase_args(reduce_fn)
    with kb.if_then(kb.b.icmp_signed("==", tid, kb.i64(0))):
        total = _sum_thread_partials(kb, layout, scratch, nthreads, "s", 16 * s_stride)
        dw_t = layout.shared(kb, scratch, "dWt")
        scales = [[kb.splat(_H_SCALE[i] * _H_SCALE[j]) for j in range(4)] for i in range(4)]
        with kb.for_range(0, C, name="c") as c:
            with kb.for_range(0, lanes, step=kb.width, name="o") as o:
                at = kb.add(kb.mul(c, lanes), o)
                sums = [[kb.fmul(kb.load_vec(total, kb.add(at, (4 * i + j) * s_stride)), scales[i][j])
                         for j in range(4)] for i in range(4)]
                taps = _transform(kb, _AT, sums)
                for i in range(3):
                    for j in range(3):
                        kb.store_vec(taps[i][j], dw_t, kb.add(kb.mul(kb.add(kb.mul(c, 9), 3 * i + j), lanes), o))
        _call_transpose(kb, dw_t, lanes, out, K, rows=K, cols=O, lanes=K)
    kb.b.ret_void()
    return Kernel([fn, reduce_fn], layout.total_floats(max_threads))


def _transform_gradient(kb: KernelBuilder, plan: _TilePlan, g_t, row0, h, h_stride: int, lanes: int) -> None:
    """h[xi*h_stride + t*lanes + o] = (G g G^T)[xi] for the 2x2 cells g of output channel o
    in the chunk's tile t, from gT (pixels x lanes), a vector of channels at a time."""
    out_w = plan.g.out_w
    with kb.for_range(0, plan.chunk_rows, name="row") as row:
        y = kb.mul(kb.add(row0, row), 2)
        with kb.for_range(0, plan.tile_cols, name="col") as col:
            pixel = kb.add(kb.mul(y, out_w), kb.mul(col, 2))
            tile = kb.add(kb.mul(row, plan.tile_cols), col)
            with kb.for_range(0, lanes, step=kb.width, name="o") as o:
                cells = [[kb.load_vec(g_t, kb.add(kb.mul(kb.add(pixel, a * out_w + b), lanes), o))
                          for b in range(2)] for a in range(2)]
                transformed = _transform(kb, _G, cells)
                for xi in range(16):
                    kb.store_vec(transformed[xi // 4][xi % 4], h,
                                 kb.add(kb.add(kb.mul(tile, lanes), o), xi * h_stride))
