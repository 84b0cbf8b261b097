"""The forward conv2d kernels: output channels in the lanes (`_LanesForward`, also the input
gradient's "as forward" path) or output pixels in the lanes."""
from __future__ import annotations

import dataclasses
from typing import Callable

import llvmlite.ir as ir

from graphc.backend.emit.kernel import Kernel, phase_args, phase_function
from graphc.backend.emit.kernel_builder import KernelBuilder
from graphc.backend.kernels.conv.buffers import (_ceil_div, _emit_copy_zero_tail, _my_samples, _Placement, _round_up,
                                                 _sample, _ScratchLayout, _thread0_phase, emit_fill_zero)
from graphc.backend.kernels.conv.geometry import ConvGeometry, _VectorCover
from graphc.backend.kernels.conv.tiles import (_TILE_ROWS, _call_tile, _call_transpose, _equal_runs, _padded_list,
                                               _row_indices, _Tables, _tile_vectors, _tiles_along,
                                               _zeros)
from graphc.backend.llvm.target import vector_width_f32

# Reduction steps of a channels-in-lanes forward tile per call: a K of at most
# `_MAX_K_UNSPLIT` in one block, a longer one in blocks of at most `_MAX_K_BLOCK`. A
# block's rows of Wt for a tile's channels (K_block x 16 floats) stay in L1 across all its
# pixel tiles, along with the cells of x its 6 pixels broadcast (K_block / 9 channels x 3-4
# rows of x for 3x3 taps): 192 steps are 12 KB of Wt plus ~10-14 KB of x, near the 32 KB
# of L1 (a K of 576 in one block ran far slower; bench/NOTES.md, "Convolutions"). Each
# extra block reloads and stores outT, so a K that fits stays whole (LeNet's conv2, K = 150).
_MAX_K_UNSPLIT = 256
_MAX_K_BLOCK = 128


# ------------------------------------------------------------ forward, channels in lanes

