"""The conv2d weight-gradient kernels: output channels in the lanes, or dot products over
wide rows with pixels in the lanes."""
from __future__ import annotations

import llvmlite.ir as ir

from graphc.backend.emit.kernel import Kernel, phase_args, phase_function
from graphc.backend.kernels.conv.buffers import (_my_samples, _Placement, _round_up, _sample, _ScratchLayout,
                                                 _sum_thread_partials, emit_fill_zero)
from graphc.backend.kernels.conv.forward import _emit_channel_groups
from graphc.backend.kernels.conv.geometry import ConvGeometry
from graphc.backend.kernels.conv.tiles import (_TILE_ROWS, _balanced, _call_tile, _call_transpose, _dot_function,
                                               _equal_runs, _padded_list, _Tables)
from graphc.backend.kernels.reduce import horizontal_sum
from graphc.backend.llvm.target import vector_width_f32

# Most pixels per weight-gradient block: the block's rows of gT for a tile's channels
# (256 x 16 floats, 16 KB) stay in L1 across all the tiles of taps.
_MAX_P_BLOCK = 256


# ---------------------------------------------------------------------- weight gradient

def _emit_weight_grad_channel_lanes(module: ir.Module, name: str, g: ConvGeometry, *,
                                    max_threads: int) -> Kernel:
    """dW with output channels in the lanes.

    Phase 1: each thread sums, over its share of the batch, its own partial dWt (K, Op):
    per sample, gT = g[n]^T (P, Op), then tiles of (up to) 6 taps x a group of channel
    vectors, summed over blocks of at most `_MAX_P_BLOCK` pixels. Taps are cut into tiles
    of balanced sizes (27 = 6 + 6 + 5 + 5 + 5): 5 tiles of 6 with 3 padding rows were
    slower on the conv net's first layer (bench/NOTES.md). Phase 2 (thread 0): adds the
    partials and transposes the sum into out (O, K).
    """
    width = vector_width_f32()
    O, K, P = g.out_channels, g.patch_size, g.pixels
    lanes = _round_up(O, width)
    layout = _ScratchLayout(shared={}, private={
        "x": _Placement.padding_of(g).buffer_floats(width), "gT": P * lanes,
        "dWt": K * lanes})
    tables = _Tables(module, name)
    taps = tables.add("taps", g.tap_offsets())
    steps = tables.add("steps", g.pixel_offsets())
    placement = _Placement.padding_of(g)
    blocks = -(-P // _MAX_P_BLOCK)
    block = -(-P // blocks)

    fn, kb = phase_function(module, f"{name}.compute", 2)
    out, (x, grad), scratch, tid, nthreads = phase_args(fn)
    g_t = layout.private(kb, scratch, tid, "gT")
    partial = layout.private(kb, scratch, tid, "dWt")
    x_buffer = placement.prepare_buffer(kb, layout.private(kb, scratch, tid, "x"))
    # Zeroed even by threads without samples: phase 2 adds every thread's partial.
    emit_fill_zero(kb, partial, kb.i64(K * lanes))
    with _my_samples(kb, g.batch, tid, nthreads) as n:
        x_n = placement.place(kb, _sample(kb, x, n, g.sample_floats), x_buffer)
        _call_transpose(kb, _sample(kb, grad, n, O * P), P, g_t, lanes,
                        rows=O, cols=P, lanes=lanes)
        with kb.for_range(0, blocks, name="block") as index:
            p0 = kb.mul(index, block)

            def group(ch0, vecs):
                for first, rows, count in _equal_runs(K, _TILE_ROWS):
                    with kb.for_range(0, count, name="tile") as t:
                        k0 = kb.add(first, kb.mul(t, rows))
                        c = kb.gep(partial, kb.add(kb.mul(k0, lanes), ch0))
                        _call_tile(kb, rows, vecs, "a", a=x_n, a_rows=kb.gep(taps, k0),
                                   b=kb.gep(g_t, kb.add(kb.mul(p0, lanes), ch0)),
                                   steps=kb.gep(steps, p0), stride=lanes,
                                   n=kb.min(block, kb.sub(P, p0)), c=c, c_row=lanes,
                                   v_step=kb.width, init=c, init_row=lanes,
                                   init_vec=kb.width)

            _emit_channel_groups(kb, lanes, group)
    kb.b.ret_void()

    reduce_fn, kb = phase_function(module, f"{name}.reduce", 2)
    out, _, scratch, tid, nthreads = phase_args(reduce_fn)
    with kb.if_then(kb.b.icmp_signed("==", tid, kb.i64(0))):
        total = _sum_thread_partials(kb, layout, scratch, nthreads, "dWt", K * lanes)
        _call_transpose(kb, total, lanes, out, K, rows=K, cols=O, lanes=K)
    kb.b.ret_void()
    return Kernel([fn, reduce_fn], layout.total_floats(max_threads))


def _emit_weight_grad_pixel_lanes(module: ir.Module, name: str, g: ConvGeometry, *,
                                  max_threads: int) -> Kernel:
    """dW by dot products over wide rows (stride 1): per sample, gw = g[n] with its rows
    padded to x's padded width Wp by zeros, then for every group of (up to) 6 channels and
    pair of taps, acc[o][t] += gw[o, q:q+W] * x[q + tap(t) : +W] over all q: the zeros of
    gw cancel the products of its extra columns. The lanes of acc are partial sums.

    Phase 1: each thread keeps its own partial vectors (Kp, rows, W). Phase 2 (thread 0):
    sums them over threads and lanes into out.
    """
    width = vector_width_f32()
    O, K = g.out_channels, g.patch_size
    groups = _balanced(O, _TILE_ROWS)
    rows = _round_up(O, groups[0][1])
    taps_rows = _round_up(K, 2)
    wide = g.out_h * g.padded_w
    vectors = -(-wide // width)
    # x is read up to a vector and a tap row past its last padded row.
    x_placement = _Placement.padding_of(g, always=True, margin=g.kernel_w + width)
    g_placement = _Placement(channels=O, src_h=g.out_h, src_w=g.out_w, dst_h=g.out_h,
                             dst_w=g.padded_w, step_y=1, step_x=1, first_y=0, first_x=0,
                             always=True)
    g_plane = g.out_h * g.padded_w + width
    layout = _ScratchLayout(shared={}, private={
        "x": x_placement.buffer_floats(width),
        "gw": O * g_plane + width, "dWv": taps_rows * rows * width})
    tables = _Tables(module, name)
    taps = tables.add("taps", _padded_list(g.tap_offsets(), taps_rows))
    g_rows = tables.add("grows", [o * g_plane for o in range(rows)])

    fn, kb = phase_function(module, f"{name}.compute", 2)
    out, (x, grad), scratch, tid, nthreads = phase_args(fn)
    partial = layout.private(kb, scratch, tid, "dWv")
    x_buffer = x_placement.prepare_buffer(kb, layout.private(kb, scratch, tid, "x"))
    g_buffer = layout.private(kb, scratch, tid, "gw")
    # The copies of g[n] only write its rows; the extra columns stay zero.
    emit_fill_zero(kb, g_buffer, kb.i64(O * g_plane + width))
    emit_fill_zero(kb, partial, kb.i64(taps_rows * rows * width))
    with _my_samples(kb, g.batch, tid, nthreads) as n:
        x_n = x_placement.place(kb, _sample(kb, x, n, g.sample_floats), x_buffer)
        g_placement.place(kb, _sample(kb, grad, n, O * g.pixels), g_buffer, stride=g_plane)
        for o0, group_rows in groups:
            dot_fn = _dot_function(module, group_rows, 2)
            with kb.for_range(0, taps_rows // 2, name="taps") as t:
                k0 = kb.mul(t, 2)
                c = kb.gep(partial, kb.mul(kb.add(kb.mul(k0, rows), o0), width))
                kb.b.call(dot_fn, [g_buffer, kb.gep(g_rows, o0), x_n, kb.gep(taps, k0),
                                   kb.i64(vectors), c, kb.i64(width), kb.i64(rows * width)])
    kb.b.ret_void()

    reduce_fn, kb = phase_function(module, f"{name}.reduce", 2)
    out, _, scratch, tid, nthreads = phase_args(reduce_fn)
    with kb.if_then(kb.b.icmp_signed("==", tid, kb.i64(0))):
        total = _sum_thread_partials(kb, layout, scratch, nthreads, "dWv", taps_rows * rows * width)
        with kb.for_range(0, O, name="o") as o:
            with kb.for_range(0, K, name="k") as k:
                vector = kb.load_vec(total, kb.mul(kb.add(kb.mul(k, rows), o), width))
                # The thread partials were summed as vectors; their lanes sum here.
                kb.store(horizontal_sum(kb, vector), out, kb.add(kb.mul(o, K), k))
    kb.b.ret_void()
    return Kernel([fn, reduce_fn], layout.total_floats(max_threads))