@dataclasses.dataclass(frozen=True)
class _LanesForward:
    """A forward convolution with output channels in the lanes, over samples that
    `placement` lays out as `g`'s padded planes: outT (P, Op) by tiles of 6 pixels x a
    group of channel vectors, summed over blocks of steps (one block up to
    `_MAX_K_UNSPLIT` steps, else blocks of at most `_MAX_K_BLOCK`; the first block
    starting from the bias, relu applied to the last one's sums), then
    transposed into out[n]. Phase 1 (thread 0) packs the weights with `pack` (default: W
    (O, K) transposed into Wt (K, Op)) and the bias (zero-padded to Op)."""

    g: ConvGeometry
    placement: _Placement
    bias: bool = False
    relu: bool = False
    weight_input: int = 1
    pack: Callable | None = None
    # after_sample(kb, out, inputs, n): more work on sample n once out[n] is written (the
    # input gradient's fused epilogue, per-channel sums).
    after_sample: Callable | None = None

    def emit(self, module: ir.Module, name: str, *, n_inputs: int, max_threads: int) -> Kernel:
        g, width = self.g, vector_width_f32()
        O, K, P = g.out_channels, g.patch_size, g.pixels
        lanes = _round_up(O, width)
        tiles = -(-P // _TILE_ROWS)
        layout = _ScratchLayout(shared={"wt": K * lanes, "bias": lanes},
                                private={"x": self.placement.buffer_floats(width),
                                         "outT": tiles * _TILE_ROWS * lanes})
        tables = _Tables(module, name)
        pixels = tables.add("pixels", _padded_list(g.pixel_offsets(), tiles * _TILE_ROWS))
        steps = tables.add("steps", g.tap_offsets())
        blocks = 1 if K <= _MAX_K_UNSPLIT else _ceil_div(K, _MAX_K_BLOCK)
        block = _ceil_div(K, blocks)

        def pack_weights(kb, inputs, scratch):
            wt = layout.shared(kb, scratch, "wt")
            if self.pack is not None:
                self.pack(kb, inputs[self.weight_input], wt, lanes)
            else:
                _call_transpose(kb, inputs[self.weight_input], K, wt, lanes,
                                rows=O, cols=K, lanes=lanes)
            biases = layout.shared(kb, scratch, "bias")
            if self.bias:
                _emit_copy_zero_tail(kb, inputs[2], biases, O, lanes)
            else:
                emit_fill_zero(kb, biases, kb.i64(lanes))

        fn, kb = phase_function(module, f"{name}.compute", n_inputs)
        out, inputs, scratch, tid, nthreads = phase_args(fn)
        wt, biases = layout.shared(kb, scratch, "wt"), layout.shared(kb, scratch, "bias")
        out_t = layout.private(kb, scratch, tid, "outT")
        x_buffer = self.placement.prepare_buffer(kb, layout.private(kb, scratch, tid, "x"))
        with _my_samples(kb, g.batch, tid, nthreads) as n:
            x_n = self.placement.place(kb, _sample(kb, inputs[0], n,
                                                   self.placement.source_floats), x_buffer)
            with kb.for_range(0, blocks, name="block") as index:
                k0 = kb.mul(index, block)
                first = kb.b.icmp_signed("==", index, kb.i64(0))
                last = kb.b.icmp_signed("==", index, kb.i64(blocks - 1))

                def group(ch0, vecs):
                    with kb.for_range(0, tiles, name="tile") as t:
                        p0 = kb.mul(t, _TILE_ROWS)
                        c = kb.gep(out_t, kb.add(kb.mul(p0, lanes), ch0))
                        # Later blocks add to the sums of the earlier ones, kept in outT.
                        select = kb.b.select
                        _call_tile(kb, _TILE_ROWS, vecs, "a", a=x_n, a_rows=kb.gep(pixels, p0),
                                   b=kb.gep(wt, kb.add(kb.mul(k0, lanes), ch0)),
                                   steps=kb.gep(steps, k0), stride=lanes,
                                   n=kb.min(block, kb.sub(K, k0)), c=c, c_row=lanes,
                                   v_step=kb.width, init=select(first, kb.gep(biases, ch0), c),
                                   init_row=select(first, kb.i64(0), kb.i64(lanes)),
                                   init_vec=kb.i64(kb.width),
                                   relu=last if self.relu else False)

                _emit_channel_groups(kb, lanes, group)
            _call_transpose(kb, out_t, lanes, _sample(kb, out, n, O * P), P,
                            rows=P, cols=O, lanes=P)
            if self.after_sample is not None:
                self.after_sample(kb, out, inputs, n)
        kb.b.ret_void()
        pack = _thread0_phase(module, f"{name}.pack", n_inputs, pack_weights)
        return Kernel([pack, fn], layout.total_floats(max_threads))


def _emit_forward_channel_lanes(module: ir.Module, name: str, g: ConvGeometry, *, bias: bool,
                                relu: bool, max_threads: int, after_sample: Callable | None = None,
                                n_inputs: int | None = None) -> Kernel:
    return _LanesForward(g, _Placement.padding_of(g), bias=bias, relu=relu, after_sample=after_sample).emit(
        module, name, n_inputs=n_inputs or (3 if bias else 2), max_threads=max_threads)


def _emit_channel_groups(kb: KernelBuilder, lanes: int,
                         body: Callable[[ir.Value, int], None]) -> None:
    """body(first_channel, vecs) for the channel groups of a tile: `_tile_vectors()`
    vectors each, the last one maybe narrower."""
    vectors = lanes // kb.width
    group = min(_tile_vectors(), vectors)
    with kb.for_range(0, vectors // group, name="group") as index:
        body(kb.mul(index, group * kb.width), group)
    if vectors % group:
        body(kb.i64((vectors - vectors % group) * kb.width), vectors % group)


# -------------------------------------------------------------- forward, pixels in lanes

def _emit_forward_pixel_lanes(module: ir.Module, name: str, g: ConvGeometry, *, bias: bool,
                              relu: bool, max_threads: int, placement: _Placement | None = None,
                              pack_group: Callable | None = None, after_sample: Callable | None = None,
                              n_inputs: int | None = None) -> Kernel:
    """out[o, oh, ow..] by tiles of (up to) 6 output channels x a pair of vectors of one
    output row, broadcasting packed weights Wp[k, r] and reading x at one offset per tap.

    Phase 1 (thread 0): Wp, for the group of `rows` channels from o0, the (K, rows) block
    at o0*K; the bias of channel o splatted into a vector (the initial accumulators).
    Phase 2: per sample, every tile, stored straight into out[n]. Groups come in runs of
    equal sizes (`_equal_runs`: 64 channels are 9 x 6 + 2 x 5), each run an IR loop.

    The input gradient runs this on its own geometry: `placement` lays out its dilated,
    padded g, `pack_group(kb, w, block, o0, rows)` writes a group's block of its flipped,
    transposed weights, and `after_sample(kb, out, inputs, n)` applies its fused epilogue.
    """
    width = vector_width_f32()
    O, K, P = g.out_channels, g.patch_size, g.pixels
    runs = _equal_runs(O, _TILE_ROWS)
    placement = placement or _Placement.padding_of(g)
    layout = _ScratchLayout(shared={"wp": O * K, "bias": O * width},
                            private={"x": placement.buffer_floats(width)})
    tables = _Tables(module, name)
    steps = tables.add("steps", g.tap_offsets())
    n_inputs = n_inputs or (3 if bias else 2)

    def transposed_block(kb, w, block, o0, rows):
        _call_transpose(kb, kb.gep(w, kb.mul(o0, K)), K, block, rows, rows=rows, cols=K, lanes=rows)

    def pack(kb, inputs, scratch):
        wp, biases = layout.shared(kb, scratch, "wp"), layout.shared(kb, scratch, "bias")
        for first, rows, count in runs:
            with kb.for_range(0, count, name="group") as group:
                o0 = kb.add(first, kb.mul(group, rows))
                (pack_group or transposed_block)(kb, inputs[1], kb.gep(wp, kb.mul(o0, K)), o0, rows)
        if bias:
            with kb.for_range(0, O, name="o") as o:
                kb.store_vec(kb.splat(kb.load(inputs[2], o)), biases, kb.mul(o, width))

    fn, kb = phase_function(module, f"{name}.compute", n_inputs)
    out, inputs, scratch, tid, nthreads = phase_args(fn)
    wp, biases = layout.shared(kb, scratch, "wp"), layout.shared(kb, scratch, "bias")
    x_buffer = placement.prepare_buffer(kb, layout.private(kb, scratch, tid, "x"))
    row_indices = _row_indices(module)
    zeros = _zeros(module)
    cover = _VectorCover.of(g.out_w, width)
    with _my_samples(kb, g.batch, tid, nthreads) as n:
        x_n = placement.place(kb, _sample(kb, inputs[0], n, placement.source_floats), x_buffer)
        out_n = _sample(kb, out, n, O * P)
        for first, rows, count in runs:
            with kb.for_range(0, count, name="group") as group:
                o0 = kb.add(first, kb.mul(group, rows))
                init, init_row = ((kb.gep(biases, kb.mul(o0, width)), width) if bias
                                  else (zeros, 0))
                with kb.for_range(0, g.out_h, name="oh") as oh:
                    cover.emit_each(kb, _tiles_along(
                        kb, rows, "b", b=kb.gep(x_n, kb.mul(oh, g.stride_h * g.padded_w)),
                        c=kb.gep(out_n, kb.add(kb.mul(o0, P), kb.mul(oh, g.out_w))),
                        a=kb.gep(wp, kb.mul(o0, K)), a_rows=row_indices, steps=steps,
                        stride=rows, n=kb.i64(K), c_row=P, init=init, init_row=init_row,
                        init_vec=0, relu=relu))
        if after_sample is not None:
            after_sample(kb, out, inputs, n)
    kb.b.ret_void()
    pack_fn = _thread0_phase(module, f"{name}.pack", n_inputs, pack)
    return Kernel([pack_fn, fn], layout.total_floats(max_threads))
